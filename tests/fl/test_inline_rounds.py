"""Issue 24's lighter rounds: a small task and a small result travel whole in one message each
(``Cell(inline_max=)``), a big one streams; the model comes out the same either way, in
fewer frames."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import anyio
import numpy as np
import pytest

import flare_async.client as flare
from flare_async import Cell, MemoryNetwork, system_handlers
from flare_async.fl import ClientRuntime, FLModel, FLServer, RelayAggregator, fedavg

pytestmark = pytest.mark.anyio

RELAYS = ["server.r1", "server.r2"]
SITES = [f"{RELAYS[i % 2]}.s{i}" for i in range(6)]


async def script() -> None:
    """Site i adds i + 1 to every value and weighs its result i + 1."""
    k = flare.get_config()["site_index"] + 1
    while (model := await flare.receive_async()) is not None:
        params = {n: np.asarray(v) + k for n, v in model.params.items()}
        await flare.send_async(FLModel(params=params, meta={"num_samples": k}))


async def run(inline_max: int, size: int) -> tuple[dict[str, np.ndarray], int, dict[str, int]]:
    """Three FedAvg rounds over two relays that fold; the final model, the frames the rounds
    moved, and the objects sent whole or streamed by every cell."""
    net = MemoryNetwork()
    cells: list[Cell] = []

    def cell(name: str, **kw: Any) -> Cell:
        c = Cell(name, drivers=[net], inline_max=inline_max, heartbeat=None, **kw)
        cells.append(c)
        return c

    async with AsyncExitStack() as stack:
        server_cell = cell("server", listen=["memory://server"])
        server = FLServer(server_cell, SITES, digest=False, hierarchical=True, seed=0)
        server_cell.mount(server.handlers())
        await stack.enter_async_context(server_cell)
        for relay in RELAYS:
            r = cell(relay, listen=[f"memory://{relay}"], parent="memory://server")
            r.mount(system_handlers())
            r.mount(RelayAggregator(r, digest=False).handlers())
            await stack.enter_async_context(r)
            await r.wait_parent()
        runtimes = []
        for i, site in enumerate(SITES):
            c = cell(site, parent=f"memory://{site.rsplit('.', 1)[0]}")
            runtime = ClientRuntime(c, "server", config={"site_index": i}, digest=False)
            c.mount(runtime.handlers())
            await stack.enter_async_context(c)
            await c.wait_parent()
            runtimes.append(runtime)
        async with anyio.create_task_group() as tg:
            for runtime in runtimes:
                tg.start_soon(lambda rt=runtime: rt.run_script(script, in_loop=True))
            before = net.statistics().frames_sent
            final = await fedavg(server, {"w": np.zeros(size, np.float32)}, rounds=3, deadline=30)
            frames = net.statistics().frames_sent - before
            await server.stop_clients()
        counts = {"inline": 0, "streamed": 0}
        for c in cells:
            s = c.statistics().streams
            counts["inline"] += s.inline_sent
            counts["streamed"] += s.sent
    return {k: np.asarray(v) for k, v in final.params.items()}, frames, counts


def expected(size: int) -> np.ndarray:
    ks = np.arange(1, len(SITES) + 1, dtype=np.float64)
    step = float((ks * ks).sum() / ks.sum())
    return np.full(size, 3 * step, np.float32)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_inline_and_streamed_rounds_give_the_same_model_in_fewer_frames() -> None:
    inline_model, inline_frames, inline_counts = await run(inline_max=64 * 1024, size=1000)
    streamed_model, streamed_frames, streamed_counts = await run(inline_max=0, size=1000)
    np.testing.assert_array_equal(inline_model["w"], streamed_model["w"])
    np.testing.assert_allclose(inline_model["w"], expected(1000), rtol=1e-6)
    assert inline_counts["streamed"] == 0  # every task, result and partial sum went whole
    assert inline_counts["inline"] > 0
    assert streamed_counts["inline"] == 0
    # per site and round: a task and a result, request and reply each, plus the relays' share
    per_site = inline_frames / 3 / len(SITES)
    assert per_site < 8, per_site
    assert inline_frames * 2 < streamed_frames, (inline_frames, streamed_frames)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_model_past_the_limit_streams_and_a_small_one_does_not_in_the_same_cells() -> None:
    big, _, counts = await run(inline_max=4096, size=4096)  # 16 KiB of float32: streamed
    np.testing.assert_allclose(big["w"], expected(4096), rtol=1e-6)
    assert counts["streamed"] > 0


@pytest.mark.parametrize("frozen_by_app", [False, True])
async def test_an_in_loop_simulation_quiets_the_collector_and_gives_it_back(
    frozen_by_app: bool,
) -> None:
    """While the sites run, young collections wait for 25 new objects a site (at least 50,000)
    and what existed is frozen; afterwards the thresholds are the application's again, and so
    is the freeze (thawed only if the application had frozen nothing itself)."""
    import gc  # noqa: PLC0415

    from flare_async.fl import simulate  # noqa: PLC0415

    old = gc.get_threshold()
    gc.unfreeze()
    if frozen_by_app:
        gc.freeze()
    seen: list[tuple[int, int]] = []

    async def workflow(server: FLServer) -> Any:
        seen.append((gc.get_threshold()[0], gc.get_freeze_count()))
        return await fedavg(server, {"w": np.zeros(3)}, rounds=1, deadline=30)

    try:
        for sites, want in ((4, 50_000), (2_001, 50_025)):
            seen.clear()
            await simulate(workflow, script, clients=sites, in_loop=True, relays=(2,))
            assert seen[0][0] == want  # the edge: 2,000 sites and fewer keep 50,000
            assert seen[0][1] > 0  # the topology is out of the collector's view
            assert gc.get_threshold() == old
            assert (gc.get_freeze_count() > 0) is frozen_by_app
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)
