"""``flare-async send`` from the admin's kit to a site of a deployment started as ``flare-async
up`` starts it (``run KIT --jobs JOBS``, no ``--inbox``): real processes, mutual TLS, the file
in the site's default inbox, a name already there refused unless ``--overwrite``."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flare_async.security import admin_cell_name, provision
from flare_async.testing import free_ports
from tests._procs import Proc
from tests.cli.test_cli_send import send


def sent(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert done.returncode == 0, done.stderr
    events: list[dict[str, object]] = [json.loads(line) for line in done.stdout.splitlines()]
    (result,) = [e for e in events if e["event"] == "sent"]
    return result


@pytest.mark.slow  # a deployment: server, site and senders as processes
def test_an_admin_sends_a_file_to_a_site_of_an_up_deployment(tmp_path: Path) -> None:
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
[[admins]]
name = "admin@example.org"
""")
    kits = tmp_path / "kits"
    provision(project, kits, now=datetime.now(UTC))
    admin = "admin@example.org"
    # The site takes files from admins only (their sessions' names), not from other cells.
    session = admin_cell_name("server", "admin@example.org")
    (kits / "server.site-1" / "policy.toml").write_text(
        '[accept]\n"files/*" = ["server._admin-*"]\n'
    )
    jobs = tmp_path / "jobs"
    inbox = jobs / "server.site-1" / "inbox"
    first, second, third = (tmp_path / n for n in ("a", "b", "c"))
    for path, size in ((first, 3 << 20), (second, 1 << 20), (third, 2 << 20)):
        path.mkdir()
        (path / "round-7.bin").write_bytes(os.urandom(size))
    procs: list[Proc] = []
    try:
        server = Proc(
            "server", kits / "server", tmp_path / "server.log", ["--jobs", str(jobs / "server")]
        )
        procs.append(server)
        site = Proc(
            "site",
            kits / "server.site-1",
            tmp_path / "site.log",
            ["--jobs", str(jobs / "server.site-1")],
        )
        procs.append(site)
        site.wait_for("link-up", role="parent")  # (before or after "ready": not waited for)

        done = send(kits, first / "round-7.bin", "--to", "server.site-1", kit=admin)
        assert sent(done)["stored"] == 3 << 20
        assert (inbox / "round-7.bin").read_bytes() == (first / "round-7.bin").read_bytes()
        stored = site.wait_for("stored", name="round-7.bin")
        assert (stored["src"], stored["replaced"]) == (session, False)

        # The same name again: refused in one line at the sender, the file there untouched.
        again = send(kits, second / "round-7.bin", "--to", "server.site-1", kit=admin)
        assert again.returncode == 1
        last = again.stderr.strip().splitlines()[-1]
        assert last == (
            "flare-async send: error: BadRequest: round-7.bin is already in server.site-1's inbox; "
            "send it with --overwrite to replace it (reported by server.site-1)"
        )
        assert (inbox / "round-7.bin").read_bytes() == (first / "round-7.bin").read_bytes()

        # With --overwrite it replaces the file.
        done = send(kits, third / "round-7.bin", "--to", "server.site-1", "--overwrite", kit=admin)
        assert sent(done)["stored"] == 2 << 20
        assert (inbox / "round-7.bin").read_bytes() == (third / "round-7.bin").read_bytes()
        assert site.wait_for("stored", name="round-7.bin")["replaced"] is True

        # A cell the site's policy does not name for files is refused, and writes nothing.
        ops = send(kits, first / "round-7.bin", "--to", "server.site-1", "--name", "x.bin")
        assert ops.returncode == 1
        assert "Unauthorized" in ops.stderr.strip().splitlines()[-1]
        assert sorted(p.name for p in inbox.iterdir()) == ["round-7.bin"]
    finally:
        for proc in reversed(procs):
            proc.stop()
