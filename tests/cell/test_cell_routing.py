"""Request/reply, events and broadcast through relays over memory://, on both backends."""

from __future__ import annotations

import anyio
import pytest

from flare_async import Cell, Context, HandlerTable, MemoryNetwork, Payload, errors
from flare_async.wire import Limits
from tests._topo import tree, url

pytestmark = pytest.mark.anyio

TREE = ["server", "server.eu", "server.us", "server.eu.a", "server.eu.b", "server.us.c"]


def echo_table() -> HandlerTable:
    t = HandlerTable()

    @t.request("test", "whoami")
    async def whoami(ctx: Context, msg: Payload) -> bytes:
        route = ",".join(ctx.route)
        return f"{ctx.cell.name}|{ctx.src}|{route}|{msg.tobytes().decode()}".encode()

    @t.request("test", "echo")
    async def echo(ctx: Context, msg: Payload) -> Payload:
        return msg

    return t


async def test_server_to_edge_through_relay() -> None:
    async with tree(MemoryNetwork(), TREE, {"*": [echo_table()]}) as cells:
        reply = await cells["server"].request("server.eu.a", "test", "whoami", b"hi")
        assert reply.tobytes() == b"server.eu.a|server|server,server.eu|hi"


async def test_edge_to_edge_through_common_ancestor() -> None:
    async with tree(MemoryNetwork(), TREE, {"*": [echo_table()]}) as cells:
        # Siblings meet at their parent; cousins at the root.
        sib = await cells["server.eu.a"].request("server.eu.b", "test", "whoami", b"1")
        assert sib.tobytes() == b"server.eu.b|server.eu.a|server.eu.a,server.eu|1"
        cousin = await cells["server.eu.a"].request("server.us.c", "test", "whoami", b"2")
        assert cousin.tobytes() == (
            b"server.us.c|server.eu.a|server.eu.a,server.eu,server,server.us|2"
        )
        up = await cells["server.us.c"].request("server", "test", "whoami", b"3")
        assert up.tobytes() == b"server|server.us.c|server.us.c,server.us|3"


async def test_request_to_self_is_local() -> None:
    async with tree(MemoryNetwork(), ["server"], {"*": [echo_table()]}) as cells:
        reply = await cells["server"].request("server", "test", "whoami", b"me")
        assert reply.tobytes() == b"server|server|server|me"


async def test_relays_forward_payload_buffers_untouched() -> None:
    seen: list[Payload] = []
    t = HandlerTable()

    @t.request("test", "keep")
    async def keep(ctx: Context, msg: Payload) -> None:
        seen.append(msg)

    body = bytes(range(256)) * 4096
    tail = bytearray(b"tail")
    async with tree(MemoryNetwork(), TREE, {"server.us.c": [t]}) as cells:
        await cells["server.eu.a"].request("server.us.c", "test", "keep", Payload([body, tail]))
    (msg,) = seen
    # Over memory:// the very same buffers arrive, read-only, after three relays: no copy,
    # no re-encoding of the payload on the way.
    assert [bytes(p) for p in msg.parts] == [body, b"tail"]
    assert msg.parts[0].obj is body
    assert msg.parts[0].readonly


async def test_broadcast_reports_each_target_and_fails_fast() -> None:
    net = MemoryNetwork()
    async with tree(net, TREE, {"*": [echo_table()]}) as cells:
        async with Cell("server.eu.nohandlers", parent=url("server.eu"), drivers=[net]):
            targets = [
                "server.eu.a",
                "server.eu.b",
                "server.us.c",
                "server.eu.ghost",
                "server.eu.nohandlers",
                "server.us",
            ]
            start = anyio.current_time()
            results = await cells["server"].broadcast(targets, "test", "echo", b"ping", timeout=30)
            elapsed = anyio.current_time() - start
        assert list(results) == targets
        assert sorted(results.replies) == ["server.eu.a", "server.eu.b", "server.us", "server.us.c"]
        assert all(r.tobytes() == b"ping" for r in results.replies.values())
        ghost = results["server.eu.ghost"]
        assert isinstance(ghost, errors.Unreachable)
        assert ghost.reported_by == "server.eu"
        nohandler = results["server.eu.nohandlers"]
        assert isinstance(nohandler, errors.NoHandler)
        assert nohandler.reported_by == "server.eu.nohandlers"
        assert "test/echo" in str(nohandler)
        # Failures are answered at once; nothing waited for the 30 s timeout. On trio's
        # virtual clock no time passes at all; on asyncio it is real time.
        assert elapsed < 1.0


async def test_unknown_destinations_fail_at_once() -> None:
    async with tree(MemoryNetwork(), ["server", "server.eu", "server.eu.a"]) as cells:
        edge = cells["server.eu.a"]
        with pytest.raises(errors.Unreachable) as below:
            await edge.request("server.eu.a.job-1", "test", "x", timeout=30)
        assert below.value.reported_by is None  # decided locally: nothing below the edge
        with pytest.raises(errors.Unreachable) as root:
            await edge.request("elsewhere", "test", "x", timeout=30)
        assert root.value.reported_by == "server"  # the root has nowhere to send it
        with pytest.raises(errors.InvalidName):
            await edge.request("bad name!", "test", "x")


async def test_hop_limit_stops_long_routes() -> None:
    names = ["server", "server.r1", "server.r1.r2", "server.r1.r2.e"]
    async with tree(
        MemoryNetwork(), names, {"*": [echo_table()]}, limits=Limits(max_route=2)
    ) as cells:
        # Two hops (server -> r1 -> r2) are allowed; the third (r2 -> e) is not.
        ok = await cells["server"].request("server.r1.r2", "test", "echo", b"2 hops")
        assert ok.tobytes() == b"2 hops"
        with pytest.raises(errors.Unreachable, match="hop limit") as exc:
            await cells["server"].request("server.r1.r2.e", "test", "echo", b"3 hops")
        assert exc.value.reported_by == "server.r1.r2"


async def test_events_reach_handlers_and_failures_are_reported_back() -> None:
    got: list[tuple[str, bytes]] = []
    done = anyio.Event()
    t = HandlerTable()

    @t.event("metrics", "*")
    async def on_metric(ctx: Context, msg: Payload) -> None:
        got.append((ctx.topic, msg.tobytes()))
        done.set()

    async with tree(
        MemoryNetwork(), ["server", "server.eu", "server.eu.a"], {"server": [t]}
    ) as cells:
        await cells["server.eu.a"].send_event("server", "metrics", "loss", b"0.5")
        await done.wait()
        assert got == [("loss", b"0.5")]
        # An event nobody handles comes back as an error report to the sender.
        before = cells["server.eu"].statistics().errors_returned
        await cells["server.eu"].send_event("server.eu.a", "metrics", "loss", b"x")
        while cells["server.eu.a"].statistics().errors_returned == before:
            await anyio.wait_all_tasks_blocked()
        assert cells["server.eu.a"].statistics().errors_returned == before + 1


async def test_statistics_count_forwarding() -> None:
    async with tree(MemoryNetwork(), TREE, {"*": [echo_table()]}) as cells:
        for _ in range(5):
            await cells["server.eu.a"].request("server.us.c", "test", "echo", b"")
        assert cells["server"].statistics().forwarded == 10  # 5 requests + 5 replies
        stats = cells["server.us.c"].statistics()
        assert stats.handled == 5
        assert stats.pending_requests == 0
        assert cells["server.eu.a"].statistics().pending_requests == 0
        assert cells["server"].children == ["server.eu", "server.us"]
