"""The ``tcp://`` and ``tls://`` drivers: frames over TCP sockets, with mutual TLS for ``tls``.

Plain TCP works on the raw non-blocking socket: the sans-IO :class:`~flare_async.wire.Connection`
hands out the buffer to read into (a large payload is read straight into its own buffer with
``recv_into``, never through an intermediate ``bytes``), and frames are written with
``sendmsg`` as a list of segments (header and payload parts are never concatenated). Measured on
this machine (docs/design.md §5): anyio's stream ``receive()`` tops out near 0.9 GB/s because
every read allocates; ``recv_into`` after ``wait_readable`` reaches 1.9 (asyncio) to 2.7 GB/s
(uvloop).

TLS goes through anyio's ``TLSStream`` over the same socket: encryption copies anyway, so its
reads feed the connection with ``receive_data``. On an accepted socket the TLS handshake runs on
first use, inside the cell's handshake timeout, so a slow or hostile client never holds up the
accept loop.

A frame cut by cancellation after some of its bytes were written cannot be completed later
without blocking the canceller, so the link is marked broken instead: the peer then sees
``LinkBroken``, never a corrupted frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import socket
import ssl
import struct
import termios
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
import sniffio
from anyio.abc import SocketStream
from anyio.lowlevel import checkpoint
from anyio.streams.tls import TLSAttribute, TLSStream

from flare_async import _logging
from flare_async._concurrency import Lock
from flare_async.errors import (
    ConfigError,
    ConnectError,
    LinkBroken,
    LinkClosed,
    ProtocolError,
)
from flare_async.transport import _splice
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
    EOF,
    HELLO_BUFFER,
    Buffer,
    Connection,
    Envelope,
    Frame,
    Limits,
    Passing,
    payload_size,
)

_IOV_MAX = 1024
FINISH_WITHIN = 30.0
"""Seconds a frame already begun may wait for room to finish after its sender is cancelled.

A link carries frames from many tasks; one task giving up (a deadline, a withdrawn task) must
not cut a frame in half, which would lose the link for all of them. So once a frame's first
bytes are written (with TLS: once its records are made), the rest is written shielded from
cancellation; only a peer that takes none of it for this long breaks the link."""


def split_hostport(url: str, schemes: Sequence[str]) -> tuple[str, int, str]:
    """``(host, port, scheme)`` of a ``tcp://`` or ``tls://`` URL.

    Raises:
        ConfigError: another scheme, or no host or port.
    """
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ConfigError(f"{url!r} is not a {'/'.join(schemes)} URL")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{url!r}: {exc}") from None
    if not parts.hostname or port is None:
        raise ConfigError(f"{url!r} needs a host and a port, e.g. tcp://127.0.0.1:8002")
    return parts.hostname, port, parts.scheme


def _format_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class TcpLink(Link):
    """One TCP (optionally TLS) connection carrying frames. One reader at a time."""

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
        self._sock = sock
        self._tls = tls
        self._stream = stream  # once set, the descriptor belongs to the stream's transport
        self._server_tls = server_tls  # set while an accepted TLS link still owes a handshake
        # Accepted by a guarded listener: until hello_done(), a hello-sized frame in a small
        # buffer (docs/design.md §3); on_hello releases the listener's count of pending links.
        self._on_hello = on_hello
        self._read_size = _TLS_READ
        if hello_limits is not None:
            self._conn = Connection(hello_limits, peer=peer_address, staging_size=HELLO_BUFFER)
            self._read_size = HELLO_BUFFER
        else:
            self._conn = Connection(limits, peer=peer_address)
        self.limits = limits
        self.peer_limits = limits
        self.local_address = local_address
        self.peer_address = peer_address
        self._send_lock = Lock()
        self._closed = False
        self._broken: str | None = None
        self._handshake_lock = Lock()
        # asyncio, plain TCP: a reader callback registered once with the loop reads ahead
        # into the connection (see _on_readable), and try_send may leave the end of a frame to
        # a writer callback (see _park_tail). None on trio and for TLS.
        self._loop: asyncio.AbstractEventLoop | None = None
        if tls is None and server_tls is None and _on_asyncio():
            self._loop = asyncio.get_running_loop()
        self._started = False
        self._on_frame: Callable[[Frame], bool] | None = None
        self._pushing = False  # frames go to _on_frame (else to receive())
        self._held: Frame | None = None  # declined by _on_frame: receive() returns it first
        self._tail: memoryview | None = None
        self._reading = False
        self._lowat = 1
        self._rx_error: BaseException | None = None
        self._rx_wakeup: asyncio.Future[None] | None = None
        self._passing: Passing | None = None  # handed out by receive(), payload not yet moved
        self._passed = 0

    @property
    def peer_limits(self) -> Limits:
        return self._conn.peer_limits

    @peer_limits.setter
    def peer_limits(self, value: Limits) -> None:
        self._conn.peer_limits = value

    def hello_done(self) -> None:
        if self._conn.limits is not self.limits:
            self._conn.widen(self.limits)
            self._read_size = _TLS_READ
        self._release()

    def _release(self) -> None:
        on_hello, self._on_hello = self._on_hello, None
        if on_hello is not None:
            on_hello()

    # ------------------------------------------------------------------ TLS
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
                self._mark_broken(f"TLS handshake failed: {_reason(exc)}")
                raise ProtocolError(
                    f"TLS handshake failed: {_reason(exc)}", peer=self.peer_address
                ) from None
            except BaseException:
                # Cancelled half way (e.g. the handshake timeout): never fall back to the raw
                # socket, which would carry frames in clear text.
                self._mark_broken("TLS handshake did not complete")
                raise

    def _take_server_tls(self) -> ssl.SSLContext | None:
        context, self._server_tls = self._server_tls, None
        return context

    # ------------------------------------------------------------------ state
    def _check_usable(self) -> None:
        if self._closed:
            raise LinkClosed("link was closed by this side")
        if self._broken is not None:
            raise LinkBroken(self._broken)

    def _mark_broken(self, why: str) -> None:
        if self._broken is None:
            self._broken = why

    # ------------------------------------------------------------------ sending
    def try_send(self, frame: Frame) -> bool:
        """Write a small frame (at most 4 KiB) at once, without waiting.

        On asyncio, one ``sendmsg`` usually takes the whole frame; if the kernel takes only
        part, the rest (a few KiB at most, copied) is written by a writer callback that holds
        the send lock meanwhile, so no other frame can slip in between. On trio, which has no
        such callbacks, the frame is only written when the kernel's send queue is empty
        (``TIOCOUTQ``), where a partial write does not happen. Anything else (TLS, a busy lock,
        a bigger frame) returns ``False`` and goes through :meth:`send`.
        """
        if self._tls is not None or self._server_tls is not None or self._send_lock.locked():
            return False
        self._check_usable()
        parts = frame.parts
        body = payload_size(parts)
        if body > _TRY_SEND_MAX:
            return False
        head = self._conn.head(frame.stamp(anyio.current_time), body)
        total = len(head) + body
        if total > _TRY_SEND_MAX:
            return False  # send() encodes it again; rare (a header of kilobytes)
        segments = [head, *parts]
        try:
            if self._loop is None and not self._send_queue_empty():
                return False
            n = self._sock.sendmsg(segments)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._mark_broken(f"send failed: {_reason(exc)}")
            raise LinkBroken(self._broken or "") from None
        if n != total:
            if self._loop is None:  # not expected with an empty queue; never leave half a frame
                self._cut_short()
                raise LinkBroken("a small frame was only partly written")
            self._park_tail(segments, n)
        self._conn.count_frame(total)
        return True

    def _send_queue_empty(self) -> bool:
        if _TIOCOUTQ is None:
            return False
        return not struct.unpack("i", fcntl.ioctl(self._sock, _TIOCOUTQ, b"\0\0\0\0"))[0]

    def _park_tail(self, segments: list[Buffer], written: int) -> None:
        assert self._loop is not None
        self._send_lock.acquire_nowait()  # free: try_send checked; released once flushed
        self._tail = memoryview(b"".join(segments)[written:])
        self._loop.add_writer(self._sock.fileno(), self._flush_tail)

    def _flush_tail(self) -> None:
        tail = self._tail
        if tail is None:
            return
        try:
            n = self._sock.send(tail)
        except BlockingIOError:
            return
        except OSError as exc:
            self._mark_broken(f"send failed: {_reason(exc)}")
            n = len(tail)  # give up on it: the link is broken, senders will see that
        if n < len(tail):
            self._tail = tail[n:]
            return
        self._end_tail()

    def _end_tail(self) -> None:
        if self._tail is not None:
            self._tail = None
            assert self._loop is not None
            self._loop.remove_writer(self._sock.fileno())
            self._send_lock.release()

    async def send(self, frame: Frame) -> None:
        # Encoded once: a frame with a deadline when the link is ours (the budget left then),
        # any other before waiting. FrameTooLarge comes before any byte is written either way.
        late = frame.expires is not None
        segments = None if late else self._conn.send(frame.header, frame.parts)
        await self._ensure_tls()
        async with self._send_lock:
            self._check_usable()
            if segments is None:
                segments = self._conn.send(frame.stamp(anyio.current_time), frame.parts)
            try:
                if self._tls is not None:
                    await self._send_tls(segments)
                else:
                    await self._send_raw(segments)
            except OSError as exc:
                self._mark_broken(f"send failed: {_reason(exc)}")
                raise LinkBroken(self._broken or "") from None

    async def _send_raw(self, segments: list[Buffer], *, begun: bool = False) -> None:
        """Write ``segments`` whole; ``begun``: they continue a frame partly written."""
        views = [memoryview(s).cast("B") for s in segments]
        total = sum(v.nbytes for v in views)
        written = 0
        try:
            while views:
                try:
                    n = self._sock.sendmsg(views[:_IOV_MAX])
                except BlockingIOError:
                    if written or begun:
                        await self._wait_to_finish()
                    else:
                        await self._wait(anyio.wait_writable)
                    continue
                written += n
                while views and n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
        except BaseException:
            if 0 < written < total:
                self._cut_short()
            raise
        if not total:
            await checkpoint()

    async def _send_tls(self, segments: list[Buffer]) -> None:
        assert self._tls is not None
        # The TLS stream makes a segment's records before it waits to write them: from the
        # first segment on, the frame is begun (see FINISH_WITHIN).
        with anyio.move_on_after(FINISH_WITHIN, shield=True) as finishing:
            try:
                for seg in segments:
                    if len(seg):
                        await self._tls.send(seg)  # type: ignore[arg-type]
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError) as exc:
                self._mark_broken(f"send failed: {_reason(exc)}")
                raise LinkBroken(self._broken or "") from None
        if finishing.cancelled_caught:
            self._cut_short(f"a frame could not be finished within {FINISH_WITHIN:g} s")
            raise LinkBroken(self._broken or "")

    async def _wait_to_finish(self) -> None:
        """Wait for room to go on with a frame begun, cancelled or not (see FINISH_WITHIN)."""
        with anyio.move_on_after(FINISH_WITHIN, shield=True) as finishing:
            await self._wait(anyio.wait_writable)
        if finishing.cancelled_caught:
            self._cut_short(f"a frame could not be finished within {FINISH_WITHIN:g} s")
            raise LinkBroken(self._broken or "")

    async def _wait(self, waiter: Any) -> None:
        """Wait for the socket; closing it from another task ends the wait as a link error."""
        try:
            await waiter(self._sock)
        except (anyio.ClosedResourceError, OSError, ValueError):
            if self._closed and self._broken is None:  # an abort (then a close) is a break
                raise LinkClosed("link was closed by this side") from None
            self._mark_broken(self._broken or "socket closed while waiting")
            raise LinkBroken(self._broken or "") from None

    def _cut_short(self, why: str = "a frame was cut short by cancellation") -> None:
        # End our direction with a FIN after the partial frame: the peer still reads every
        # complete frame before it, then sees the truncated one as LinkBroken. (A reset would
        # make its kernel drop frames it has not read yet.)
        self._mark_broken(why)
        self._close_socket(reset=False)

    # ------------------------------------------------------------------ receiving
    async def receive(self) -> Frame:
        await self._ensure_tls()
        conn = self._conn
        if self._loop is not None:
            return await self._receive_ahead()
        while True:
            event = conn.next_event()
            if isinstance(event, Frame):
                return event
            if event is EOF:
                raise LinkClosed("peer closed the connection")
            self._check_usable()
            if self._tls is not None:
                await self._fill_tls()
            else:
                await self._fill_raw()

    async def _fill_raw(self) -> None:
        buf = self._conn.get_buffer()
        try:
            n = self._sock.recv_into(buf)
        except BlockingIOError:
            await self._wait(anyio.wait_readable)
            return
        except OSError as exc:
            if self._closed and self._broken is None:
                raise LinkClosed("link was closed by this side") from None
            self._mark_broken(f"connection failed: {_reason(exc)}")
            raise LinkBroken(self._broken or "") from None
        if n:
            self._conn.buffer_updated(n)
        else:
            self._conn.receive_data(b"")  # clean EOF, or LinkBroken in the middle of a frame

    # ------------------------------------------------------------ asyncio read-ahead
    # On asyncio (and uvloop) waiting for readability once per read is the most expensive part
    # of a small round trip: anyio registers a reader, creates a future and unregisters it every
    # time. Instead a reader callback stays registered and reads into the connection as data
    # arrives, as a BufferedProtocol would; receive() only waits when no frame is complete.
    # Reading pauses while complete frames not yet received exceed _READ_AHEAD bytes, so a
    # consumer that stops reading stops the socket (and the peer, through TCP flow control).
    # Writes stay on the socket itself (vectored sendmsg), which a transport would not allow.

    def deliver_to(self, on_frame: Callable[[Frame], bool] | None) -> bool:
        if self._loop is None:
            return False
        self._on_frame = on_frame
        if on_frame is None:
            self._pushing = False
        # Otherwise pushing starts once receive() has taken every frame already read.
        return True

    async def _receive_ahead(self) -> Frame:
        conn = self._conn
        assert self._loop is not None
        if not self._started:
            self._started = True
            self._resume_reading()
        while True:
            if self._passing is not None:
                await self._discard_passing()
            held = self._held
            if held is not None:
                self._held = None
                if isinstance(held, Passing):
                    self._passing = held
                return held
            event = conn.next_event()
            if isinstance(event, Passing):
                self._passing = event
                return event
            if isinstance(event, Frame):
                if (
                    not self._reading
                    and self._rx_error is None
                    and conn.pending_bytes < _READ_AHEAD
                ):
                    self._resume_reading()
                return event
            if event is EOF:
                raise LinkClosed("peer closed the connection")
            if self._rx_error is not None:
                raise self._rx_error
            self._check_usable()
            if self._on_frame is not None:
                self._pushing = True  # nothing queued: later frames go straight to on_frame
            if not self._reading:
                self._resume_reading()
            wakeup = self._rx_wakeup = self._loop.create_future()
            await wakeup

    def _resume_reading(self) -> None:
        if self._conn.passing:
            return  # the payload in the socket is moved by whoever forwards the frame
        if not self._reading and self._started and self._sock.fileno() >= 0:
            assert self._loop is not None
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())

    def _on_readable(self) -> None:
        conn = self._conn
        try:
            n = self._sock.recv_into(conn.get_buffer())
            if n:
                conn.buffer_updated(n)
                self._set_lowat(conn.owed)
                if not isinstance(self._loop, asyncio.SelectorEventLoop):
                    _raise_pending_error(self._sock)
            else:
                self._pause_reading()
                conn.receive_data(b"")  # clean EOF, or LinkBroken in the middle of a frame
        except BlockingIOError:
            return
        except OSError as exc:
            self._pause_reading()
            self._mark_broken(f"connection failed: {_reason(exc)}")
            self._rx_error = LinkBroken(self._broken or "")
        except (ProtocolError, LinkBroken) as exc:
            self._pause_reading()
            self._rx_error = exc
        else:
            if conn.passing:
                self._pause_reading()
            if self._pushing:
                if not self._push():
                    return  # every frame handled: the receiving task sleeps on
            elif conn.pending_bytes >= _READ_AHEAD:
                self._pause_reading()
        self._wake_receiver()

    def _set_lowat(self, owed: int) -> None:
        """Wake up for a large payload only once a good part of it is there.

        Woken for every 64 KiB that arrives, a 3 GB/s stream costs ~50,000 loop turns a
        second; with ``SO_RCVLOWAT`` at what the peer still owes for the frame in progress
        (capped), the kernel wakes us a few times per megabyte. Never more than is owed: the
        peer must send that much, so the wait cannot hang.
        """
        lowat = min(owed, _LOWAT_MAX) if owed >= _LOWAT_FROM else 1
        if lowat != self._lowat:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                self._lowat = lowat
            except OSError:
                pass

    def _push(self) -> bool:
        """Hand complete frames to ``_on_frame``; True when receive() has work (a declined
        frame, the end of the link)."""
        conn = self._conn
        on_frame = self._on_frame
        assert on_frame is not None
        while True:
            event = conn.next_event()
            if not isinstance(event, Frame):
                return event is EOF
            if isinstance(event, Passing):  # moving its payload takes waiting: receive() it
                self._held = event
                self._pushing = False
                return True
            try:
                taken = on_frame(event)
            except Exception as exc:  # handed to receive(), which raises it
                self._pause_reading()
                self._pushing = False
                self._rx_error = exc
                return True
            if not taken:
                self._held = event
                self._pushing = False
                if conn.pending_bytes >= _READ_AHEAD:
                    self._pause_reading()
                return True

    def _wake_receiver(self) -> None:
        wakeup, self._rx_wakeup = self._rx_wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # ------------------------------------------------------- passing through (os.splice)
    @property
    def splices(self) -> bool:
        """Whether frames can pass through this link without being read (plain TCP on
        asyncio, on Linux): see :meth:`send_passing`."""
        return self._loop is not None and _splice.SPLICE

    def pass_through(self, decide: Callable[[Envelope, int], bool] | None) -> bool:
        if not self.splices:
            return False
        self._conn.pass_through = decide
        return True

    async def take_passing(self, passing: Passing) -> Frame:
        if passing is not self._passing:
            raise RuntimeError("not this link's passing frame")
        first = memoryview(passing.parts[0])
        payload = await self._move_passing(
            lambda: _splice.take(
                self._sock, first, passing.owed, self._await_payload, self._conn.passed
            )
        )
        return Frame(passing.header, (payload,))

    async def send_passing(self, frame: Frame, passing: Passing, src: Link) -> None:
        if not (isinstance(src, TcpLink) and src._passing is passing and self.splices):
            raise RuntimeError("send_passing needs the passing frame of a splicing link")
        size = passing.payload_len
        head = self._conn.head(frame.header, size)  # FrameTooLarge before any I/O
        try:
            chain = _splice.PipeChain(_splice.PIPES)
        except OSError:  # out of descriptors or pipe memory: read it through, as without
            whole = await src.take_passing(passing)
            await self.send(Frame(frame.header, whole.parts, frame.expires))
            return
        try:
            rest = await src._move_passing(
                lambda: _splice.gather(
                    src._sock, chain, passing.owed, src._await_payload, src._conn.passed
                )
            )
            async with self._send_lock:
                self._check_usable()
                if frame.expires is not None:  # the budget left now that the link is ours
                    head = self._conn.head(frame.stamp(anyio.current_time), size)
                await self._write_passing([head, *frame.parts], chain, rest)
            self._conn.count_frame(len(head) + size)
            src._passed += 1
        finally:
            chain.release()  # a pipe a failed forward left bytes in is closed

    async def _write_passing(
        self, segments: list[Buffer], chain: _splice.PipeChain, rest: memoryview | None
    ) -> None:
        wrote = False
        try:
            await self._send_raw(segments)
            wrote = True
            await _splice.flush(chain, self._sock, self._wait_to_finish)
            if rest is not None:
                await self._send_raw([rest], begun=True)
        except OSError as exc:
            self._mark_broken(f"send failed: {_reason(exc)}")
            raise LinkBroken(self._broken or "") from None
        except BaseException:
            if wrote and self._broken is None:
                self._cut_short()  # part of the frame is on the wire
            raise

    async def _move_passing(self, move: Callable[[], Any]) -> Any:
        """Run ``move`` (which takes the passing payload out of the socket); then the link
        reads frames again. A socket failure breaks this link."""
        self._check_usable()
        try:
            result = await move()
        except (EOFError, OSError) as exc:
            self._mark_broken(f"connection failed: {_reason(exc)}")
            self._rx_error = LinkBroken(self._broken or "")
            raise LinkBroken(f"link from {self.peer_address} broke: {self._broken}") from None
        self._passing = None
        self._set_lowat(0)
        return result

    async def _await_payload(self) -> None:
        self._set_lowat(self._conn.owed)
        await self._wait(anyio.wait_readable)

    async def _discard_passing(self) -> None:
        """The passing frame was not forwarded: read its payload and drop it."""
        if self._rx_error is not None:
            raise self._rx_error
        owed = self._conn.owed
        await self._move_passing(
            lambda: _splice.discard(self._sock, owed, self._await_payload, self._conn.passed)
        )

    async def _fill_tls(self) -> None:
        assert self._tls is not None
        try:
            data = await self._tls.receive(self._read_size)
        except anyio.EndOfStream:
            self._conn.receive_data(b"")
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError, OSError) as e:
            if self._closed and self._broken is None:
                raise LinkClosed("link was closed by this side") from None
            self._mark_broken(f"connection failed: {_reason(e)}")
            raise LinkBroken(self._broken or "") from None
        self._conn.receive_data(data)

    # ------------------------------------------------------------------ closing
    def _close_socket(self, *, reset: bool, crash: bool = False) -> None:
        self._release()
        sock = self._sock
        if sock.fileno() < 0:
            return
        self._pause_reading()
        self._wake_receiver()  # it sees the link closed or broken
        if self._tail is not None:  # a frame's end that can no longer be written
            self._mark_broken("link closed with a frame partly written")
            self._end_tail()
        if self._stream is not None:
            # The descriptor belongs to the stream's transport: only end the connection here;
            # the stream closes the descriptor in aclose().
            with contextlib.suppress(OSError):
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    if not crash:  # a crash leaves the reset alone to the descriptor's close
                        sock.shutdown(socket.SHUT_RDWR)
                    return
                sock.shutdown(socket.SHUT_WR)
                # As below: bytes left unread (a TLS 1.3 session ticket nobody asked for)
                # would turn the close into a reset, and the peer would see a broken link.
                while sock.recv(65536, socket.MSG_DONTWAIT):
                    pass
            return
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
        # Shut the connection down (and drain it) before the TLS stream closes the descriptor.
        self._close_socket(reset=self._broken is not None)
        if self._tls is not None:
            with (
                anyio.move_on_after(1, shield=True),
                contextlib.suppress(OSError, ssl.SSLError, anyio.BrokenResourceError),
            ):
                await self._tls.aclose()
        if self._stream is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await self._stream.aclose()
        await checkpoint()

    def abort(self) -> None:
        """Reset the connection as a crash would: the peer sees ``LinkBroken``."""
        self._mark_broken("link aborted")
        self._close_socket(reset=True, crash=True)
        if self._stream is not None:
            # The TLS stream's transport owns the descriptor, and abort() cannot await its
            # aclose(): close it the way that aclose() does, now (asyncio, then trio).
            transport = getattr(self._stream, "_transport", None)
            trio_socket = getattr(self._stream, "_trio_socket", None)
            if transport is not None:
                transport.abort()
            elif trio_socket is not None:
                trio_socket.close()

    def extra(self) -> dict[str, Any]:
        cert = None
        if self._tls is not None:
            cert = self._tls.extra(TLSAttribute.peer_certificate_binary, None)
        return {"peer_certificate": cert, "peer_address": self.peer_address}

    def statistics(self) -> dict[str, int]:
        s = self._conn.statistics()
        return {
            "frames_sent": s.frames_sent,
            "frames_received": s.frames_received,
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "buffered": s.buffered,
            "frames_passed": self._passed,
            "read_buffer": self._conn.buffer_size,
        }


_TRY_SEND_MAX = 4096
"""Largest frame try_send writes (and, on asyncio, the most a partial write leaves over)."""
_TLS_READ = 256 * 1024
"""Most bytes one TLS read asks for (after the hello; HELLO_BUFFER before it)."""
_LOWAT_FROM = 64 * 1024
_LOWAT_MAX = 512 * 1024
_READ_AHEAD = 1 << 20
"""Bytes of complete frames read ahead of receive() before reading pauses (asyncio)."""


def _raise_pending_error(sock: socket.socket) -> None:
    """Raise the error (a reset) the socket holds after a read that returned data.

    On uvloop a reader registered with ``add_reader`` is called once more when the socket
    reports an error (libuv's ``POLLERR``) and then silently unregistered. Where data was still
    waiting (below ``SO_RCVLOWAT``, or come in the same loop turn as the reset) that last read
    returns the data, not the error, and nothing would call the reader again: the link would
    look alive until the heartbeat dropped it. asyncio's selector calls the reader again, so
    only other loops pay for this check (one ``getsockopt`` per wakeup, a few per MiB of a
    large frame).
    """
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _on_asyncio() -> bool:
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpListener(Listener):
    """Accepts TCP connections on one address; TLS handshakes happen per link, later."""

    def __init__(
        self, sock: socket.socket, scheme: str, limits: Limits, server_tls: ssl.SSLContext | None
    ) -> None:
        self._sock = sock
        self._scheme = scheme
        self._limits = limits
        self._server_tls = server_tls
        host, port = sock.getsockname()[:2]
        self.url = _format_url(scheme, host, port)
        self._closed = False
        self._pending: Pending | None = None

    def guard(self, admission: Admission) -> bool:
        self._pending = Pending(admission)
        return True

    async def accept(self) -> Link:
        while True:
            if self._closed:
                raise LinkClosed(f"listener {self.url} is closed")
            try:
                sock, addr = self._sock.accept()
            except BlockingIOError:
                try:
                    await anyio.wait_readable(self._sock)
                except (anyio.ClosedResourceError, OSError, ValueError):
                    raise LinkClosed(f"listener {self.url} is closed") from None
                continue
            except OSError as exc:
                if self._closed:
                    raise LinkClosed(f"listener {self.url} is closed") from None
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await anyio.sleep(0.1)  # out of descriptors: back off, keep the listener
                    continue
                if exc.errno in ACCEPT_SKIP:
                    continue  # that one connection failed before we got it; serve the rest
                raise
            peer = _format_url(self._scheme, addr[0], addr[1])
            pending = self._pending
            guarded: dict[str, Any] = {}
            if pending is not None:
                source = str(addr[0])
                why = pending.admit(source)
                if why is not None:  # closed at once: no buffer, no task, no handshake
                    sock.close()
                    _logging.get_logger().warning(
                        "connection refused before hello", peer=peer, reason=why
                    )
                    continue
                guarded = {
                    "hello_limits": pending.admission.limits,
                    "on_hello": functools.partial(pending.release, source),
                }
            _configure(sock)
            return TcpLink(
                sock,
                self._limits,
                local_address=self.url,
                peer_address=peer,
                server_tls=self._server_tls,
                **guarded,
            )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
        await checkpoint()


class TcpDriver(Driver):
    """Serves ``tcp://HOST:PORT`` and, given TLS contexts, ``tls://HOST:PORT`` (mutual TLS).

    Args:
        server_tls: context for accepted ``tls://`` links (must require client certificates).
        client_tls: context for ``tls://`` links this side opens.
        backlog: the listening sockets' backlog.
        connect_timeout: seconds to establish a connection (TCP and TLS handshake).
    """

    schemes = ("tcp", "tls")

    def __init__(
        self,
        *,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
        backlog: int = 128,
        connect_timeout: float = 10.0,
    ) -> None:
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.backlog = backlog
        self.connect_timeout = connect_timeout

    async def listen(self, url: str, *, limits: Limits) -> Listener:
        host, port, scheme = split_hostport(url, self.schemes)
        if scheme == "tls" and self.server_tls is None:
            raise ConfigError(f"{url}: tls:// needs a server TLS context (from a startup kit)")
        try:
            infos = await anyio.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, addr = infos[0]
            sock = listening_socket(family, addr, self.backlog)
        except (OSError, socket.gaierror) as exc:
            raise ConnectError(f"cannot listen on {url}: {_reason(exc)}") from None
        return TcpListener(sock, scheme, limits, self.server_tls if scheme == "tls" else None)

    async def connect(self, url: str, *, limits: Limits) -> Link:
        host, port, scheme = split_hostport(url, self.schemes)
        if scheme == "tls" and self.client_tls is None:
            raise ConfigError(f"{url}: tls:// needs a client TLS context (from a startup kit)")
        try:
            with anyio.fail_after(self.connect_timeout):
                return await self._connect(host, port, scheme, limits)
        except TimeoutError:
            raise ConnectError(
                f"cannot connect to {url}: no connection within {self.connect_timeout} s"
            ) from None
        except (OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise ConnectError(f"cannot connect to {url}: {_reason(exc)}") from None

    async def _connect(self, host: str, port: int, scheme: str, limits: Limits) -> Link:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        stream: SocketStream | None = None
        tls: TLSStream | None = None
        try:
            _configure(sock)
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))  # noqa: TRY301 - one error path below
            if scheme == "tls":
                stream = await SocketStream.from_socket(sock)
                tls = await TLSStream.wrap(
                    stream,
                    server_side=False,
                    hostname=host,
                    ssl_context=self.client_tls,
                    standard_compatible=False,
                )
                # The peer may still refuse our certificate right after the handshake (TLS 1.3
                # sends that verdict late); the first receive then reports it as a break.
        except BaseException:
            if stream is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await stream.aclose()
            else:
                sock.close()
            raise
        local = _format_url(scheme, *sock.getsockname()[:2])
        peer = _format_url(scheme, host, port)
        return TcpLink(sock, limits, local_address=local, peer_address=peer, tls=tls, stream=stream)


__all__ = ["TcpDriver", "TcpLink", "TcpListener", "split_hostport"]
