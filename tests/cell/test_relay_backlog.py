"""A relay's full link holds up only its own frames (issue 19): frames for a child whose link
does not drain wait in that link's backlog, and the relay goes on reading the link they came
on, so a request to another child behind the same relay is answered meanwhile.

Real TCP links; the link ``server.r -> server.r.a`` runs through a proxy paused downwards, so
nothing the relay writes to it gets through until it is resumed. Events of 100 KiB stay below
the size that passes through a relay unread (``PASS_FROM``): each is read, then queued."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

from flare_async import Cell, Context, HandlerTable, Payload, errors
from flare_async.testing import FaultProxy
from flare_async.transport import TcpDriver

pytestmark = pytest.mark.anyio

EVENT = 100 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Leaf:
    def __init__(self) -> None:
        self.table = HandlerTable()
        self.events = 0
        self.pings = 0
        self.got_all = anyio.Event()
        self.expected = -1

        @self.table.event("t", "bulk")
        async def bulk(ctx: Context, msg: Payload) -> None:
            self.events += 1
            if self.events == self.expected:
                self.got_all.set()

        @self.table.request("t", "ping")
        async def ping(ctx: Context, msg: Payload) -> bytes:
            self.pings += 1
            return b"pong"


@asynccontextmanager
async def tree(a: Leaf, b: Leaf) -> AsyncIterator[tuple[Cell, Cell, FaultProxy]]:
    driver = TcpDriver()
    async with AsyncExitStack() as stack:
        server = Cell("server", listen=["tcp://127.0.0.1:0"], drivers=[driver])
        await stack.enter_async_context(server)
        relay = Cell(
            "server.r", parent=server.listen_urls[0], listen=["tcp://127.0.0.1:0"], drivers=[driver]
        )
        await stack.enter_async_context(relay)
        proxy = await stack.enter_async_context(FaultProxy(relay.listen_urls[0]))
        cell_a = Cell("server.r.a", parent=proxy.url, drivers=[driver], handlers=[a.table])
        cell_b = Cell(
            "server.r.b", parent=relay.listen_urls[0], drivers=[driver], handlers=[b.table]
        )
        await stack.enter_async_context(cell_a)
        await stack.enter_async_context(cell_b)
        with anyio.fail_after(10):
            for cell in (relay, cell_a, cell_b):
                await cell.wait_parent()
            for dst in ("server.r.a", "server.r.b"):
                await server.request(dst, "t", "ping", b"", timeout=5)  # paths up
        yield server, relay, proxy


async def _fill(server: Cell, relay: Cell, held: int = 8, limit: int = 2000) -> int:
    """Send 100 KiB events to ``server.r.a`` until the relay holds ``held`` of them in its
    backlog (a link that takes nothing more, not one that was full for a moment)."""
    for sent in range(1, limit + 1):
        await server.send_event("server.r.a", "t", "bulk", bytes(EVENT), timeout=60)
        if relay.statistics().backlog >= held:
            return sent
        await anyio.lowlevel.checkpoint()  # let the relay read what it was sent
    raise AssertionError(f"{limit} events of {EVENT} B never filled the link")


async def test_a_full_link_does_not_hold_up_a_request_to_another_child() -> None:
    a, b = Leaf(), Leaf()
    async with tree(a, b) as (server, relay, proxy):
        proxy.pause("down")
        sent = await _fill(server, relay)
        with anyio.fail_after(5):  # before: the relay's reader waited for server.r.a's link
            reply = await server.request("server.r.b", "t", "ping", b"", timeout=5)
        assert reply.tobytes() == b"pong"
        assert relay.statistics().backlog >= 1  # server.r.a's frames still wait
        assert a.events < sent
        a.expected = sent
        proxy.resume("down")
        with anyio.fail_after(20):  # nothing was lost: every event arrives, in time
            await a.got_all.wait()
        assert relay.statistics().backlog == 0


@pytest.mark.parametrize("limit", ["per_link", "all_links"])
async def test_a_backlog_past_its_limit_makes_the_reader_wait_and_holds_no_more(
    limit: str,
) -> None:
    a, b = Leaf(), Leaf()
    async with tree(a, b) as (server, relay, proxy):
        router = relay._router
        if limit == "per_link":
            router.backlogs.limit = 4 * EVENT
        else:
            router.backlogs.total = 4 * EVENT
        proxy.pause("down")
        sent = await _fill(server, relay, held=3)
        # More events than the backlog takes: the relay stops reading its parent link instead
        # of queueing past the limit (backpressure), and the server's sends wait in turn.
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(server.send_event, "server.r.a", "t", "bulk", bytes(EVENT))
            await anyio.sleep(0.5)  # the fault lasts this long; nothing is checked by time
            (peer,) = [p for p in router.children.values() if p.name == "server.r.a"]
            assert peer.backlog_bytes <= 4 * EVENT
            assert router.backlogs.bytes <= 4 * EVENT
            a.expected = sent + 20
            proxy.resume("down")
        with anyio.fail_after(20):
            await a.got_all.wait()
        assert relay.statistics().backlog == 0


async def test_a_frame_whose_deadline_passes_in_the_backlog_is_reported_not_sent() -> None:
    a, b = Leaf(), Leaf()
    async with tree(a, b) as (server, relay, proxy):
        proxy.pause("down")
        await _fill(server, relay)
        with pytest.raises(errors.DeadlineExceeded):
            await server.request("server.r.a", "t", "ping", b"", timeout=0.3)
        proxy.resume("down")
        with anyio.fail_after(20):  # the link drains; the late request never ran a handler
            reply = await server.request("server.r.a", "t", "ping", b"", timeout=15)
        assert reply.tobytes() == b"pong"
        assert a.pings == 2  # the warm-up and this one: the late request was dropped
        assert relay.statistics().backlog == 0


async def test_a_link_that_goes_down_takes_its_backlog_with_it() -> None:
    """Frames that waited for a link that then broke are reported and forgotten at once: the
    relay's counters go back to zero and its other links are not held."""
    a, b = Leaf(), Leaf()
    async with tree(a, b) as (server, relay, proxy):
        proxy.pause("down")
        await _fill(server, relay)
        assert proxy.reset() >= 1  # the link to server.r.a breaks with frames waiting for it
        with anyio.fail_after(10):
            while relay.statistics().backlog:
                await anyio.lowlevel.checkpoint()  # the relay's reader handles the drop
        backlogs = relay._router.backlogs
        assert (backlogs.frames, backlogs.bytes) == (0, 0)
        reply = await server.request("server.r.b", "t", "ping", b"", timeout=5)
        assert reply.tobytes() == b"pong"
