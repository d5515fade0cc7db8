"""Every cell serves ``sys/fanout`` (the relay's part of ``stream_many``) without mounting
anything; ``routing_handlers=False`` opts out; a user's own handler for the address wins."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest

from flare_async import Cell, Context, HandlerTable, IncomingStream, MemoryNetwork, Payload
from flare_async.cell._handlers import Dispatch, Kind
from flare_async.cell._system import routing_handlers
from flare_async.errors import BadRequest, ConfigError, FlareError, NoHandler

pytestmark = pytest.mark.anyio
DATA = bytes(range(256)) * 4096  # 1 MiB
SITES = [f"server.r.s{i}" for i in range(3)]


def site_table() -> HandlerTable:
    table = HandlerTable()

    @table.stream("models", "global")
    async def take(ctx: Context, stream: IncomingStream) -> bytes:
        got = (await stream.read_all()).tobytes()
        return f"{ctx.cell.name} {len(got)} {got == DATA}".encode()

    return table


async def fan_out(
    relay_tables: list[HandlerTable], **relay_options: Any
) -> tuple[dict[str, Payload | FlareError], int, int]:
    """server -> relay ``server.r`` (mounting only ``relay_tables``) -> 3 sites; the results,
    the streams the server sent and the bytes that crossed the server's link."""
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            Cell("server", listen=["memory://server"], drivers=[net])
        )
        relay = await stack.enter_async_context(
            Cell(
                "server.r",
                listen=["memory://r"],
                parent="memory://server",
                drivers=[net],
                handlers=relay_tables,
                **relay_options,
            )
        )
        await relay.wait_parent()
        for name in SITES:
            site = Cell(name, parent="memory://r", drivers=[net], handlers=[site_table()])
            await (await stack.enter_async_context(site)).wait_parent()
        (link,) = [p.link for p in server._router.children.values()]
        before = link.statistics().bytes_sent
        results = await server.stream_many(SITES, "models", "global", DATA, idle=10)
        return results, server.statistics().streams.sent, link.statistics().bytes_sent - before


async def test_stream_many_through_a_relay_that_mounts_nothing() -> None:
    results, sent, upstream = await fan_out([])
    assert {n: r.tobytes().decode() for n, r in results.items() if isinstance(r, Payload)} == {
        n: f"{n} {len(DATA)} True" for n in SITES
    }
    assert sent == 1  # one stream, to the relay's sys/fanout
    assert len(DATA) <= upstream < 1.2 * len(DATA)  # the object crossed the link once


async def test_a_relay_built_without_routing_handlers_answers_no_handler() -> None:
    results, _, _ = await fan_out([], routing_handlers=False)
    assert set(results) == set(SITES)
    for outcome in results.values():
        assert isinstance(outcome, NoHandler), outcome
        assert "sys/fanout" in str(outcome)


@pytest.mark.parametrize("topic", ["fanout", "*"])
async def test_a_users_own_handler_for_the_address_wins(topic: str) -> None:
    mine = HandlerTable("mine")
    seen: list[str] = []

    @mine.stream("sys", topic)
    async def fanout(ctx: Context, stream: IncomingStream) -> bytes:
        seen.append(ctx.topic)
        raise BadRequest("this relay fans out its own way")

    results, _, _ = await fan_out([mine])
    assert seen == ["fanout"]
    for outcome in results.values():
        assert isinstance(outcome, BadRequest), outcome
        assert "its own way" in str(outcome)


def test_defaults_fill_only_what_the_tables_leave() -> None:
    async def take(ctx: Context, stream: IncomingStream) -> None:
        return None

    handler: Any = take
    mine, other, twice = HandlerTable(), HandlerTable(), HandlerTable()
    mine.stream("sys", "fanout")(handler)
    other.request("sys", "*")(handler)
    twice.stream("sys", "fanout")(handler)

    def fanout_of(tables: list[HandlerTable], defaults: list[HandlerTable]) -> object:
        return Dispatch(tables, defaults).lookup(Kind.STREAM, "sys", "fanout")

    assert fanout_of([mine], [routing_handlers()]) is handler
    assert fanout_of([], [routing_handlers()]) not in (None, handler)
    assert fanout_of([], []) is None
    # A request handler on sys/* leaves the stream address to the default.
    assert fanout_of([other], [routing_handlers()]) not in (None, handler)
    # Two tables of the user's for one address still conflict, defaults or not.
    with pytest.raises(ConfigError, match="two handlers for stream sys/fanout"):
        Dispatch([mine, twice], [routing_handlers()])


async def test_a_cell_beside_the_tree_fans_out_where_the_paths_part() -> None:
    """A sender that is not above its destinations (an admin's session below the server, a
    site sending to other sites) sends one stream up, to the nearest cell above them all,
    which fans it out; the sites see it come from the sender (its origin), not the relays."""
    net = MemoryNetwork()
    origins: dict[str, str] = {}
    table = HandlerTable()

    @table.stream("models", "global")
    async def take(ctx: Context, stream: IncomingStream) -> bytes:
        origins[ctx.cell.name] = stream.origin
        return str(len((await stream.read_all()).tobytes())).encode()

    sites = ["server.eu.r.s1", "server.eu.r.s2", "server.eu.s3"]
    async with AsyncExitStack() as stack:
        for name, url, parent in (
            ("server", "memory://server", None),
            ("server.eu", "memory://eu", "memory://server"),
            ("server.eu.r", "memory://r", "memory://eu"),
        ):
            cell = Cell(name, listen=[url], parent=parent, drivers=[net])
            await stack.enter_async_context(cell)
            if parent:
                await cell.wait_parent()
        for name in sites:
            parent = "memory://r" if ".r." in name else "memory://eu"
            site = Cell(name, parent=parent, drivers=[net], handlers=[table])
            await (await stack.enter_async_context(site)).wait_parent()
        ops = await stack.enter_async_context(
            Cell("server.ops", parent="memory://server", drivers=[net])
        )
        await ops.wait_parent()
        results = await ops.stream_many(sites, "models", "global", DATA, idle=10)
        assert {
            n: r.tobytes() for n, r in results.items() if isinstance(r, Payload)
        } == dict.fromkeys(sites, str(len(DATA)).encode())
        assert ops.statistics().streams.sent == 1  # one stream, to server.eu's sys/fanout
        assert origins == dict.fromkeys(sites, "server.ops")
        # a lone destination, or one above the others, is sent to directly
        alone = await ops.stream_many(["server.eu.s3"], "models", "global", DATA, idle=10)
        assert isinstance(alone["server.eu.s3"], Payload)
        assert ops.statistics().streams.sent == 2
