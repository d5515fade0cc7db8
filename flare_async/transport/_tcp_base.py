"""What every ``tcp://`` and ``tls://`` link shares: a socket, the sans-IO framing, the send lock,
the link's state and how it ends.

Four classes build on :class:`TcpLink`, and the one a link is made as decides how it does its
I/O; no method asks which it is:

* :class:`~flare_async.transport._tcp_asyncio.AsyncioTcpLink`: the raw socket on asyncio (and
  uvloop), read ahead in loop callbacks, with push delivery and splicing;
* :class:`~flare_async.transport._tcp_trio.TrioTcpLink`: the raw socket on any other backend,
  waiting for the socket before each read or write;
* :class:`~flare_async.transport._tls_asyncio.AsyncioTlsLink`: mutual TLS on asyncio, the
  asyncio link with an ``SSLObject`` between its reads and writes and the socket;
* :class:`~flare_async.transport._tls.TlsLink`: mutual TLS on any other backend, through
  anyio's ``TLSStream``.

``TcpLink(sock, ...)`` itself makes the raw-socket link of the running backend.

A frame cut by cancellation after some of its bytes were written cannot be completed later
without blocking the canceller, so the link is marked broken instead: the peer then sees
``LinkBroken``, never a corrupted frame.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sniffio
from anyio.lowlevel import checkpoint

from flare_async._concurrency import Lock
from flare_async.errors import LinkBroken, LinkClosed
from flare_async.transport._base import Link, LinkFacts, LinkStatistics
from flare_async.wire import EOF, HELLO_BUFFER, Buffer, Connection, Frame, Limits

FINISH_WITHIN = 30.0
"""Seconds a frame already begun may wait for room to finish after its sender is cancelled.

A link carries frames from many tasks; one task giving up (a deadline, a withdrawn task) must
not cut a frame in half, which would lose the link for all of them. So once a frame's first
bytes are written (with TLS: once its records are made), the rest is written shielded from
cancellation; only a peer that takes none of it for this long breaks the link."""


class TcpLink(Link):
    """One TCP (optionally TLS) connection carrying frames. One reader at a time.

    Args:
        sock: the connected socket (non-blocking); the link owns it.
        limits: limits applied to frames we receive.
        hello_limits: given by a guarded listener: until :meth:`hello_done`, a hello-sized
            frame in a small buffer (docs/design.md §3).
        on_hello: called once, at :meth:`hello_done` or the close: releases the listener's
            count of pending links.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> TcpLink:
        # TcpLink(sock, ...) (a job's socket pair, say) is the raw-socket link of this backend.
        return super().__new__(raw_link_class() if cls is TcpLink else cls)

    def __init__(
        self,
        sock: socket.socket,
        limits: Limits,
        *,
        local_address: str,
        peer_address: str,
        hello_limits: Limits | None = None,
        on_hello: Callable[[], None] | None = None,
    ) -> None:
        self._sock = sock
        self._on_hello = on_hello
        if hello_limits is not None:
            self._conn = Connection(hello_limits, peer=peer_address, staging_size=HELLO_BUFFER)
        else:
            self._conn = Connection(limits, peer=peer_address)
        self.limits = limits
        self.peer_limits = limits
        self.local_address = local_address
        self.peer_address = peer_address
        self._send_lock = Lock()
        self._closed = False
        self._broken: str | None = None
        self._passed = 0  # frames whose payload went through unread (splicing links)
        self._clock: Callable[[], float] = anyio.current_time  # bound to the loop's by subclasses

    @property
    def peer_limits(self) -> Limits:
        return self._conn.peer_limits

    @peer_limits.setter
    def peer_limits(self, value: Limits) -> None:
        self._conn.peer_limits = value

    def hello_done(self) -> None:
        if self._conn.limits is not self.limits:
            self._conn.widen(self.limits)
        self._release()

    def _release(self) -> None:
        on_hello, self._on_hello = self._on_hello, None
        if on_hello is not None:
            on_hello()

    # ------------------------------------------------------------------ state
    def _check_usable(self) -> None:
        if self._closed:
            raise LinkClosed("link was closed by this side")
        if self._broken is not None:
            raise LinkBroken(self._broken)

    def _mark_broken(self, why: str) -> None:
        if self._broken is None:
            self._broken = why

    def _cut_short(self, why: str = "a frame was cut short by cancellation") -> None:
        # End our direction with a FIN after the partial frame: the peer still reads every
        # complete frame before it, then sees the truncated one as LinkBroken. (A reset would
        # make its kernel drop frames it has not read yet.)
        self._mark_broken(why)
        self._close_socket(reset=False)

    # ------------------------------------------------------------------ sending
    async def send(self, frame: Frame) -> None:
        # Encoded once: a frame with a deadline when the link is ours (the budget left then),
        # any other before waiting. FrameTooLarge comes before any byte is written either way.
        late = frame.expires is not None
        segments = None if late else self._conn.send(frame.header, frame.parts)
        async with self._send_lock:
            self._check_usable()
            if segments is None:
                segments = self._conn.send(frame.stamp(self._clock), frame.parts)
            try:
                await self._write(segments)
            except OSError as exc:
                self._mark_broken(f"send failed: {error_reason(exc)}")
                raise LinkBroken(self._broken or "") from None

    async def _write(self, segments: list[Buffer]) -> None:
        """Write one frame's segments whole, under the send lock."""
        raise NotImplementedError  # each kind of link writes its own way

    async def _finish(self, rest: Awaitable[None]) -> None:
        """Await ``rest`` (what a frame begun needs to go on), cancelled or not, for at most
        :data:`FINISH_WITHIN` seconds; past that the frame is cut and the link broken."""
        with anyio.move_on_after(FINISH_WITHIN, shield=True) as finishing:
            await rest
        if finishing.cancelled_caught:
            self._cut_short(f"a frame could not be finished within {FINISH_WITHIN:g} s")
            raise LinkBroken(self._broken or "")

    # ------------------------------------------------------------------ receiving
    async def receive(self) -> Frame:
        conn = self._conn
        while True:
            event = conn.next_event()
            if isinstance(event, Frame):
                return event
            if event is EOF:
                raise LinkClosed("peer closed the connection")
            self._check_usable()
            await self._fill()

    async def _fill(self) -> None:
        """Feed the connection what the socket has (waiting for it): at least a byte or EOF."""
        raise NotImplementedError  # each kind of link reads its own way

    # ------------------------------------------------------------------ closing
    def _close_socket(self, *, reset: bool, crash: bool = False) -> None:
        self._release()
        if self._sock.fileno() < 0:
            return
        self._stop_io()
        self._end_connection(reset=reset, crash=crash)

    def _stop_io(self) -> None:
        """Drop what still waits on the socket (loop callbacks) before the connection ends."""

    def _end_connection(self, *, reset: bool, crash: bool) -> None:
        """End the connection and close the descriptor: with a reset, or gracefully."""
        sock = self._sock
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)
                # Drain what the peer sent us, so closing does not answer with a reset that
                # could destroy frames the peer has not read yet.
                while sock.recv(65536):
                    pass
        except OSError:
            pass
        anyio.notify_closing(sock)
        sock.close()

    async def aclose(self) -> None:
        if self._closed:
            await checkpoint()
            return
        self._closed = True
        self._close_socket(reset=self._broken is not None)
        await self._close_streams()
        await checkpoint()

    async def _close_streams(self) -> None:
        """Close what wraps the socket, once the connection ended (TLS)."""

    def abort(self) -> None:
        """Reset the connection as a crash would: the peer sees ``LinkBroken``."""
        self._mark_broken("link aborted")
        self._close_socket(reset=True, crash=True)

    # ------------------------------------------------------------------ facts
    def extra(self) -> LinkFacts:
        return LinkFacts(peer_address=self.peer_address)

    def statistics(self) -> LinkStatistics:
        s = self._conn.statistics()
        return LinkStatistics(
            frames_sent=s.frames_sent,
            frames_received=s.frames_received,
            bytes_sent=s.bytes_sent,
            bytes_received=s.bytes_received,
            buffered=s.buffered,
            frames_passed=self._passed,
            read_buffer=self._conn.buffer_size,
        )


def raw_link_class() -> type[TcpLink]:
    """The raw-socket link of the running backend: asyncio's reads in loop callbacks, any
    other backend's waits for the socket (decided once, when a link is made)."""
    # Imported here: both build on this module.
    from flare_async.transport._tcp_asyncio import AsyncioTcpLink  # noqa: PLC0415
    from flare_async.transport._tcp_trio import TrioTcpLink  # noqa: PLC0415

    return AsyncioTcpLink if on_asyncio() else TrioTcpLink


def on_asyncio() -> bool:
    """Whether the running backend is asyncio (or uvloop)."""
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def cut_reason(exc: BaseException) -> tuple[str, ...]:
    """Why a frame begun was cut short by ``exc``, for ``TcpLink._cut_short``: the socket's
    error when it failed (its default, cancellation, otherwise): the first reason a link
    records is the one it keeps."""
    return (f"send failed: {error_reason(exc)}",) if isinstance(exc, OSError) else ()


def error_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__
