"""Per-link backlogs: frames a relay forwards to a peer whose link is full.

A relay reads a link and forwards each frame one hop on. If the next link has no room, the frame
joins that link's backlog, in order, and the relay goes on reading: a full link holds up its
own frames only. A task per link sends its backlog, each frame until its deadline; one that
cannot be sent is reported to its origin as a forward that failed. Past ``limit`` bytes of
payload for one peer, or ``total`` for all, a forward waits for room (backpressure on the link
the frames came from) until its deadline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from flare_async import _logging
from flare_async._concurrency import Signal
from flare_async.cell._links import NO_BACKLOG, Peer
from flare_async.errors import (
    CellClosed,
    ConfigError,
    DeadlineExceeded,
    LinkBroken,
    ProtocolError,
    TransportError,
)
from flare_async.wire import Frame

DEFAULT_BACKLOG: Final = 16 << 20
"""Bytes of payload a relay holds for one peer whose link is full before the link's reader
waits (backpressure)."""
BACKLOG_PEERS: Final = 16
"""All backlogs of a cell together hold at most this many peers' worth (``limit``)."""

Failed = Callable[[Peer, Frame, Exception], None]
_log = _logging.get_logger()


class Backlogs:
    """The backlogs of one cell's links (the frames wait in each ``Peer.backlog``).

    Args:
        name: the cell's name (for task names and errors).
        clock: the cell's clock.
        spawn: starts a task in the cell's group (False once it stops).
        send: sends a frame on a peer's link, waiting for room until a deadline.
        failed: told of a frame that could not be sent (deadline passed, link broke).
        limit: bytes of payload one peer's backlog holds before a forward waits (> 0).

    Raises:
        ConfigError: a limit of 0 or less.
    """

    def __init__(
        self,
        name: str,
        clock: Callable[[], float],
        spawn: Callable[..., bool],
        send: Callable[[Peer, Frame, float], Awaitable[None]],
        failed: Failed,
        limit: int = DEFAULT_BACKLOG,
    ) -> None:
        self.name = name
        self._clock = clock
        self._spawn = spawn
        self._send = send
        self._failed = failed
        if not limit > 0:
            raise ConfigError(f"a backlog limit must be a positive number of bytes, not {limit}")
        self.limit = limit
        self.total = BACKLOG_PEERS * limit
        """Bytes of payload all backlogs together hold before a forward waits."""
        self.frames = 0
        self.bytes = 0

    async def put(self, hop: Peer, frame: Frame, deadline: float) -> None:
        """Put a frame in ``hop``'s backlog, waiting (until ``deadline``) while the backlog is
        past its limits; start the task that sends it. A peer with an empty backlog always
        takes one frame (so ``total`` may be passed by one frame per peer, and a wait is
        always ended by that peer's own drain).

        Raises:
            DeadlineExceeded: no room before the deadline.
            CellClosed: the cell is stopping (nothing would send the frame).
        """
        size = frame.payload_len
        while hop.backlog and (
            hop.backlog_bytes + size > self.limit or self.bytes + size > self.total
        ):
            if hop.room is None:
                hop.room = Signal()
            room = hop.room
            with anyio.move_on_after(max(0.0, deadline - self._clock())):
                await room.wait()
            if not room.is_set:
                raise DeadlineExceeded(f"the backlog to {hop.name} stayed full until the deadline")
        if not hop.draining:
            hop.draining = self._spawn(self._drain, hop, name=f"{self.name} backlog {hop.name}")
            if not hop.draining:
                raise CellClosed(f"cell {self.name} is stopping")
        if hop.backlog is NO_BACKLOG:
            hop.backlog = deque()
        hop.backlog.append((frame, deadline, size))
        hop.backlog_bytes += size
        self.bytes += size
        self.frames += 1

    def discard(self, hop: Peer, error: TransportError) -> None:
        """``hop``'s link went down: what waits for it will never be sent. Each frame is
        reported as failed (but the one being sent, which its send reports)."""
        keep = 1 if hop.draining and hop.backlog else 0
        while len(hop.backlog) > keep:
            frame, _, _ = self._take(hop, -1)
            self._failed(hop, frame, error)

    def _take(self, hop: Peer, index: int) -> tuple[Frame, float, int]:
        entry = hop.backlog.popleft() if index == 0 else hop.backlog.pop()
        size = entry[2]
        hop.backlog_bytes -= size
        self.bytes -= size
        self.frames -= 1
        room, hop.room = hop.room, None
        if room is not None:
            room.set()
        return entry

    async def _drain(self, hop: Peer) -> None:
        """Send ``hop``'s backlog in order, each frame until its deadline."""
        try:
            while hop.backlog:
                frame, deadline, _ = hop.backlog[0]
                failed: Exception | None = None
                try:
                    if deadline <= self._clock():
                        failed = DeadlineExceeded(f"deadline passed at {self.name}")
                    else:
                        await self._send(hop, frame, deadline)
                except (DeadlineExceeded, TransportError, ProtocolError) as exc:
                    failed = exc
                except Exception as exc:  # a bug below must cost this frame, not the cell
                    _log.exception("forwarding from a backlog failed", peer=hop.name)
                    failed = LinkBroken(f"{self.name} could not forward: {exc!r}")
                finally:
                    self._take(hop, 0)
                if failed is not None:
                    self._failed(hop, frame, failed)
        finally:
            hop.draining = False


__all__ = ["BACKLOG_PEERS", "DEFAULT_BACKLOG", "Backlogs"]
