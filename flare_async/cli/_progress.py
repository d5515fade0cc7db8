"""Progress for people, drawn with tqdm: on a terminal one bar, redrawn, with log lines and
other output written above it; elsewhere (a log, a pipe) a plain line now and then, never a
redrawn bar.

- :class:`ProgressBar`: a stream's bytes (``flare-async send``), fed
  :class:`~flare_async.streaming.Progress`.
- :class:`RoundProgress`: an FL job's rounds (``flare-async simulate``; ``job submit --wait``):
  round k of n, sites that answered of those asked, elapsed and remaining time, the latest
  metrics. Off a terminal, one line per round.
- :class:`AboveBar`: a text stream whose lines go above the bars (give it to
  ``_logging.configure(stream=...)`` and as ``sys.stdout``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type hints
from tqdm.contrib.logging import logging_redirect_tqdm  # type: ignore[import-untyped]

from flare_async.streaming import Progress

__all__ = [
    "AboveBar",
    "ProgressBar",
    "RoundProgress",
    "human_bytes",
    "human_seconds",
    "render",
    "render_metrics",
    "render_round",
]

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

    On a terminal, a tqdm bar (bytes, rate, ETA) redrawn at most every ``every`` seconds;
    elsewhere (a log, a pipe) it writes a :func:`render` line at most every ``plain_every``
    seconds, so logs stay readable.
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
        self.tty = _isatty(out) if tty is None else tty
        self.every = every if self.tty else plain_every
        self.clock = clock
        self._last = -float("inf")
        self.last: Progress | None = None
        self._bar: Any = None

    def update(self, p: Progress) -> None:
        self.last = p
        now = self.clock()
        if now - self._last < self.every:
            return
        self._last = now
        self._draw(p)

    def _draw(self, p: Progress) -> None:
        if not self.tty:
            self.out.write(f"{render(self.label, p)}\n")
            self.out.flush()
            return
        if self._bar is None:
            self._bar = tqdm(
                total=p.total,
                desc=self.label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.out,
                dynamic_ncols=True,
                leave=True,
            )
        if p.total is not None and self._bar.total != p.total:
            self._bar.total = p.total
        self._bar.n = p.done
        self._bar.refresh()

    def finish(self) -> None:
        if self.last is not None:
            self._draw(self.last)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def render_round(
    done: int,
    rounds: int | None,
    *,
    responded: int,
    expected: int | None,
    elapsed: float,
    remaining: float | None,
    metrics: Mapping[str, float],
    failed: Sequence[str] = (),
    label: str = "round",
) -> str:
    """One plain line for a finished round: ``round 3/15  sites 4/4  00:02 elapsed  00:10
    left  accuracy=0.91 loss=0.2`` (``failed: NAME ...`` when some site failed)."""
    of = f"/{rounds}" if rounds is not None else ""
    sites = f"{responded}/{expected}" if expected is not None else str(responded)
    line = f"{label} {done}{of}  sites {sites}  {human_seconds(elapsed)} elapsed"
    if remaining is not None:
        line += f"  {human_seconds(remaining)} left"
    if metrics:
        line += "  " + render_metrics(metrics)
    if failed:
        line += f"  failed: {' '.join(failed)}"
    return line


def render_metrics(metrics: Mapping[str, object]) -> str:
    """``k=v`` pairs, floats to 4 significant digits, anything else as it prints."""
    return " ".join(f"{k}={_number(v)}" for k, v in metrics.items())


def _number(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class RoundProgress:
    """An FL job's rounds as a person follows them.

    On a terminal (``tty``; default: whether ``out`` is one), a tqdm bar: ``round 3/15
    |###   | 00:02<00:10  sites 4/4 accuracy=0.91``; elsewhere one :func:`render_round` line
    per round. Use it as a context manager (or call :meth:`close`)::

        with RoundProgress(rounds, out=sys.stderr) as progress:
            ...
            progress.update(k, responded=4, expected=4, metrics={"loss": 0.2})

    Thread-safe: rounds may be reported from worker threads.
    """

    def __init__(
        self,
        rounds: int | None,
        *,
        out: TextIO,
        tty: bool | None = None,
        label: str = "round",
        first: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        rounds: how many rounds the job runs (``None``: not known yet; see :meth:`update`).
        out: where the bar or the lines go (stderr, so that stdout stays for results).
        first: rounds already done before this started (a resumed job): the remaining
            time is estimated from the rounds run here only.
        clock: for the elapsed and remaining times of the plain lines.
        """
        self.rounds = rounds
        self.out = out
        self.tty = _isatty(out) if tty is None else tty
        self.label = label
        self.clock = clock
        self.start = clock()
        self.first = first
        self.done = first
        self._lock = threading.Lock()
        self._bar: Any = None
        if self.tty:
            self._bar = tqdm(
                total=rounds,
                initial=first,
                desc=label,
                unit="round",
                file=out,
                dynamic_ncols=True,
                leave=True,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}",
            )

    def update(
        self,
        done: int,
        *,
        responded: int,
        expected: int | None = None,
        metrics: Mapping[str, float] | None = None,
        failed: Sequence[str] = (),
        rounds: int | None = None,
    ) -> None:
        """Round ``done`` (counted from 1) finished: ``responded`` of ``expected`` sites
        answered (``failed`` names those that did not), with these latest ``metrics``;
        ``rounds`` updates the total when it was not known (or changed)."""
        with self._lock:
            if rounds is not None:
                self.rounds = rounds
            self.done = done
            elapsed = self.clock() - self.start
            ran = done - self.first
            remaining = (
                elapsed / ran * (self.rounds - done)
                if self.rounds is not None and ran > 0 and done <= self.rounds
                else None
            )
            if self._bar is None:
                line = render_round(
                    done,
                    self.rounds,
                    responded=responded,
                    expected=expected,
                    elapsed=elapsed,
                    remaining=remaining,
                    metrics=metrics or {},
                    failed=failed,
                    label=self.label,
                )
                self.out.write(f"{line}\n")
                self.out.flush()
                return
            if self.rounds is not None and self._bar.total != self.rounds:
                self._bar.total = self.rounds
            sites = f"{responded}/{expected}" if expected is not None else str(responded)
            postfix = f"sites {sites}"
            if metrics:
                postfix += "  " + render_metrics(metrics)
            if failed:
                postfix += f"  failed: {' '.join(failed)}"
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.n = done
            self._bar.refresh()

    def write(self, text: str) -> None:
        """A line of other output, above the bar (plain: as it is)."""
        with self._lock:
            if self._bar is not None:
                with tqdm.external_write_mode(file=self.out):
                    self.out.write(text if text.endswith("\n") else text + "\n")
            else:
                self.out.write(text if text.endswith("\n") else text + "\n")
                self.out.flush()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def __enter__(self) -> RoundProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AboveBar:
    """A text stream for other output while bars are drawn on a terminal: each whole line is
    written to ``out`` with the bars drawn on ``bars`` (default ``out``: stdout and stderr on
    one terminal) cleared first and drawn again after, so log lines and prints never run
    through a bar. Partial lines wait for their end. ``muted`` drops everything (a command
    that is stopping)."""

    def __init__(self, out: TextIO, bars: TextIO | None = None) -> None:
        self.out = out
        self.bars = out if bars is None else bars
        self.muted = False
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            if self.muted:
                return len(text)
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            if lines:
                with tqdm.external_write_mode(file=self.bars):
                    self.out.write("".join(f"{line}\n" for line in lines))
                    self.out.flush()
        return len(text)

    def flush(self) -> None:
        # A partial line stays pending: written now, the next redraw would overwrite it.
        self.out.flush()

    def close(self) -> None:
        """Write what waits of a last partial line (the bars are gone by now); the stream
        itself stays open (it is ``out``'s)."""
        with self._lock:
            pending, self._pending = self._pending, ""
            if pending and not self.muted:
                self.out.write(pending)
                self.out.flush()

    def isatty(self) -> bool:
        return _isatty(self.out)

    def fileno(self) -> int:
        return self.out.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.out, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:  # the rest of a text stream (buffer, errors...)
        return getattr(self.out, name)


@contextmanager
def logging_above_bars() -> Iterator[None]:
    """Standard-library logging (libraries' own loggers) written above the bars."""
    with logging_redirect_tqdm():
        yield


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # a closed stream, or an object without it
        return False
