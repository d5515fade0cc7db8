"""A link the heartbeat gives up on is closed without waiting on the network (issue 18, 7d).

Over real sockets: a parent and a child linked through a FaultProxy, the proxy paused both ways
(a silent cut: no RST, no FIN) and both send buffers filled. The parent forgets the child and
fails the request waiting on it with ``LinkBroken`` within ``dead_after`` and a margin, while
the network is still cut; the child starts reconnecting meanwhile, and once the proxy resumes
it is back and answers. Before the fix, the accepting end of a ``ws://`` link only woke its
reader after writing the close frame, which waited out the driver's ``close_timeout``; and
sends cut off by the close saw ``LinkClosed`` ("we closed it") instead of ``LinkBroken``.

Over memory links on virtual time: a transport whose graceful close never returns (as a close
over a cut network) delays neither the heartbeat's check of the other links nor the drop.

Tests wait on the cells' own events and the proxy's counters, bounded by ``fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from flare_async import Backoff, Cell, Context, HandlerTable, MemoryNetwork, Payload
from flare_async.cell._links import handshake_connector
from flare_async.errors import DeadlineExceeded, FlareError, LinkBroken, TransportError
from flare_async.testing import FaultProxy
from flare_async.transport import Driver, Link, Listener, TcpDriver, WebSocketDriver
from flare_async.wire import Frame, Limits, make_hello
from tests.transport.test_transport_ws import Pki, client_context, make_pki, server_context

pytestmark = pytest.mark.anyio

HEARTBEAT = 0.2
DEAD_AFTER = 1.0
MARGIN = 1.0
"""Beyond the heartbeat's own bound (dead_after + one heartbeat), for a busy machine."""
BIG = 16 << 20
"""More than a loopback connection's buffers hold (sender's 4 MiB, proxy's window, 64 KiB
the proxy holds): a frame this size cannot be written while the proxy is paused."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


BACKENDS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),  # the runtime's production loop
    "trio": ("trio", {}),  # real clock: real sockets
}
CASES = [
    (transport, backend)
    for transport in ("tcp", "tls", "ws", "wss")
    for backend in BACKENDS
    if not (transport.startswith("ws") and backend == "trio")  # aiohttp: asyncio only
]


@pytest.fixture
def loop() -> str:
    """The event loop; tests over real sockets parametrize it, the rest run on virtual time."""
    return "virtual"


@pytest.fixture
def anyio_backend(loop: str) -> tuple[str, dict[str, Any]]:
    if loop == "virtual":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return BACKENDS[loop]


def _driver(transport: str, pki: Pki) -> Driver:
    if transport in ("tcp", "tls"):
        return TcpDriver(server_tls=server_context(pki), client_tls=client_context(pki))
    # close_timeout as it ships: before the fix the dead link's end waited it out.
    return WebSocketDriver(
        server_ssl=server_context(pki), client_ssl=client_context(pki), close_timeout=10.0
    )


class Links:
    """``on_link`` of a cell: the latest state of each peer, and an event on every change."""

    def __init__(self) -> None:
        self.up: dict[str, bool] = {}
        self.changed = anyio.Event()

    def __call__(self, peer: str, role: str, up: bool) -> None:
        self.up[peer] = up
        self.changed.set()
        self.changed = anyio.Event()

    async def wait(self, peer: str, up: bool) -> None:
        while self.up.get(peer) is not up:
            await self.changed.wait()


@asynccontextmanager
async def cut_pair(
    transport: str, pki: Pki, handlers: list[HandlerTable]
) -> AsyncIterator[tuple[Cell, Cell, FaultProxy, Links, Links]]:
    """``server`` and ``server.e`` over ``transport``, through a FaultProxy, short heartbeats."""
    driver = _driver(transport, pki)
    path = "/flare" if transport.startswith("ws") else ""
    liveness: dict[str, Any] = {"heartbeat": HEARTBEAT, "dead_after": DEAD_AFTER}
    async with AsyncExitStack() as stack:
        parent_links, child_links = Links(), Links()
        parent = Cell(
            "server",
            listen=[f"{transport}://127.0.0.1:0{path}"],
            drivers=[driver],
            handlers=handlers,
            on_link=parent_links,
            **liveness,
        )
        await stack.enter_async_context(parent)
        port = int(parent.listen_urls[0].rsplit(":", 1)[1].split("/")[0])
        proxy = FaultProxy(("127.0.0.1", port), framed=transport == "tcp")
        await stack.enter_async_context(proxy)
        child = Cell(
            "server.e",
            parent=f"{transport}://127.0.0.1:{proxy.address[1]}{path}",
            drivers=[driver],
            handlers=handlers,
            backoff=Backoff(initial=0.05, maximum=0.2),
            on_link=child_links,
            **liveness,
        )
        await stack.enter_async_context(child)
        with anyio.fail_after(10):
            await child.wait_parent()
            await parent_links.wait("server.e", True)
        yield parent, child, proxy, parent_links, child_links


def hanging_table(arrived: list[str], got: anyio.Event, release: anyio.Event) -> HandlerTable:
    table = HandlerTable()

    @table.request("t", "hang")
    async def hang(ctx: Context, msg: Payload) -> bytes:
        arrived.append(f"{ctx.cell.name}:{len(msg.tobytes())}")
        got.set()
        await release.wait()
        return b"late"

    @table.request("t", "ok")
    async def ok(ctx: Context, msg: Payload) -> bytes:
        return b"ok"

    return table


@pytest.mark.slow  # real sockets and real heartbeats, 12 cases
@pytest.mark.parametrize(("transport", "loop"), CASES, ids=[f"{t}-{b}" for t, b in CASES])
async def test_a_dead_link_is_dropped_and_its_requests_fail_while_the_network_is_still_cut(
    transport: str, pki: Pki
) -> None:
    arrived: list[str] = []
    got, release = anyio.Event(), anyio.Event()
    table = hanging_table(arrived, got, release)
    outcomes: dict[str, BaseException | bytes] = {}
    ended: dict[str, anyio.Event] = {k: anyio.Event() for k in ("pending", "down", "up")}

    async def ask(cell: Cell, dst: str, body: bytes, key: str) -> None:
        try:
            reply = await cell.request(dst, "t", "hang", body, timeout=None)
            outcomes[key] = reply.tobytes()
        except FlareError as exc:
            outcomes[key] = exc
        ended[key].set()

    async with cut_pair(transport, pki, [table]) as (parent, child, proxy, at_parent, at_child):
        async with anyio.create_task_group() as tg:
            # A request the child has taken and will not answer: it waits on the link.
            tg.start_soon(ask, parent, "server.e", b"", "pending")
            with anyio.fail_after(10):
                await got.wait()
            proxy.pause()  # the cut: nothing moves either way, no connection ends
            forwarded = dict(proxy.counters.bytes)
            # Both ends fill their send buffers: a frame bigger than what they hold each way.
            tg.start_soon(ask, parent, "server.e", bytes(BIG), "down")
            tg.start_soon(ask, child, "server", bytes(BIG), "up")
            with anyio.fail_after(DEAD_AFTER + HEARTBEAT + MARGIN):
                await at_parent.wait("server.e", False)
                await at_child.wait("server", False)
                for event in ended.values():
                    await event.wait()
                # The connecting side is trying again already (its hello held by the cut).
                await proxy.wait_until(lambda c: c.connections >= 2)

        assert proxy.counters.bytes == forwarded  # the network stayed cut throughout
        assert parent.children == []
        assert child.parent_name is None
        pending = outcomes["pending"]
        assert isinstance(pending, LinkBroken), pending
        assert "no frame from server.e" in str(pending)
        for key in ("down", "up"):  # never written whole; and a dead link is not "we closed it"
            assert isinstance(outcomes[key], LinkBroken | DeadlineExceeded), outcomes[key]
        assert arrived == ["server.e:0"]  # neither big request got through

        proxy.resume()
        with anyio.fail_after(15):
            await child.wait_parent()
            await at_parent.wait("server.e", True)
            reply = await child.request("server", "t", "ok", b"", timeout=10)
            assert reply.tobytes() == b"ok"
            reply = await parent.request("server.e", "t", "ok", b"", timeout=10)
            assert reply.tobytes() == b"ok"
        release.set()


# ------------------------------------------------------------- virtual time, memory links
class _CloseWaitsOnNetwork(Link):
    """A memory link whose graceful close never completes (a drain or close handshake over a
    cut network); ``abort`` ends it at once, as every driver's does."""

    def __init__(self, inner: Link, closes: list[str]) -> None:
        self._inner = inner
        self._closes = closes
        self._aborted = False
        self.local_address = inner.local_address
        self.peer_address = inner.peer_address
        self.limits = inner.limits

    @property
    def peer_limits(self) -> Limits:
        return self._inner.peer_limits

    @peer_limits.setter
    def peer_limits(self, value: Limits) -> None:
        self._inner.peer_limits = value

    async def send(self, frame: Frame) -> None:
        await self._inner.send(frame)

    def try_send(self, frame: Frame) -> bool:
        return self._inner.try_send(frame)

    async def receive(self) -> Frame:
        return await self._inner.receive()

    async def aclose(self) -> None:
        self._closes.append("aclose")
        if not self._aborted:
            await anyio.sleep(3600)  # virtual seconds: a cell that waits here hangs its checks
        await self._inner.aclose()

    def abort(self) -> None:
        self._closes.append("abort")
        self._aborted = True
        self._inner.abort()


class _CloseWaitsListener(Listener):
    def __init__(self, inner: Listener, closes: list[str]) -> None:
        self._inner = inner
        self._closes = closes
        self.url = inner.url

    async def accept(self) -> Link:
        return _CloseWaitsOnNetwork(await self._inner.accept(), self._closes)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _CloseWaitsDriver(Driver):
    schemes = ("memory",)

    def __init__(self, net: MemoryNetwork, closes: list[str]) -> None:
        self._net = net
        self._closes = closes

    async def connect(self, url: str, *, limits: Limits) -> Link:
        return await self._net.connect(url, limits=limits)

    async def listen(self, url: str, *, limits: Limits) -> Listener:
        return _CloseWaitsListener(await self._net.listen(url, limits=limits), self._closes)


async def test_a_close_that_waits_on_the_network_delays_neither_the_drop_nor_other_links() -> None:
    net = MemoryNetwork()
    closes: list[str] = []
    links = Links()
    server = Cell(
        "server",
        listen=["memory://server"],
        drivers=[_CloseWaitsDriver(net, closes)],
        heartbeat=1.0,
        dead_after=3.0,
        on_link=links,
    )
    async with server:
        mute: list[Link] = []
        for name in ("server.a", "server.b"):  # two children that never answer a ping
            link = await net.connect("memory://server", limits=Limits())
            await handshake_connector(link, make_hello(name, "child", Limits()))
            mute.append(link)
        await links.wait("server.b", True)
        start = anyio.current_time()
        with anyio.fail_after(3.0 + 1.0 + 0.5):  # dead_after, one heartbeat, no more
            await links.wait("server.a", False)
            await links.wait("server.b", False)
        assert 3.0 <= anyio.current_time() - start <= 4.0
        assert server.children == []
        assert closes.count("abort") == 2  # given up with an abort; no close was waited for
        for link in mute:  # the other end learns the link broke, not that it was closed
            assert isinstance(await end_of(link), LinkBroken)


async def end_of(link: Link) -> TransportError:
    """How ``link`` ended, once every frame before the end was read."""
    while True:
        try:
            await link.receive()
        except TransportError as exc:
            return exc
