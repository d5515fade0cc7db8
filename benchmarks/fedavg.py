"""Simulated FedAvg: rounds per second, and the server's memory for a large model.

Cases:

- ``small-8clients`` (rounds/s): 8 simulated clients whose local training adds 1 to every
  parameter, a 3x3 float32 model, 20 rounds (``--quick``: 10), everything in this process over
  ``memory://`` (the simulator: client scripts in worker threads). The round rate counts the
  whole workflow (sampling, sending the task as one stream, folding results, stepping).
- ``large-8clients`` (s per round, and ``server`` ``peak_rss`` with the model's size in bytes as
  ``baseline``): the same with a 25M-parameter float32 model (100 MB), 3 rounds (``--quick``:
  2.5M parameters). Clients run in this process too (the issue asks for subprocesses over tcp,
  which the simulator does not do yet), so ``peak_rss`` is that of the whole simulation: server
  and the 8 clients' copies of the model.

Run: ``python benchmarks/fedavg.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import anyio
import numpy as np
from _report import emit, log, median, parser

import flare_async.client as flare
from flare_async.fl import FLModel, fedavg, simulate


def add_one() -> None:
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        flare.send(
            FLModel(params={k: v + 1 for k, v in model.params.items()}, meta={"num_samples": 1})
        )


async def run(params: dict[str, Any], rounds: int) -> float:
    start = time.perf_counter()
    out = await simulate(lambda s: fedavg(s, params, rounds=rounds), add_one, clients=8)
    seconds = time.perf_counter() - start
    first = next(iter(out.params.values()))
    assert float(first.reshape(-1)[0]) == float(next(iter(params.values())).reshape(-1)[0]) + rounds
    return seconds


def main() -> None:
    args = parser(__doc__.split("\n\n", 1)[0]).parse_args()
    rounds = 10 if args.quick else 20
    small = {"w": np.zeros((3, 3), np.float32)}
    rates = [rounds / anyio.run(run, small, rounds) for _ in range(args.repeat)]
    emit("fedavg", "small-8clients", "throughput", median(rates), "rounds/s")
    log(f"small: {median(rates):.1f} rounds/s")
    n = 2_500_000 if args.quick else 25_000_000
    big = {f"layer{i}": np.zeros(n // 10, np.float32) for i in range(10)}
    size = sum(v.nbytes for v in big.values())
    per_round = [anyio.run(run, big, 3) / 3 for _ in range(args.repeat)]
    emit("fedavg", "large-8clients", "seconds_per_round", median(per_round), "s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    emit("fedavg", "large-8clients:server", "peak_rss", rss, "B", size)
    log(
        f"large: {median(per_round):.2f} s per round, peak RSS {rss / 2**20:.0f} MiB "
        f"for a {size / 2**20:.0f} MiB model"
    )


if __name__ == "__main__":
    main()
