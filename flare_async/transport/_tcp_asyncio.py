"""The raw-socket ``tcp://`` link on asyncio (and uvloop): reads ahead in a loop callback, hands
frames to the cell as they arrive (push delivery), writes the small frames of a loop turn
together, and (its base, :mod:`~flare_async.transport._tcp_passing`) passes large payloads
through unread (splicing, on Linux).

On asyncio waiting for readability once per read is the most expensive part of a small round
trip: anyio registers a reader, creates a future and unregisters it every time. Instead a reader
callback stays registered and reads into the connection as data arrives, as a BufferedProtocol
would; receive() only waits when no frame is complete. Reading pauses while complete frames not
yet received exceed _READ_AHEAD bytes, so a consumer that stops reading stops the socket (and
the peer, through TCP flow control). Writes stay on the socket itself (vectored sendmsg), which
a transport would not allow.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from flare_async.errors import LinkBroken, LinkClosed, ProtocolError
from flare_async.transport._tcp_base import error_reason
from flare_async.transport._tcp_passing import PassingTcpLink
from flare_async.transport._tcp_raw import _IOV_MAX
from flare_async.wire import EOF, Buffer, Frame, Passing

_LOWAT_FROM = 64 * 1024
_LOWAT_MAX = 512 * 1024
_READ_AHEAD = 1 << 20
"""Bytes of complete frames read ahead of receive() before reading pauses."""
_OUT_MAX = 256 * 1024
_OUT_FRAMES = _IOV_MAX // 2
"""Small frames held for one write: at most this many bytes and frames (``IOV_MAX`` is 1024)."""


class AsyncioTcpLink(PassingTcpLink):
    """A reader callback registered once with the loop reads ahead into the connection (see
    :meth:`_on_readable`), and try_send may leave the end of a frame to a writer callback (see
    :meth:`_park_tail`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = asyncio.get_running_loop()
        self._clock = self._loop.time
        self._out: list[
            Buffer
        ] = []  # small frames try_send took, written together (see _write_small)
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        # See _raise_pending_error: asyncio's selector calls the reader again, other loops not.
        self._check_error = not isinstance(self._loop, asyncio.SelectorEventLoop)
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

    # ------------------------------------------------------------------ sending
    def _write_small(self, segments: list[Buffer], total: int) -> bool:
        """The first small frame of a turn of the loop is written at once; the turn's later
        ones (copied: at most 4 KiB each) are held and written together in one ``sendmsg``
        when the turn ends (:meth:`_flush_out`). With many callers one system call carries
        dozens of requests or replies instead of one each (``sendmsg`` per frame was a third
        of both processes' time at 64 callers), while the first frame of a burst still leaves
        at once, so the peer works on it while this side makes the rest: holding that one too
        made two processes on two cores take turns (64 callers: 13-14k round trips/s against
        15-16k)."""
        self._out.append(b"".join(segments))
        self._out_bytes += total
        if self._flush_handle is None:
            self._flush_out(raising=True)  # nothing written this turn yet: now
            self._flush_handle = self._loop.call_soon(self._flush_out)  # the rest: turn's end
        elif self._out_bytes >= _OUT_MAX or len(self._out) >= _OUT_FRAMES:
            self._flush_out(raising=True)  # enough for one write: now
        return True

    def _flush_out(self, *, raising: bool = False) -> None:
        """Write the held frames: one ``sendmsg``; if the kernel takes only part, the rest is
        written by a writer callback that holds the send lock meanwhile (:meth:`_park_tail`),
        so no other frame can slip in between. While :meth:`send` holds the lock, the frames
        wait for it: its write puts them first (:meth:`_write`)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._out or self._send_lock.locked() or self._sock.fileno() < 0:
            return
        try:
            written, n = self._write_held(self._take_out())
        except OSError as exc:
            self._mark_broken(f"send failed: {error_reason(exc)}")
            if raising:
                raise
            return
        if n != sum(len(b) for b in written):
            self._park_tail(written, n)

    def _write_held(self, out: list[Buffer]) -> tuple[list[Buffer], int]:
        """Write the held frames with one system call, without waiting: what went to the
        socket, and how many bytes of it the kernel took (the rest is parked)."""
        try:
            return out, self._sock.sendmsg(out)
        except BlockingIOError:
            return out, 0

    def _take_out(self) -> list[Buffer]:
        out = self._out
        if out:
            self._out, self._out_bytes = [], 0
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
        return out

    async def send(self, frame: Frame) -> None:
        try:
            await super().send(frame)
        finally:
            # Frames held while this send had the lock, if it never wrote them (an error
            # before its write): written soon, as any.
            if self._out and self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush_out)

    async def _write(self, segments: list[Buffer], *, begun: bool = False) -> None:
        held = self._take_out()  # small frames taken before this one: they go first
        await super()._write([*held, *segments] if held else segments, begun=begun)

    def _close_socket(self, *, reset: bool, crash: bool = False) -> None:
        if reset or self._broken is not None:
            self._take_out()  # a crash (or a reset) loses what was not written, as the kernel's
        elif self._out:
            self._flush_out()  # a closing frame (Bye) held this turn goes before the FIN
        super()._close_socket(reset=reset, crash=crash)

    def _park_tail(self, segments: list[Buffer], written: int) -> None:
        self._send_lock.acquire_nowait()  # free: try_send checked; released once flushed
        self._tail = memoryview(b"".join(segments))[written:]  # one copy, not two
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
            self._mark_broken(f"send failed: {error_reason(exc)}")
            n = len(tail)  # give up on it: the link is broken, senders will see that
        if n < len(tail):
            self._tail = tail[n:]
            return
        self._end_tail()

    def _end_tail(self) -> None:
        if self._tail is not None:
            self._tail = None
            self._loop.remove_writer(self._sock.fileno())
            self._send_lock.release()

    # ------------------------------------------------------------------ receiving
    def deliver_to(self, on_frame: Callable[[Frame], bool] | None) -> bool:
        self._on_frame = on_frame
        if on_frame is None:
            self._pushing = False
        # Otherwise pushing starts once receive() has taken every frame already read.
        return True

    async def receive(self) -> Frame:
        conn = self._conn
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
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def _on_readable(self) -> None:
        conn = self._conn
        try:
            if self._read_socket():
                if self._check_error:
                    _raise_pending_error(self._sock)
            else:
                self._pause_reading()
                conn.receive_data(b"")  # clean EOF, or LinkBroken in the middle of a frame
        except BlockingIOError:
            return
        except OSError as exc:
            self._pause_reading()
            self._mark_broken(f"connection failed: {error_reason(exc)}")
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

    def _read_socket(self) -> bool:
        """Read what the socket has into the connection: ``False`` at its end;
        ``BlockingIOError`` when nothing came after all. (A TLS link decrypts here.)"""
        conn = self._conn
        n = self._sock.recv_into(conn.get_buffer())
        if n:
            conn.buffer_updated(n)
            self._set_lowat(conn.owed)
        return n > 0

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

    def _stop_io(self) -> None:
        self._pause_reading()
        self._wake_receiver()  # it sees the link closed or broken
        if self._tail is not None:  # a frame's end that can no longer be written
            self._mark_broken("link closed with a frame partly written")
            self._end_tail()


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
