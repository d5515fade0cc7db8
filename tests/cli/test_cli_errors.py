"""Errors that name their cause (issue 21): every command's failure is one line on stderr,
``flare-async COMMAND: error: ...``, with the documented exit status; a traceback only with
``flare-async --debug``. Real processes, as a person or a script runs them."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flare_async.cli._main import describe
from flare_async.cli._provision import as_flags
from flare_async.errors import ConfigError, ConnectError
from flare_async.security import provision


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flare_async", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def one_error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The one line that says what went wrong (and nothing that looks like a traceback)."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"flare-async {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that a listening socket holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def topology(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path


def test_up_names_a_missing_topology_file(tmp_path: Path) -> None:
    done = cli("up", str(tmp_path / "nope.toml"))
    assert done.returncode == 1
    line = one_error_line(done, "up")
    assert "nope.toml" in line
    assert "No such file" in line


def test_up_names_a_toml_syntax_error_with_its_line(tmp_path: Path) -> None:
    done = cli("up", str(topology(tmp_path, 'project = "p"\n[server\n')))
    assert done.returncode == 1
    line = one_error_line(done, "up")
    assert "topology.toml" in line
    assert "line 2" in line


def test_up_names_a_url_with_a_scheme_it_cannot_provision(tmp_path: Path) -> None:
    path = topology(tmp_path, 'project = "p"\n[server]\nlisten = ["tcpx://127.0.0.1:1"]\n')
    done = cli("up", str(path))
    assert done.returncode == 1
    line = one_error_line(done, "up")
    assert "tcpx://127.0.0.1:1" in line
    assert "tls:// or wss://" in line


def test_up_names_a_parent_nobody_listens_on(tmp_path: Path) -> None:
    path = topology(
        tmp_path,
        'project = "p"\n[server]\nlisten = ["tls://127.0.0.1:18999"]\n'
        '[[clients]]\nname = "server.site-1"\nparent = "tls://127.0.0.1:18998"\n',
    )
    done = cli("up", str(path))
    assert done.returncode == 1
    line = one_error_line(done, "up")
    assert "tls://127.0.0.1:18998" in line
    # The same input gives provision the same line.
    again = cli("provision", str(path), "-o", str(tmp_path / "kits"))
    assert again.returncode == 1
    assert one_error_line(again, "provision").split(": error: ")[1] == line.split(": error: ")[1]


def test_debug_adds_the_traceback_before_the_line(tmp_path: Path) -> None:
    done = cli("--debug", "up", str(tmp_path / "nope.toml"))
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("flare-async up: error: cannot read")


def test_run_on_a_port_in_use_says_so_in_one_line(tmp_path: Path, busy_port: int) -> None:
    path = topology(
        tmp_path, f'project = "p"\n[server]\nlisten = ["tls://127.0.0.1:{busy_port}"]\n'
    )
    provision(path, tmp_path / "kits", now=datetime.now(UTC))
    done = cli("run", str(tmp_path / "kits" / "server"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("flare-async run:")]
    assert done.stderr.splitlines()[-1] == line
    assert f"127.0.0.1:{busy_port}" in line
    assert "address already in use" in line.lower()
    assert "another process listens there" in line


@pytest.mark.slow  # up starts two cells as processes
def test_up_shows_the_error_of_a_cell_that_failed(tmp_path: Path, busy_port: int) -> None:
    url = f"tls://127.0.0.1:{busy_port}"
    path = topology(
        tmp_path,
        f'project = "p"\n[server]\nlisten = ["{url}"]\n'
        f'[[clients]]\nname = "server.site-1"\nparent = "{url}"\n',
    )
    done = cli("up", str(path), "--workdir", str(tmp_path / "work"), "--grace", "5")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    (line,) = [x for x in done.stderr.splitlines() if "exited with status" in x]
    assert line.startswith("flare-async up: error: server exited with status 1: ")
    assert "flare-async run: error: ConnectError: cannot listen on " + url in line
    assert "address already in use" in line.lower()
    assert str(tmp_path / "work" / "logs" / "server.log") in line


def test_provision_names_its_flags_not_python_arguments(tmp_path: Path) -> None:
    path = topology(tmp_path, 'project = "p"\n[server]\nlisten = ["tls://127.0.0.1:18999"]\n')
    kits = tmp_path / "kits"
    assert cli("provision", str(path), "-o", str(kits)).returncode == 0
    again = cli("provision", str(path), "-o", str(kits))
    assert again.returncode == 1
    line = one_error_line(again, "provision")
    assert "use --add-site NAME to add one" in line
    assert "or --force to re-provision everything" in line
    assert "add_site" not in line
    args = ["provision", "--add-site", "server.site-1", "--parent", "tls://127.0.0.1:18999"]
    assert cli(*args, "-o", str(kits)).returncode == 0
    twice = cli(*args, "-o", str(kits))
    assert twice.returncode == 1
    assert "--force replaces it" in one_error_line(twice, "provision")


def test_as_flags_leaves_other_words_alone() -> None:
    assert as_flags("x; force overwrites it") == "x; --force overwrites it"
    assert as_flags("the enforced rule, --force stays") == "the enforced rule, --force stays"


def test_a_usage_error_exits_2(tmp_path: Path) -> None:
    done = cli("provision", "-o", str(tmp_path / "kits"))
    assert done.returncode == 2
    assert one_error_line(done, "provision").endswith(
        "give a PROJECT file, or --add-site NAME --parent URL"
    )
    unknown = cli("up")
    assert unknown.returncode == 2
    assert "the following arguments are required: topology" in unknown.stderr


def test_audit_verify_names_a_missing_log(tmp_path: Path) -> None:
    done = cli("audit", "verify", str(tmp_path / "audit.jsonl"))
    assert done.returncode == 1
    line = one_error_line(done, "audit verify")
    assert line.endswith(f"no such file or directory: {tmp_path / 'audit.jsonl'}")


def test_describe_maps_causes_to_statuses() -> None:
    assert describe(ConfigError("bad")) == (1, "error: bad")
    assert describe(KeyboardInterrupt()) == (130, "interrupted")
    # Task groups wrap what failed: the leaf decides (an interrupt first).
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    status, line = describe(ExceptionGroup("x", [in_use]))
    assert status == 1
    assert "another process listens there" in line
    group = BaseExceptionGroup("x", [ConnectError("no"), KeyboardInterrupt()])
    assert describe(group) == (130, "interrupted")
    status, line = describe(ZeroDivisionError("boom"))
    assert status == 1
    assert line.startswith("internal error: ZeroDivisionError: boom; ")
    assert "--debug" in line
