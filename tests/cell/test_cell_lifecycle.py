"""Starting, stopping, reconnecting and refusing links; on trio's virtual clock."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from trio.testing import MockClock

import flare_async
from flare_async import Backoff, Cell, Context, HandlerTable, MemoryNetwork, Payload, errors
from flare_async.transport import Link
from flare_async.wire import Bye, Frame, Hello, Limits, Session
from tests._topo import serve_until, tree, url

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def ok_table() -> HandlerTable:
    t = HandlerTable()

    @t.request("t", "ok")
    async def ok(ctx: Context, msg: Payload) -> bytes:
        return ctx.cell.name.encode()

    return t


async def test_not_running_cell_refuses_work() -> None:
    cell = Cell("server")
    with pytest.raises(errors.CellClosed):
        await cell.request("server", "t", "ok")
    async with cell:
        pass
    with pytest.raises(errors.CellClosed):
        await cell.send_event("server", "t", "ok")
    with pytest.raises(errors.ConfigError):
        async with cell:
            pass


def test_configuration_errors() -> None:
    with pytest.raises(errors.InvalidName):
        Cell("no spaces allowed")
    with pytest.raises(errors.ConfigError, match="root"):
        Cell("server", parent="memory://x")
    t = HandlerTable()

    async def handler(ctx: Context, msg: Payload) -> None:
        return None

    with pytest.raises(errors.ConfigError):
        t.request("", "x")(handler)
    with pytest.raises(errors.ConfigError):
        t.request("*", "x")(handler)
    with pytest.raises(errors.ConfigError):
        t.event("c", "")(handler)
    assert len(t) == 0


async def test_duplicate_handlers_and_late_mounts_are_refused() -> None:
    with pytest.raises(errors.ConfigError, match="two handlers"):
        async with Cell("server", handlers=[ok_table(), ok_table()]):
            pass
    async with Cell("server") as cell:
        with pytest.raises(errors.ConfigError, match="frozen"):
            cell.mount(ok_table())


async def test_wildcard_topic_and_exact_topic_priority() -> None:
    t = HandlerTable()

    @t.request("t", "*")
    async def anything(ctx: Context, msg: Payload) -> bytes:
        return b"wild:" + ctx.topic.encode()

    @t.request("t", "exact")
    async def exact(ctx: Context, msg: Payload) -> bytes:
        return b"exact"

    async with Cell("server", handlers=[t]) as cell:
        assert (await cell.request("server", "t", "exact")).tobytes() == b"exact"
        assert (await cell.request("server", "t", "other")).tobytes() == b"wild:other"


async def test_unknown_scheme_fails_when_the_cell_is_made() -> None:
    with pytest.raises(errors.UnsupportedScheme):
        async with Cell("server", listen=["gopher://127.0.0.1:70"]):
            pass


async def test_shutdown_fails_pending_requests_and_says_bye() -> None:
    release = anyio.Event()
    t = HandlerTable()

    @t.request("t", "hang")
    async def hang(ctx: Context, msg: Payload) -> None:
        await release.wait()

    net = MemoryNetwork()
    async with tree(net, ["server"], {"server": [t]}) as cells:
        child = Cell("server.e", parent=url("server"), drivers=[net])
        stop = anyio.Event()
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await child.request("server", "t", "hang", timeout=None)
            except errors.FlareError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            await tg.start(serve_until, child, stop)
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            assert cells["server"].children == ["server.e"]
            stop.set()
        assert isinstance(outcome[0], errors.CellClosed)
        await anyio.wait_all_tasks_blocked()
        assert cells["server"].children == []  # the parent saw the bye and forgot the child
        release.set()


async def test_child_reconnects_with_backoff_after_parent_restarts() -> None:
    net = MemoryNetwork()
    backoff = Backoff(initial=0.5, maximum=4.0)

    def server() -> Cell:
        return Cell("server", listen=[url("server")], drivers=[net], handlers=[ok_table()])

    async with anyio.create_task_group() as tg:
        stop = anyio.Event()
        await tg.start(serve_until, server(), stop)
        async with Cell(
            "server.e",
            parent=url("server"),
            drivers=[net],
            backoff=backoff,
            handlers=[ok_table()],
            seed=1,
        ) as edge:
            assert edge.parent_name == "server"
            stop.set()
            await anyio.wait_all_tasks_blocked()
            assert edge.parent_name is None
            with pytest.raises(errors.Unreachable):
                await edge.request("server", "t", "ok")
            down_at = anyio.current_time()
            await anyio.sleep(30)  # several failed attempts, backing off to the 4 s cap
            async with server() as again:
                restarted = anyio.current_time()
                await edge.wait_parent()
                # Reconnected within one capped backoff interval of the restart.
                assert anyio.current_time() - restarted <= 4.0
                assert anyio.current_time() - down_at >= 30
                assert (await again.request("server.e", "t", "ok")).tobytes() == b"server.e"


async def test_parent_refuses_a_child_not_below_it_and_keeps_serving() -> None:
    net = MemoryNetwork()
    async with tree(net, ["server", "server.eu"], {"*": [ok_table()]}) as cells:
        intruder = Cell("server.us.x", parent=url("server.eu"), drivers=[net])
        async with intruder:
            assert intruder.parent_name is None  # refused, retrying in the background
            assert cells["server.eu"].children == []
        # Others are unaffected.
        assert (await cells["server"].request("server.eu", "t", "ok")).tobytes() == b"server.eu"


async def test_silent_connection_is_dropped_after_the_handshake_timeout() -> None:
    net = MemoryNetwork()
    async with Cell("server", listen=[url("server")], drivers=[net], handshake_timeout=5) as server:
        link = await net.connect(url("server"), limits=Limits())
        start = anyio.current_time()
        with pytest.raises(errors.LinkClosed):
            await link.receive()  # we never say hello; the server gives up on us
        assert anyio.current_time() - start == pytest.approx(5)
        assert server.children == []


async def test_wrong_protocol_version_is_refused_with_a_reason() -> None:
    net = MemoryNetwork()
    async with Cell("server", listen=[url("server")], drivers=[net]):
        link = await net.connect(url("server"), limits=Limits())
        hello = Hello(
            name="server.e",
            version=99,
            min_version=99,
            role="child",
            capabilities=[],
            max_header=65536,
            max_frame=1 << 20,
        )
        await link.send(Frame(hello))
        bye = (await link.receive()).header
        assert isinstance(bye, Bye)
        assert "protocol" in bye.reason
        with pytest.raises(errors.LinkClosed):
            await link.receive()
        await link.aclose()


async def test_reconnecting_child_replaces_its_old_link() -> None:
    net = MemoryNetwork()
    first = Cell("server.e", parent=url("server"), drivers=[net], handlers=[ok_table()])
    second = Cell("server.e", parent=url("server"), drivers=[net], handlers=[ok_table()])
    async with tree(net, ["server"], {"*": [ok_table()]}) as cells, first, second:
        await anyio.wait_all_tasks_blocked()
        assert cells["server"].children == ["server.e"]
        assert second.parent_name == "server"
        # The displaced cell was told why and does not fight back (no flapping).
        assert first.parent_name is None
        await anyio.sleep(60)
        assert first.parent_name is None
        assert second.parent_name == "server"
        assert (await cells["server"].request("server.e", "t", "ok")).tobytes() == b"server.e"


def test_public_surface() -> None:
    assert set(flare_async.__all__) == {
        "Cell",
        "HandlerTable",
        "Context",
        "Payload",
        "BroadcastResults",
        "Outcome",
        "CellStatistics",
        "Backoff",
        "CellName",
        "Limits",
        "Driver",
        "Link",
        "Listener",
        "MemoryNetwork",
        "errors",
        "__version__",
        "system_handlers",
        "IncomingStream",
        "Progress",
    }
    for name in flare_async.__all__:
        assert hasattr(flare_async, name), name


async def test_peer_verifier_refuses_links_on_both_sides() -> None:
    net = MemoryNetwork()
    seen: list[tuple[str, str]] = []

    def only_good(link: Link, session: Session) -> None:
        seen.append((session.peer, session.role))
        if "bad" in session.peer:
            raise errors.IdentityError(f"{session.peer} has no certificate for that name")

    async with Cell("server", listen=[url("server")], drivers=[net], verify_peer=only_good) as s:
        async with Cell("server.bad", parent=url("server"), drivers=[net]) as bad:
            assert bad.parent_name is None
        async with Cell("server.good", parent=url("server"), drivers=[net]) as good:
            assert good.parent_name == "server"
        assert ("server.bad", "child") in seen
        assert ("server.good", "child") in seen

        def distrust_parent(link: Link, session: Session) -> None:
            if session.role == "parent":
                raise errors.IdentityError("the parent's certificate is not a server's")

        async with Cell(
            "server.picky", parent=url("server"), drivers=[net], verify_peer=distrust_parent
        ) as picky:
            assert picky.parent_name is None
            await anyio.wait_all_tasks_blocked()
            assert "server.picky" not in s.children
