"""The ``ws://`` and ``wss://`` driver: links over WebSocket, on aiohttp.

For sites that can only make outbound HTTP(S) connections, possibly through a proxy: the link is
an ordinary WebSocket (HTTP/1.1 upgrade), and ``wss://`` through an HTTP proxy is a ``CONNECT``
tunnel. Everything comes in as arguments; no environment variable (``HTTPS_PROXY``...) is read.
aiohttp runs on asyncio only, so this driver refuses to work under trio.

Wire mapping: one binary WebSocket message carries exactly one frame, the same bytes a TCP link
carries (prefix + msgpack header + payload). The receiver checks the prefix against its limits
and that the announced lengths add up to the message size exactly; aiohttp's ``max_msg_size`` is
set from the same limits, so a message larger than any acceptable frame is refused by aiohttp
from the WebSocket frame header, before its body is buffered. Text messages, malformed frames and
frames whose lengths disagree with their prefix raise :class:`~flare_async.errors.ProtocolError`
and close the link (close codes 1003, 1002 and 1009 for oversize).

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

Closing: :meth:`WebSocketLink.aclose` marks the link closed, starts the WebSocket closing handshake
(a normal close frame, 1000) and returns without waiting for the peer's answer, since the peer
answers only once its owner reads. The handshake is finished in the background, bounded by
``close_timeout``: on the accepting side by the aiohttp handler that serves the link, on the
connecting side by a small task the driver keeps, which then closes the link's
``aiohttp.ClientSession``. :meth:`WebSocketLink.wait_closed` waits for that end. A close frame
from the peer with code 1000/1001 (or none) is an orderly close (``LinkClosed``); any other code,
an EOF or reset without a close frame, or a missed heartbeat is ``LinkBroken``.

Listening: an ``aiohttp.web.Application`` with one WebSocket route (the URL's path, or the
driver's ``path`` when the URL has none), served by ``AppRunner`` on a socket and accept loop of
our own (see ``_WebSocketListener.start``). Plain HTTP
requests on that path get ``426 Upgrade Required``, other paths ``404``. Accepted WebSockets wait
for :meth:`Listener.accept` in a bounded queue of ``max_queue`` links; beyond it the upgrade is
refused with ``503`` (so ``connect`` raises ``ConnectError``). ``Listener.aclose`` stops the
site (the listening socket closes; connections not yet accepted are closed with code 1013) but
keeps links already accepted open, as the driver contract requires: aiohttp's
``AppRunner.cleanup`` would close them, so it runs only when no accepted link is left; otherwise
the server's remaining state goes away with the last link.

Before the hello (a listener given :meth:`Listener.guard`, as a cell's are): connections are
capped per listener and per source address at the TCP accept, and cut when the admission's
timeout passes before ``hello_done`` (TLS handshake, HTTP upgrade and hello together); the first
message may be no bigger than a hello (1009). Client frames without a mask are refused (1002)
on every accepted connection. See ``_FrameCheck`` and docs/design.md §3.

Why one file of ~1,000 lines: the listener's own accept loop, the pre-hello checks of the
WebSocket framing and the two link classes share aiohttp's objects at one boundary; issue 19
(links that are one thing each) is where this splits, as ``_tcp.py`` does.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from collections.abc import Coroutine
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio
import sniffio
from aiohttp import WSCloseCode, WSMsgType, web
from anyio.lowlevel import checkpoint

from flare_async import _logging
from flare_async._concurrency import Channel, ChannelClosed
from flare_async.errors import (
    ConfigError,
    ConnectError,
    FrameTooLarge,
    LinkBroken,
    LinkClosed,
    ProtocolError,
    TransportError,
)
from flare_async.transport._base import (
    ACCEPT_SKIP,
    Admission,
    Driver,
    Link,
    Listener,
    Pending,
    listening_socket,
)
from flare_async.wire import (
    PREFIX_SIZE,
    Frame,
    Limits,
    decode_frame,
    encode_head,
    payload_size,
)

__all__ = ["WebSocketDriver", "WebSocketLink"]

_BACKLOG: Final = 128
_ACCEPT_RETRY: Final = 0.1

_ORDERLY_CLOSE_CODES: Final = frozenset({0, WSCloseCode.OK, WSCloseCode.GOING_AWAY})
"""Close codes that mean the peer closed on purpose (0: a close frame without a code)."""

_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

_DONE: Final = object()
"""Marks a coroutine that ran to its end (it may also yield ``None``, a bare yield)."""


def _require_asyncio() -> None:
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library != "asyncio":
        raise ConfigError("ws:// needs the asyncio backend (aiohttp runs on asyncio only)")


def _max_msg_size(limits: Limits) -> int:
    # aiohttp refuses a message whose size is >= max_msg_size, so allow one byte more than the
    # largest frame the limits accept.
    return PREFIX_SIZE + limits.max_header + limits.max_frame + 1


def _format_address(address: Any, scheme: str | None = None) -> str:
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
        self._extra: dict[str, Any] = {
            "peer_certificate": _peer_certificate(ws),
            "peer_address": peer_address,
            "socket_peer": _format_address(self._peername),
        }
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

        Returns once the close is under way (see the module docs); frames sent before are
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
    def extra(self) -> dict[str, Any]:
        """``peer_certificate``: the peer's DER certificate (``wss`` only, else ``None``);
        ``peer_address``: as the attribute; ``socket_peer``: the TCP peer as ``HOST:PORT``
        (the proxy, when the link goes through one)."""
        return dict(self._extra)

    def statistics(self) -> dict[str, int]:
        return {
            "frames_sent": self._frames_out,
            "frames_received": self._frames_in,
            "bytes_sent": self._bytes_out,
            "bytes_received": self._bytes_in,
        }


class _ServerLink(WebSocketLink):
    """The accepting end: the aiohttp handler that accepted it serves it until it is closed."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        local_address: str,
        peer_address: str,
        limits: Limits,
        close_timeout: float,
        admitted: _Admitted,
    ) -> None:
        super().__init__(ws, local_address, peer_address, limits, close_timeout)
        self._close_requested = asyncio.Event()
        self._admitted = admitted
        admitted.link = self

    def _start_finisher(self) -> None:
        self._close_requested.set()

    def hello_done(self) -> None:
        self._admitted.hello_done()

    def _refused_why(self) -> str | None:
        return self._admitted.violation

    async def serve(self) -> None:
        """Run in the aiohttp handler: keep it alive while the link is open, then close."""
        try:
            await self._close_requested.wait()
        finally:
            # Only a cancelled handler gets here with the link still open.
            self._fail(LinkBroken, "the web server stopped serving the link")
            try:
                await self._close_websocket()
            finally:
                self._finished.set()


class _ClientLink(WebSocketLink):
    """The connecting end: owns an ``aiohttp.ClientSession``, closed with the link."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        session: aiohttp.ClientSession,
        tasks: set[asyncio.Task[None]],
        local_address: str,
        peer_address: str,
        limits: Limits,
        close_timeout: float,
    ) -> None:
        super().__init__(ws, local_address, peer_address, limits, close_timeout)
        self._session = session
        self._tasks = tasks

    def _start_finisher(self) -> None:
        task = asyncio.get_running_loop().create_task(
            self._finish(), name=f"close ws link to {self.peer_address}"
        )
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(_forget_task(self._tasks))

    async def _finish(self) -> None:
        try:
            # Sends the close frame, then reads (and drops) until the peer's close frame, then
            # closes the connection (RFC 6455 lets the server close TCP first).
            await self._close_websocket()
        finally:
            try:
                await self._session.close()
            finally:
                self._finished.set()


def _release_after(task: asyncio.Task[None], lock: asyncio.Lock) -> None:
    lock.release()
    if not task.cancelled():
        task.exception()  # retrieved: a caller that was cancelled meanwhile cannot see it


def _forget_task(tasks: set[asyncio.Task[None]]) -> Any:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it; the link is closed anyway

    return done


_UNMASKED: Final = b"\x83\x80"
"""A frame aiohttp's reader refuses with 1002 (a reserved opcode): stands in for an unmasked one."""
_TOO_BIG: Final = b"\x82\xff" + b"\xff" * 8
"""A frame header aiohttp's reader refuses with 1009 (a length beyond 2**63): stands in for a
message bigger than the hello phase allows."""


class _Admitted:
    """One accepted connection of a listener: its place among the pending ones, its deadline,
    and what the frame check found. Lives from the TCP accept to the connection's end."""

    def __init__(
        self, listener: _WebSocketListener, source: str, peer: str, pending: Pending | None
    ) -> None:
        self.listener = listener
        self.source = source
        self.peer = peer
        self.pending = pending
        self.max_message = (
            _max_msg_size(pending.admission.limits) - 1 if pending is not None else None
        )
        """Largest first message allowed before the hello (``None``: no hello phase)."""
        self.timer: asyncio.TimerHandle | None = None
        self.starting: asyncio.Task[None] | None = None
        """Wraps the socket in a transport (and runs the TLS handshake) until it is done."""
        self.transport: asyncio.BaseTransport | None = None
        self.link: _ServerLink | None = None
        self.violation: str | None = None

    def hello_done(self) -> None:
        self.max_message = None
        self._release()

    def closed(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.release(self.source)

    def expire(self) -> None:
        """The deadline passed before the hello: cut the connection (TLS, upgrade or hello)."""
        self.timer = None
        pending = self.pending
        if pending is None:
            return
        if self.link is None:  # still before the upgrade: the cell never saw it, count it here
            pending.admission.refused["no hello in time"] += 1
            _logging.get_logger().warning(
                "connection refused before hello", peer=self.peer, reason="no hello in time"
            )
        self._release()
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        elif self.transport is not None:
            self.transport.close()
        elif self.starting is not None:
            self.starting.cancel()


class _FrameCheck:
    """Sits between aiohttp's request handler and its WebSocket reader, on the raw bytes.

    Reads only the frame headers (payloads pass untouched, without a copy): a client frame
    without a mask (RFC 6455 §5.1) and, before the hello, a data message bigger than a hello are
    refused. aiohttp has no hook for either, so the check feeds the reader, at that frame's
    boundary, a frame header the reader itself refuses with the right code (1002, 1009): the link
    then fails through aiohttp's ordinary path (its close frame, our ``ProtocolError`` or
    ``FrameTooLarge`` with the reason recorded here); the bytes after it are never parsed.
    """

    def __init__(self, parser: Any, admitted: _Admitted) -> None:
        self._parser = parser
        self._admitted = admitted
        self._held = b""  # a frame header split over reads (forwarded once whole)
        self._skip = 0  # payload bytes of the current frame still to pass
        self._message = 0  # bytes of the current data message so far
        self._failed = False

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._failed:
            return self._parser.feed_data(data)  # type: ignore[no-any-return]
        buf = self._held + data if self._held else data
        self._held = b""
        n = len(buf)
        i = 0
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                i += take
                self._skip -= take
                continue
            if n - i < 2:
                return self._hold(buf, i)
            second = buf[i + 1]
            short = second & 0x7F
            extra = 2 if short == 126 else 8 if short == 127 else 0
            size = 2 + extra + (4 if second & 0x80 else 0)
            if n - i < size:
                return self._hold(buf, i)
            length = int.from_bytes(buf[i + 2 : i + 2 + extra]) if extra else short
            refusal = self._refusal(buf[i], second, length)
            if refusal is not None:
                self._failed = True
                if i:
                    self._parser.feed_data(buf[:i])
                return self._parser.feed_data(refusal)  # type: ignore[no-any-return]
            self._skip = length
            i += size
        return self._parser.feed_data(buf)  # type: ignore[no-any-return]

    def _hold(self, buf: bytes, start: int) -> tuple[bool, bytes]:
        self._held = buf[start:]
        if not start:
            return False, b""
        return self._parser.feed_data(buf[:start])  # type: ignore[no-any-return]

    def _refusal(self, first: int, second: int, length: int) -> bytes | None:
        admitted = self._admitted
        if not second & 0x80:
            admitted.violation = "unmasked frame from the client (RFC 6455 §5.1)"
            return _UNMASKED
        limit = admitted.max_message
        if limit is not None and first & 0x0F <= 0x2:  # continuation, text, binary
            self._message += length
            if self._message > limit:
                admitted.violation = (
                    f"first message of at least {self._message} bytes is bigger than a hello"
                    f" ({limit} bytes)"
                )
                return _TOO_BIG
            if first & 0x80:  # FIN: the message ends with this frame
                self._message = 0
        return None


class _Handler(web.RequestHandler):
    """aiohttp's request handler for one connection, with our frame check and bookkeeping."""

    __slots__ = ("_admitted",)

    def __init__(self, manager: web.Server, *, admitted: _Admitted, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._admitted = admitted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admitted.transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._admitted.closed()
        super().connection_lost(exc)

    def set_parser(self, parser: Any, data_received_cb: Any = None) -> None:
        # The reader is used only through feed_data/feed_eof, which the check provides.
        check: Any = _FrameCheck(parser, self._admitted)
        super().set_parser(check, data_received_cb)


class _WebSocketListener(Listener):
    def __init__(
        self, url: str, scheme: str, limits: Limits, driver: WebSocketDriver, runner: web.AppRunner
    ) -> None:
        self.url = url
        self._scheme = scheme
        self.limits = limits
        self._driver = driver
        self._runner = runner
        self._backlog: Channel[_ServerLink] = Channel(driver.max_queue)
        self._links: set[_ServerLink] = set()
        """Links whose handler is running (queued or accepted)."""
        self._closed = False
        self._sock: socket.socket | None = None
        self._ssl: ssl.SSLContext | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._pending: Pending | None = None

    def guard(self, admission: Admission) -> bool:
        self._pending = Pending(admission)
        return True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of the WebSocket route."""
        driver = self._driver
        ws = web.WebSocketResponse(
            timeout=driver.close_timeout,
            autoclose=False,
            autoping=True,
            heartbeat=driver.heartbeat,
            compress=False,
            max_msg_size=_max_msg_size(self.limits),
        )
        if not ws.can_prepare(request):
            return web.Response(
                status=426,
                text="this endpoint speaks WebSocket only\n",
                headers={"Upgrade": "websocket", "Connection": "Upgrade"},
            )
        if self._closed or len(self._backlog) >= self._backlog.size:
            return web.Response(status=503, text="listener closed or accept backlog full\n")
        await ws.prepare(request)
        transport = request.transport
        peer = _format_address(
            transport.get_extra_info("peername") if transport else None, self._scheme
        )
        handler = request.protocol
        admitted = handler._admitted if isinstance(handler, _Handler) else None
        if admitted is None:  # not one of our connections: cannot happen
            return web.Response(status=500, text="unknown connection\n")
        link = _ServerLink(ws, self.url, peer, self.limits, driver.close_timeout, admitted)
        try:
            offered = self._backlog.put_nowait(link)
        except ChannelClosed:
            offered = False
        if not offered:  # closed or filled while the upgrade was answered
            link._fail(LinkBroken, "listener did not take the link")
            link._begin_close(WSCloseCode.TRY_AGAIN_LATER)
        self._links.add(link)
        try:
            await link.serve()
        finally:
            self._links.discard(link)
        return ws

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Listen on our own socket and accept in a task of ours (not aiohttp's ``TCPSite``): a
        connection is counted, capped and given its deadline at the TCP accept, before its TLS
        handshake and HTTP upgrade, which aiohttp does not bound."""
        infos = await anyio.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, addr = infos[0]
        sock = listening_socket(family, addr, _BACKLOG)
        self._sock = sock
        self._ssl = ssl_context
        self._accepting = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name=f"accept {self.url}"
        )
        port_: int = sock.getsockname()[1]
        return port_

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        log = _logging.get_logger()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP:
                    continue
                log.warning("ws listener cannot accept", url=self.url, reason=str(exc))
                await asyncio.sleep(_ACCEPT_RETRY)  # out of descriptors: let some close
                continue
            source = str(addr[0])
            peer = _format_address(addr, self._scheme)
            pending = self._pending
            if pending is not None:
                why = pending.admit(source)
                if why is not None:  # closed at once: no handler, no handshake
                    conn.close()
                    log.warning("connection refused before hello", peer=peer, reason=why)
                    continue
            admitted = _Admitted(self, source, peer, pending)
            if pending is not None:
                admitted.timer = loop.call_later(pending.admission.timeout, admitted.expire)
            task = loop.create_task(self._start_connection(conn, admitted))
            admitted.starting = task
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_connection(self, conn: socket.socket, admitted: _Admitted) -> None:
        """Hand the socket to aiohttp (after the TLS handshake, for wss)."""
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            timeout = admitted.pending.admission.timeout if admitted.pending else None
            await loop.connect_accepted_socket(
                lambda: _Handler(server, admitted=admitted, loop=loop, access_log=None),
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=timeout if self._ssl is not None else None,
            )
        except (OSError, asyncio.CancelledError) as exc:  # TLS failed, timed out, or closing
            conn.close()
            admitted.closed()
            if not isinstance(exc, asyncio.CancelledError):
                _logging.get_logger().info(
                    "connection failed before the upgrade", peer=admitted.peer, reason=str(exc)
                )
        finally:
            admitted.starting = None

    async def accept(self) -> Link:
        try:
            return await self._backlog.get()
        except ChannelClosed:
            raise LinkClosed(f"listener {self.url} is closed") from None

    async def aclose(self) -> None:
        if self._closed:
            await checkpoint()
            return
        self._closed = True
        self._backlog.close()
        for pending in self._backlog.clear():
            pending._fail(LinkBroken, "listener closed before the link was accepted")
            pending._begin_close(WSCloseCode.TRY_AGAIN_LATER)
        with anyio.CancelScope(shield=True):
            if self._accepting is not None:
                self._accepting.cancel()
                await asyncio.wait((self._accepting,))
            if self._sock is not None:
                self._sock.close()
            for task in list(self._starting):
                task.cancel()
            if self._starting:
                await asyncio.wait(self._starting)
            if not self._links:
                await self._runner.cleanup()
        await checkpoint()


class WebSocketDriver(Driver):
    """Serves ``ws://HOST:PORT/PATH`` and ``wss://HOST:PORT/PATH`` URLs with aiohttp.

    Args:
        server_ssl: TLS context for ``wss://`` listeners (set ``verify_mode`` and CA for mTLS).
        client_ssl: TLS context for ``wss://`` connections (CA to trust, our certificate).
        proxy: HTTP proxy URL for connections (``wss://`` goes through it with ``CONNECT``).
        path: the WebSocket route when a URL names no path.
        heartbeat: seconds between WebSocket pings; a missing pong breaks the link. ``None``:
            no pings (the runtime's own heartbeat then detects dead peers).
        max_queue: accepted WebSockets waiting for ``accept()``; beyond it upgrades get 503.
        close_timeout: how long a closing handshake waits for the peer's close frame.
        connect_timeout: bound on ``connect`` (TCP, proxy, TLS and upgrade); ``None``: none.
    """

    schemes = ("ws", "wss")

    def __init__(
        self,
        *,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        proxy: str | None = None,
        path: str = "/flare",
        heartbeat: float | None = None,
        max_queue: int = 64,
        close_timeout: float = 10.0,
        connect_timeout: float | None = 30.0,
    ) -> None:
        if max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        if not path.startswith("/"):
            raise ConfigError(f"path {path!r} must start with '/'")
        if heartbeat is not None and heartbeat <= 0:
            raise ConfigError("heartbeat must be positive (or None)")
        if close_timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise ConfigError("close_timeout and connect_timeout must be positive")
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.proxy = proxy
        self.path = path
        self.heartbeat = heartbeat
        self.max_queue = max_queue
        self.close_timeout = close_timeout
        self.connect_timeout = connect_timeout
        self._closing_tasks: set[asyncio.Task[None]] = set()

    def _parse(self, url: str) -> tuple[str, str, int, str]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            raise ConfigError(f"{url!r} is not a ws:// or wss:// URL")
        host = parts.hostname
        if not host:
            raise ConfigError(f"{url!r} names no host")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{url!r} has an invalid port") from None
        if port is None:
            port = 443 if scheme == "wss" else 80
        return scheme, host, port, parts.path or self.path

    async def connect(self, url: str, *, limits: Limits) -> Link:
        _require_asyncio()
        scheme, _, _, path = self._parse(url)
        ssl_arg: ssl.SSLContext | bool = True
        if scheme == "wss":
            if self.client_ssl is None:
                raise ConfigError("wss:// needs a client_ssl context")
            ssl_arg = self.client_ssl
        parts = urlsplit(url)
        target = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        try:
            with anyio.fail_after(self.connect_timeout):
                ws = await session.ws_connect(
                    target,
                    ssl=ssl_arg,
                    proxy=self.proxy,
                    max_msg_size=_max_msg_size(limits),
                    autoclose=False,
                    autoping=True,
                    heartbeat=self.heartbeat,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.close_timeout),
                )
        except aiohttp.WSServerHandshakeError as exc:
            await session.close()
            raise ConnectError(
                f"{url}: the server refused the WebSocket upgrade (HTTP {exc.status} {exc.message})"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:  # OSError: also TimeoutError, SSLError
            await session.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise ConnectError(f"cannot connect to {url}: {reason}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await session.close()
            raise
        local = _format_address(ws.get_extra_info("sockname"), scheme)
        return _ClientLink(ws, session, self._closing_tasks, local, url, limits, self.close_timeout)

    async def listen(self, url: str, *, limits: Limits) -> Listener:
        _require_asyncio()
        scheme, host, port, path = self._parse(url)
        if scheme == "wss" and self.server_ssl is None:
            raise ConfigError("wss:// needs a server_ssl context")
        app = web.Application()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.close_timeout)
        url_host = f"[{host}]" if ":" in host else host
        listener = _WebSocketListener(url, scheme, limits, self, runner)
        app.router.add_get(path, listener.handle)
        await runner.setup()
        try:
            bound = await listener.start(host, port, self.server_ssl if scheme == "wss" else None)
        except OSError as exc:
            await runner.cleanup()
            raise ConnectError(f"cannot listen on {url}: {exc}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            raise
        listener.url = f"{scheme}://{url_host}:{bound}{path}"
        return listener
