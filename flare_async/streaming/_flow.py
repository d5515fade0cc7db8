"""The two ends of a stream as sans-IO state machines: credit, progress, resending.

Pure and synchronous, like :class:`~flare_async.wire.Connection`: no clock, no I/O. The cell
feeds them what arrived (acks to the sender, chunks to the receiver) and does what they say.

Flow control is by credit in bytes. The receiver grants ``limit``: the sender may send bytes
below that offset. The limit is what the receiver's consumer has taken plus the window, so
bytes held by the receiver (and by every relay on the way, which only forwards what the
sender sent) never exceed the window, whatever the object's size. Offsets are Python ints
on our side and u64 on the wire: objects past 4 GiB are nothing special.

Loss and damage are repaired go-back-N: the receiver holds only the contiguous, verified
prefix (``committed``); a gap (a chunk lost with a dropped link) or a chunk failing its CRC
makes it ask once for everything from ``committed`` again, and the sender rewinds. The
sender keeps every chunk it sent until the receiver commits it, so it can always rewind (at
most a window's worth). A chunk that keeps arriving damaged fails the stream.
"""

from __future__ import annotations

import enum

import crc32c

from flare_async.errors import ProtocolError, StreamCorrupted
from flare_async.wire import Buffer

DEFAULT_CHUNK = 1 << 20
"""Bytes per chunk unless the sender asks otherwise (see :func:`pick_chunk`)."""
LARGE_CHUNK = 4 << 20
"""Bytes per chunk of a large object (see :func:`pick_chunk`)."""
LARGE_FROM = 64 << 20
"""Objects of this size or more are sent in :data:`LARGE_CHUNK` chunks."""
DEFAULT_WINDOW = 16 << 20
"""Bytes in flight per stream unless the sender asks otherwise."""
MAX_WINDOW = 256 << 20
"""The most a receiver grants one stream, whatever the sender asks."""
MIN_CHUNK = 4096


def pick_chunk(size: int | None, window: int, *, in_memory: bool = True) -> int:
    """The chunk size a sender proposes when its caller did not choose one.

    Every chunk costs a fixed share of work on both ends (a frame, a flow-control step, a
    wakeup), ~0.1 ms here: at 1 MiB that is a fifth of a 2 GB/s transfer. An object already
    in memory of :data:`LARGE_FROM` bytes or more goes in :data:`LARGE_CHUNK` chunks where the
    window still holds four of them (measured: +15% direct, +20% through a relay, see
    ``benchmarks/README.md``). Files keep 1 MiB chunks: a file is usually sent to be saved as
    one, and a receiver writing 4 MiB chunks to disk ran at half the speed of 1 MiB ones
    (0.39 against 0.66-0.75 GB/s file to file). Smaller objects, and small windows, keep 1 MiB.
    """
    if in_memory and size is not None and size >= LARGE_FROM and window >= 4 * LARGE_CHUNK:
        return LARGE_CHUNK
    return min(DEFAULT_CHUNK, window)


def negotiate(chunk: int, window: int, max_chunk: int) -> tuple[int, int]:
    """The chunk size and window a receiver accepts for a proposal.

    The chunk is capped by ``max_chunk`` (the smallest frame limit the receiver knows of);
    the window holds at least two chunks, so the sender can send one while the other is read.

    Raises:
        ProtocolError: a proposal that is not a positive size.
    """
    if chunk <= 0 or window <= 0:
        raise ProtocolError(f"stream proposal of chunk {chunk} and window {window} B")
    chunk = max(MIN_CHUNK, min(chunk, max_chunk))
    window = max(2 * chunk, min(window, MAX_WINDOW))
    return chunk, window


class SenderFlow:
    """What the sending end of one stream may do next.

    Attributes:
        next_offset: the next byte to send.
        high: the end of the furthest byte ever sent.
        committed: every byte below was received intact (the sender may drop it).
        limit: the sender may send bytes below this offset.
        started: the receiver answered the open (chunk and window are settled).
        rewinds: how many times the sender went back to resend.
    """

    def __init__(self, chunk: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW) -> None:
        self.chunk = chunk
        self.window = window
        self.next_offset = 0
        self.high = 0
        self.committed = 0
        self.limit = 0
        self.started = False
        self.rewinds = 0

    @property
    def credit(self) -> int:
        """Bytes the sender may send now."""
        return max(0, self.limit - self.next_offset)

    def on_ack(
        self, committed: int, limit: int, *, chunk: int = 0, window: int = 0, resend: bool = False
    ) -> bool:
        """Take an ack. Returns True if the sender must go back to ``committed`` and resend.

        Acks may be stale (overtaken by a resend or a resume): a committed offset or a limit
        below what is already known is ignored, and a committed offset past where a rewind
        put the sender moves it forward again (the bytes arrived after all).

        Raises:
            ProtocolError: the ack commits bytes that were never sent (a broken or hostile
                receiver).
        """
        if committed < 0 or committed > self.high:
            raise ProtocolError(f"stream ack commits {committed} B of {self.high} sent")
        if chunk:
            self.chunk = chunk
        if window:
            self.window = window
        self.started = True
        self.limit = max(self.limit, limit)
        if committed < self.committed:
            return False  # stale
        self.committed = committed
        if committed > self.next_offset:
            self.next_offset = committed
        elif resend and committed < self.next_offset:
            self.next_offset = committed
            self.rewinds += 1
            return True
        return False

    def rewind(self, offset: int) -> None:
        """Go back to ``offset`` (a resume: the receiver said it holds everything below)."""
        if not 0 <= offset <= self.next_offset:
            raise ProtocolError(f"stream resume at {offset} B, but {self.next_offset} were sent")
        self.rewinds += offset < self.next_offset
        self.next_offset = offset
        self.committed = offset
        self.limit = max(self.limit, offset)

    def sent(self, nbytes: int) -> None:
        """Record ``nbytes`` sent from :attr:`next_offset`."""
        self.next_offset += nbytes
        self.high = max(self.high, self.next_offset)


class Verdict(enum.Enum):
    """What the receiver makes of a chunk."""

    ACCEPT = "accept"
    """In order and intact: hand it to the consumer."""
    DUPLICATE = "duplicate"
    """Already held (a resend overlapping what arrived): drop it."""
    RESEND = "resend"
    """A gap or a damaged chunk: drop it and ask the sender to go back (ack with resend)."""
    IGNORE = "ignore"
    """Out of order after a resend was asked for: drop it quietly until the resend arrives."""


class EndVerdict(enum.Enum):
    """What the receiver makes of the sender's end message."""

    COMPLETE = "complete"
    """Every byte arrived: the object may be checked and finished."""
    RESEND = "resend"
    """Bytes are missing at the end: ask the sender to go back (ack with resend)."""
    WAIT = "wait"
    """Bytes are missing, and a resend is already asked for: wait for it."""


class ReceiverFlow:
    """What the receiving end of one stream holds and grants.

    Args:
        window: bytes the consumer may fall behind the sender.
        max_damaged: chunks that may fail their check in a row before the stream fails.

    Attributes:
        committed: every byte below arrived intact, in order.
        consumed: bytes the consumer took (the rest of ``committed`` waits in the buffer).
        end_size: the size announced by the sender's end message, once it came.
        resend_asked: a resend from ``committed`` is outstanding.
    """

    def __init__(self, window: int, *, max_damaged: int = 3) -> None:
        self.window = window
        self.max_damaged = max_damaged
        self.committed = 0
        self.consumed = 0
        self.end_size: int | None = None
        self.resend_asked = False
        self.damaged = 0
        self._acked_limit = 0

    @property
    def limit(self) -> int:
        """The credit to grant: the sender may send bytes below this offset."""
        return self.consumed + self.window

    @property
    def held(self) -> int:
        """Bytes received and not yet consumed (bounded by the window)."""
        return self.committed - self.consumed

    def on_data(self, offset: int, length: int, intact: bool) -> Verdict:
        """Judge the chunk of ``length`` bytes at ``offset`` (``intact``: its CRC matched).

        Raises:
            ProtocolError: the chunk goes past the credit granted (a sender ignoring flow
                control), or past the size the end message announced.
            StreamCorrupted: chunks kept failing their check.
        """
        end = offset + length
        if offset < 0 or end > self.limit:
            raise ProtocolError(
                f"stream chunk [{offset}, {end}) goes past the credit granted ({self.limit} B)"
            )
        if self.end_size is not None and end > self.end_size:
            raise ProtocolError(f"stream chunk ends at {end} B, past the size {self.end_size} B")
        if end <= self.committed and length:
            return Verdict.DUPLICATE
        if offset != self.committed:
            if offset < self.committed:  # overlaps the committed end: a resend from before
                return Verdict.DUPLICATE
            return self._ask_resend()
        if not intact:
            self.damaged += 1
            if self.damaged > self.max_damaged:
                raise StreamCorrupted(
                    f"the chunk at {offset} B failed its check {self.damaged} times in a row"
                )
            self.resend_asked = False  # ask again: this one is the resend that failed
            return self._ask_resend()
        self.damaged = 0
        self.resend_asked = False
        self.committed = end
        return Verdict.ACCEPT

    def _ask_resend(self) -> Verdict:
        if self.resend_asked:
            return Verdict.IGNORE
        self.resend_asked = True
        return Verdict.RESEND

    def on_end(self, size: int) -> EndVerdict:
        """Take the sender's end message announcing ``size`` bytes.

        Raises:
            ProtocolError: a size below what already arrived.
        """
        if size < self.committed:
            raise ProtocolError(f"stream ended at {size} B after {self.committed} B arrived")
        self.end_size = size
        if self.committed == size:
            return EndVerdict.COMPLETE
        return EndVerdict.RESEND if self._ask_resend() is Verdict.RESEND else EndVerdict.WAIT

    @property
    def complete(self) -> bool:
        return self.end_size is not None and self.committed == self.end_size

    def on_consumed(self, nbytes: int) -> bool:
        """Record ``nbytes`` taken by the consumer; True when an ack should go out now (the
        credit grew by a quarter window since the last one)."""
        self.consumed += nbytes
        if self.consumed > self.committed:
            raise ValueError("consumed more than was received")
        return self.limit - self._acked_limit >= self.window // 4

    def acked(self) -> int:
        """Record that an ack granting :attr:`limit` went out; returns that limit."""
        self._acked_limit = self.limit
        return self._acked_limit


def checksum(data: Buffer) -> int:
    """The per-chunk CRC-32C (hardware-accelerated: ~17 GB/s here, against 3.8 for zlib's
    CRC-32, which would cost most of a core at the transfer rates we aim for)."""
    return int(crc32c.crc32c(data))
