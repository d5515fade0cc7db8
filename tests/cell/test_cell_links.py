"""Link liveness: heartbeats, unresponsive peers, and prompt failure of in-flight requests."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from flare_async import Backoff, Cell, Context, HandlerTable, MemoryNetwork, Payload, errors
from flare_async.cell._links import HelloFactory, handshake_acceptor, handshake_connector
from flare_async.wire import Limits, Ping, make_hello
from tests._topo import tree

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def table(started: list[str], release: anyio.Event) -> HandlerTable:
    t = HandlerTable()

    @t.request("t", "work")
    async def work(ctx: Context, msg: Payload) -> bytes:
        started.append(ctx.cell.name)
        await anyio.sleep(float(msg.tobytes()))
        return b"done"

    @t.request("t", "block")
    async def block(ctx: Context, msg: Payload) -> bytes:
        started.append(ctx.cell.name)
        await release.wait()
        return b"released"

    return t


async def test_long_local_work_never_makes_a_cell_look_dead() -> None:
    started: list[str] = []
    async with tree(
        MemoryNetwork(),
        ["server", "server.e"],
        {"server.e": [table(started, anyio.Event())]},
        heartbeat=1.0,
    ) as cells:
        start = anyio.current_time()
        reply = await cells["server"].request("server.e", "t", "work", b"100", timeout=200)
        assert reply.tobytes() == b"done"
        assert anyio.current_time() - start == pytest.approx(100)
        assert cells["server.e"].parent_name == "server"  # the link stayed up throughout
        assert cells["server"].children == ["server.e"]


async def test_unresponsive_peer_is_dropped_after_dead_after() -> None:
    net = MemoryNetwork()
    async with tree(net, ["server"], heartbeat=1.0, dead_after=3.0) as cells:
        link = await net.connect("memory://server", limits=Limits())
        await handshake_connector(link, make_hello("server.mute", "child", Limits()))
        assert cells["server"].children == ["server.mute"]
        start = anyio.current_time()
        pings = 0
        ended: errors.TransportError | None = None
        while ended is None:  # we read (and count) the server's pings but never answer
            try:
                frame = await link.receive()
            except errors.TransportError as exc:
                ended = exc
            else:
                pings += isinstance(frame.header, Ping)
        # Given up, the link is aborted, not closed: the silent end learns it broke.
        assert isinstance(ended, errors.LinkBroken)
        assert cells["server"].children == []  # forgotten when given up, not after a close
        assert 3.0 <= anyio.current_time() - start <= 4.0
        assert pings >= 2


async def test_requests_in_flight_through_a_relay_fail_when_its_link_drops() -> None:
    net = MemoryNetwork()
    started: list[str] = []
    names = ["server", "server.r1", "server.r1.e"]
    async with tree(net, names, {"server.r1.e": [table(started, anyio.Event())]}) as cells:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:

            async def cut() -> None:
                await anyio.wait_all_tasks_blocked()
                assert started == ["server.r1.e"]
                net.sever("memory://server.r1")  # the relay loses its link to the edge

            tg.start_soon(cut)
            with pytest.raises(errors.LinkBroken) as exc:
                await cells["server"].request("server.r1.e", "t", "block", timeout=60)
        assert exc.value.reported_by == "server.r1"
        assert anyio.current_time() == start  # at once, not at the 60 s deadline


async def test_forwarded_entries_do_not_outlive_their_answers() -> None:
    started: list[str] = []
    release = anyio.Event()
    release.set()
    names = ["server", "server.r1", "server.r1.e"]
    async with tree(MemoryNetwork(), names, {"server.r1.e": [table(started, release)]}) as c:
        for _ in range(20):
            await c["server"].request("server.r1.e", "t", "block")
        relay = c["server.r1"]
        assert all(not peer.inflight for peer in relay._router.children.values())
        assert relay._router.parent is not None
        assert not relay._router.parent.inflight


async def test_a_parent_that_drops_every_link_at_once_is_redialled_with_backoff() -> None:
    net = MemoryNetwork()
    listener = await net.listen("memory://server", limits=Limits())
    accepted: list[float] = []

    async def flaky_parent() -> None:
        hello = HelloFactory("server", Limits(), frozenset(), 0.0)
        while True:
            link = await listener.accept()
            accepted.append(anyio.current_time())
            await handshake_acceptor(link, "server", hello)
            await link.aclose()  # hello, then gone without a goodbye

    async with anyio.create_task_group() as tg:
        tg.start_soon(flaky_parent)
        backoff = Backoff(initial=0.5, maximum=4.0)
        async with Cell(
            "server.e",
            parent="memory://server",
            drivers=[net],
            backoff=backoff,
            heartbeat=None,
            seed=3,
        ):
            await anyio.sleep(60)
        tg.cancel_scope.cancel()
    await listener.aclose()
    # Capped exponential backoff: 0.25-0.5, 0.5-1, 1-2, 2-4, then 2-4 s apart; never a hot loop.
    assert 15 <= len(accepted) <= 35
    gaps = [b - a for a, b in itertools.pairwise(accepted)]
    assert min(gaps) >= 0.25
