"""A real deployment on loopback: every cell its own OS process, real sockets, real certificates.

Server, relay and two sites over tls://, a third site over wss://, each started with
``python -m flare_async run KIT``; the test joins as one more site (a kit added later with
``add_site``) to drive traffic. Processes report link changes as JSON lines on stdout, which the
test follows instead of sleeping.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Queue
from typing import Any

import anyio
import pytest

from flare_async import errors
from flare_async.cli._kit import cell_from_kit
from flare_async.security import add_site, load_kit, provision
from flare_async.testing import free_ports
from flare_async.transport import TcpDriver
from flare_async.wire import Frame, Limits, make_hello
from tests._procs import Proc

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # slow: every cell an OS process
ROOT = Path(__file__).resolve().parents[2]
RELAY = "server.relay-1"
SITES = [f"{RELAY}.site-1", f"{RELAY}.site-2", f"{RELAY}.site-3"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp (wss) runs on asyncio only


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Proc]]]:
    p_server, p_server_ws, p_relay, p_relay_ws = free_ports(4)
    project = tmp_path / "project.toml"
    project.write_text(f"""
project = "test"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:{p_server}", "wss://127.0.0.1:{p_server_ws}/flare"]
[[relays]]
name = "{RELAY}"
parent = "tls://127.0.0.1:{p_server}"
listen = ["tls://127.0.0.1:{p_relay}", "wss://127.0.0.1:{p_relay_ws}/flare"]
[[clients]]
name = "{SITES[0]}"
parent = "tls://127.0.0.1:{p_relay}"
[[clients]]
name = "{SITES[1]}"
parent = "tls://127.0.0.1:{p_relay}"
[[clients]]
name = "{SITES[2]}"
parent = "wss://127.0.0.1:{p_relay_ws}/flare"
""")
    kits = tmp_path / "kits"
    provision(project, kits, now=datetime.now(UTC))
    procs: dict[str, Proc] = {}
    try:
        for name in ["server", RELAY, *SITES]:
            extra = ["--handlers", "tests._deploy_handlers:table"] if name == SITES[0] else []
            procs[name] = Proc(name, kits / name, tmp_path / f"{name}.log", extra)
        procs["server"].wait_for("link-up", peer=RELAY)
        for site in SITES:
            procs[site].wait_for("link-up", role="parent")
        yield tmp_path, procs
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def probe_kit(tmp_path: Path, name: str = f"{RELAY}.probe") -> Any:
    kits = tmp_path / "kits"
    relay = load_kit(kits / RELAY)
    return add_site(kits, name, relay.listen[0], now=datetime.now(UTC))


async def reach(cell: Any, via: str, dst: str) -> dict[str, Any]:
    reply = await cell.request(via, "sys", "reach", dst.encode(), timeout=20)
    return json.loads(reply.tobytes())


async def test_request_reply_across_processes_over_tls_and_wss(deployment: Any) -> None:
    tmp_path, _ = deployment
    async with cell_from_kit(probe_kit(tmp_path)) as probe:
        await probe.wait_parent()
        # client -> client through the relay, over tls and over wss
        for site in SITES:
            pong = await probe.request(site, "sys", "ping", b"hello", timeout=20)
            assert pong.tobytes() == b"pong hello"
        # server -> client: the server process makes the request and reports the outcome
        for site in SITES:
            result = await reach(probe, "server", site)
            assert result["ok"], result
        # client -> client between two other processes (tls site to wss site)
        result = await reach(probe, SITES[0], SITES[2])
        assert result["ok"], result
        info = json.loads((await probe.request(RELAY, "sys", "info", timeout=20)).tobytes())
        assert sorted(info["children"]) == sorted([*SITES, probe.name])
        assert info["parent"] == "server"


async def test_relay_killed_and_restarted(deployment: Any) -> None:
    tmp_path, procs = deployment
    async with cell_from_kit(probe_kit(tmp_path), heartbeat=1.0) as probe:
        await probe.wait_parent()
        start = anyio.current_time()
        failures: list[errors.FlareError] = []

        async def kill_when_started() -> None:
            await anyio.to_thread.run_sync(procs[SITES[0]].wait_for, "slow-started")
            procs[RELAY].proc.send_signal(signal.SIGKILL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_when_started)
            # A request in flight through the relay (the handler takes 20 s) ...
            try:
                await probe.request(SITES[0], "test", "slow", b"20", timeout=30)
            except errors.FlareError as exc:
                failures.append(exc)
        assert len(failures) == 1
        assert isinstance(failures[0], errors.TransportError), failures
        # ... fails promptly with a transport error, not at its 30 s deadline.
        assert anyio.current_time() - start < 10
        procs[RELAY].proc.wait(timeout=10)
        procs[RELAY].restart()
        # Everyone below the relay reconnects by itself, and traffic resumes.
        for site in SITES:
            procs[site].wait_for("link-up", role="parent")
        procs["server"].wait_for("link-up", peer=RELAY)
        with anyio.fail_after(30):
            await probe.wait_parent()
        for site in SITES:
            pong = await probe.request(site, "sys", "ping", b"again", timeout=20)
            assert pong.tobytes() == b"pong again"


async def test_bad_clients_are_refused_and_the_listener_keeps_serving(deployment: Any) -> None:
    tmp_path, procs = deployment
    kits = tmp_path / "kits"
    relay_url = load_kit(kits / RELAY).listen[0]
    host, port = relay_url.removeprefix("tls://").split(":")
    # 1. a certificate from another CA
    provision_other = tmp_path / "other.toml"
    provision_other.write_text("""
project = "other"
[server]
name = "server.relay-1"
listen = ["tls://127.0.0.1:1"]
[[clients]]
name = "server.relay-1.intruder"
parent = "tls://127.0.0.1:1"
""")
    other = provision(provision_other, tmp_path / "other-kits", now=datetime.now(UTC))
    foreign = next(k for k in other if k.name.endswith("intruder"))
    foreign = load_kit(tmp_path / "other-kits" / foreign.name)
    foreign = type(foreign)(
        **{**{f: getattr(foreign, f) for f in foreign.__struct_fields__}, "parent": relay_url}
    )
    async with cell_from_kit(foreign) as intruder:
        assert intruder.parent_name is None
    # 2. an expired certificate
    expired = add_site(
        kits, f"{RELAY}.expired", relay_url, now=datetime.now(UTC) - timedelta(days=30), days=1
    )
    async with cell_from_kit(load_kit(kits / expired.name)) as old:
        assert old.parent_name is None
    # 3. a name that does not match the certificate
    mine = probe_kit(tmp_path, f"{RELAY}.site-9")
    liar = cell_from_kit(load_kit(kits / mine.name))
    # claims another site's name with its own certificate
    liar.name = liar._router.name = liar._links.hello.name = f"{RELAY}.site-1"
    async with liar:
        assert liar.parent_name is None
    # 4. plain TCP (our own framing) to the TLS port, 5. garbage, 6. a silent connection
    async with await anyio.connect_tcp(host, int(port)) as plain:
        driver = TcpDriver()
        link = await driver.connect(f"tcp://{host}:{port}", limits=liar.limits)
        await link.send(Frame(make_hello(f"{RELAY}.plain", "child", Limits())))
        with pytest.raises(errors.TransportError):
            await link.receive()
        await link.aclose()
        await plain.send(b"\x16\x03\x01garbage that is not a TLS record" * 10)
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
            await plain.receive()
    silent = socket.create_connection((host, int(port)))
    try:
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed by the relay after its 1 s handshake timeout
    finally:
        silent.close()
    # The relay still serves a good client.
    async with cell_from_kit(probe_kit(tmp_path)) as probe:
        await probe.wait_parent()
        assert (await probe.request(SITES[1], "sys", "ping", b"ok", timeout=20)).tobytes() == (
            b"pong ok"
        )
    procs[RELAY].stop()
    log = procs[RELAY].log.read_text()
    assert log.count("link refused") >= 5, log[-4000:]
    for reason in ("certificate", "claims to be", "TLS handshake failed", "no hello in time"):
        assert reason in log, (reason, log[-4000:])


@contextlib.contextmanager
def running_up(
    topology: Path, work: Path, *, cells: int, to_a_thread: bool = False
) -> Iterator[list[str]]:
    """``flare-async up TOPOLOGY`` until every cell linked; Ctrl-C (SIGINT) when the block
    ends, which must stop everything with exit status 0. Yields the lines ``up`` printed (all of
    them once the block is over). ``to_a_thread``: the SIGINT goes to one of up's threads other
    than the main one, as the kernel may deliver a process's signal to any thread that does
    not block it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flare_async", "up", str(topology), "--workdir", str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: Queue[str] = Queue()

    def read() -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while f"all {cells} cells linked\n" not in seen:
            seen.append(lines.get(timeout=120))
        yield seen
        if to_a_thread:
            tgkill_a_thread(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=60)
        if status != 0:  # what up printed says why (a cell that died, a traceback)
            reader.join(timeout=10)
            while not lines.empty():
                seen.append(lines.get())
            pytest.fail(f"up exited with {status}; it printed:\n{''.join(seen)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get())


def tgkill_a_thread(pid: int, signo: int) -> None:
    """Send ``signo`` to a thread of process ``pid`` other than its main thread."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, "up has no thread besides its main one"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tids[0], signo) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.parametrize(
    "to_a_thread",
    [
        pytest.param(False, id="to-the-process"),
        pytest.param(
            True,
            id="to-a-thread",
            marks=pytest.mark.skipif(sys.platform != "linux", reason="tgkill and /proc"),
        ),
    ],
)
def test_up_starts_a_topology_and_stops_it_on_ctrl_c(tmp_path: Path, to_a_thread: bool) -> None:
    """Ctrl-C stops every cell and up exits 0, whichever of up's threads the kernel hands the
    signal to (numpy's BLAS threads do not block it: up once died of a KeyboardInterrupt)."""
    p_server, p_relay = free_ports(2)
    topology = tmp_path / "topology.toml"
    topology.write_text(f"""
project = "up-test"
[server]
listen = ["tls://127.0.0.1:{p_server}"]
[[relays]]
name = "{RELAY}"
parent = "tls://127.0.0.1:{p_server}"
listen = ["tls://127.0.0.1:{p_relay}"]
[[clients]]
name = "{SITES[0]}"
parent = "tls://127.0.0.1:{p_relay}"
[[clients]]
name = "{SITES[1]}"
parent = "tls://127.0.0.1:{p_relay}"
""")
    work = tmp_path / "work"
    with running_up(topology, work, cells=4, to_a_thread=to_a_thread) as seen:
        pass
    assert seen[-1] == "all cells stopped\n", seen
    logs = sorted(p.name for p in (work / "logs").iterdir())
    assert logs == sorted(f"{n}.log" for n in ["server", RELAY, *SITES[:2]])
    for name in [RELAY, *SITES[:2]]:
        events = [
            json.loads(x)
            for x in (work / "logs" / f"{name}.log").read_text().splitlines()
            if x.startswith("{")
        ]
        assert {"event": "stopped", "cell": name} in events


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports free now."""
    for _ in range(50):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports")


# 23 cell processes and 16 training processes start, run a job and stop on two cores: 111-113 s
# here alone (at the session's start commit and after it alike), so the suite's 120 s limit let
# it time out when anything else ran beside it.
@pytest.mark.timeout(300)
def test_a_three_tier_topology_from_its_fanout_runs_the_demo_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[tree] fanout = [2, 2, 4]``: the server, 2 relays, 2 relays under each, 4 sites under
    each of those (23 cell processes, and a training process per site), started by
    ``flare-async up``; the main demo job, submitted with the admin kit, completes. The job
    asks for all 16 sites (``--min-clients``): every cell linked to its parent is not yet every
    site registered with the server (a site whose relay linked up after it retries its
    registration with backoff), and a job takes the sites registered when it starts."""
    topology = tmp_path / "three-tier.toml"
    text = (ROOT / "cells" / "topologies" / "three-tier.toml").read_text()
    topology.write_text(text.replace("port = 18100", f"port = {free_port_run(7)}"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    work = tmp_path / "work"
    with running_up(topology, work, cells=23):
        done = subprocess.run(
            [
                sys.executable, "-m", "flare_async", "job", "--kit", str(work / "kits" / "admin-1"),
                "submit", "examples.fedavg_digits:recipe", "--rounds", "2", "--deadline", "400",
                "--min-clients", "16", "--wait",
            ],
            capture_output=True, text=True, timeout=900, check=False, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    assert final["state"] == "finished", final
    assert final["rounds_done"] == 2
    assert len(final["sites"]) == 16
    events = (work / "jobs" / "server" / final["id"] / "events.jsonl").read_text().splitlines()
    rounds = [json.loads(x) for x in events if '"round"' in x]
    assert [len(r["responded"]) for r in rounds] == [16, 16]  # folded by the lower relays
