"""The ``tls://`` link: frames over mutual TLS, through anyio's ``TLSStream`` on the socket.

Encryption copies anyway, so reads feed the connection with ``receive_data`` (no ``recv_into``
into the frame's own buffer, as the raw link does). On an accepted socket the TLS handshake
runs on first use, inside the cell's handshake timeout, so a slow or hostile client never holds
up the accept loop.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Callable

import anyio
from anyio.abc import SocketStream
from anyio.streams.tls import TLSAttribute, TLSStream

from flare_async._concurrency import Lock
from flare_async.errors import LinkBroken, LinkClosed, ProtocolError
from flare_async.transport._base import LinkFacts
from flare_async.transport._tcp_base import TcpLink, error_reason
from flare_async.wire import HELLO_BUFFER, Buffer, Frame, Limits, payload_size

_TLS_READ = 256 * 1024
"""Most bytes one TLS read asks for (after the hello; HELLO_BUFFER before it)."""


class TlsLink(TcpLink):
    """A TCP link in mutual TLS: made with its ``tls`` stream (a link this side opened) or with
    ``server_tls``, the context of a handshake it still owes (an accepted link)."""

    def __init__(
        self,
        sock: socket.socket,
        limits: Limits,
        *,
        local_address: str,
        peer_address: str,
        tls: TLSStream | None = None,
        stream: SocketStream | None = None,
        server_tls: ssl.SSLContext | None = None,
        hello_limits: Limits | None = None,
        on_hello: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            sock,
            limits,
            local_address=local_address,
            peer_address=peer_address,
            hello_limits=hello_limits,
            on_hello=on_hello,
        )
        self._tls = tls
        self._stream = stream  # once set, the descriptor belongs to the stream's transport
        self._server_tls = server_tls  # set while an accepted link still owes a handshake
        self._handshake_lock = Lock()
        self._read_size = HELLO_BUFFER if hello_limits is not None else _TLS_READ

    def hello_done(self) -> None:
        self._read_size = _TLS_READ
        super().hello_done()

    async def _ensure_tls(self) -> None:
        if self._server_tls is None:
            return
        async with self._handshake_lock:
            context = self._take_server_tls()
            if context is None:  # another task did the handshake while we waited
                return
            try:
                self._stream = await SocketStream.from_socket(self._sock)
                self._tls = await TLSStream.wrap(
                    self._stream,
                    server_side=True,
                    ssl_context=context,
                    standard_compatible=False,
                )
            except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                self._mark_broken(f"TLS handshake failed: {error_reason(exc)}")
                raise ProtocolError(
                    f"TLS handshake failed: {error_reason(exc)}", peer=self.peer_address
                ) from None
            except BaseException:
                # Cancelled half way (e.g. the handshake timeout): never fall back to the raw
                # socket, which would carry frames in clear text.
                self._mark_broken("TLS handshake did not complete")
                raise

    def _take_server_tls(self) -> ssl.SSLContext | None:
        context, self._server_tls = self._server_tls, None
        return context

    # ------------------------------------------------------------------ I/O
    async def send(self, frame: Frame) -> None:
        if self._server_tls is not None:  # a frame too large is refused before the handshake
            self._conn.head(frame.header, payload_size(frame.parts))
            await self._ensure_tls()
        await super().send(frame)

    async def _write(self, segments: list[Buffer]) -> None:
        # The TLS stream makes a segment's records before it waits to write them: from the
        # first segment on, the frame is begun (see FINISH_WITHIN).
        await self._finish(self._write_records(segments))

    async def _write_records(self, segments: list[Buffer]) -> None:
        assert self._tls is not None
        try:
            for seg in segments:
                if len(seg):
                    await self._tls.send(seg)  # type: ignore[arg-type]
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError) as exc:
            self._mark_broken(f"send failed: {error_reason(exc)}")
            raise LinkBroken(self._broken or "") from None

    async def receive(self) -> Frame:
        if self._server_tls is not None:
            await self._ensure_tls()
        return await super().receive()

    async def _fill(self) -> None:
        assert self._tls is not None
        try:
            data = await self._tls.receive(self._read_size)
        except anyio.EndOfStream:
            self._conn.receive_data(b"")
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError, OSError) as e:
            if self._closed and self._broken is None:
                raise LinkClosed("link was closed by this side") from None
            self._mark_broken(f"connection failed: {error_reason(e)}")
            raise LinkBroken(self._broken or "") from None
        self._conn.receive_data(data)

    # ------------------------------------------------------------------ closing
    def _end_connection(self, *, reset: bool, crash: bool) -> None:
        if self._stream is None:  # no handshake yet: the descriptor is still the link's
            super()._end_connection(reset=reset, crash=crash)
            return
        # The descriptor belongs to the stream's transport: only end the connection here; the
        # stream closes the descriptor in aclose().
        sock = self._sock
        with contextlib.suppress(OSError):
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if not crash:  # a crash leaves the reset alone to the descriptor's close
                    sock.shutdown(socket.SHUT_RDWR)
                return
            sock.shutdown(socket.SHUT_WR)
            # As a raw link drains: bytes left unread (a TLS 1.3 session ticket nobody asked
            # for) would turn the close into a reset, and the peer would see a broken link.
            while sock.recv(65536, socket.MSG_DONTWAIT):
                pass

    async def _close_streams(self) -> None:
        # After the connection was shut down (and drained) by _end_connection.
        if self._tls is not None:
            with (
                anyio.move_on_after(1, shield=True),
                contextlib.suppress(OSError, ssl.SSLError, anyio.BrokenResourceError),
            ):
                await self._tls.aclose()
        if self._stream is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await self._stream.aclose()

    def abort(self) -> None:
        super().abort()
        if self._stream is not None:  # abort() cannot await the stream's aclose()
            _close_stream_now(self._stream)

    def extra(self) -> LinkFacts:
        cert = None
        if self._tls is not None:
            cert = self._tls.extra(TLSAttribute.peer_certificate_binary, None)
        return LinkFacts(peer_address=self.peer_address, peer_certificate=cert)


def _close_stream_now(stream: SocketStream) -> None:
    """Close ``stream``'s descriptor at once, the way its ``aclose()`` does, without awaiting.

    The one place the package reaches into anyio's private attributes (anyio 4 has no
    synchronous close of a socket stream): its asyncio stream owns the descriptor through a
    transport (``_transport``), its trio stream through a trio socket (``_trio_socket``).
    Looked up with ``getattr``, so an anyio that renames them leaves the descriptor to the
    ``aclose()`` that follows instead of failing.
    """
    transport = getattr(stream, "_transport", None)
    trio_socket = getattr(stream, "_trio_socket", None)
    if transport is not None:
        transport.abort()
    elif trio_socket is not None:
        trio_socket.close()
