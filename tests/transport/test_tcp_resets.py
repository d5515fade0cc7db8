"""A link reset behind bytes of a frame not read yet is seen at once, on every loop.

uvloop calls a reader registered with ``add_reader`` one last time when its socket reports an
error, then drops it without a word. Where bytes of a frame were still waiting (held back by
``SO_RCVLOWAT``, or come in the same loop turn as the reset) that last read returns them, not
the error: unless the link asks the socket for its error then, nothing tells it the peer is
gone until the heartbeat drops the link, 45 s later.

The stream tests put a proxy on one hop that forwards part of a frame and resets both of its
sockets in the same step, so the receiving end always finds bytes and a reset together. The
stream must resume within an ``idle`` far shorter than the heartbeat: down, up, and through a
relay (the hop into it, where it splices, and the hop out of it), on asyncio and uvloop.
"""

from __future__ import annotations

import hashlib
import socket
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from flare_async import Cell
from flare_async.errors import LinkBroken
from flare_async.testing import FaultProxy, rst_close
from flare_async.transport import TcpDriver
from flare_async.transport._tcp_asyncio import AsyncioTcpLink
from flare_async.wire import Connection, Event, Limits
from tests._topo import sink_table
from tests.streaming.test_streams import pattern

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        # The runtime's production loop (anyio.run(..., backend_options={"use_uvloop": True})).
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


# ----------------------------------------------------------------------- one link, raw peer
def _frame_start(payload: int) -> bytes:
    """The head of a frame with a ``payload``-byte payload (the payload not included)."""
    event = Event(
        id=1, src="a", dst="b", route=["a"], budget=None, headers={}, channel="c", topic="t"
    )
    head = Connection().send(event, [bytes(payload)])
    return bytes(head[0])


async def _accepted() -> tuple[AsyncioTcpLink, socket.socket, Any]:
    listener = await TcpDriver().listen("tcp://127.0.0.1:0", limits=Limits())
    port = int(listener.url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port))
    link = await listener.accept()
    assert isinstance(link, AsyncioTcpLink)
    return link, raw, listener


async def test_a_reset_behind_bytes_below_the_low_water_mark_breaks_the_link() -> None:
    link, raw, listener = await _accepted()
    try:
        with anyio.fail_after(5):  # unnoticed, the reset would wait for the heartbeat
            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    with pytest.raises(LinkBroken):
                        await link.receive()

                tg.start_soon(receive)
                raw.sendall(_frame_start(4 << 20) + bytes(100_000))
                for _ in range(1000):  # until the link has read that and wants the rest
                    if link._lowat > 1:
                        break
                    await checkpoint()
                assert link._lowat > 100_000  # SO_RCVLOWAT: the next 100,000 B wake no one
                raw.sendall(bytes(100_000))
                rst_close(raw)
    finally:
        await link.aclose()
        await listener.aclose()


async def test_a_reset_come_with_the_bytes_before_it_breaks_the_link() -> None:
    """Bytes and the reset behind them are both there when the loop first looks."""
    link, raw, listener = await _accepted()
    try:
        raw.sendall(_frame_start(4 << 20) + bytes(100_000))
        rst_close(raw)
        with anyio.fail_after(5), pytest.raises(LinkBroken):
            await link.receive()
    finally:
        await link.aclose()
        await listener.aclose()


# ------------------------------------------------------------------- streams through a proxy


# names of the cells, the child whose link to its parent goes through the proxy, the
# direction of the stream on that hop
SCENARIOS = {
    "down": (["server", "server.e"], "server.e", "down"),
    "up": (["server", "server.e"], "server.e", "up"),
    "into-a-relay": (["server", "server.r", "server.r.e"], "server.r", "down"),
    "out-of-a-relay": (["server", "server.r", "server.r.e"], "server.r.e", "down"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_a_stream_resumes_at_once_after_a_reset_mid_frame(scenario: str) -> None:
    names, proxied, direction = SCENARIOS[scenario]
    up = direction == "up"
    sender_name, receiver_name = (names[-1], names[0]) if up else (names[0], names[-1])
    data = pattern(24 << 20, seed=31)
    driver = TcpDriver()
    proxy: FaultProxy | None = None
    async with anyio.create_task_group() as tg:
        try:
            async with AsyncExitStack() as stack:
                cells: dict[str, Cell] = {}
                parent_url: str | None = None
                for name in names:
                    if name == proxied:
                        assert parent_url is not None
                        proxy = FaultProxy(parent_url)
                        tg.start_soon(proxy.serve)
                        parent_url = proxy.url
                    cell = Cell(
                        name,
                        listen=["tcp://127.0.0.1:0"] if name != names[-1] else [],
                        parent=parent_url,
                        drivers=[driver],
                        handlers=[sink_table()] if name == receiver_name else [],
                    )
                    await stack.enter_async_context(cell)
                    if parent_url is not None:
                        with anyio.fail_after(10):
                            await cell.wait_parent()
                    parent_url = cell.listen_urls[0] if cell.listen_urls else None
                    cells[name] = cell
                assert proxy is not None
                # well inside a 1 MiB chunk's payload
                proxy.drop_after((6 << 20) + 12345, "up" if up else "down")
                # idle: an unnoticed reset waits for the heartbeat (45 s) and stalls the stream
                with anyio.fail_after(20):
                    reply = await cells[sender_name].stream(
                        receiver_name, "t", "sink", data, chunk=1 << 20, probe=0.2, idle=5
                    )
                assert reply.tobytes().decode() == f"{len(data)} {hashlib.sha256(data).hexdigest()}"
                assert proxy.counters.cuts == 1
                assert cells[receiver_name].statistics().streams.resumes >= 1
        finally:
            tg.cancel_scope.cancel()
            if proxy is not None:
                proxy.close()
