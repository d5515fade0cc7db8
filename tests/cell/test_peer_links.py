"""Peer links: a cell keeps a direct link to a cell of another branch (``Cell(peers=[url])``);
messages for that cell take it instead of going up the tree, and when it is gone they go
up the tree again."""

from __future__ import annotations

import anyio
import pytest

from flare_async import Cell, MemoryNetwork
from flare_async.cell import Context, HandlerTable, Payload

pytestmark = pytest.mark.anyio


def echo_table(seen: list[list[str]]) -> HandlerTable:
    table = HandlerTable("echo")

    @table.request("t", "echo")
    async def echo(ctx: Context, msg: Payload) -> bytes:
        seen.append(list(ctx.route))
        return msg.tobytes()

    return table


class Links:
    """What ``on_link`` reports, and a way to wait for a link to come up or go down."""

    def __init__(self) -> None:
        self.up: set[tuple[str, str]] = set()
        self.changed = anyio.Event()

    def __call__(self, name: str, role: str, up: bool) -> None:
        (self.up.add if up else self.up.discard)((name, role))
        self.changed.set()
        self.changed = anyio.Event()

    async def wait(self, name: str, role: str, up: bool = True) -> None:
        with anyio.fail_after(10):
            while ((name, role) in self.up) != up:
                await self.changed.wait()


async def test_a_message_to_a_peer_takes_the_peer_link_not_the_tree() -> None:
    net = MemoryNetwork()
    seen: list[list[str]] = []
    links = Links()
    async with (
        Cell("server", listen=["memory://server"], drivers=[net]),
        Cell(
            "server.site-2",
            listen=["memory://site-2"],
            parent="memory://server",
            drivers=[net],
            handlers=[echo_table(seen)],
        ) as s2,
    ):
        await s2.wait_parent()
        async with Cell(
            "server.site-1",
            parent="memory://server",
            peers=["memory://site-2"],
            drivers=[net],
            on_link=links,
        ) as s1:
            await s1.wait_parent()
            await links.wait("server.site-2", "peer")
            assert (await s1.request("server.site-2", "t", "echo", b"hi")).tobytes() == b"hi"
            assert seen[-1] == ["server.site-1"]  # straight over: the server never saw it
        # site-1 is gone; site-2 still answers what comes up the tree.
        async with Cell(
            "server.site-3",
            parent="memory://server",
            peers=["memory://nowhere"],
            drivers=[net],
        ) as s3:
            await s3.wait_parent()  # an unreachable peer does not stop the cell
            echoed = await s3.request("server.site-2", "t", "echo", b"up")
            assert echoed.tobytes() == b"up"
            assert seen[-1] == ["server.site-3", "server"]
