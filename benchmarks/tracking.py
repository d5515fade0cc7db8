"""Tracked values (``flare.log``, the tracking writers) from training scripts to the server.

Cases (values per second: ``2 N`` values over the time a one-round job with them takes
beyond the same job logging nothing, measured one after the other; the server must have kept
all ``2 N``):

- ``threads-2sites``: two simulated sites (scripts in worker threads, ``memory://``), each
  logging ``N`` scalars in one round (``--quick``: 20,000; else 200,000), batched by the site
  into ``fl/metrics`` requests as the script goes.
- ``processes-2sites``: the same with each script in its own process (the worker pipe to its
  site, then the site's batches), as jobs run on a deployment.

``baseline``: the same number of records built and kept in a list in the script's thread (the
part no transport can avoid: the record itself), measured in the same run.

Run: ``python benchmarks/tracking.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import emit, log, median, parser, run_async

import flare_async.client as flare
from flare_async.fl import FLModel, FLServer, fedavg, simulate
from flare_async.fl._tracking import records

HERE = str(Path(__file__).resolve().parent)
"""On the worker processes' path: they import this module for their script."""


def count() -> int:
    return int(os.environ.get("FLARE_BENCH_VALUES", "20000"))


def log_many() -> None:
    """One round: log ``count()`` scalars, then answer."""
    flare.init()
    n = count()
    while flare.is_running():
        model = flare.receive()
        for i in range(n):
            flare.log("loss", 1.0 / (i + 1), step=i)
        flare.send(FLModel(params=dict(model.params)))


async def one(script: Any, n: int) -> float:
    """Seconds of a one-round job whose two scripts log ``n`` values each."""
    os.environ["FLARE_BENCH_VALUES"] = str(n)
    kept = 0

    def on_metrics(site: str, recs: list[dict[str, Any]]) -> None:
        nonlocal kept
        kept += len(recs)

    async def wf(server: FLServer) -> FLModel:
        return await fedavg(server, {"w": np.zeros(1)}, rounds=1, deadline=600)

    start = time.perf_counter()
    await simulate(wf, script, clients=2, on_metrics=on_metrics)
    elapsed = time.perf_counter() - start
    if kept != 2 * n:
        raise SystemExit(f"the server kept {kept} of {2 * n} values")
    return elapsed


def baseline(n: int) -> float:
    start = time.perf_counter()
    kept: list[dict[str, Any]] = []
    for _ in range(2):
        for i in range(n):
            kept.extend(records("loss", 1.0 / (i + 1), "SCALAR", i))
    return 2 * n / (time.perf_counter() - start)


async def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    n = 20_000 if args.quick else 200_000
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (HERE, os.environ.get("PYTHONPATH", "")) if p
    )
    cases = {"threads-2sites": log_many, "processes-2sites": "tracking:log_many"}
    for case, script in cases.items():
        rates, bases = [], []
        for rep in range(args.repeat):  # interleaved with the baseline
            bases.append(baseline(n))
            empty = await one(script, 0)
            rates.append(2 * n / (await one(script, n) - empty))
            log(f"{case} #{rep}: {rates[-1]:,.0f} values/s (baseline {bases[-1]:,.0f})")
        emit(
            "tracking",
            f"{case}-{n}",
            "throughput",
            median(rates),
            "values/s",
            baseline=median(bases),
        )
        log(f"load average (1 min) after {case}: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    run_async(main)
