"""Simulated FedAvg with thousands of edge cells under two tiers of relays, in one process.

A case is named ``fedavg-<N>edge-<T1>x<T2>``: ``N`` edge cells (sites) under ``T1`` relays,
each with ``T2`` relays below it (``T1 * T2`` leaf relays; sites spread over them round-robin),
everything in this process on one ``MemoryNetwork``, built by ``flare_async.fl.simulate`` as
any simulation is. Every site runs an async training script on the simulation's event loop
(``simulate(in_loop=True)``: no thread per site): it adds a site-dependent constant to the
model and reports it with ``num_samples``. The server samples every site each round and sends
the model by fan-out (one stream per relay, tier by tier); each leaf relay folds its sites'
results and sends one partial sum to the relay above it, which folds those and sends one to
the server (``FLServer(hierarchical=True)``: every tier folds). The model
is small (``--params`` float32 values, 1,000 by default): this measures the fabric and the
FL machinery per site, not arithmetic.

Per case:

- ``round_time`` (s): median wall time of a round (task out to every site, every result
  folded, model stepped), over ``--rounds`` rounds after a warm-up round; ``baseline``: the
  same rounds' floor on this interpreter, ``N`` times one ``asyncio.Queue`` put and get pair
  per message the round moves (an in-process hand-off with no framing, routing or state), so
  ``ratio`` says how many times that floor the fabric takes;
- ``startup`` (s): building the topology and linking every cell;
- ``messages_per_s``: frames sent on all links during the measured rounds / their time;
- ``frames_per_site``: frames sent on all links per measured round, per site (every hop
  counts: a frame that crosses two relays counts three times);
- ``peak_rss`` (B): this process's peak resident memory (``ru_maxrss``), and ``rss_per_cell``
  (B): the growth of RSS from before the topology to after it is linked, per edge cell, in the
  case's first run (later runs reuse the memory the first one freed);
- the final model is checked against the expected weighted average (a wrong sum fails the run).

Backends (``--backends``, issue 24): ``local`` is the in-process simulator above; ``rayN`` the
same case with ``simulate(backend="ray", actors=N)`` (the server in this process, the top
relays' subtrees in ``N`` Ray actors on a local ``ray.init()`` over this machine's cores, linked
to the server over ``tcp://``), its case named with ``-rayN``. Within a repeat, each backend runs
once, in turn, so they share the machine's state. A Ray case reports ``round_time`` (no
baseline), ``startup`` (the actors' start included, ``ray.init`` not: it runs once, before),
``peak_rss`` (this process's RSS at the end of the rounds plus the actors' peak RSS, ``VmHWM``,
summed) and ``ray_vs_local``: its median round time over the in-process one's in the same run.
Frames cross the actors' own networks and tcp, uncounted: no ``messages_per_s``,
``frames_per_site`` or ``rss_per_cell`` for Ray.

Run: ``python benchmarks/scale.py [--quick] [--repeat N] [--cells 1000,10000] [--tiers 10,10]
[--backends local,ray1,ray2]``. Full size: 1,000 and 10,000 cells, backends ``local,ray1,ray2``;
``--quick``: 1,000, ``local`` only. ``--cells 100000`` where memory allows.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import resource
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import csv_choice, csv_ints, emit, log, median, parser

import flare_async.client as flare
from flare_async import MemoryNetwork
from flare_async.fl import FLModel, FLServer, RoundResult, fedavg, simulate

BACKENDS = ("local", "ray1", "ray2")


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def ray_actors_peak_rss() -> int:
    """The summed peak RSS (``VmHWM``) of this machine's Ray actors of the simulator."""
    total = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ray::Host" in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                total += int(status.split("VmHWM:")[1].split()[0]) * 1024
        except (OSError, IndexError):
            continue  # gone, or not ours to read
    return total


async def edge_script() -> None:
    """Site i adds (i % 5 + 1) to every value and reports i % 5 + 1 samples."""
    k = flare.get_config()["site_index"] % 5 + 1
    while (model := await flare.receive_async()) is not None:
        params = {name: np.asarray(v) + k for name, v in model.params.items()}
        await flare.send_async(FLModel(params=params, meta={"num_samples": k}))


def expected_step(cells: int) -> float:
    ks = [i % 5 + 1 for i in range(cells)]
    return sum(k * k for k in ks) / sum(ks)


async def queue_floor(messages: int) -> float:
    """Seconds for ``messages`` put/get pairs through one asyncio.Queue (in batches)."""
    q: asyncio.Queue[int] = asyncio.Queue()
    start = time.perf_counter()
    done = 0
    while done < messages:
        batch = min(1000, messages - done)
        for i in range(batch):
            q.put_nowait(i)
        for _ in range(batch):
            await q.get()
        done += batch
    return time.perf_counter() - start


async def run_case(
    cells: int, tiers: tuple[int, int], rounds: int, size: int, backend: str = "local"
) -> dict[str, Any]:
    net = MemoryNetwork()
    on_ray = backend != "local"
    gc.collect()
    before = current_rss()
    marks: list[tuple[float, int]] = []
    started = time.perf_counter()
    linked: dict[str, float] = {}

    def on_round(result: RoundResult) -> None:
        marks.append((time.perf_counter(), net.statistics().frames_sent))

    async def workflow(server: FLServer) -> FLModel:
        linked["at"] = time.perf_counter()
        linked["rss"] = current_rss()
        marks.append((time.perf_counter(), net.statistics().frames_sent))
        out = await fedavg(
            server,
            {"w": np.zeros(size, np.float32)},
            rounds=rounds + 1,
            deadline=600,
        )
        if on_ray:  # the actors are still up
            linked["ray_rss"] = current_rss() + ray_actors_peak_rss()
        return out

    where: dict[str, Any] = (
        # An actor links its sites 128 at a time on one loop: 50,000 take minutes.
        {"backend": "ray", "actors": int(backend[3:]), "join_timeout": max(120.0, cells / 100)}
        if on_ray
        else {"network": net}
    )
    final = await simulate(
        workflow,
        edge_script,
        clients=cells,
        relays=tiers,
        in_loop=True,
        on_round=on_round,
        **where,
    )
    want = (rounds + 1) * expected_step(cells)
    if not np.allclose(final.params["w"], want, rtol=1e-4):
        raise RuntimeError(f"wrong model: {final.params['w'][:3]} != {want}")
    times = [b[0] - a[0] for a, b in itertools.pairwise(marks[1:])]  # after the warm-up round
    frames = marks[-1][1] - marks[1][1]
    floor = await queue_floor(frames // max(1, len(times)))
    return {
        "round_time": median(times),
        "floor": floor,
        "startup": linked["at"] - started,
        "messages_per_s": frames / sum(times),
        "frames_per_site": frames / max(1, len(times)) / cells,
        "peak_rss": linked["ray_rss"] if on_ray else rss(),
        "rss_per_cell": (linked["rss"] - before) / cells,
    }


def main() -> None:
    p = parser(__doc__.split("\n\n", 1)[0])
    p.add_argument("--cells", type=csv_ints, default=None, help="edge cells per case")
    p.add_argument("--tiers", type=csv_ints, default=[10, 10], help="relays per tier (two)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per run")
    p.add_argument("--params", type=int, default=1000, help="float32 values in the model")
    p.add_argument(
        "--backends",
        type=csv_choice(BACKENDS),
        default=None,
        help="local (in-process), rayN (N Ray actors); default local,ray1,ray2 (--quick: local)",
    )
    args = p.parse_args()
    cells_list = args.cells or ([1000] if args.quick else [1000, 10000])
    backends = args.backends or (["local"] if args.quick else list(BACKENDS))
    if len(args.tiers) != 2:
        p.error("--tiers takes two numbers (relays under the server, relays under each)")
    tiers = (args.tiers[0], args.tiers[1])
    if any(b != "local" for b in backends):
        import ray  # noqa: PLC0415 (only for the Ray backend)

        ray.init(include_dashboard=False, log_to_driver=False)  # once: not in any start-up
    for cells in cells_list:
        case = f"fedavg-{cells}edge-{tiers[0]}x{tiers[1]}"
        runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        for i in range(args.repeat):
            for backend in backends:  # interleaved: every backend sees the same machine
                # One process per run would measure start-up too; the RSS peak is per process,
                # so it is the peak over this case's runs (and earlier, smaller cases).
                out = anyio.run(
                    run_case,
                    cells,
                    tiers,
                    args.rounds,
                    args.params,
                    backend,
                    backend="asyncio",
                    backend_options={"use_uvloop": True},
                )
                log(
                    f"{case} {backend} run {i + 1}/{args.repeat}: round {out['round_time']:.2f} s,"
                    f" start-up {out['startup']:.1f} s, "
                    + (f"{out['messages_per_s']:,.0f} msg/s, " if backend == "local" else "")
                    + f"peak RSS {out['peak_rss'] / 2**20:,.0f} MiB"
                )
                runs[backend].append(out)
        for backend in backends:
            report(case, backend, runs[backend], runs.get("local"))


def report(
    case: str, backend: str, runs: list[dict[str, Any]], local: list[dict[str, Any]] | None
) -> None:
    """The metrics of one case on one backend (``-rayN`` suffixed to Ray's case names)."""
    round_time = median([r["round_time"] for r in runs])
    if backend != "local":
        name = f"{case}-{backend}"
        emit("scale", name, "round_time", round_time, "s")
        emit("scale", name, "startup", median([r["startup"] for r in runs]), "s")
        emit("scale", name, "peak_rss", max(r["peak_rss"] for r in runs), "B")
        if local:
            local_time = median([r["round_time"] for r in local])
            emit("scale", name, "ray_vs_local", round_time / local_time, "x")
        return
    emit("scale", case, "round_time", round_time, "s", median([r["floor"] for r in runs]))
    emit("scale", case, "startup", median([r["startup"] for r in runs]), "s")
    emit("scale", case, "messages_per_s", median([r["messages_per_s"] for r in runs]), "msg/s")
    emit("scale", case, "frames_per_site", median([r["frames_per_site"] for r in runs]), "frames")
    emit("scale", case, "peak_rss", max(r["peak_rss"] for r in runs), "B")
    # Later runs in the same process reuse the memory the first one freed: only the
    # first run's growth is the cells' footprint.
    emit("scale", case, "rss_per_cell", runs[0]["rss_per_cell"], "B")


if __name__ == "__main__":
    main()
