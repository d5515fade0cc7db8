"""Progress of a stream: bytes, rate and ETA, for code, progress bars and the dashboard."""

from __future__ import annotations

from collections.abc import Callable

import msgspec


class Progress(msgspec.Struct, frozen=True):
    """Where one stream stands.

    Attributes:
        peer: the other end (the receiver for a sender, the sender for a receiver).
        sid: the stream id (unique per sender).
        done: bytes the receiver holds intact.
        total: the object's size, when known.
        elapsed: seconds since the stream opened.
        rate: bytes per second, smoothed over the last seconds.
    """

    peer: str
    sid: int
    done: int
    total: int | None
    elapsed: float
    rate: float

    @property
    def eta(self) -> float | None:
        """Seconds to the end at the current rate (``None`` when unknown)."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)

    @property
    def fraction(self) -> float | None:
        if self.total is None:
            return None
        return 1.0 if self.total == 0 else self.done / self.total


class ProgressMeter:
    """Turns (time, bytes done) samples into :class:`Progress` with a smoothed rate."""

    def __init__(
        self, clock: Callable[[], float], peer: str, sid: int, total: int | None, tau: float = 2.0
    ) -> None:
        self._clock = clock
        self.peer = peer
        self.sid = sid
        self.total = total
        self._tau = tau
        self._start = clock()
        self._last_t = self._start
        self._last_done = 0
        self._rate = 0.0

    def update(self, done: int) -> Progress:
        now = self._clock()
        dt = now - self._last_t
        if dt > 0.05:
            instant = (done - self._last_done) / dt
            weight = min(1.0, dt / self._tau)
            self._rate = (
                instant if self._rate == 0 else self._rate + weight * (instant - self._rate)
            )
            self._last_t = now
            self._last_done = done
        return Progress(self.peer, self.sid, done, self.total, now - self._start, self._rate)
