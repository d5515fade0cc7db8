"""``flare-async send`` into ``flare-async run --inbox``: real processes, mutual TLS, a file
streamed through the server to a site's inbox, with its progress shown and refusals named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flare_async.cli._progress import ProgressBar, render
from flare_async.cli._run import inbox_for
from flare_async.cli._send import safe_name
from flare_async.errors import BadRequest
from flare_async.security import load_kit, provision
from flare_async.streaming import Progress
from flare_async.testing import free_ports
from tests._procs import Proc

ROOT = Path(__file__).resolve().parents[2]


def send(
    kits: Path, file: Path, *extra: str, kit: str = "server.ops"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "flare_async", "send", str(kits / kit), str(file), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.slow  # a deployment: server, site and sender as processes
def test_send_streams_a_file_into_an_inbox(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    project = tmp_path / "project.toml"
    project.write_text(f"""
project = "send"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:{port}"]
[[clients]]
name = "server.site-1"
parent = "tls://127.0.0.1:{port}"
[[clients]]
name = "server.ops"
parent = "tls://127.0.0.1:{port}"
[[clients]]
name = "server.other"
parent = "tls://127.0.0.1:{port}"
""")
    kits = tmp_path / "kits"
    provision(project, kits, now=datetime.now(UTC))
    # The site's policy holds for its inbox also when it runs without --jobs.
    (kits / "server.site-1" / "policy.toml").write_text('[accept]\n"files/*" = ["server.ops"]\n')
    inbox = tmp_path / "inbox"
    data = os.urandom(3 << 20) + b"end"
    src = tmp_path / "round-7.bin"
    src.write_bytes(data)
    procs: list[Proc] = []
    try:
        server = Proc("server", kits / "server", tmp_path / "server.log", [])
        procs.append(server)
        site = Proc("site", kits / "server.site-1", tmp_path / "site.log", ["--inbox", str(inbox)])
        procs.append(site)
        site.wait_for("link-up", role="parent")
        done = send(kits, src, "--to", "server.site-1")
        assert done.returncode == 0, done.stderr
        events = [json.loads(line) for line in done.stdout.splitlines()]
        (result,) = [e for e in events if e["event"] == "sent"]  # after link-up/down events
        assert result["stored"] == len(data)
        assert (inbox / "round-7.bin").read_bytes() == data
        assert "round-7.bin" in done.stderr
        assert "100.0%" in done.stderr
        assert site.wait_for("stored", name="round-7.bin")["size"] == len(data)
        # A name that would leave the inbox is refused by name, and nothing is written.
        bad = send(kits, src, "--to", "server.site-1", "--name", "../escape.bin")
        assert bad.returncode == 1
        assert "BadRequest" in bad.stderr
        assert not (tmp_path / "escape.bin").exists()
        nobody = send(kits, src, "--to", "server.nobody")
        assert nobody.returncode == 1
        assert "Unreachable" in nobody.stderr
        other = send(kits, src, "--to", "server.site-1", "--name", "o.bin", kit="server.other")
        assert other.returncode == 1
        assert other.stderr.strip().splitlines()[-1] == (
            "flare-async send: error: Unauthorized: server.site-1's policy does not accept files "
            "from server.other (reported by server.site-1); its admins.toml or policy.toml "
            "decides who may"
        )
        assert sorted(p.name for p in inbox.iterdir()) == ["round-7.bin"]
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.mark.parametrize(
    "name", ["../x", "a/b", ".hidden", "x.part", "", "..", "a\\b", "a\x00", "x" * 256]
)
def test_inbox_names_that_are_refused(name: str) -> None:
    with pytest.raises(BadRequest):
        safe_name(name)


def test_an_inbox_name_at_the_length_limit_is_taken() -> None:
    assert safe_name("x" * 255) == "x" * 255


def test_where_a_cell_takes_files(tmp_path: Path) -> None:
    (tmp_path / "project.toml").write_text(
        'project = "inbox"\norg = "example.org"\n[server]\nlisten = ["tls://127.0.0.1:1"]\n'
        '[[clients]]\nname = "server.site-1"\nparent = "tls://127.0.0.1:1"\n'
    )
    kits = tmp_path / "kits"
    provision(tmp_path / "project.toml", kits, now=datetime.now(UTC))
    site, server = (load_kit(kits / n, now=datetime.now(UTC)) for n in ("server.site-1", "server"))
    jobs, elsewhere = Path("/j"), Path("/in")
    assert inbox_for(site, None, jobs) == jobs / "inbox"  # a site with a jobs folder
    assert inbox_for(site, elsewhere, jobs) == elsewhere  # --inbox wins
    assert inbox_for(site, elsewhere, jobs, none=True) is None  # --no-inbox wins over all
    assert inbox_for(site, None, None) is None  # no jobs folder: none unless asked
    assert inbox_for(server, None, jobs) is None  # only a site takes files by default
    assert inbox_for(server, elsewhere, jobs) == elsewhere


def test_progress_lines() -> None:
    p = Progress(
        peer="server.site-1", sid=1, done=512 << 20, total=1 << 30, elapsed=1.0, rate=512 << 20
    )
    line = render("model.bin", p)
    assert "50.0%" in line
    assert "512.0 MiB/1.0 GiB" in line
    assert "ETA 00:01" in line
    assert "%" not in render("stream", Progress("x", 1, 10, None, 1.0, 10.0))

    class Out:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    now = [0.0]
    out = Out()
    bar = ProgressBar(out, "m", plain_every=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for t in range(12):
        now[0] = float(t)
        bar.update(Progress("x", 1, t, 11, float(t), 1.0))
    bar.finish()
    assert out.text.count("\n") == 4  # at 0, 5 and 10 s, and the final line
