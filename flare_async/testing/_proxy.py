"""A loopback TCP proxy that injects faults on demand: ``FaultProxy``.

It listens on ``127.0.0.1:0`` and forwards every connection to a target address; a cell whose
parent URL is ``proxy.url`` reaches its parent through it. Faults are switched at run time,
from the test, and trigger on explicit calls or on byte and frame counts, never on timers:

- ``delay(s)``, ``throttle(bytes_per_s)``: latency per read and a rate cap;
- ``pause()`` / ``resume()``: a stall, bytes held (the proxy stops reading, TCP backs up);
- ``reset()``: every open connection reset on both sides (RST, ``SO_LINGER`` 0);
- ``drop_after(n)``: after ``n`` more bytes one way, that connection is reset in the same step
  as the last write (the receiver finds bytes of a frame and the reset behind them);
- ``drop_next_frame()``, ``duplicate_next_frame()``, ``reorder_next_frames(k)``: on the
  fabric's own wire (plain ``tcp://``: length-prefixed frames, ``flare_async/wire/_frame.py``),
  applied to whole frames only, optionally only to frames whose header matches.

Directions: ``"up"`` is client to target (a child to its parent), ``"down"`` the way back.
``counters`` counts connections, bytes and frames forwarded each way, and each fault applied.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import anyio
import anyio.abc

from flare_async.errors import ProtocolError
from flare_async.wire import MAGIC, PREFIX, PREFIX_SIZE, Envelope, Limits, decode_header

Direction = Literal["up", "down"]
HeaderMatch = Callable[[Envelope], bool]
"""Picks the frames a frame fault applies to, by their decoded header."""

_READ = 1 << 16
_HEADER_LIMITS = Limits(max_header=16 * 1024 * 1024)


def rst_close(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST), as a crashed host or a cut cable would."""
    if sock.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    anyio.notify_closing(sock)
    sock.close()


@dataclass
class FaultCounters:
    """What the proxy forwarded and did, for assertions (frames: whole frames written)."""

    connections: int = 0
    resets: int = 0
    """Connections reset by ``reset()`` or ``drop_after()`` (a cut)."""
    cuts: int = 0
    """Connections cut by ``drop_after()``."""
    bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    frames: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    frames_dropped: int = 0
    frames_duplicated: int = 0
    frames_reordered: int = 0
    unframed: int = 0
    """Connection directions whose bytes were not frames (TLS, WebSocket): passed as is."""


@dataclass
class _FrameFault:
    kind: Literal["drop", "duplicate", "reorder"]
    k: int
    match: HeaderMatch | None


class _Side:
    """One direction of one connection: where the frame boundaries are."""

    def __init__(self) -> None:
        self.prefix = bytearray()
        self.in_frame = False
        self.left = 0
        self.header_len = 0
        self.capture: bytearray | None = None
        self.held: list[bytes] = []
        self.unframed = False


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.socks = (client, server)
        self.scope = anyio.CancelScope()
        self.done = False

    def reset(self) -> None:
        if not self.done:
            self.done = True
            for s in self.socks:
                rst_close(s)
        self.scope.cancel()

    def close(self) -> None:
        self.done = True
        for s in self.socks:
            if s.fileno() >= 0:
                anyio.notify_closing(s)
                s.close()
        self.scope.cancel()


class FaultProxy:
    """A TCP proxy on ``127.0.0.1:0`` in front of ``target`` (``tcp://host:port`` or
    ``(host, port)``), with faults switched at run time.

    Use ``async with FaultProxy(url) as proxy:`` (or start :meth:`serve` in a task group and
    call :meth:`close`); ``proxy.url`` is known from construction on.

    Args:
        target: where every accepted connection is forwarded.
        framed: parse the fabric's frame prefixes (frame counters and frame faults); a
            connection whose bytes are not frames is passed as is (``counters.unframed``).
    """

    def __init__(self, target: str | tuple[str, int], *, framed: bool = True) -> None:
        if isinstance(target, str):
            host, port = target.removeprefix("tcp://").rsplit(":", 1)
            self.target: tuple[str, int] = (host.strip("[]"), int(port))
        else:
            self.target = target
        self.framed = framed
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self._sock.setblocking(False)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self.url = f"tcp://127.0.0.1:{self.address[1]}"
        self.counters = FaultCounters()
        self._conns: set[_Conn] = set()
        self._delay = 0.0
        self._rate: float | None = None
        self._running = {"up": anyio.Event(), "down": anyio.Event()}
        for event in self._running.values():
            event.set()
        self._cut: dict[str, int | None] = {"up": None, "down": None}
        self._frame_faults: dict[str, deque[_FrameFault]] = {"up": deque(), "down": deque()}
        self._changed: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------ faults
    def delay(self, seconds: float) -> None:
        """Hold every read ``seconds`` before forwarding it, both ways (0: none)."""
        self._delay = max(0.0, seconds)

    def throttle(self, bytes_per_s: float | None) -> None:
        """Forward at most ``bytes_per_s`` each way, per connection (None: no limit)."""
        self._rate = bytes_per_s if bytes_per_s and bytes_per_s > 0 else None

    def pause(self, direction: Direction | None = None) -> None:
        """Stop forwarding (one way or both): what was read is held, the rest backs up in the
        sockets, and senders block once their buffers are full. Links stay open."""
        for d in self._directions(direction):
            if self._running[d].is_set():
                self._running[d] = anyio.Event()

    def resume(self, direction: Direction | None = None) -> None:
        """Forward again what :meth:`pause` held, in order."""
        for d in self._directions(direction):
            self._running[d].set()

    def reset(self) -> int:
        """Reset every open connection on both sides (RST); returns how many. New connections
        (a child reconnecting) pass."""
        conns = [c for c in self._conns if not c.done]
        for conn in conns:
            conn.reset()
        self.counters.resets += len(conns)
        self._notify()
        return len(conns)

    def drop_after(self, n_bytes: int, direction: Direction = "down") -> None:
        """Forward ``n_bytes`` more bytes ``direction`` (over all connections), then reset
        the connection that carried the last of them, in the same step as its last write."""
        if n_bytes < 1:
            raise ValueError("n_bytes must be at least 1")
        self._cut[direction] = n_bytes

    def drop_next_frame(
        self, direction: Direction = "down", match: HeaderMatch | None = None
    ) -> None:
        """Lose the next whole frame ``direction`` (whose header ``match`` accepts)."""
        self._frame_faults[direction].append(_FrameFault("drop", 1, match))

    def duplicate_next_frame(
        self, direction: Direction = "down", match: HeaderMatch | None = None
    ) -> None:
        """Forward the next whole frame ``direction`` (whose header ``match`` accepts) twice."""
        self._frame_faults[direction].append(_FrameFault("duplicate", 1, match))

    def reorder_next_frames(
        self, k: int, direction: Direction = "down", match: HeaderMatch | None = None
    ) -> None:
        """Hold the next ``k`` whole frames ``direction`` that ``match`` accepts and forward
        them in reverse order (frames it does not accept pass meanwhile). Frames still held
        when their connection ends are forwarded in order before its end."""
        if k < 2:
            raise ValueError("k must be at least 2")
        self._frame_faults[direction].append(_FrameFault("reorder", k, match))

    def pending_frame_faults(self, direction: Direction) -> int:
        """Frame faults armed ``direction`` that have not been applied yet."""
        return len(self._frame_faults[direction])

    async def wait_until(self, condition: Callable[[FaultCounters], bool]) -> None:
        """Wait until ``condition(counters)`` holds (checked whenever a counter changes)."""
        while not condition(self.counters):
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    # --------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> FaultProxy:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self.serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self.close()

    async def serve(self) -> None:
        """Accept and forward connections until cancelled."""
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.wait_readable(self._sock)
                try:
                    client, _ = self._sock.accept()
                except BlockingIOError:
                    continue
                tg.start_soon(self._handle, client)

    def close(self) -> None:
        """Close the listening socket and every connection (not a reset)."""
        if self._sock.fileno() >= 0:
            anyio.notify_closing(self._sock)
            self._sock.close()
        for conn in list(self._conns):
            conn.close()
        for event in self._running.values():
            event.set()

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _directions(direction: Direction | None) -> tuple[Direction, ...]:
        return ("up", "down") if direction is None else (direction,)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _handle(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target)
        except OSError:
            rst_close(client)
            return
        conn = _Conn(client, server)
        for s in conn.socks:
            s.setblocking(False)
        self._conns.add(conn)
        self.counters.connections += 1
        self._notify()
        try:
            with conn.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, conn, client, server, "up")
                    tg.start_soon(self._pump, conn, server, client, "down")
        finally:
            self._conns.discard(conn)
            conn.close()

    async def _pump(
        self, conn: _Conn, src: socket.socket, dst: socket.socket, direction: Direction
    ) -> None:
        side = _Side()
        side.unframed = not self.framed
        try:
            while True:
                try:
                    data = src.recv(_READ)
                except BlockingIOError:
                    await anyio.wait_readable(src)
                    continue
                if not data:
                    await self._write(conn, dst, direction, self._flush_held(side, direction))
                    dst.shutdown(socket.SHUT_WR)
                    return
                if self._delay:
                    await anyio.sleep(self._delay)
                await self._running[direction].wait()
                out = self._frames(side, data, direction)
                if await self._write(conn, dst, direction, out):
                    return
        except (OSError, anyio.ClosedResourceError):
            conn.reset()  # one side broke: the other sees it as a reset too

    async def _write(
        self, conn: _Conn, dst: socket.socket, direction: Direction, out: list[memoryview]
    ) -> bool:
        """Forward ``out``; True when a cut (``drop_after``) reset the connection."""
        for chunk in out:
            piece = chunk
            cut = self._cut[direction]
            cutting = cut is not None and cut <= piece.nbytes
            if cutting:
                assert cut is not None
                piece = piece[:cut]
                self._cut[direction] = None
            elif cut is not None:
                self._cut[direction] = cut - piece.nbytes
            while piece:
                try:
                    sent = dst.send(piece)
                except BlockingIOError:
                    await anyio.wait_writable(dst)
                    continue
                piece = piece[sent:]
                self.counters.bytes[direction] += sent
                if self._rate is not None:
                    await anyio.sleep(sent / self._rate)
            if cutting:  # no await since the last write: the peer has not read it yet
                self.counters.cuts += 1
                self.counters.resets += 1
                conn.reset()
                self._notify()
                return True
        self._notify()
        return False

    def _flush_held(self, side: _Side, direction: Direction) -> list[memoryview]:
        out = [memoryview(f) for f in side.held]
        self.counters.frames[direction] += len(side.held)
        side.held.clear()
        if side.capture is not None:
            out.append(memoryview(bytes(side.capture)))
            side.capture = None
        if side.prefix:
            out.append(memoryview(bytes(side.prefix)))
            side.prefix.clear()
        return out

    def _frames(self, side: _Side, data: bytes, direction: Direction) -> list[memoryview]:
        """Split ``data`` at frame boundaries; what to forward now, frame faults applied."""
        mv = memoryview(data)
        out: list[memoryview] = []
        while mv:
            if side.unframed:
                out.append(mv)
                break
            if not side.in_frame:
                take = mv[: PREFIX_SIZE - len(side.prefix)]
                side.prefix += take
                mv = mv[take.nbytes :]
                if len(side.prefix) < PREFIX_SIZE:
                    break
                magic, _, _, header_len, payload_len = PREFIX.unpack_from(side.prefix)
                prefix = bytes(side.prefix)
                side.prefix.clear()
                if magic != MAGIC:
                    side.unframed = True
                    self.counters.unframed += 1
                    out.append(memoryview(prefix))
                    continue
                side.in_frame = True
                side.header_len = header_len
                side.left = header_len + payload_len
                if self._frame_faults[direction]:
                    side.capture = bytearray(prefix)
                else:
                    out.append(memoryview(prefix))
            else:
                take = mv[: side.left]
                mv = mv[take.nbytes :]
                side.left -= take.nbytes
                if side.capture is not None:
                    side.capture += take
                else:
                    out.append(take)
            if side.in_frame and side.left == 0:
                side.in_frame = False
                self._frame_done(side, direction, out)
        return out

    def _frame_done(self, side: _Side, direction: Direction, out: list[memoryview]) -> None:
        counters = self.counters
        if side.capture is None:
            counters.frames[direction] += 1
            return
        frame = bytes(side.capture)
        side.capture = None
        faults = self._frame_faults[direction]
        fault = faults[0] if faults else None
        if fault is None or not self._matches(fault, frame, side.header_len):
            out.append(memoryview(frame))
            counters.frames[direction] += 1
            return
        if fault.kind == "drop":
            faults.popleft()
            counters.frames_dropped += 1
        elif fault.kind == "duplicate":
            faults.popleft()
            out += [memoryview(frame), memoryview(frame)]
            counters.frames[direction] += 2
            counters.frames_duplicated += 1
        else:
            side.held.append(frame)
            if len(side.held) == fault.k:
                faults.popleft()
                out += [memoryview(f) for f in reversed(side.held)]
                counters.frames[direction] += fault.k
                counters.frames_reordered += fault.k
                side.held.clear()

    @staticmethod
    def _matches(fault: _FrameFault, frame: bytes, header_len: int) -> bool:
        if fault.match is None:
            return True
        try:
            header = decode_header(frame[PREFIX_SIZE : PREFIX_SIZE + header_len], _HEADER_LIMITS)
        except ProtocolError:
            return False
        return fault.match(header)


__all__ = ["Direction", "FaultCounters", "FaultProxy", "HeaderMatch", "rst_close"]
