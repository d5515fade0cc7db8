"""A deadline counts the time a message waits at every hop (issue 19): the budget on the wire is
what is left when the header is written, at the caller and at each relay, so queueing behind a
slow link never extends the caller's deadline at the handler.

Real TCP links through user-space proxies: ``server -> P1 -> server.r -> P2 -> server.r.h``.
A proxy paused one way with a 16 MiB event in front makes the next frame on that link wait (the
link's send lock is held by the event); it is resumed after ``HOLD`` seconds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

from flare_async import Cell, Context, HandlerTable, Payload, errors
from flare_async.testing import FaultProxy
from flare_async.transport import TcpDriver

pytestmark = pytest.mark.anyio

HOLD = 0.5
TIMEOUT = 1.0
BIG = 16 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Handler:
    def __init__(self) -> None:
        self.table = HandlerTable()
        self.remaining: list[float] = []
        self.started = anyio.Event()

        @self.table.request("t", "probe")
        async def probe(ctx: Context, msg: Payload) -> bytes:
            self.remaining.append(ctx.remaining())
            self.started.set()
            return b"ok"

        @self.table.event("t", "big")
        async def big(ctx: Context, msg: Payload) -> None:
            return None


@asynccontextmanager
async def chain(handler: Handler) -> AsyncIterator[tuple[Cell, Cell, FaultProxy, FaultProxy]]:
    driver = TcpDriver()
    sink = HandlerTable()

    @sink.event("t", "big")
    async def big(ctx: Context, msg: Payload) -> None:
        return None

    async with AsyncExitStack() as stack:
        server = Cell("server", listen=["tcp://127.0.0.1:0"], drivers=[driver])
        await stack.enter_async_context(server)
        p1 = await stack.enter_async_context(FaultProxy(server.listen_urls[0]))
        relay = Cell(
            "server.r",
            parent=p1.url,
            listen=["tcp://127.0.0.1:0"],
            drivers=[driver],
            handlers=[sink],
        )
        await stack.enter_async_context(relay)
        p2 = await stack.enter_async_context(FaultProxy(relay.listen_urls[0]))
        leaf = Cell("server.r.h", parent=p2.url, drivers=[driver], handlers=[handler.table])
        await stack.enter_async_context(leaf)
        with anyio.fail_after(10):
            await relay.wait_parent()
            await leaf.wait_parent()
            await server.request("server.r.h", "t", "probe", b"", timeout=5)  # links warm
        handler.remaining.clear()
        handler.started = anyio.Event()
        yield server, relay, p1, p2


def _queued_at(cell: Cell) -> Callable[[], bool]:
    """Whether ``cell`` holds the probe: in a link's backlog (a relay), or in its own send
    (the caller: the request's waiter knows the link it leaves on once the send began)."""
    if cell.name == "server":
        return lambda: any(w.via is not None for w in cell._router.pending.all())
    return lambda: cell.statistics().backlog >= 1


async def _held(
    sender: Cell, dst: str, proxy: FaultProxy, server: Cell, hold: float
) -> tuple[Any, float]:
    """Block ``sender``'s link towards ``dst`` behind a big event (``proxy`` paused that way),
    ask ``server.r.h`` with ``TIMEOUT`` meanwhile, resume ``hold`` after ``sender`` holds the
    request: the outcome (reply or error) and how long the caller waited for it."""
    proxy.pause("down")
    outcome: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: sender.send_event(dst, "t", "big", bytes(BIG), timeout=30))
        # Its send began (the link's send lock is taken before any byte is written) and
        # cannot end: 16 MiB do not fit the sockets' buffers behind a paused proxy.
        await anyio.wait_all_tasks_blocked()
        start = anyio.current_time()

        async def ask() -> None:
            try:
                outcome.append(
                    await server.request("server.r.h", "t", "probe", b"", timeout=TIMEOUT)
                )
            except errors.FlareError as exc:
                outcome.append(exc)
            outcome.append(anyio.current_time() - start)

        tg.start_soon(ask)
        queued = _queued_at(sender)
        for _ in range(1000):  # on a loaded machine the probe may take a while to get there
            if queued():
                break
            await anyio.sleep(0.005)
        else:
            raise AssertionError(f"{sender.name} never held the probe")
        await anyio.sleep(hold)  # the fault: the link stays blocked this long
        proxy.resume("down")
    return outcome[0], outcome[1]


async def test_a_relay_that_queues_a_request_forwards_only_what_is_left_of_its_budget() -> None:
    handler = Handler()
    async with chain(handler) as (server, relay, _p1, p2):
        outcome, _ = await _held(relay, "server.r.h", p2, server, HOLD)
    assert isinstance(outcome, Payload)
    (left,) = handler.remaining
    assert left <= TIMEOUT - HOLD + 0.05, left  # before: the full 1.0 s at the handler


async def test_a_callers_own_wait_to_send_counts_against_its_deadline() -> None:
    handler = Handler()
    async with chain(handler) as (server, _relay, p1, _p2):
        outcome, _ = await _held(server, "server.r", p1, server, HOLD)
    assert isinstance(outcome, Payload)
    (left,) = handler.remaining
    assert left <= TIMEOUT - HOLD + 0.05, left


async def test_a_request_held_past_its_deadline_never_reaches_the_handler() -> None:
    handler = Handler()
    async with chain(handler) as (server, relay, _p1, p2):
        outcome, waited = await _held(relay, "server.r.h", p2, server, TIMEOUT + 0.5)
        # A request after it on the same links reaches the handler after it would have.
        await server.request("server.r.h", "t", "probe", b"", timeout=5)
    assert isinstance(outcome, errors.DeadlineExceeded)
    assert waited < TIMEOUT + 0.3
    assert len(handler.remaining) == 1  # only the later one: the held one was never handled
