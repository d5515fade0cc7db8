"""The ``tls://`` link on asyncio (and uvloop): the raw link's reader callback and vectored
writes, with an :class:`ssl.SSLObject` on memory BIOs in between.

TLS costs what the cipher costs, not what the Python around it costs, when it runs where the
raw ``tcp://`` link's I/O already runs (:class:`~flare_async.transport._tcp_asyncio.
AsyncioTcpLink`): the reader callback stays registered with the loop and, per wakeup, reads one
large slice of ciphertext, writes it into the incoming BIO and decrypts with
``SSLObject.read(n, buffer)`` straight into the buffer the connection hands out (a large
payload's own buffer), so frames are pushed to the cell (``deliver_to``) as they complete. The
small frames try_send takes in one turn of the loop are held as on the raw link, then sealed
with one ``SSLObject.write`` (one record for many frames) and leave with one ``send``; a frame
from send() with one write of its segments joined (a large one in slices of :data:`_SEAL`, cut
by OpenSSL into full 16 KiB records) and one send per slice. What the socket does not take of
sealed bytes is never given back: a small tail goes to the writer callback, a large one is
finished within FINISH_WITHIN.

Chosen by measurement (64 callers, request/reply of 72-byte messages over one loopback
connection, one process, three rounds interleaved): this design made 42-44k round trips/s on
uvloop, 37-43k on asyncio; the loop's own SSL transport (``create_connection(ssl=...)``, a
protocol) 34-37k and 32-33k; bare sockets 56-66k. That transport also writes through its own
buffer: no send lock backpressure, no say over the close and reset on the socket.

What the link keeps from the TLS link on other backends (:mod:`~flare_async.transport._tls`):
an accepted socket owes its handshake until first used, inside the cell's handshake timeout, so
a slow or hostile client never holds up accept; a failed handshake is a ``ProtocolError``; one
cancelled half way breaks the link (never clear text). Before its hello a link reads at most
:data:`~flare_async.wire.HELLO_BUFFER` bytes of ciphertext per wakeup, into a buffer shared by
every link of the thread (an idle link costs no read buffer of its own). Closing is the raw
link's (no ``close_notify``: the cells said goodbye in frames), and so is an abort's reset.
Payloads cannot pass through a TLS link unread: it does not splice.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import cast

import anyio

from flare_async._concurrency import Lock
from flare_async.errors import LinkBroken, ProtocolError
from flare_async.transport._base import Link, LinkFacts, Splicing
from flare_async.transport._tcp_asyncio import AsyncioTcpLink
from flare_async.transport._tcp_base import cut_reason, error_reason
from flare_async.wire import HELLO_BUFFER, Buffer, Envelope, Frame, Limits, Passing, payload_size

_TLS_READ = 256 * 1024
"""Most ciphertext one wakeup reads (after the hello; HELLO_BUFFER before it)."""
_RECORD_MAX = 5 + 16 * 1024 + 2048
"""Most bytes of one TLS record on the wire (TLS 1.2's limit; TLS 1.3's is lower)."""
_SEAL = 256 * 1024
"""Plaintext sealed per ``SSLObject.write`` of a large frame (its records leave in one send)."""


class _ReadBuffer(threading.local):
    """Ciphertext read for the BIO: one buffer per thread (a loop's callbacks never overlap)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(_TLS_READ))


_READ = _ReadBuffer()


class AsyncioTlsLink(AsyncioTcpLink):
    """A ``tls://`` link on asyncio.

    Args:
        sock: the connected socket (non-blocking); the link owns it.
        limits: limits applied to frames we receive.
        context: the TLS context: a server's (it must require client certificates) for an
            accepted link, a client's for one this side opens.
        server_side: an accepted link; its handshake runs on first use (see
            :meth:`_ensure_tls`). A link this side opens is handed over after
            :meth:`handshake`.
        server_hostname: the name the server's certificate must carry (client side).
        hello_limits, on_hello: as :class:`~flare_async.transport._tcp_base.TcpLink`.
    """

    def __init__(
        self,
        sock: socket.socket,
        limits: Limits,
        *,
        local_address: str,
        peer_address: str,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
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
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
        )
        self._secure = False  # the handshake completed: frames may flow
        self._unread = False  # ciphertext waits in the incoming BIO: decrypt before reading
        # Where the records of the incoming stream end, to tell an end of stream between
        # records from one in the middle of one (OpenSSL reports both alike, and takes a partial
        # record out of the BIO): bytes of the current record still to come, and the first
        # bytes of a record header split between reads.
        self._record_left = 0
        self._header = b""
        self._handshake_lock = Lock()
        self._read_size = HELLO_BUFFER if hello_limits is not None else _TLS_READ

    def hello_done(self) -> None:
        self._read_size = _TLS_READ
        super().hello_done()

    # ------------------------------------------------------------------ handshake
    async def handshake(self) -> None:
        """Run the TLS handshake on the socket (a link this side opens: before it is used).

        Raises:
            ssl.SSLError: the handshake failed (a certificate refused, not TLS at all, the
                peer closed during it).
            OSError: the connection failed.
            LinkClosed, LinkBroken: the link was closed or aborted meanwhile.

        Cancelled, it leaves the link unusable: the caller breaks or closes it.
        """
        tls = self._tls
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_handshake()
                await self._wait(anyio.wait_readable)
                try:
                    data = self._sock.recv(HELLO_BUFFER)
                except BlockingIOError:
                    continue
                if data:
                    self._follow_records(memoryview(data), len(data))
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
        await self._send_handshake()  # our last flight (a client's Finished, a server's tickets)
        self._secure = True
        if self._incoming.pending or tls.pending():
            # Records that came with the peer's last flight (a client's first frame): nothing
            # more may come on the socket until they are answered, so read them now.
            self._unread = True
            self._on_readable()

    async def _send_handshake(self) -> None:
        data = memoryview(self._outgoing.read())
        while data.nbytes:
            try:
                data = data[self._sock.send(data) :]
            except BlockingIOError:
                await self._wait(anyio.wait_writable)

    async def _ensure_tls(self) -> None:
        """Run the handshake an accepted link owes, once; afterwards the link is secure, or
        broken or closed (the caller's usability check says which).

        Raises:
            ProtocolError: the handshake failed; the link is broken.
        """
        if self._secure:
            return
        async with self._handshake_lock:
            if self._secure or self._broken is not None or self._closed:
                return  # done by another task meanwhile, or failed
            try:
                await self.handshake()
            except (ssl.SSLError, OSError) as exc:
                self._mark_broken(f"TLS handshake failed: {error_reason(exc)}")
                raise ProtocolError(
                    f"TLS handshake failed: {error_reason(exc)}", peer=self.peer_address
                ) from None
            except BaseException:
                # Cancelled half way (e.g. the handshake timeout): the link must never carry
                # frames without TLS, so it is broken, not left to a later try.
                self._mark_broken("TLS handshake did not complete")
                raise

    # ------------------------------------------------------------------ sending
    def try_send(self, frame: Frame) -> bool:
        if not self._secure:
            return False  # send() runs the handshake first
        return super().try_send(frame)

    async def send(self, frame: Frame) -> None:
        if not self._secure:  # a frame too large is refused before the handshake
            self._conn.head(frame.header, payload_size(frame.parts))
            await self._ensure_tls()
        await super().send(frame)

    def _write_held(self, out: list[Buffer]) -> tuple[list[Buffer], int]:
        """Seal the small frames try_send held this turn (see the raw link's ``_write_small``)
        together, one record for many frames, and write them with one ``send``. Sealed, they
        are begun (records carry sequence numbers): what the socket does not take now is
        parked for the writer callback, never given back. (Overriding this is what keeps the
        raw link's flush from writing held frames unsealed.)"""
        self._tls.write(b"".join(out))
        data = self._outgoing.read()
        try:
            return [data], self._sock.send(data)
        except BlockingIOError:
            return [data], 0

    async def _write(self, segments: list[Buffer], *, begun: bool = False) -> None:
        held = self._take_out()  # small frames try_send took before this one go first
        chunks = _plaintext([*held, *segments] if held else segments)
        sealed = False
        try:
            for chunk in chunks:
                self._tls.write(chunk)
                sealed = True
                data = memoryview(self._outgoing.read())
                try:
                    n = self._sock.send(data)
                except BlockingIOError:
                    n = 0
                if n < data.nbytes:
                    # Its records are made: the rest is written whatever the sender does (see
                    # FINISH_WITHIN).
                    await self._finish(self._write_rest(data[n:], chunks))
                    return
        except BaseException as exc:
            if sealed and self._sock.fileno() >= 0:
                self._cut_short(*cut_reason(exc))
            raise

    async def _write_rest(self, data: memoryview, chunks: Iterator[Buffer]) -> None:
        while True:
            while data.nbytes:
                try:
                    data = data[self._sock.send(data) :]
                except BlockingIOError:
                    await self._wait(anyio.wait_writable)
            chunk = next(chunks, None)
            if chunk is None:
                return
            self._tls.write(chunk)
            data = memoryview(self._outgoing.read())

    # ------------------------------------------------------------------ receiving
    async def receive(self) -> Frame:
        if not self._secure:
            await self._ensure_tls()
            self._check_usable()  # the handshake failed earlier, or the link was closed
        return await super().receive()

    def _read_socket(self) -> bool:
        """Read a slice of ciphertext and decrypt every whole record in it into the connection:
        ``False`` at the end of the stream (a clean end: at a record boundary, or the peer's
        ``close_notify``).

        Raises:
            LinkBroken: the peer closed in the middle of a TLS record.
            ssl.SSLError: a record failed (an alert from the peer, a bad MAC).
        """
        incoming = self._incoming
        if self._unread:
            self._unread = False
        else:
            view = _READ.view[: self._read_size]
            n = self._sock.recv_into(view)
            if not n:
                if self._record_left or self._header:
                    self._mark_broken("peer closed the connection in the middle of a TLS record")
                    raise LinkBroken(self._broken or "")
                return False
            self._follow_records(view, n)
            incoming.write(view[:n])
        conn = self._conn
        tls = self._tls
        ended = False
        more = True
        while more:
            # Whole records into the buffer the connection hands out, then one parse: many
            # small frames read at once are parsed together, not one record at a time.
            buf = conn.get_buffer()
            size = buf.nbytes
            got = 0
            try:
                while got < size:
                    k = cast(int, tls.read(size - got, buf[got:]))  # with a buffer: a count
                    if not k:  # the peer's close_notify
                        ended, more = True, False
                        break
                    got += k
                    if not (incoming.pending or tls.pending()):
                        more = False  # saves the SSLWantReadError that would say so
                        break
            except ssl.SSLWantReadError:
                more = False  # every whole record is read; a partial one waits
            finally:
                if got:  # records before a bad one are frames the receiver still gets
                    conn.buffer_updated(got)
        if ended:
            return False
        # The peer still owes at least this much ciphertext for the frame in progress: what
        # the frame still lacks, less what waits undecrypted (in the BIO, or a partial record
        # OpenSSL took out of it). At most half a read, so a wakeup takes all it waited for.
        self._set_lowat(min(conn.owed - incoming.pending - _RECORD_MAX, _TLS_READ // 2))
        return True

    def _follow_records(self, data: memoryview, n: int) -> None:
        """Follow the record boundaries (5-byte headers ending in a length) through ``data[:n]``."""
        left = self._record_left
        if self._header:
            need = 5 - len(self._header)
            if n < need:
                self._header += bytes(data[:n])
                return
            head = self._header + bytes(data[:need])
            self._header = b""
            left = need + ((head[3] << 8) | head[4])
        while left < n:
            if left + 5 > n:
                self._header = bytes(data[left:n])
                left = n
                break
            left += 5 + ((data[left + 3] << 8) | data[left + 4])
        self._record_left = left - n

    # ------------------------------------------------------------------ no splicing
    @property
    def splices(self) -> bool:
        """Always ``False``: a payload spliced into the socket would bypass the encryption."""
        return False

    def pass_through(self, decide: Callable[[Envelope, int], bool] | None) -> bool:
        return False

    async def send_passing(self, frame: Frame, passing: Passing, src: Link) -> None:
        """Never splices (see :attr:`splices`): reads the payload from ``src``, then seals it."""
        if not isinstance(src, Splicing):
            raise TypeError("send_passing needs the passing frame of a splicing link")
        whole = await src.take_passing(passing)
        await self.send(Frame(frame.header, whole.parts, frame.expires))

    def _end_connection(self, *, reset: bool, crash: bool) -> None:
        if reset and not crash:  # as TlsLink: a FIN before the reset (a silent client that
            with contextlib.suppress(OSError):  # timed out reads the end, not only a reset)
                self._sock.shutdown(socket.SHUT_RDWR)
        super()._end_connection(reset=reset, crash=crash)

    # ------------------------------------------------------------------ facts
    def extra(self) -> LinkFacts:
        cert = self._tls.getpeercert(binary_form=True) if self._secure else None
        return LinkFacts(peer_address=self.peer_address, peer_certificate=cert)


def _plaintext(segments: list[Buffer]) -> Iterator[Buffer]:
    """A frame's segments as pieces of at most :data:`_SEAL` bytes: small segments joined (a
    small frame is one piece, one record), a large one in slices of its own memory."""
    pieces: list[memoryview] = []
    size = 0
    for seg in segments:
        view = memoryview(seg).cast("B")
        while view.nbytes:
            take = min(_SEAL - size, view.nbytes)
            if not size and take == _SEAL:
                yield view[:take]
            else:
                pieces.append(view[:take])
                size += take
                if size == _SEAL:
                    yield b"".join(pieces)
                    pieces, size = [], 0
            view = view[take:]
    if pieces:
        yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
