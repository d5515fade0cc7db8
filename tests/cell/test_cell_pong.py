"""Answering a ping never stops a link's reader: a peer that sends pings but does not read
(its link full towards it) still has its next frames handled (issue 19: a live link that would
not drain stalled its reader on the pong)."""

from __future__ import annotations

import anyio
import pytest

from flare_async import Cell, Context, HandlerTable, MemoryNetwork, Payload
from flare_async.cell._links import handshake_connector
from flare_async.wire import Event as EventHeader
from flare_async.wire import Frame, Limits, Ping, make_hello, originate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_peer_that_pings_but_does_not_read_still_has_its_frames_handled() -> None:
    net = MemoryNetwork(queue_size=2)
    table = HandlerTable()
    seen = anyio.Event()

    @table.event("t", "note")
    async def note(ctx: Context, msg: Payload) -> None:
        seen.set()

    async with Cell("server", listen=["memory://server"], drivers=[net], handlers=[table]):
        link = await net.connect("memory://server", limits=Limits())
        await handshake_connector(link, make_hello("server.raw", "child", Limits()))
        # The raw child never reads: two pongs fill the server's queue towards it; the third
        # would wait for room for ever.
        for seq in range(1, 6):
            await link.send(Frame(Ping(seq=seq)))
        event = originate(EventHeader, 1, "server.raw", "server", channel="t", topic="note")
        await link.send(Frame(event))
        with anyio.fail_after(5):
            await seen.wait()
        await link.aclose()
