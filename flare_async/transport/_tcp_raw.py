"""Frames on the bare socket (``tcp://``): what the asyncio and the trio link share.

The sans-IO :class:`~flare_async.wire.Connection` hands out the buffer to read into (a large
payload is read straight into its own buffer with ``recv_into``, never through an intermediate
``bytes``), and frames are written with ``sendmsg`` as a list of segments (header and payload
parts are never concatenated). Measured on this machine (docs/design.md §5): anyio's stream
``receive()`` tops out near 0.9 GB/s because every read allocates; ``recv_into`` after
``wait_readable`` reaches 1.9 (asyncio) to 2.7 GB/s (uvloop).
"""

from __future__ import annotations

import abc
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

from flare_async.errors import LinkBroken, LinkClosed
from flare_async.transport._tcp_base import TcpLink, cut_reason, error_reason
from flare_async.wire import Buffer, Frame, payload_size

_IOV_MAX = 1024
_TRY_SEND_MAX = 4096
"""Largest frame try_send writes (and, on asyncio, the most a partial write leaves over)."""


class RawTcpLink(TcpLink):
    """A link that writes and reads the socket itself; its subclass decides how it waits."""

    # ------------------------------------------------------------------ sending
    def try_send(self, frame: Frame) -> bool:
        """Write a small frame (at most 4 KiB) at once, without waiting, if the socket takes
        it (see :meth:`_write_small`). A busy lock or a bigger frame returns ``False`` and goes
        through :meth:`send`."""
        if self._send_lock.locked():
            return False
        self._check_usable()
        parts = frame.parts
        body = payload_size(parts)
        if body > _TRY_SEND_MAX:
            return False
        head = self._conn.head(frame.stamp(self._clock), body)
        total = len(head) + body
        if total > _TRY_SEND_MAX:
            return False  # send() encodes it again; rare (a header of kilobytes)
        try:
            if not self._write_small([head, *parts], total):
                return False
        except BlockingIOError:
            return False
        except OSError as exc:
            self._mark_broken(f"send failed: {error_reason(exc)}")
            raise LinkBroken(self._broken or "") from None
        self._conn.count_frame(total)
        return True

    @abc.abstractmethod
    def _write_small(self, segments: list[Buffer], total: int) -> bool:
        """Write a small frame of ``total`` bytes now, whole (or so that it will be, before any
        other frame); ``False`` (or ``BlockingIOError``) when that would need waiting."""

    async def _write(self, segments: list[Buffer], *, begun: bool = False) -> None:
        """Write ``segments`` whole; ``begun``: they continue a frame partly written."""
        views = [memoryview(s).cast("B") for s in segments]
        total = sum(v.nbytes for v in views)
        written = 0
        first = 0  # views before it are written (an index: popping the front is O(parts))
        try:
            while first < len(views):
                try:
                    n = self._sock.sendmsg(views[first : first + _IOV_MAX])
                except BlockingIOError:
                    if written or begun:
                        await self._wait_to_finish()
                    else:
                        await self._wait(anyio.wait_writable)
                    continue
                written += n
                while first < len(views) and n >= views[first].nbytes:
                    n -= views[first].nbytes
                    first += 1
                if n:
                    views[first] = views[first][n:]
        except BaseException as exc:
            if 0 < written < total:
                self._cut_short(*cut_reason(exc))
            raise
        if not total:
            await checkpoint()

    async def _wait_to_finish(self) -> None:
        """Wait for room to go on with a frame begun, cancelled or not (see FINISH_WITHIN)."""
        await self._finish(self._wait(anyio.wait_writable))

    async def _wait(self, waiter: Any) -> None:
        """Wait for the socket; closing it from another task ends the wait as a link error."""
        try:
            await waiter(self._sock)
        except (anyio.ClosedResourceError, OSError, ValueError):
            if self._closed and self._broken is None:  # an abort (then a close) is a break
                raise LinkClosed("link was closed by this side") from None
            self._mark_broken(self._broken or "socket closed while waiting")
            raise LinkBroken(self._broken or "") from None

    # ------------------------------------------------------------------ receiving
    async def _fill(self) -> None:
        buf = self._conn.get_buffer()
        try:
            n = self._sock.recv_into(buf)
        except BlockingIOError:
            await self._wait(anyio.wait_readable)
            return
        except OSError as exc:
            if self._closed and self._broken is None:
                raise LinkClosed("link was closed by this side") from None
            self._mark_broken(f"connection failed: {error_reason(exc)}")
            raise LinkBroken(self._broken or "") from None
        if n:
            self._conn.buffer_updated(n)
        else:
            self._conn.receive_data(b"")  # clean EOF, or LinkBroken in the middle of a frame
