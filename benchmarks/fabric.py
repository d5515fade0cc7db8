"""Request/reply rate and latency of the cell fabric, per transport, hop count and concurrency.

A case is named ``<transport>-<hops>hop-c<callers>`` (e.g. ``tcp-1hop-c64``): ``callers``
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
request count, interleaved with the fabric's runs so both see the same machine noise.

``memory``: every cell in this process on one ``MemoryNetwork``. Its baseline is the same
request/reply pipeline built from bare asyncio primitives in the same process: the caller puts
the message on a link queue and awaits a future; a reader task moves it on (one more queue and
reader per relay hop); at the edge a worker echoes it into the reply link queue; reader tasks
carry it back, and the root's reader resolves the future. No headers, no routing, no deadlines:
the ceiling for any in-process fabric on this interpreter.

``tcp``, ``tls``, ``tls-signed``, ``ws``: two processes on loopback (see ``_netbench.py``). The
root cell listens in this process; a child process runs the relays and the edge, which dial their
parents as sites do (``tls``: mutual TLS with kits provisioned for a throwaway project, cells
built by ``cell_from_kit``, message signing off; ``tls-signed``: the same with every message
signed and checked, as deployed). Their baseline is a raw-socket echo (plus, for 3 hops, two
forwarding relays) in the child process, which this process calls over one connection with the
same callers: length-prefixed 64-byte messages with a request id, on plain uvloop protocols.

Run: ``python benchmarks/fabric.py [--quick] [--repeat N]
[--transports memory,tcp,tls,tls-signed,ws]``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _netbench import NETWORK_TRANSPORTS, chain_names, echo_table, network_topology
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

from flare_async import Cell, MemoryNetwork, Payload

BENCH = "fabric"
PAYLOAD = b"x" * 64
TIMEOUT = 30.0
"""Every request carries a deadline, as the cell's default does (the deadline path is measured)."""
HOPS = (1, 3)
CONCURRENCY = (1, 64)
WARMUP_MIN = 1_000
"""Each case starts with a warm-up of a tenth of a run's requests, at least this many."""

Call = Callable[[], Awaitable[object]]


# ---------------------------------------------------------------- transports
Start = Callable[[int], AbstractAsyncContextManager[tuple[Call, Call]]]
"""Start a transport's fabric chain and its baseline for a hop count; yields both calls."""


@dataclass(frozen=True)
class Transport:
    """How to run the fabric, and its baseline, over one kind of link."""

    name: str
    start: Start
    requests: tuple[int, int]
    """Requests per measured run: full size, ``--quick``."""


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


@asynccontextmanager
async def memory_start(hops: int) -> AsyncIterator[tuple[Call, Call]]:
    """The whole chain in this process on one ``MemoryNetwork``; the queue pipeline beside it."""
    async with fabric(hops) as fabric_call, queue_baseline(hops) as base_call:
        yield fabric_call, base_call


def network_start(name: str) -> Start:
    """The root here, the rest of the chain in a child process; the raw-socket echo beside it."""

    @asynccontextmanager
    async def start(hops: int) -> AsyncIterator[tuple[Call, Call]]:
        async with network_topology(name, hops, PAYLOAD) as (root, edge, base_call):
            yield await checked_call(root, edge), base_call

    return start


TRANSPORTS: dict[str, Transport] = {
    "memory": Transport(name="memory", start=memory_start, requests=(50_000, 5_000)),
    **{
        name: Transport(name=name, start=network_start(name), requests=(20_000, 1_500))
        for name in NETWORK_TRANSPORTS
    },
}


# ---------------------------------------------------------------- the fabric
async def checked_call(server: Cell, edge: str) -> Call:
    """The call the root makes to the edge's echo handler, after checking it once."""

    async def call() -> Payload:
        return await server.request(edge, "bench", "echo", PAYLOAD, timeout=TIMEOUT)

    reply = await call()
    if reply.tobytes() != PAYLOAD:
        raise RuntimeError(f"echo returned {reply!r}")
    return call


@asynccontextmanager
async def fabric(hops: int) -> AsyncIterator[Call]:
    """Start a chain of cells on one ``MemoryNetwork``; yield the root's call to the edge."""
    network = MemoryNetwork()
    names = chain_names(hops)
    async with AsyncExitStack() as stack:
        parent_url: str | None = None
        cells: list[Cell] = []
        for name in names:
            is_edge = name == names[-1]
            cell = Cell(
                name,
                listen=[] if is_edge else [f"memory://{name}"],
                parent=parent_url,
                drivers=[network],
                handlers=[echo_table()] if is_edge else [],
            )
            await stack.enter_async_context(cell)
            if parent_url is not None:
                with anyio.fail_after(10):
                    await cell.wait_parent()
            if not is_edge:
                parent_url = cell.listen_urls[0]
            cells.append(cell)
        yield await checked_call(cells[0], names[-1])


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
    warmup = min(requests, max(WARMUP_MIN, requests // 10))
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
    requests: int | None,
    repeat: int,
    quick: bool,
) -> None:
    for name in transports:
        transport = TRANSPORTS[name]
        count = requests or transport.requests[1 if quick else 0]
        for hops in hops_list:
            async with transport.start(hops) as (fabric_call, base_call):
                for callers in concurrency:
                    case = f"{name}-{hops}hop-c{callers}"
                    log(f"{case}: {count:,} requests x {repeat} runs")
                    await run_case(case, fabric_call, base_call, callers, count, repeat)


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
        help="requests per measured run, for every transport (default: memory 50,000, tcp/tls/ws "
        "20,000; --quick: memory 5,000, tcp/tls/ws 1,500)",
    )
    args = p.parse_args()
    start = time.perf_counter()
    try:
        run_async(
            main,
            args.transports,
            args.hops,
            args.concurrency,
            args.requests,
            args.repeat,
            args.quick,
        )
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    log(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli()
