"""The main demo and the CLI run as real processes, as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flare_async import Cell, MemoryNetwork, system_handlers
from flare_async.cli import main as cli_main
from flare_async.wire import PROTOCOL_VERSION
from tests._topo import tree

ROOT = Path(__file__).resolve().parents[1]


def test_fabric_demo_runs_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fabric_in_process.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "server children = ['server.eu', 'server.us']" in out
    assert "'pong hi'" in out
    assert "server.eu.site-9     Unreachable" in out
    assert "server.eu            NoHandler" in out
    assert out.count('{"n": 1000') == 5  # the first request plus four broadcast replies
    assert "InternalError" in out
    assert "secret" not in out  # the handler's error text stayed in the site's log...
    assert "postgres://admin:secret@db" in proc.stderr  # ...which is where it went
    assert "handler at server.us.site-3 was cancelled at that deadline" in out


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["version"]) == 0
    assert f"wire protocol {PROTOCOL_VERSION}" in capsys.readouterr().out


def test_cli_entry_point_is_installed() -> None:
    exe = Path(sys.executable).parent / "flare-async"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("flare-async ")


@pytest.mark.anyio
async def test_system_handlers_report_links_and_counters() -> None:
    async with Cell("server", handlers=[system_handlers()]) as cell:
        assert (await cell.request("server", "sys", "ping", b"x")).tobytes() == b"pong x"
        info = json.loads((await cell.request("server", "sys", "info")).tobytes())
    assert info["name"] == "server"
    assert info["parent"] is None
    assert info["children"] == []
    assert info["statistics"]["handled"] == 1  # the ping; info itself is still running


@pytest.mark.anyio
async def test_sys_reach_reports_paths_and_failures() -> None:
    net = MemoryNetwork()
    names = ["server", "server.eu", "server.eu.a"]
    async with tree(net, names, {"*": [system_handlers()]}) as cells:
        ok = json.loads(
            (await cells["server"].request("server", "sys", "reach", b"server.eu.a")).tobytes()
        )
        assert ok["ok"] is True
        assert ok["rtt"] >= 0
        bad = json.loads(
            (
                await cells["server.eu.a"].request("server.eu.a", "sys", "reach", b"server.x")
            ).tobytes()
        )
        assert bad["ok"] is False
        assert bad["error"].startswith("Unreachable")
