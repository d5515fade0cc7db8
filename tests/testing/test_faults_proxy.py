"""FaultProxy (flare_async.testing) between real cells on 127.0.0.1: streams resume through
resets and cope with duplicated, reordered and lost chunk frames; a round closes without a
stalled site and takes it back once its link flows; a reset child reconnects and asks again.

Faults trigger on byte and frame counts or explicit calls; the tests wait on the proxy's
counters and on the cells' own events, never on sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import numpy as np
import pytest

from flare_async import Backoff, Cell, Context, HandlerTable
from flare_async.cell import Payload
from flare_async.fl import ClientRuntime, FLModel, FLServer
from flare_async.testing import FaultCounters, FaultProxy
from flare_async.transport import TcpDriver
from flare_async.wire import Envelope, StreamData
from tests._topo import sink_table
from tests.streaming.test_streams import pattern

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[pytest.param(("asyncio", {}), id="asyncio"), pytest.param(("trio", {}), id="trio")]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]  # real clocks: real sockets


def expected(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


@contextlib.asynccontextmanager
async def parent_and_child(
    server_handlers: list[HandlerTable] | None = None, **child: Any
) -> AsyncIterator[tuple[Cell, Cell, FaultProxy]]:
    """``server`` and ``server.e`` (with the sink), linked through a FaultProxy."""
    driver = TcpDriver()
    async with AsyncExitStack() as stack:
        server = Cell(
            "server",
            listen=["tcp://127.0.0.1:0"],
            drivers=[driver],
            handlers=server_handlers or [],
        )
        await stack.enter_async_context(server)
        proxy = await stack.enter_async_context(FaultProxy(server.listen_urls[0]))
        e = Cell("server.e", parent=proxy.url, drivers=[driver], handlers=[sink_table()], **child)
        await stack.enter_async_context(e)
        with anyio.fail_after(10):
            await e.wait_parent()
        yield server, e, proxy


async def test_a_stream_survives_two_resets_mid_transfer() -> None:
    data = pattern(16 << 20, seed=7)
    reply: list[bytes] = []
    async with parent_and_child() as (server, e, proxy):

        async def send() -> None:
            out = await server.stream("server.e", "t", "sink", data, chunk=1 << 20, probe=0.1)
            reply.append(out.tobytes())

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                for at in (3 << 20, 9 << 20):  # bytes down the proxy, resends included

                    def past(c: FaultCounters, at: int = at) -> bool:
                        return c.bytes["down"] >= at

                    await proxy.wait_until(past)
                    assert proxy.reset() == 1
        assert reply[0].decode() == expected(data)
        assert proxy.counters.resets == 2
        assert proxy.counters.connections >= 3  # the child came back twice
        assert e.statistics().streams.resumes >= 2


def is_chunk(header: Envelope) -> bool:
    return isinstance(header, StreamData)


@pytest.mark.parametrize("fault", ["duplicate", "reorder", "drop"])
async def test_a_duplicated_reordered_or_lost_chunk_frame_never_gives_a_wrong_object(
    fault: str,
) -> None:
    data = pattern(4 << 20, seed=11)
    async with parent_and_child() as (server, _, proxy):
        frames_before = proxy.counters.frames["down"]
        if fault == "duplicate":
            proxy.duplicate_next_frame("down", match=is_chunk)
        elif fault == "reorder":
            proxy.reorder_next_frames(3, "down", match=is_chunk)
        else:
            proxy.drop_next_frame("down", match=is_chunk)
        with anyio.fail_after(30):
            out = await server.stream(
                "server.e", "t", "sink", data, chunk=256 << 10, probe=0.1, idle=10
            )
        assert out.tobytes().decode() == expected(data)  # resumed whole, whatever the fault
        c = proxy.counters
        assert proxy.pending_frame_faults("down") == 0  # the fault hit a chunk frame
        assert (c.frames_duplicated, c.frames_reordered, c.frames_dropped) == {
            "duplicate": (1, 0, 0),
            "reorder": (0, 3, 0),
            "drop": (0, 0, 1),
        }[fault]
        assert c.frames["down"] - frames_before >= 16  # whole frames, counted
        assert c.resets == 0


async def site_worker(runtime: ClientRuntime, answered: list[int]) -> None:
    """A site's training loop on the cell's own loop: every task's weights plus one."""
    while (model := await runtime.areceive()) is not None:
        answered.append(model.current_round or 0)
        await runtime.asend(FLModel(params={"w": model.params["w"] + 1}, meta={"weight": 1}))


async def test_a_round_closes_without_a_stalled_site_which_answers_the_next_after_resume() -> None:
    driver = TcpDriver()
    names = ["server.site-1", "server.site-2", "server.site-3"]
    answered: dict[str, list[int]] = {n: [] for n in names}
    async with AsyncExitStack() as stack:
        server_cell = Cell("server", listen=["tcp://127.0.0.1:0"], drivers=[driver])
        server = FLServer(server_cell, names, digest=False)
        server_cell.mount(server.handlers())
        await stack.enter_async_context(server_cell)
        proxy = await stack.enter_async_context(FaultProxy(server_cell.listen_urls[0]))
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        for name in names:
            parent = proxy.url if name.endswith("-3") else server_cell.listen_urls[0]
            cell = Cell(name, parent=parent, drivers=[driver])
            runtime = ClientRuntime(cell, "server", digest=False)
            cell.mount(runtime.handlers())
            await stack.enter_async_context(cell)
            with anyio.fail_after(10):
                await cell.wait_parent()
            tg.start_soon(site_worker, runtime, answered[name])

        proxy.pause()  # site-3's link stalls: open, nothing moves
        model = FLModel(params={"w": np.zeros(3)}, current_round=0)
        with anyio.fail_after(20):
            first = await server.run_round(model, names, min_responses=2, deadline=1.5)
        assert sorted(first.responded) == names[:2]
        assert "server.site-3" in first.failed
        assert answered["server.site-3"] == []  # nothing reached it

        proxy.resume()
        with anyio.fail_after(30):
            second = await server.run_round(
                FLModel(params={"w": np.zeros(3)}, current_round=1), names, deadline=20
            )
        assert sorted(second.responded) == names  # site-3 too, on the same link
        assert answered["server.site-3"][-1] == 1
        assert proxy.counters.connections == 1
        assert proxy.counters.resets == 0


async def test_a_reset_child_reconnects_with_backoff_and_asks_for_work_again() -> None:
    asked: list[str] = []
    table = HandlerTable()

    @table.request("work", "next")
    async def next_work(ctx: Context, msg: Payload) -> bytes:
        asked.append(ctx.src)
        return f"task-{len(asked)}".encode()

    ups: list[bool] = []
    changed = anyio.Event()

    def on_link(peer: str, role: str, up: bool) -> None:
        nonlocal changed
        if peer == "server":
            ups.append(up)
            changed.set()
            changed = anyio.Event()

    async with parent_and_child(
        [table], backoff=Backoff(initial=0.05, maximum=0.5), on_link=on_link
    ) as (_, e, proxy):
        with anyio.fail_after(20):
            reply = await e.request("server", "work", "next", b"")
            assert reply.tobytes() == b"task-1"
            assert proxy.reset() == 1
            while ups[-2:] != [False, True]:  # down, then up again on a new link
                await changed.wait()
            await proxy.wait_until(lambda c: c.connections >= 2)
            reply = await e.request("server", "work", "next", b"")
        assert reply.tobytes() == b"task-2"
        assert asked == ["server.e", "server.e"]
        assert proxy.counters == FaultCounters(
            connections=2,
            resets=1,
            bytes=proxy.counters.bytes,
            frames=proxy.counters.frames,
        )
