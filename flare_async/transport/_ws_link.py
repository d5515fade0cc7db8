"""The WebSocket link (``ws://``, ``wss://``): frames as WebSocket messages, on aiohttp.

Wire mapping: one binary WebSocket message carries exactly one frame, the same bytes a TCP link
carries (prefix + msgpack header + payload). The receiver checks the prefix against its limits
and that the announced lengths add up to the message size exactly; aiohttp's ``max_msg_size`` is
set from the same limits (:func:`max_msg_size`), so a message larger than any acceptable frame
is refused by aiohttp from the WebSocket frame header, before its body is buffered. Text
messages, malformed frames and frames whose lengths disagree with their prefix raise
:class:`~flare_async.errors.ProtocolError` and close the link (close codes 1003, 1002 and 1009
for oversize).

Copies: aiohttp's ``send_bytes`` takes one bytes-like object and writes one unfragmented
WebSocket message, so a frame with a payload is joined **once** (``b"".join((head, *parts))``)
before it is handed over. A client must also mask what it sends (RFC 6455), which aiohttp does on
its own copy of the message; a server writes the message unmasked and without a further copy.
Received frames cost no copy of ours: the payload is a read-only view into the message aiohttp
assembled.

Backpressure and cancellation: aiohttp writes a message to the transport synchronously and then
waits for the transport to drain. ``send`` runs that first, synchronous step itself and leaves
any wait for the drain to a task of its own, which nothing cancels: a cancelled ``send`` has
handed over its whole frame or none of it, and cannot cancel the future aiohttp shares between
everything that writes on the connection (see ``send``). ``try_send`` keeps the default
(``False``): aiohttp has no public non-blocking send.

How a link's close ends depends on its side: see ``_ws_ends``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Coroutine
from typing import Any, Final, NoReturn

import aiohttp
import anyio
from aiohttp import WSCloseCode, WSMsgType, web
from anyio.lowlevel import checkpoint

from flare_async.errors import FrameTooLarge, LinkBroken, LinkClosed, ProtocolError, TransportError
from flare_async.transport._base import Link, LinkFacts, LinkStatistics
from flare_async.wire import PREFIX_SIZE, Frame, Limits, decode_frame, encode_head, payload_size

_ORDERLY_CLOSE_CODES: Final = frozenset({0, WSCloseCode.OK, WSCloseCode.GOING_AWAY})
"""Close codes that mean the peer closed on purpose (0: a close frame without a code)."""

_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

_DONE: Final = object()
"""Marks a coroutine that ran to its end (it may also yield ``None``, a bare yield)."""


def max_msg_size(limits: Limits) -> int:
    # aiohttp refuses a message whose size is >= max_msg_size, so allow one byte more than the
    # largest frame the limits accept.
    return PREFIX_SIZE + limits.max_header + limits.max_frame + 1


def format_address(address: Any, scheme: str | None = None) -> str:
    """``HOST:PORT`` of a socket address, as a ``SCHEME://HOST:PORT`` URL when given a scheme."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        text = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    else:
        text = str(address) if address is not None else "unknown"
    return f"{scheme}://{text}" if scheme else text


def _peer_certificate(ws: _WebSocket) -> bytes | None:
    ssl_object = ws.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    return der


class WebSocketLink(Link):
    """One end of a WebSocket link. Made by :class:`WebSocketDriver`."""

    def __init__(
        self,
        ws: _WebSocket,
        local_address: str,
        peer_address: str,
        limits: Limits,
        close_timeout: float,
    ) -> None:
        self._ws = ws
        self._close_timeout = close_timeout
        self._sock: Any = ws.get_extra_info("socket")
        self._sockname: Any = ws.get_extra_info("sockname")
        self._peername: Any = ws.get_extra_info("peername")
        self.local_address = local_address
        self.peer_address = peer_address
        self.limits = limits
        self.peer_limits = limits
        self._facts = LinkFacts(
            peer_address=peer_address,
            peer_certificate=_peer_certificate(ws),
            socket_peer=format_address(self._peername),
        )
        self._send_lock = asyncio.Lock()
        self._receive_lock = asyncio.Lock()  # aiohttp refuses concurrent receive() calls
        self._failure: tuple[type[TransportError], str] | None = None
        """Why the link no longer works; the first reason recorded wins."""
        self._close_code: int | None = None
        """Set once the closing handshake was started, with the code we close with."""
        self._finished = asyncio.Event()
        self._frames_in = 0
        self._frames_out = 0
        self._bytes_in = 0
        self._bytes_out = 0

    # ------------------------------------------------------------------ state
    def _fail(self, cls: type[TransportError], text: str) -> None:
        if self._failure is None:
            self._failure = (cls, text)

    def _check_open(self) -> None:
        if self._failure is not None:
            cls, text = self._failure
            raise cls(text)

    def _begin_close(self, code: int) -> None:
        """Start the closing handshake once; it finishes in the background."""
        if self._close_code is None:
            self._close_code = code
            self._start_finisher()

    def _start_finisher(self) -> None:
        raise NotImplementedError

    async def _close_websocket(self) -> None:
        """The closing handshake, bounded by ``close_timeout``; cut the connection if it overruns.

        aiohttp bounds only the wait for the peer's close frame, not writing ours (a peer that
        stopped reading never drains it), and closing a transport waits for its buffer to flush.
        """
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._ws.close(code=self._close_code or WSCloseCode.GOING_AWAY)
        except TimeoutError:
            self._kill()

    def _kill(self) -> None:
        """Cut the TCP connection now, without a close frame; a reset once the socket closes.

        Works on a duplicate of the socket's descriptor: the transports' socket wrappers do not
        all allow ``shutdown`` (uvloop's does not), and aiohttp's client does not expose its
        transport. The addresses are compared first, in case the descriptor was reused.
        """
        try:
            fd = self._sock.fileno() if self._sock is not None else -1
            if fd < 0:
                return
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        with dup:
            try:
                if dup.getsockname() != self._sockname or dup.getpeername() != self._peername:
                    return
                dup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    # ------------------------------------------------------------------ sending
    async def send(self, frame: Frame) -> None:
        self._check_open()
        parts = frame.parts
        size = payload_size(parts)
        # Encoded once: a frame with a deadline when the link is ours (the budget left then),
        # any other before waiting (FrameTooLarge first).
        late = frame.expires is not None
        head = None if late else encode_head(frame.header, size, self.peer_limits)
        lock = self._send_lock
        await lock.acquire()
        try:
            self._check_open()
            if head is None:
                head = encode_head(frame.stamp(anyio.current_time), size, self.peer_limits)
            # The one copy on the sending side: aiohttp sends one bytes-like object per message.
            data = b"".join((head, *parts)) if parts else head
            # aiohttp writes the whole message to the transport synchronously, in the first step
            # of send_bytes(); only waiting for the transport to drain (backpressure) suspends.
            # We take that first step here, so a send never hands over part of a frame.
            sending = self._ws.send_bytes(data)
            waiting_on = self._step(sending)
        except BaseException:
            lock.release()
            raise
        self._frames_out += 1
        self._bytes_out += len(data)
        if waiting_on is _DONE:
            lock.release()
            return
        # The drain is awaited by a task of ours, never cancelled: aiohttp (3.14 here; since
        # aio-libs/aiohttp#12307) awaits its protocol's shared drain future unshielded, so
        # cancelling a send there would cancel that future, and every later drain on the link
        # would raise CancelledError in tasks nobody cancelled, until writing resumed.
        # A cancelled send returns at once; its frame is on its way and the lock stays held
        # until the drain is over, so later frames still queue behind it (backpressure).
        drain = asyncio.get_running_loop().create_task(self._drain(sending, waiting_on))
        drain.add_done_callback(lambda task: _release_after(task, lock))
        await asyncio.shield(drain)

    def _step(self, sending: Coroutine[Any, Any, None]) -> Any:
        """Advance ``sending`` by one step: the future it now waits on, or ``_DONE``.

        Does what an asyncio task does with a coroutine it runs, including clearing the
        future's ``_asyncio_future_blocking`` flag (otherwise nothing else could await it).
        """
        try:
            waiting_on = sending.send(None)
        except StopIteration:
            return _DONE
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Not a cancellation of ours: the shared drain future was cancelled by a closing
            # handshake that ran out of time.
            self._lost("the connection was cut while closing")
        except (ConnectionError, aiohttp.ClientError) as exc:
            self._lost(str(exc) or type(exc).__name__)
        if waiting_on is not None:
            waiting_on._asyncio_future_blocking = False
        return waiting_on

    async def _drain(self, sending: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        """Drive ``sending`` to its end as a task would, in a task nobody but shutdown cancels."""
        try:
            while waiting_on is not _DONE:
                if waiting_on is None:
                    await asyncio.sleep(0)  # a bare yield
                else:
                    # Waits without ever cancelling the future; how it ended (result, error,
                    # cancellation by someone else) ``sending`` sees itself when resumed.
                    await asyncio.wait((waiting_on,))
                waiting_on = self._step(sending)
        except asyncio.CancelledError:  # the event loop is shutting down
            sending.close()
            raise

    def _lost(self, why: str) -> NoReturn:
        self._fail(LinkBroken, f"connection to {self.peer_address} lost: {why}")
        self._begin_close(WSCloseCode.ABNORMAL_CLOSURE)
        self._check_open()
        raise AssertionError("unreachable: the link has failed")

    # ------------------------------------------------------------------ receiving
    async def receive(self) -> Frame:
        async with self._receive_lock:
            while True:
                self._check_open()
                try:
                    msg = await self._ws.receive()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise
                    # Not a cancellation of ours: aiohttp's server injects CancelledError into
                    # its readers when it shuts down.
                    self._fail(LinkBroken, "the web server serving the link shut down")
                    self._begin_close(WSCloseCode.GOING_AWAY)
                    continue
                kind = msg.type
                if kind is WSMsgType.BINARY:
                    return self._decode(msg.data)
                if kind is WSMsgType.TEXT:
                    raise self._protocol_error(
                        ProtocolError("text message on a frame link"), WSCloseCode.UNSUPPORTED_DATA
                    )
                if kind is WSMsgType.CLOSE:
                    code, reason = msg.data, msg.extra
                    if code in _ORDERLY_CLOSE_CODES:
                        self._fail(LinkClosed, f"{self.peer_address} closed the link")
                    else:
                        why = f": {reason}" if reason else ""
                        self._fail(
                            LinkBroken, f"{self.peer_address} closed the link with code {code}{why}"
                        )
                    self._begin_close(WSCloseCode.OK)  # answer the peer's close frame
                elif kind is WSMsgType.ERROR:
                    exc = msg.data
                    if isinstance(exc, aiohttp.WebSocketError):
                        # aiohttp has already closed the WebSocket with exc.code.
                        cls = (
                            FrameTooLarge
                            if exc.code == WSCloseCode.MESSAGE_TOO_BIG
                            else ProtocolError
                        )
                        why = self._refused_why() or f"bad WebSocket message: {exc}"
                        raise self._protocol_error(cls(why), exc.code)
                    self._fail(LinkBroken, f"connection to {self.peer_address} failed: {exc}")
                    self._begin_close(WSCloseCode.ABNORMAL_CLOSURE)
                elif kind in (WSMsgType.CLOSED, WSMsgType.CLOSING):
                    # CLOSING/CLOSED after our own close are covered by _failure already.
                    cause = self._ws.exception()
                    why = f": {cause}" if cause else ""
                    self._fail(
                        LinkBroken, f"connection to {self.peer_address} ended without a close{why}"
                    )
                    self._begin_close(WSCloseCode.ABNORMAL_CLOSURE)
                # PING and PONG are answered by aiohttp (autoping); anything else: read on.

    def _decode(self, data: bytes | bytearray) -> Frame:
        view = memoryview(data)
        try:
            header, start = decode_frame(view, self.limits)
        except FrameTooLarge as exc:
            raise self._protocol_error(exc, WSCloseCode.MESSAGE_TOO_BIG) from None
        except ProtocolError as exc:
            raise self._protocol_error(exc, WSCloseCode.PROTOCOL_ERROR) from None
        self._frames_in += 1
        self._bytes_in += len(data)
        return Frame(header, (view[start:].toreadonly(),))

    def _refused_why(self) -> str | None:
        """Why our own frame check refused a message (accepting side only), if it did."""
        return None

    def _protocol_error(self, exc: ProtocolError, code: int) -> ProtocolError:
        self._fail(LinkClosed, "link was closed after a protocol error")
        self._begin_close(code)
        if exc.peer is None:
            return type(exc)(str(exc), peer=self.peer_address)
        return exc

    # ------------------------------------------------------------------ closing
    async def aclose(self) -> None:
        """Close with a normal close frame; idempotent, never raises for a dead link.

        Returns once the close is under way (see ``_ws_ends``); frames sent before are
        delivered first. :meth:`wait_closed` waits for the handshake and the connection to end.
        """
        self._fail(LinkClosed, "link was closed by this side")
        self._begin_close(WSCloseCode.OK)
        await checkpoint()

    def abort(self) -> None:
        """Break the link as a crash would: the connection is cut without a close frame.

        Both ends then see ``LinkBroken``. Used by the conformance suite's ``break_link``.
        """
        self._fail(LinkBroken, "link was aborted")
        self._kill()
        self._begin_close(WSCloseCode.ABNORMAL_CLOSURE)

    async def wait_closed(self) -> None:
        """Wait until the closing handshake ended and the connection was released.

        Only returns after the link was closed (:meth:`aclose`, :meth:`abort`, the peer's close
        or a failure); bounded by the driver's ``close_timeout`` from then on.
        """
        await self._finished.wait()

    # ------------------------------------------------------------------ facts
    def extra(self) -> LinkFacts:
        """The peer's certificate (``wss`` only), address, and TCP peer (``socket_peer``: the
        proxy, when the link goes through one)."""
        return self._facts

    def statistics(self) -> LinkStatistics:
        return LinkStatistics(
            frames_sent=self._frames_out,
            frames_received=self._frames_in,
            bytes_sent=self._bytes_out,
            bytes_received=self._bytes_in,
        )


def _release_after(task: asyncio.Task[None], lock: asyncio.Lock) -> None:
    lock.release()
    if not task.cancelled():
        task.exception()  # retrieved: a caller that was cancelled meanwhile cannot see it
