"""The fabric in one process: a server, two relays and four edge sites over memory://.

    server
    ├── server.eu            (relay)
    │   ├── server.eu.site-1
    │   └── server.eu.site-2
    └── server.us            (relay)
        ├── server.us.site-3
        └── server.us.site-4

Shows request/reply through a relay, edge-to-edge traffic through the common ancestor, a
broadcast in which one target does not exist and one has no handler (both fail at once, the
others answer), a handler that fails without leaking its error text, and a deadline that
cancels a slow handler three hops away.

Run from the repository root:  python examples/fabric_in_process.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import numpy as np
from anyio.abc import TaskStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the repo's cells/ package

from cells import edge, relay, server
from flare_async import Cell, Context, HandlerTable, MemoryNetwork, Payload, errors

SITES = {"server.eu": ["site-1", "site-2"], "server.us": ["site-3", "site-4"]}


def site_handlers(seed: int, cancelled: anyio.Event) -> HandlerTable:
    """What every site answers: a summary of its local data (which never leaves the site)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(loc=seed, scale=1.0, size=1000)
    table = HandlerTable("site")

    @table.request("data", "summary")
    async def summary(ctx: Context, msg: Payload) -> bytes:
        return json.dumps({"n": data.size, "mean": round(float(data.mean()), 3)}).encode()

    @table.request("data", "slow")
    async def slow(ctx: Context, msg: Payload) -> bytes:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise
        return b"unreachable"

    @table.request("data", "broken")
    async def broken(ctx: Context, msg: Payload) -> bytes:
        raise RuntimeError("connection string postgres://admin:secret@db")

    return table


async def main() -> None:
    net = MemoryNetwork()
    root = server.build(listen=["memory://server"], drivers=[net])
    async with root, anyio.create_task_group() as tg:
        stop = anyio.Event()
        cancelled = anyio.Event()
        sites: dict[str, Cell] = {}
        for relay_name, leaves in SITES.items():
            await tg.start(run_relay, net, relay_name, leaves, stop, sites, cancelled)
        print(f"topology up: server children = {root.children}")

        t0 = time.perf_counter()
        reply = await root.request("server.eu.site-1", "data", "summary")
        ms = (time.perf_counter() - t0) * 1e3
        print(f"server -> server.eu.site-1 (via relay): {reply.tobytes().decode()} in {ms:.2f} ms")

        ping = await sites["server.eu.site-1"].request("server.us.site-4", "sys", "ping", b"hi")
        print(f"site-1 -> site-4 (via eu, server, us): {ping.tobytes().decode()!r}")

        targets = list(sites)
        targets += ["server.eu.site-9", "server.eu"]  # does not exist / no data handler
        t0 = time.perf_counter()
        results = await root.broadcast(targets, "data", "summary", timeout=30)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"broadcast to {len(targets)} targets in {ms:.2f} ms (timeout was 30 s):")
        for name, outcome in results.items():
            shown = (
                outcome.tobytes().decode()
                if isinstance(outcome, Payload)
                else f"{type(outcome).__name__}: {outcome}"
            )
            print(f"    {name:20s} {shown}")

        try:
            await root.request("server.us.site-3", "data", "broken")
        except errors.InternalError as exc:
            print(f"failing handler -> {type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        try:
            await root.request("server.us.site-3", "data", "slow", timeout=0.2)
        except errors.DeadlineExceeded:
            print(f"slow handler -> DeadlineExceeded after {time.perf_counter() - t0:.2f} s")
        with anyio.fail_after(5):
            await cancelled.wait()
        print("    ... and the handler at server.us.site-3 was cancelled at that deadline")

        info = json.loads((await root.request("server.eu", "sys", "info")).tobytes())
        print(
            f"server.eu forwarded {info['statistics']['forwarded']} messages; "
            f"children {info['children']}"
        )
        stop.set()


async def run_relay(
    net: MemoryNetwork,
    name: str,
    leaves: list[str],
    stop: anyio.Event,
    sites: dict[str, Cell],
    cancelled: anyio.Event,
    *,
    task_status: TaskStatus[None],
) -> None:
    """One relay and its sites; returns when ``stop`` is set."""
    url = f"memory://{name}"
    hub = relay.build(name, parent="memory://server", listen=[url], drivers=[net])
    async with hub, anyio.create_task_group() as tg:
        for leaf in leaves:
            cell = edge.build(
                f"{name}.{leaf}",
                parent=url,
                drivers=[net],
                handlers=[site_handlers(len(sites) + 1, cancelled)],
            )
            sites[cell.name] = cell
            await tg.start(serve_until, cell, stop)
        task_status.started()


async def serve_until(cell: Cell, stop: anyio.Event, *, task_status: TaskStatus[None]) -> None:
    async with cell:
        task_status.started()
        await stop.wait()


if __name__ == "__main__":
    anyio.run(main, backend_options={"use_uvloop": True})
