"""Request/reply rate and latency of the cell fabric, per transport, hop count and concurrency.

A case is named ``<transport>-<hops>hop-c<callers>`` (e.g. ``memory-1hop-c64``): ``callers``
tasks on the root cell ``server`` each send requests one after another, with a 64-byte payload,
to an echo handler on an edge cell ``hops`` links away (3 hops: through two relays,
``server -> server.r1 -> server.r1.r2 -> server.r1.r2.e``). Per case it reports:

- ``throughput`` (msg/s): completed request/replies per second of wall time;
- ``latency_p50`` / ``latency_p99`` (s): percentiles of one request's round trip as a caller sees
  it (``await cell.request(...)``), including the time it waits behind the other callers.

Each measurement runs ``--repeat`` times (after one warm-up) and every metric is the median of
its per-run values: the throughput of each run, and the p50 and p99 of each run's own latency
distribution (percentiles are not pooled across runs).

``baseline`` is the physical reference measured in the same run, with the same callers and
request count, interleaved with the fabric's runs so both see the same machine noise. For
``memory`` it is the same request/reply pipeline built from bare asyncio primitives in the same
process: the caller puts the message on a link queue and awaits a future; a reader task moves it
on (one more queue and reader per relay hop); at the edge a worker echoes it into the reply link
queue; reader tasks carry it back, and the root's reader resolves the future. No headers, no
routing, no deadlines: the ceiling for any in-process fabric on this interpreter.

Network transports (tcp, tls, ws) plug in as more :class:`Transport` entries: cells then listen
on an ephemeral port (``tcp://127.0.0.1:0``) and children connect to the URL their parent
reports in ``listen_urls``; their baseline is a raw-socket relay/echo pipeline.

Run: ``python benchmarks/fabric.py [--quick] [--repeat N] [--transports memory]``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import (  # the script's own directory is on the path (above)
    csv_choice,
    csv_ints,
    emit,
    log,
    median_records,
    parser,
    percentile,
    positive_int,
    run_async,
)

from flare_async import Cell, Context, Driver, HandlerTable, MemoryNetwork, Payload

BENCH = "fabric"
PAYLOAD = b"x" * 64
TIMEOUT = 30.0
"""Every request carries a deadline, as the cell's default does (the deadline path is measured)."""
HOPS = (1, 3)
CONCURRENCY = (1, 64)
FULL_REQUESTS = 50_000
QUICK_REQUESTS = 5_000

Call = Callable[[], Awaitable[object]]


# ---------------------------------------------------------------- transports
class Baseline(Protocol):
    """A physical reference pipeline, started for one hop count."""

    def __call__(self, hops: int) -> Any:
        """An async context manager yielding the :data:`Call` that makes one request/reply."""


@dataclass(frozen=True)
class Transport:
    """How to run the fabric, and its baseline, over one kind of link."""

    name: str
    drivers: Callable[[], list[Driver]]
    """Fresh drivers for one topology (all its cells share them)."""
    listen_url: Callable[[str], str]
    """The URL a cell of this name listens on; children use the URL it reports back."""
    baseline: Baseline


class _QueuePipeline:
    """The memory baseline: the fabric's request/reply path on bare asyncio queues and futures.

    Per hop, one bounded queue each way (the link, sized like ``MemoryNetwork``'s) and a reader
    task per queue; at the edge a worker queue and one worker that echoes. The same task
    structure and queue crossings as the fabric, with none of its work per message.
    """

    def __init__(self, hops: int, queue_size: int = 64) -> None:
        self.down = [asyncio.Queue[tuple[int, bytes]](queue_size) for _ in range(hops)]
        self.up = [asyncio.Queue[tuple[int, bytes]](queue_size) for _ in range(hops)]
        self.work: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.ids = itertools.count()
        self.loop = asyncio.get_running_loop()

    async def call(self) -> bytes:
        msg_id = next(self.ids)
        fut = self.loop.create_future()
        self.pending[msg_id] = fut
        try:
            await self.down[0].put((msg_id, PAYLOAD))
            return await fut
        finally:
            self.pending.pop(msg_id, None)

    @staticmethod
    async def _move(src: asyncio.Queue[Any], dst: asyncio.Queue[Any]) -> None:
        """A link reader at a relay (or the edge): take each message and pass it on."""
        while True:
            await dst.put(await src.get())

    async def _resolve(self) -> None:
        """The root's link reader: complete the caller's future."""
        src = self.up[0]
        pending = self.pending
        while True:
            msg_id, payload = await src.get()
            fut = pending.get(msg_id)
            if fut is not None and not fut.done():
                fut.set_result(payload)

    def tasks(self) -> list[Callable[[], Awaitable[None]]]:
        hops = len(self.down)
        moves = [(self.down[i], self.down[i + 1]) for i in range(hops - 1)]
        moves.append((self.down[-1], self.work))  # edge reader -> worker queue
        moves.append((self.work, self.up[-1]))  # worker echoes into the reply link
        moves += [(self.up[i], self.up[i - 1]) for i in range(hops - 1, 0, -1)]
        return [*(lambda s=s, d=d: self._move(s, d) for s, d in moves), self._resolve]


@asynccontextmanager
async def queue_baseline(hops: int) -> AsyncIterator[Call]:
    pipeline = _QueuePipeline(hops)
    async with anyio.create_task_group() as tg:
        for task in pipeline.tasks():
            tg.start_soon(task)
        yield pipeline.call
        tg.cancel_scope.cancel()


TRANSPORTS: dict[str, Transport] = {
    "memory": Transport(
        name="memory",
        drivers=lambda: [MemoryNetwork()],
        listen_url=lambda name: f"memory://{name}",
        baseline=queue_baseline,
    ),
}


# ---------------------------------------------------------------- the fabric
def chain_names(hops: int) -> list[str]:
    """``server``, then ``hops - 1`` relays, then the edge: each the child of the one before."""
    names = ["server"]
    for i in range(1, hops):
        names.append(f"{names[-1]}.r{i}")
    names.append(f"{names[-1]}.e")
    return names


@asynccontextmanager
async def fabric(transport: Transport, hops: int) -> AsyncIterator[Call]:
    """Start a chain of cells; yield the call the root makes to the edge's echo handler."""
    table = HandlerTable("bench")

    @table.request("bench", "echo")
    async def echo(ctx: Context, msg: Payload) -> Payload:
        return msg

    drivers = transport.drivers()
    names = chain_names(hops)
    async with AsyncExitStack() as stack:
        parent_url: str | None = None
        cells: list[Cell] = []
        for name in names:
            is_edge = name == names[-1]
            cell = Cell(
                name,
                listen=[] if is_edge else [transport.listen_url(name)],
                parent=parent_url,
                drivers=drivers,
                handlers=[table] if is_edge else [],
            )
            await stack.enter_async_context(cell)
            if parent_url is not None:
                with anyio.fail_after(10):
                    await cell.wait_parent()
            if not is_edge:
                parent_url = cell.listen_urls[0]
            cells.append(cell)
        server, edge = cells[0], names[-1]

        async def call() -> Payload:
            return await server.request(edge, "bench", "echo", PAYLOAD, timeout=TIMEOUT)

        reply = await call()
        if reply.tobytes() != PAYLOAD:
            raise RuntimeError(f"echo returned {reply!r}")
        yield call


# ---------------------------------------------------------------- measurement
async def measure(call: Call, callers: int, requests: int) -> dict[str, float]:
    """``callers`` tasks make ``requests`` calls in all; returns throughput and latencies."""
    per_caller = max(1, requests // callers)
    samples: list[list[float]] = [[] for _ in range(callers)]

    async def caller(out: list[float]) -> None:
        clock = time.perf_counter
        append = out.append
        for _ in range(per_caller):
            t0 = clock()
            await call()
            append(clock() - t0)

    gc.collect()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for out in samples:
            tg.start_soon(caller, out)
    elapsed = time.perf_counter() - start
    latencies = sorted(itertools.chain.from_iterable(samples))
    return {
        "throughput": len(latencies) / elapsed,
        "latency_p50": percentile(latencies, 0.50),
        "latency_p99": percentile(latencies, 0.99),
    }


UNITS = {"throughput": "msg/s", "latency_p50": "s", "latency_p99": "s"}


async def run_case(
    case: str, fabric_call: Call, base_call: Call, callers: int, requests: int, repeat: int
) -> None:
    warmup = min(requests, max(2_000, requests // 10))
    await measure(base_call, callers, warmup)
    await measure(fabric_call, callers, warmup)
    base_runs, runs = [], []
    for i in range(repeat):
        base_runs.append(await measure(base_call, callers, requests))
        runs.append(await measure(fabric_call, callers, requests))
        log(
            f"{case} run {i + 1}/{repeat}: {runs[-1]['throughput']:,.0f} msg/s "
            f"(baseline {base_runs[-1]['throughput']:,.0f} msg/s)"
        )
    value, base = median_records(runs), median_records(base_runs)
    for metric, unit in UNITS.items():
        emit(BENCH, case, metric, value[metric], unit, baseline=base[metric])


async def main(
    transports: Sequence[str],
    hops_list: Sequence[int],
    concurrency: Sequence[int],
    requests: int,
    repeat: int,
) -> None:
    for name in transports:
        transport = TRANSPORTS[name]
        for hops in hops_list:
            async with (
                fabric(transport, hops) as fabric_call,
                transport.baseline(hops) as base_call,
            ):
                for callers in concurrency:
                    case = f"{name}-{hops}hop-c{callers}"
                    log(f"{case}: {requests:,} requests x {repeat} runs")
                    await run_case(case, fabric_call, base_call, callers, requests, repeat)


def cli() -> None:
    p = parser(__doc__.split("\n\n", 1)[0])
    avail = ",".join(TRANSPORTS)
    p.add_argument(
        "--transports",
        type=csv_choice(list(TRANSPORTS)),
        default=list(TRANSPORTS),
        help=f"comma-separated transports to measure (available and default: {avail})",
    )
    p.add_argument(
        "--hops", type=csv_ints, default=list(HOPS), help="comma-separated hop counts (1,3)"
    )
    p.add_argument(
        "--concurrency",
        type=csv_ints,
        default=list(CONCURRENCY),
        help="comma-separated numbers of concurrent callers (1,64)",
    )
    p.add_argument(
        "--requests",
        type=positive_int,
        default=None,
        help=f"requests per measured run (default {FULL_REQUESTS:,}; --quick {QUICK_REQUESTS:,})",
    )
    args = p.parse_args()
    requests = args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS)
    start = time.perf_counter()
    run_async(main, args.transports, args.hops, args.concurrency, requests, args.repeat)
    log(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli()
