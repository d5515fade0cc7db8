"""A progress bar for streams on a terminal (one line, redrawn) or a log (a line now and then)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from flare_async.streaming import Progress

_WIDTH = 28


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def human_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s + 0.5)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def render(label: str, p: Progress) -> str:
    """One line: label, percentage and bar (when the size is known), bytes, rate, ETA."""
    done = human_bytes(p.done)
    rate = f"{human_bytes(p.rate)}/s"
    frac = p.fraction
    if frac is None:
        return f"{label}  {done}  {rate}"
    filled = int(frac * _WIDTH)
    bar = "#" * filled + "." * (_WIDTH - filled)
    total = human_bytes(p.total or 0)
    return f"{label} {frac * 100:5.1f}% [{bar}] {done}/{total}  {rate}  ETA {human_seconds(p.eta)}"


class ProgressBar:
    """Feed it :class:`~flare_async.streaming.Progress` (``Cell.stream(progress=bar.update)``).

    On a terminal it redraws one line at most every ``every`` seconds; elsewhere (a log, a
    pipe) it writes a line at most every ``plain_every`` seconds, so logs stay readable.
    """

    def __init__(
        self,
        out: TextIO,
        label: str,
        *,
        tty: bool | None = None,
        every: float = 0.2,
        plain_every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.label = label
        self.tty = out.isatty() if tty is None else tty
        self.every = every if self.tty else plain_every
        self.clock = clock
        self._last = -float("inf")
        self.last: Progress | None = None

    def update(self, p: Progress) -> None:
        self.last = p
        now = self.clock()
        if now - self._last < self.every:
            return
        self._last = now
        self._draw(p)

    def _draw(self, p: Progress) -> None:
        line = render(self.label, p)
        self.out.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.out.flush()

    def finish(self) -> None:
        if self.last is not None:
            self._draw(self.last)
        if self.tty:
            self.out.write("\n")
            self.out.flush()
