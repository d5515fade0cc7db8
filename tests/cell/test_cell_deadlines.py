"""Deadlines, handler failures and backpressure, on trio's virtual clock (instant, exact)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from flare_async import Cell, Context, HandlerTable, MemoryNetwork, Payload, errors
from flare_async.cell._links import handshake_connector
from flare_async.wire import Error, Frame, Limits, Request, make_hello
from tests._topo import tree

pytestmark = pytest.mark.anyio

CHAIN = ["server", "server.r1", "server.r1.r2", "server.r1.r2.e"]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Probe:
    """Handlers that record what happened to them."""

    def __init__(self) -> None:
        self.table = HandlerTable()
        self.cancelled: list[float] = []
        self.remaining: list[float] = []
        self.release = anyio.Event()
        self.started = 0
        self.ok_calls = 0
        t = self.table

        @t.request("t", "slow")
        async def slow(ctx: Context, msg: Payload) -> bytes:
            self.remaining.append(ctx.remaining())
            try:
                await anyio.sleep(3600)
            except anyio.get_cancelled_exc_class():
                self.cancelled.append(anyio.current_time())
                raise
            return b"too late"

        @t.request("t", "remaining")
        async def remaining(ctx: Context, msg: Payload) -> bytes:
            return repr(ctx.remaining()).encode()

        @t.request("t", "block")
        async def block(ctx: Context, msg: Payload) -> bytes:
            self.started += 1
            await self.release.wait()
            return b"released"

        @t.request("t", "boom")
        async def boom(ctx: Context, msg: Payload) -> bytes:
            raise RuntimeError("secret database password is hunter2")

        @t.request("t", "refuse")
        async def refuse(ctx: Context, msg: Payload) -> bytes:
            raise errors.BadRequest("round number 7 is not open")

        @t.request("t", "badtype")
        async def badtype(ctx: Context, msg: Payload) -> Any:
            return {"not": "bytes"}

        @t.request("t", "ok")
        async def ok(ctx: Context, msg: Payload) -> bytes:
            self.ok_calls += 1
            return b"ok"


async def test_deadline_travels_and_shrinks_with_time() -> None:
    probe = Probe()
    async with tree(MemoryNetwork(), CHAIN, {"server.r1.r2.e": [probe.table]}) as cells:
        reply = await cells["server"].request("server.r1.r2.e", "t", "remaining", timeout=12.5)
        # Virtual time does not move while messages hop, so the budget arrives intact.
        assert float(reply.tobytes()) == pytest.approx(12.5)


async def test_slow_handler_is_cancelled_at_the_callers_deadline() -> None:
    probe = Probe()
    async with tree(MemoryNetwork(), CHAIN, {"server.r1.r2.e": [probe.table]}) as cells:
        start = anyio.current_time()
        with pytest.raises(errors.DeadlineExceeded):
            await cells["server"].request("server.r1.r2.e", "t", "slow", timeout=5)
        assert anyio.current_time() - start == pytest.approx(5)
        await anyio.wait_all_tasks_blocked()
        # The handler three hops away was cancelled at the same deadline, not left running.
        assert probe.remaining == [pytest.approx(5)]
        assert probe.cancelled == [pytest.approx(start + 5)]
        edge = cells["server.r1.r2.e"]
        assert edge.statistics().handlers_busy == 0
        # The cell keeps serving.
        assert (await cells["server"].request("server.r1.r2.e", "t", "ok")).tobytes() == b"ok"


async def test_no_timeout_means_no_deadline() -> None:
    probe = Probe()
    async with tree(MemoryNetwork(), ["server", "server.e"], {"server.e": [probe.table]}) as c:
        reply = await c["server"].request("server.e", "t", "remaining", timeout=None)
        assert reply.tobytes() == b"inf"


async def test_handler_exception_becomes_redacted_internal_error() -> None:
    probe = Probe()
    async with tree(MemoryNetwork(), CHAIN, {"server.r1.r2.e": [probe.table]}) as cells:
        with pytest.raises(errors.InternalError) as exc:
            await cells["server"].request("server.r1.r2.e", "t", "boom")
        text = str(exc.value)
        assert "hunter2" not in text
        assert "RuntimeError" not in text
        assert "Traceback" not in text
        assert "ref " in text  # a reference to find the full story in the edge's log
        assert exc.value.reported_by == "server.r1.r2.e"
        with pytest.raises(errors.InternalError, match="bad reply type"):
            await cells["server"].request("server.r1.r2.e", "t", "badtype")
        # The cell keeps serving after failures.
        assert (await cells["server"].request("server.r1.r2.e", "t", "ok")).tobytes() == b"ok"


async def test_bad_request_passes_its_message_back() -> None:
    probe = Probe()
    async with tree(MemoryNetwork(), ["server", "server.e"], {"server.e": [probe.table]}) as c:
        with pytest.raises(errors.BadRequest, match="round number 7 is not open"):
            await c["server"].request("server.e", "t", "refuse")


async def test_full_handler_queue_answers_overloaded_at_once() -> None:
    probe = Probe()
    net = MemoryNetwork()
    async with tree(
        net, ["server", "server.e"], {"server.e": [probe.table]}, max_concurrency=2, queue_size=1
    ) as c:
        results: list[Any] = []

        async def call(topic: str) -> None:
            try:
                results.append((await c["server"].request("server.e", "t", topic)).tobytes())
            except errors.FlareError as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):  # two run, one waits in the queue
                tg.start_soon(call, "block")
            await anyio.wait_all_tasks_blocked()
            assert probe.started == 2
            start = anyio.current_time()
            await call("ok")  # the fourth finds no room
            assert anyio.current_time() == start
            assert isinstance(results[-1], errors.Overloaded)
            assert c["server.e"].statistics().rejected_overloaded == 1
            probe.release.set()
        assert sorted(r for r in results if isinstance(r, bytes)) == [b"released"] * 3


async def test_request_fails_promptly_when_its_link_breaks() -> None:
    probe = Probe()
    net = MemoryNetwork()
    async with tree(net, ["server", "server.e"], {"server.e": [probe.table]}) as c:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:

            async def cut() -> None:
                await anyio.wait_all_tasks_blocked()
                assert probe.started == 1
                net.sever("memory://server")

            tg.start_soon(cut)
            with pytest.raises(errors.LinkBroken):
                await c["server"].request("server.e", "t", "block", timeout=60)
        assert anyio.current_time() == start  # not at the 60 s timeout


async def test_no_time_left_fails_before_sending() -> None:
    probe = Probe()
    async with tree(MemoryNetwork(), ["server", "server.e"], {"server.e": [probe.table]}) as c:
        with pytest.raises(errors.DeadlineExceeded):
            await c["server"].request("server.e", "t", "ok", timeout=0)
        assert c["server"].statistics().pending_requests == 0


async def test_relay_refuses_a_message_whose_budget_ran_out() -> None:
    """Deadlines are enforced at every hop: a relay answers an expired budget at once."""
    probe = Probe()
    net = MemoryNetwork()
    async with tree(net, CHAIN, {"server.r1.r2.e": [probe.table]}):
        link = await net.connect("memory://server.r1", limits=Limits())
        hello = make_hello("server.r1.raw", "child", Limits())
        await handshake_connector(link, hello)
        req = Request(
            id=1,
            src="server.r1.raw",
            dst="server.r1.r2.e",
            route=["server.r1.raw"],
            budget=0.0,
            headers={},
            channel="t",
            topic="ok",
        )
        await link.send(Frame(req))
        answer = (await link.receive()).header
        assert isinstance(answer, Error)
        assert answer.status == errors.Status.DEADLINE_EXCEEDED
        assert answer.src == "server.r1"
        assert answer.corr == 1
        await anyio.wait_all_tasks_blocked()
        assert probe.ok_calls == 0
        await link.aclose()


@pytest.mark.parametrize(("idle", "left"), [(None, 3), (1, 1), (0, 0)])
async def test_idle_workers_bounds_the_handler_tasks_left_after_a_burst(
    idle: int | None, left: int
) -> None:
    """Three handlers run at once; once they answered, ``idle_workers`` of their tasks wait
    (default: all: the pool never shrinks), and a later request is served either way."""
    probe = Probe()
    net = MemoryNetwork()
    async with tree(
        net, ["server", "server.e"], {"server.e": [probe.table]}, idle_workers=idle
    ) as c:
        site = c["server.e"]
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(c["server"].request, "server.e", "t", "block")
            await anyio.wait_all_tasks_blocked()
            assert (probe.started, site.statistics().workers) == (3, 3)
            probe.release.set()
        await anyio.wait_all_tasks_blocked()
        assert site.statistics().workers == left
        assert (await c["server"].request("server.e", "t", "ok")).tobytes() == b"ok"
        await anyio.wait_all_tasks_blocked()
        assert site.statistics().workers == max(left, 0 if idle == 0 else 1)
        assert site.statistics().handled == 4


async def test_idle_workers_below_zero_is_refused() -> None:
    with pytest.raises(errors.ConfigError, match="idle_workers"):
        Cell("server", idle_workers=-1)
