"""Shared plumbing for the benchmark scripts (see ../shared/BENCHMARKS.md).

Every benchmark prints one JSON object per measurement on stdout and nothing else; progress goes
to stderr. A script uses this module as::

    from _report import emit, log, median, parser

    args = parser("what this measures").parse_args()
    ...
    emit("stream", "tcp-direct-1GiB-file", "throughput", 2.31e9, "B/s", baseline=3.26e9)

Scripts are run as ``python benchmarks/NAME.py``, so this directory is on ``sys.path`` and the
module is imported as ``_report``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_REPEAT = 3


# ---------------------------------------------------------------- arguments
def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: ``--quick``, ``--repeat``.

    Scripts add their own options to it before calling ``parse_args``.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced size that finishes within 60 s on the 2-core machine (used for checks)",
    )
    p.add_argument(
        "--repeat",
        type=positive_int,
        default=DEFAULT_REPEAT,
        metavar="N",
        help=f"measure each case N times and report the median (default {DEFAULT_REPEAT})",
    )
    return p


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def csv_choice(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated subset of ``choices`` (kept in given order)."""

    def parse(text: str) -> list[str]:
        picked = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in picked if item not in choices]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(choices)} (comma-separated), not {text!r}"
            )
        return picked

    return parse


def csv_ints(text: str) -> list[int]:
    """An argparse ``type`` for a comma-separated list of positive integers."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"not a list of positive integers: {text!r}")
    return values


# ---------------------------------------------------------------- output
def emit(
    bench: str,
    case: str,
    metric: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Print one measurement as a JSON line on stdout (flushed) and return it.

    ``ratio`` is ``value / baseline``; both are left out when there is no baseline. ``extra``
    fields (a second baseline, the machine's load...) follow them as given.
    """
    record: dict[str, Any] = {
        "bench": bench,
        "case": case,
        "metric": metric,
        "value": _number(value),
        "unit": unit,
    }
    if baseline is not None:
        record["baseline"] = _number(baseline)
        record["ratio"] = round(value / baseline, 4) if baseline else None
    record.update(extra)
    line(**record)
    return record


def line(**record: Any) -> None:
    """Print one JSON line on stdout, flushed: a measurement (``emit``), or what a benchmark's
    child process tells its parent."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _number(value: float) -> float | int:
    """Round to 6 significant digits: more is noise on a shared machine."""
    if isinstance(value, int) or not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.6g}")


def log(*parts: object) -> None:
    """Progress for humans: stderr only, never stdout."""
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of already sorted values, by linear interpolation."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median_of(fn: Callable[[], float], repeat: int) -> float:
    """Run ``fn`` ``repeat`` times (after a garbage collection each) and return the median."""
    results = []
    for _ in range(repeat):
        gc.collect()
        results.append(fn())
    return median(results)


async def amedian_of(fn: Callable[[], Awaitable[float]], repeat: int) -> float:
    """:func:`median_of` for an async measurement."""
    results = []
    for _ in range(repeat):
        gc.collect()
        results.append(await fn())
    return median(results)


def median_records(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key median of several runs that each measured the same metrics."""
    return {key: median([run[key] for run in runs]) for key in runs[0]}


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Call ``fn``; return its result and the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# ---------------------------------------------------------------- event loop
def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401, PLC0415 - optional
    except ImportError:
        return False
    return True


def run_async(main: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``main`` on anyio's asyncio backend, with uvloop when it can be imported."""
    import anyio  # noqa: PLC0415 - only benchmarks that need an event loop pay for it

    use_uvloop = uvloop_available()
    log(f"event loop: asyncio{' + uvloop' if use_uvloop else ''}")
    return anyio.run(main, *args, backend="asyncio", backend_options={"use_uvloop": use_uvloop})
