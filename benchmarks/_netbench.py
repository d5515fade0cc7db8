"""The network cases of ``fabric.py``: cells in two processes over loopback, and the raw-socket
echo baseline they are compared with.

Topology (one case's ``hops``; names from :func:`chain_names`):

- the benchmark process runs the root cell ``server``, which listens and makes the requests;
- a child process (this file run as a script) runs the rest of the chain: the edge
  ``server.e`` with the echo handler (3 hops: the relays ``server.r1`` and ``server.r1.r2`` and
  the edge ``server.r1.r2.e``, all in that one process, each on its own loopback link). Each
  cell dials its parent's URL, as a site does, so the child's first cell connects to the root.

Transports: ``tcp`` (``TcpDriver()``, ``tcp://127.0.0.1:0``), ``tls`` (mutual TLS: a throwaway
project is provisioned in a temporary folder and the cells are built with ``cell_from_kit``, so
the certificate checks run as in a deployment, but without message signatures), ``tls-signed``
(the same, and every request and reply signed by the cell that sends it and checked by the one
it is for, as deployed cells do: ``security.MessageSigning``) and ``ws`` (``WebSocketDriver()``,
``ws://127.0.0.1:0/flare``). Both processes run on asyncio + uvloop. The cells keep the default
heartbeat (15 s; a ping a link every 15 s costs nothing measurable).

The child also runs the raw-socket baseline: an echo server on plain asyncio protocols (uvloop)
that splits the byte stream into messages framed with a 4-byte length and writes each one back
as it is (one ``transport.write`` per message); with 3 hops, two relays in front of it that
forward each message on their own connection to the next (one ``write`` per message and hop).
The benchmark process talks to it over ONE connection with the same number of concurrent callers:
each request carries a 4-byte id and a 64-byte payload, is written at once, and its caller awaits
a future that the connection's reader resolves from the echoed id. Nothing else: no headers, no
routing, no deadlines, no flow control beyond the kernel's. It is the ceiling for request/reply
over loopback TCP from Python on this event loop.

The child gets its configuration as a JSON argument, prints one JSON line (the baseline's port)
on its stdout pipe once everything is connected (its logs go to stderr), and runs until its
stdin reaches EOF: the benchmark process closes that pipe to stop it, and if the benchmark
process dies the pipe closes with it. The child runs in a session of its own, so Ctrl-C reaches
only the benchmark process, whose cleanup stops the child (EOF, then after 10 s SIGTERM, then
SIGKILL) on every way out: normal end, exception or interrupt.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from flare_async import Cell, Context, Driver, HandlerTable, Payload
from flare_async.cli._kit import cell_from_kit
from flare_async.security import load_kit, provision
from flare_async.transport import TcpDriver, WebSocketDriver

NETWORK_TRANSPORTS = ("tcp", "tls", "tls-signed", "ws")
HOST = "127.0.0.1"
READY_TIMEOUT = 60.0
"""Seconds the child may take to start, connect its cells and report ready."""
STOP_TIMEOUT = 10.0
"""Seconds the child gets to stop after its stdin closes, then after SIGTERM, before SIGKILL."""

CHILD_SCRIPT = str(Path(__file__).resolve())

_LEN = struct.Struct("!I")
_HEAD = struct.Struct("!II")  # length of what follows (id + payload), request id

Call = Callable[[], Awaitable[object]]


def chain_names(hops: int) -> list[str]:
    """``server``, then ``hops - 1`` relays, then the edge: each the child of the one before."""
    names = ["server"]
    for i in range(1, hops):
        names.append(f"{names[-1]}.r{i}")
    names.append(f"{names[-1]}.e")
    return names


def echo_table() -> HandlerTable:
    """The edge's handler: ``bench/echo`` answers with the request's payload."""
    table = HandlerTable("bench")

    @table.request("bench", "echo")
    async def echo(ctx: Context, msg: Payload) -> Payload:
        return msg

    return table


# ---------------------------------------------------------------- raw-socket baseline
class _Framed(asyncio.Protocol):
    """A connection that splits its byte stream into length-prefixed messages."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        size = len(buf)
        pos = 0
        while size - pos >= _LEN.size:
            end = pos + _LEN.size + _LEN.unpack_from(buf, pos)[0]
            if end > size:
                break
            self.message(buf, pos, end)
            pos = end
        del buf[:pos]

    def message(self, buf: bytearray, start: int, end: int) -> None:
        raise NotImplementedError


class _Echo(_Framed):
    """The edge: write each message back as it is."""

    def message(self, buf: bytearray, start: int, end: int) -> None:
        assert self.transport is not None
        self.transport.write(buf[start:end])


class _Forward(_Framed):
    """One side of a relay: write each message to the other side's connection."""

    def __init__(self, peer: asyncio.Transport | None = None) -> None:
        super().__init__()
        self.peer = peer

    def message(self, buf: bytearray, start: int, end: int) -> None:
        assert self.peer is not None
        self.peer.write(buf[start:end])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class _RelayIn(_Forward):
    """A relay's accepted connection: opens its own connection to the next hop, holding back
    what arrives before that connection is up."""

    def __init__(self, next_port: int, tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self._next_port = next_port
        self._tasks = tasks
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def message(self, buf: bytearray, start: int, end: int) -> None:
        if self.peer is None:
            self._early.append(bytes(buf[start:end]))
        else:
            self.peer.write(buf[start:end])

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        out, _ = await loop.create_connection(
            lambda: _Forward(self.transport), HOST, self._next_port
        )
        self.peer = cast(asyncio.Transport, out)
        for data in self._early:
            self.peer.write(data)
        self._early.clear()


@asynccontextmanager
async def raw_echo_chain(hops: int) -> AsyncIterator[int]:
    """Start the echo server and ``hops - 1`` relays in front of it; yield the first's port."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    servers = [await loop.create_server(_Echo, HOST, 0)]
    try:
        for _ in range(hops - 1):
            port = servers[-1].sockets[0].getsockname()[1]
            servers.append(await loop.create_server(lambda p=port: _RelayIn(p, tasks), HOST, 0))
        yield servers[-1].sockets[0].getsockname()[1]
    finally:
        for server in servers:
            server.close()
        for task in tasks:
            task.cancel()


class _EchoClient(_Framed):
    """The caller's side: one connection, requests told apart by their id."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self._payload = payload
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()

    async def call(self) -> bytes:
        assert self.transport is not None
        msg_id = next(self._ids) & 0xFFFFFFFF
        fut = self._loop.create_future()
        self._pending[msg_id] = fut
        try:
            self.transport.write(_HEAD.pack(4 + len(self._payload), msg_id) + self._payload)
            return await fut
        finally:
            self._pending.pop(msg_id, None)

    def message(self, buf: bytearray, start: int, end: int) -> None:
        msg_id = _LEN.unpack_from(buf, start + _LEN.size)[0]
        fut = self._pending.get(msg_id)
        if fut is not None and not fut.done():
            fut.set_result(bytes(buf[start + _HEAD.size : end]))

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"raw echo connection lost: {exc}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)


@asynccontextmanager
async def raw_echo_client(port: int, payload: bytes) -> AsyncIterator[Call]:
    """Connect to the raw echo chain; yield the call that makes one request/reply."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(lambda: _EchoClient(payload), HOST, port)
    try:
        reply = await client.call()
        if reply != payload:
            raise RuntimeError(f"raw echo returned {reply!r}")
        yield client.call
    finally:
        transport.close()
        with anyio.move_on_after(1, shield=True):
            await client.closed


# ---------------------------------------------------------------- cells
def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now (closed again: the tls kits need them before listening)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def provision_chain(hops: int, out_dir: Path) -> Path:
    """Provision a throwaway project for the chain; return the folder holding the kits."""
    names = chain_names(hops)
    urls = [f"tls://{HOST}:{port}" for port in _free_ports(len(names) - 1)]
    lines = [
        'project = "fabric-bench"',
        'org = "bench.invalid"',
        "[server]",
        f'listen = ["{urls[0]}"]',
    ]
    for i, name in enumerate(names[1:-1], start=1):
        lines += ["[[relays]]", f'name = "{name}"', f'parent = "{urls[i - 1]}"']
        lines.append(f'listen = ["{urls[i]}"]')
    lines += ["[[clients]]", f'name = "{names[-1]}"', f'parent = "{urls[-1]}"']
    project = out_dir / "project.toml"
    project.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kits = out_dir / "kits"
    provision(project, kits, now=datetime.now(UTC))
    return kits


def make_cell(
    transport: str, name: str, *, parent: str | None, relay: bool, kits: Path | None, edge: bool
) -> Cell:
    """One cell of the chain: from its kit for ``tls``, with a bare driver otherwise."""
    handlers = [echo_table()] if edge else []
    if transport in ("tls", "tls-signed"):
        assert kits is not None
        cell = cell_from_kit(load_kit(kits / name, now=datetime.now(UTC)), handlers=handlers)
        cell.on_link = None  # cell_from_kit reports links as JSON on stdout: not here
        if transport == "tls":
            cell.signing = None  # the transport alone; tls-signed keeps it, as deployed
        return cell
    listen: list[str] = []
    drivers: list[Driver]
    if transport == "tcp":
        drivers = [TcpDriver()]
        listen = [f"tcp://{HOST}:0"] if relay else []
    elif transport == "ws":
        drivers = [WebSocketDriver()]
        listen = [f"ws://{HOST}:0/flare"] if relay else []
    else:
        raise ValueError(f"unknown network transport {transport!r}")
    return Cell(name, listen=listen, parent=parent, drivers=drivers, handlers=handlers)


# ---------------------------------------------------------------- the child process
async def _wait_stdin_eof() -> None:
    fd = sys.stdin.fileno()
    while True:
        await anyio.wait_readable(fd)
        if not os.read(fd, 65536):
            return


async def _child(config: dict[str, Any], ready: Any) -> None:
    """Run the chain until stdin reaches EOF; an EOF during setup abandons the setup."""
    stop = anyio.Event()
    serving = False
    async with anyio.create_task_group() as tg:

        async def watch_stdin() -> None:
            await _wait_stdin_eof()
            stop.set()
            if not serving:
                tg.cancel_scope.cancel()

        tg.start_soon(watch_stdin)
        async with _chain(config) as port:
            ready.write(json.dumps({"baseline_port": port}) + "\n")
            ready.close()
            serving = True
            await stop.wait()  # then the cells close in order, saying goodbye to their parents


@asynccontextmanager
async def _chain(config: dict[str, Any]) -> AsyncIterator[int]:
    """The raw echo chain and the cells below the root, all connected; yields the echo's port."""
    transport, hops = config["transport"], config["hops"]
    kits = Path(config["kits"]) if config.get("kits") else None
    names = chain_names(hops)
    async with AsyncExitStack() as stack:
        port = await stack.enter_async_context(raw_echo_chain(hops))
        parent_url: str = config["parent"]
        for name in names[1:]:
            edge = name == names[-1]
            cell = make_cell(
                transport, name, parent=parent_url, relay=not edge, kits=kits, edge=edge
            )
            await stack.enter_async_context(cell)
            with anyio.fail_after(READY_TIMEOUT):
                await cell.wait_parent()
            if not edge:
                parent_url = cell.listen_urls[0]
        yield port


def child_main(argv: list[str]) -> int:
    """The child process: ``python _netbench.py CONFIG_JSON``.

    It runs in a session of its own (no Ctrl-C from the terminal): the benchmark process stops
    it by closing its stdin.
    """
    config = json.loads(argv[1])
    # Our stdout is the pipe the benchmark reads the ready line from: keep it for that line
    # only, and send everything else that would go to stdout to stderr.
    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    anyio.run(_child, config, ready, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


@asynccontextmanager
async def _child_process(config: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Start the child; yield its ready report; always stop it (EOF, then SIGTERM, SIGKILL)."""
    command = [sys.executable, CHILD_SCRIPT, json.dumps(config)]
    proc: Process = await anyio.open_process(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        start_new_session=True,  # Ctrl-C reaches only us; we stop the child
    )
    try:
        assert proc.stdout is not None
        reader = BufferedByteReceiveStream(proc.stdout)
        try:
            with anyio.fail_after(READY_TIMEOUT):
                line = await reader.receive_until(b"\n", 65536)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            raise RuntimeError(f"benchmark child {config} exited before it was ready") from None
        yield json.loads(line)
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(proc)


async def _stop(proc: Process) -> None:
    if proc.stdin is not None:
        with suppress(OSError, anyio.BrokenResourceError):
            await proc.stdin.aclose()  # EOF on its stdin: the child shuts down
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and proc.returncode is None:
            with suppress(ProcessLookupError):
                proc.send_signal(sig)
        with anyio.move_on_after(STOP_TIMEOUT):
            await proc.wait()
            break
    if proc.stdout is not None:
        await proc.stdout.aclose()


@asynccontextmanager
async def network_topology(
    transport: str, hops: int, payload: bytes
) -> AsyncIterator[tuple[Cell, str, Call]]:
    """Start the root cell here and the rest of the chain in a child process.

    Yields the root cell, the edge's name and the raw-socket baseline's call.
    """
    names = chain_names(hops)
    async with AsyncExitStack() as stack:
        kits: Path | None = None
        if transport.startswith("tls"):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fabric-bench-"))
            kits = await anyio.to_thread.run_sync(provision_chain, hops, Path(tmp))
        root = make_cell(transport, names[0], parent=None, relay=True, kits=kits, edge=False)
        await stack.enter_async_context(root)
        config = {
            "transport": transport,
            "hops": hops,
            "parent": root.listen_urls[0],
            "kits": str(kits) if kits else None,
        }
        ready = await stack.enter_async_context(_child_process(config))
        base_call = await stack.enter_async_context(
            raw_echo_client(ready["baseline_port"], payload)
        )
        yield root, names[-1], base_call


if __name__ == "__main__":
    sys.exit(child_main(sys.argv))
