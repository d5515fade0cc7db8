"""The raw-socket ``tcp://`` link on trio (any backend but asyncio): it waits for the socket
(``wait_readable``/``wait_writable``) before each read or write it cannot do at once."""

from __future__ import annotations

import fcntl
import struct
import termios

from flare_async.errors import LinkBroken
from flare_async.transport._tcp_raw import RawTcpLink
from flare_async.wire import Buffer

_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


class TrioTcpLink(RawTcpLink):
    """Reads when ``receive`` is called, writes when a sender is; no loop callbacks."""

    def _write_small(self, segments: list[Buffer], total: int) -> bool:
        """Trio has no writer callbacks to finish a partial write later: the frame is only
        written when the kernel's send queue is empty (``TIOCOUTQ``), where a partial write
        does not happen."""
        if not self._send_queue_empty():
            return False
        if self._sock.sendmsg(segments) != total:  # not expected; never leave half a frame
            self._cut_short()
            raise LinkBroken("a small frame was only partly written")
        return True

    def _send_queue_empty(self) -> bool:
        if _TIOCOUTQ is None:
            return False
        return not struct.unpack("i", fcntl.ioctl(self._sock, _TIOCOUTQ, b"\0\0\0\0"))[0]
