"""Per-algorithm cost of the FL workflows: rounds per second and the server's memory.

Every strategy of ``flare_async.fl`` (issue 22) runs on FedAvg's loop with the same model and the
same 8 simulated sites (``simulate``: in this process, ``memory://``, the sites' scripts in worker
threads). The sites do almost no work: each returns the received model plus a small fixed
perturbation (SCAFFOLD's sites through ``client.algorithms.Scaffold``: the model's and the
control's change, a DIFF), so what is measured is the workflow's own cost: sending the task,
taking the results in, folding (or keeping) them, stepping the model.

Cases (``fedavg`` is the baseline of every ratio, measured in the same run): ``fedavg``,
``fedprox``, ``fedopt-adam``, ``fedavgm``, ``scaffold``, ``ditto``, ``robust-median``,
``robust-multi_krum`` (f=2), ``robust-bulyan`` (f=1), ``robust-trimmed_mean`` (f=2),
``robust-clipped_mean``. Model: 4 float32 tensors, 64 MiB in all (``--quick``: 2 MiB). Each
measurement is one fresh ``simulate`` with 1 warm-up round, ``--rounds`` timed rounds and one
traced round; the cases are interleaved (A B C ... A B C ...) ``--repeat`` times, and each metric
is reported as the median with its range (``min``, ``max``); ``--quick`` repeats twice.

Metrics per case:

- ``throughput`` (rounds/s): the timed rounds, from the start of the first one's ``run_round``
  to the start of the traced round's (so the strategy's step is counted).
- ``peak_traced`` (B), ``CASE:round``: the ``tracemalloc`` peak over the traced round, counting
  only allocations made in it (numpy's included). It is the whole process: the server and the
  in-process sites' copies of the task and of their results.
- ``peak_traced`` (B), ``CASE:step``: the ``tracemalloc`` peak while the strategy's step runs
  (after every site answered, the sites idle): what the round still holds (the running sum, or
  every update kept in memory) plus the step's own temporaries. The nearest to the server's
  aggregation alone.
- ``peak_rss`` (B), ``CASE:process``: the process's resident memory sampled every 5 ms in a
  background thread over the whole run, above its level just before the run (server and sites;
  mapped spill files' pages included). ``peak_rss_anon``: the same for ``RssAnon`` only (no
  file pages). The script re-executes itself once with ``MALLOC_MMAP_THRESHOLD_=131072`` so
  freed arrays go back to the system between runs and each run's growth is its own.

Results of 8 MiB or more (``fl/_results.SPILL_AT``) always arrive through a spill file and are
kept mapped from it: at full size every robust update is already mapped, never in memory.
The spill pair shows the other path, the in-memory bound of ``fl/_updates.Updates``: a 6 MiB
model (``--quick``: 1 MiB), under ``SPILL_AT``, Robust median with the default bound (every
update in memory: ``robust-median-small``, the pair's baseline) and with the bound lowered to one
update's size (``robust-median-small-spill``: the rest go to spill files), set with
``FLServer.memory_bound``.

The machine's load average is recorded before and after (``case: machine``).

Run: ``python benchmarks/workflows.py [--quick] [--repeat N] [--rounds K] [--cases a,b]``.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import threading
import time
import tracemalloc
from typing import Any

import anyio
import numpy as np
from _report import csv_choice, line, log, median, parser, positive_int

import flare_async.client as flare
from flare_async.client.algorithms import Scaffold as ScaffoldSite
from flare_async.fl import (
    SCAFFOLD_CTRL_GLOBAL,
    Ditto,
    FedAvg,
    FedOpt,
    FedProx,
    FLModel,
    Robust,
    RobustAggregation,
    Scaffold,
    fedavg,
    simulate,
)

BENCH = "workflows"
SITES = 8
TENSORS = 4
MIB = 1 << 20

ALGORITHMS: dict[str, FedAvg] = {
    "fedavg": FedAvg(),
    "fedprox": FedProx(mu=0.01),
    "fedopt-adam": FedOpt(optimizer="adam", lr=0.01),
    "fedavgm": FedOpt(optimizer="avgm", lr=1.0, momentum=0.9),
    "scaffold": Scaffold(),
    "ditto": Ditto(lam=0.1),
    "robust-median": Robust(RobustAggregation("median")),
    "robust-multi_krum": Robust(RobustAggregation("multi_krum", f=2)),
    "robust-bulyan": Robust(RobustAggregation("bulyan", f=1)),
    "robust-trimmed_mean": Robust(RobustAggregation("trimmed_mean", f=2)),
    "robust-clipped_mean": Robust(RobustAggregation("clipped_mean", max_norm=1.0)),
}
SPILL_CASES = ["robust-median-small", "robust-median-small-spill"]
CASES = [*ALGORITHMS, *SPILL_CASES]


# ---------------------------------------------------------------- the sites
def perturb() -> None:
    """Every site's script: the received model plus ``1e-3 * (site + 1)``; with controls in the
    task, SCAFFOLD's result (one step at lr 1) through the client helper."""
    flare.init()
    site = int(flare.get_config()["site_index"])
    eps = np.float32(1e-3 * (site + 1))
    scaffold = ScaffoldSite()
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        if SCAFFOLD_CTRL_GLOBAL in task.meta:  # the Client API puts the control there
            base = scaffold.receive(task)
            new = {k: np.asarray(v) + eps for k, v in base.items()}
            result = scaffold.result(new, steps=1, lr=1.0, meta={"num_samples": 1})
            del base, new
        else:
            params = {k: np.asarray(v) + eps for k, v in task.params.items()}
            result = FLModel(params=params, meta={"num_samples": 1})
            del params
        del task
        flare.send(result)
        del result


# ---------------------------------------------------------------- memory probes
class RssSampler:
    """Samples ``VmRSS`` and ``RssAnon`` of this process every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_rss, self.start_anon = _rss()
        self.peak_rss, self.peak_anon = self.start_rss, self.start_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss, anon = _rss()
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_anon = max(self.peak_anon, anon)


def _rss() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process in bytes."""
    rss = anon = 0
    with open("/proc/self/status", "rb") as f:
        for raw in f:
            if raw.startswith(b"VmRSS:"):
                rss = int(raw.split()[1]) * 1024
            elif raw.startswith(b"RssAnon:"):
                anon = int(raw.split()[1]) * 1024
    return rss, anon


@dataclasses.dataclass
class Probe:
    """What one run's wrappers saw."""

    rounds: int
    starts: list[float]
    traced: bool = False
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    step_peak: int = 0
    round_peak: int = 0
    kept: int = 0
    spilled: int = 0


# ---------------------------------------------------------------- one run
def model(total_bytes: int) -> dict[str, np.ndarray]:
    n = total_bytes // 4 // TENSORS
    rng = np.random.default_rng(0)
    return {f"layer{i}": rng.standard_normal(n, dtype=np.float32) for i in range(TENSORS)}


def traced_strategy(algo: FedAvg, probe: Probe) -> FedAvg:
    """``algo`` with its step wrapped: in the traced round, the tracemalloc peak of the step."""
    step = algo.step

    def wrapped(params: Any, result: Any, state: Any, clients: int) -> Any:
        if not probe.traced:
            began = time.perf_counter()
            out = step(params, result, state, clients)
            probe.step_seconds.append(time.perf_counter() - began)
            return out
        if result.updates is not None:
            probe.kept = len(result.updates)
            probe.spilled = result.updates.spilled
        probe.round_peak = max(probe.round_peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.reset_peak()
        out = step(params, result, state, clients)
        probe.step_peak = tracemalloc.get_traced_memory()[1]
        probe.round_peak = max(probe.round_peak, probe.step_peak)
        return out

    wrapped_algo = dataclasses.replace(algo)
    object.__setattr__(wrapped_algo, "step", wrapped)  # a frozen dataclass: its own dict
    return wrapped_algo


async def run_once(
    algo: FedAvg, params: dict[str, np.ndarray], timed: int, memory_bound: int | None = None
) -> dict[str, float]:
    rounds = 1 + timed + 1  # warm-up, timed, traced
    probe = Probe(rounds=rounds, starts=[])
    strategy = traced_strategy(algo, probe)

    async def workflow(server: Any) -> FLModel:
        if memory_bound is not None:
            server.memory_bound = memory_bound
        run_round = server.run_round

        async def timed_round(task: FLModel, *args: Any, **kwargs: Any) -> Any:
            probe.starts.append(time.perf_counter())
            if task.current_round == rounds - 1:
                probe.traced = True
                tracemalloc.start()
            return await run_round(task, *args, **kwargs)

        server.run_round = timed_round
        return await fedavg(server, params, rounds=rounds, strategy=strategy)

    gc.collect()
    try:
        with RssSampler() as rss:
            out = await simulate(workflow, perturb, clients=SITES)
    finally:
        tracemalloc.stop()
    assert len(out.meta["history"]) == rounds
    assert all(len(h["responded"]) == SITES for h in out.meta["history"])
    del out
    return {
        "throughput": timed / (probe.starts[-1] - probe.starts[1]),
        "step_s": median(probe.step_seconds[1:]),  # the timed rounds' (not the warm-up's)
        "round": float(probe.round_peak),
        "step": float(probe.step_peak),
        "rss": float(rss.peak_rss - rss.start_rss),
        "anon": float(rss.peak_anon - rss.start_anon),
        "kept": float(probe.kept),
        "spilled": float(probe.spilled),
    }


def run_case(case: str, size: int, small: int, timed: int) -> dict[str, float]:
    if case not in SPILL_CASES:
        return anyio.run(run_once, ALGORITHMS[case], model(size), timed)
    params = model(small)
    algo = ALGORITHMS["robust-median"]
    if not case.endswith("-spill"):
        return anyio.run(run_once, algo, params, timed)
    one = sum(v.nbytes for v in params.values())
    return anyio.run(run_once, algo, params, timed, one)


# ---------------------------------------------------------------- report
METRICS = [  # (key, metric, case suffix, unit)
    ("throughput", "throughput", "", "rounds/s"),
    ("step_s", "step_seconds", ":step", "s"),
    ("round", "peak_traced", ":round", "B"),
    ("step", "peak_traced", ":step", "B"),
    ("rss", "peak_rss", ":process", "B"),
    ("anon", "peak_rss_anon", ":process", "B"),
]


def report(case: str, runs: list[dict[str, float]], base: list[dict[str, float]] | None) -> None:
    for key, metric, suffix, unit in METRICS:
        values = [r[key] for r in runs]
        value = median(values)
        record: dict[str, Any] = {
            "bench": BENCH,
            "case": case + suffix,
            "metric": metric,
            "value": _round(value),
            "unit": unit,
            "min": _round(min(values)),
            "max": _round(max(values)),
            "n": len(values),
        }
        if base is not None and base is not runs:
            baseline = median([r[key] for r in base])
            record["baseline"] = _round(baseline)
            record["ratio"] = round(value / baseline, 4) if baseline else None
        line(**record)
    if case in SPILL_CASES:
        line(
            bench=BENCH,
            case=case,
            metric="spilled_updates",
            value=median([r["spilled"] for r in runs]),
            unit=f"of {int(runs[0]['kept'])}",
        )


def _round(value: float) -> float:
    return float(f"{value:.6g}") if value else 0.0


def load_line(when: str) -> None:
    one, five, fifteen = os.getloadavg()
    line(
        bench=BENCH,
        case=f"machine:{when}",
        metric="loadavg",
        value=one,
        unit="1-min",
        five=five,
        fifteen=fifteen,
    )


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed arrays go back: RSS per run
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    p = parser(__doc__.split("\n\n", 1)[0])
    p.add_argument("--rounds", type=positive_int, default=None, help="timed rounds per run")
    p.add_argument("--cases", type=csv_choice(CASES), default=CASES, help="comma-separated")
    p.set_defaults(repeat=None)  # 3, or 2 with --quick (checks)
    args = p.parse_args()
    size = (2 if args.quick else 64) * MIB
    small = (1 if args.quick else 6) * MIB
    timed = args.rounds or (2 if args.quick else 3)
    repeat = args.repeat or (2 if args.quick else 3)
    cases = list(args.cases)
    if "fedavg" not in cases:
        cases.insert(0, "fedavg")
    if "robust-median-small-spill" in cases and "robust-median-small" not in cases:
        cases.insert(cases.index("robust-median-small-spill"), "robust-median-small")
    log(
        f"{len(cases)} cases x {repeat}, {SITES} sites, model {size // MIB} MiB "
        f"(spill pair {small // MIB} MiB), {timed} timed rounds per run"
    )
    load_line("start")
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in cases}
    began = time.perf_counter()
    for rep in range(repeat):
        for case in cases:
            r = run_case(case, size, small, timed)
            runs[case].append(r)
            log(
                f"[{rep + 1}/{repeat}] {case:26s} {r['throughput']:7.2f} rounds/s  "
                f"step {r['step_s']:6.3f} s  "
                f"round {r['round'] / MIB:7.1f}  step {r['step'] / MIB:7.1f}  "
                f"rss +{r['rss'] / MIB:7.1f}  anon +{r['anon'] / MIB:7.1f} MiB"
                + (f"  spilled {r['spilled']:.0f}/{r['kept']:.0f}" if case in SPILL_CASES else "")
            )
    load_line("end")
    for case in cases:
        base = {"robust-median-small": None, "robust-median-small-spill": "robust-median-small"}
        report(case, runs[case], runs.get(base.get(case, "fedavg") or ""))
    log(f"done in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
