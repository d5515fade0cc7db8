"""Simulated FedAvg: rounds per second, and the server's memory for a large model.

Cases:

- ``small-8clients`` (rounds/s): 8 simulated clients whose local training adds 1 to every
  parameter, a 3x3 float32 model, 20 rounds (``--quick``: 10), everything in this process over
  ``memory://`` (the simulator: client scripts in worker threads). The round rate counts the
  whole workflow (sampling, sending the task as one stream, folding results, stepping).
- ``large-8clients`` (s per round, and ``server`` ``peak_rss`` with the model's size in bytes as
  ``baseline``): the same with a 25M-parameter float32 model (100 MB), 3 rounds (``--quick``:
  2.5M parameters), every client its own process connected to the server over tcp on loopback
  (``simulate(processes=True)``). Each repetition runs in a fresh server process, so
  ``peak_rss`` (the process's maximum resident set) is the server's alone; the round time
  counts the workflow (the sites' start-up, reported as ``startup``, is not a round).

Run: ``python benchmarks/fedavg.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from _report import emit, log, median, parser, run_async

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


HERE = Path(__file__).resolve().parent


async def large_once(n: int, rounds: int) -> dict[str, float]:
    """One large run with site processes; this process is the server."""
    start = time.perf_counter()
    began: list[float] = []

    def model() -> dict[str, np.ndarray]:
        return {f"layer{i}": np.zeros(n // 10, np.float32) for i in range(10)}

    async def workflow(server: Any) -> Any:
        began.append(time.perf_counter())
        return await fedavg(server, model(), rounds=rounds)  # only the workflow holds it

    out = await simulate(workflow, "fedavg:add_one", clients=8, processes=True)
    seconds = time.perf_counter() - began[0]
    assert float(out.params["layer0"][0]) == rounds
    return {
        "seconds_per_round": seconds / rounds,
        "startup": began[0] - start,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_bytes": n * 4,
    }


def run_large(n: int, rounds: int) -> dict[str, float]:
    """``large_once`` in a fresh process (its peak RSS is the server's alone)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    done = subprocess.run(
        [sys.executable, __file__, "--large-once", str(n), str(rounds)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    if sys.argv[1:2] == ["--large-once"]:
        record = run_async(large_once, int(sys.argv[2]), int(sys.argv[3]))
        print(json.dumps(record))
        return
    args = parser(__doc__.split("\n\n", 1)[0]).parse_args()
    rounds = 10 if args.quick else 20
    small = {"w": np.zeros((3, 3), np.float32)}
    rates = [rounds / anyio.run(run, small, rounds) for _ in range(args.repeat)]
    emit("fedavg", "small-8clients", "throughput", median(rates), "rounds/s")
    log(f"small: {median(rates):.1f} rounds/s")
    n = 2_500_000 if args.quick else 25_000_000
    runs = [run_large(n, 3) for _ in range(args.repeat)]
    per_round = median([r["seconds_per_round"] for r in runs])
    rss = median([r["peak_rss"] for r in runs])
    size = runs[0]["model_bytes"]
    emit("fedavg", "large-8clients", "seconds_per_round", per_round, "s")
    emit("fedavg", "large-8clients", "startup", median([r["startup"] for r in runs]), "s")
    emit("fedavg", "large-8clients:server", "peak_rss", rss, "B", size)
    log(
        f"large: {per_round:.2f} s per round, server peak RSS {rss / 2**20:.0f} MiB "
        f"for a {size / 2**20:.0f} MiB model (target {(2 * size + 100 * 2**20) / 2**20:.0f})"
    )


if __name__ == "__main__":
    main()
