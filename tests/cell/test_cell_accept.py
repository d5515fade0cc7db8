"""A cell's accept rule (a site's policy): refused requests and streams get Unauthorized."""

from __future__ import annotations

import pytest

from flare_async import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.errors import Unauthorized
from flare_async.transport import MemoryNetwork

pytestmark = pytest.mark.anyio


async def test_refused_requests_and_streams_get_unauthorized() -> None:
    table = HandlerTable()

    @table.request("open", "echo")
    async def echo(ctx: Context, msg: Payload) -> bytes:
        return msg.tobytes()

    @table.request("secret", "echo")
    async def secret(ctx: Context, msg: Payload) -> bytes:
        raise AssertionError("must not run")

    @table.stream("secret", "put")
    async def put(ctx: Context, stream: IncomingStream) -> bytes:
        raise AssertionError("must not run")

    net = MemoryNetwork()
    seen: list[tuple[str, str, str]] = []

    def accept(src: str, channel: str, topic: str) -> bool:
        seen.append((src, channel, topic))
        return channel != "secret"

    async with (
        Cell("server", listen=["memory://server"], drivers=[net]) as server,
        Cell(
            "server.site", parent="memory://server", drivers=[net], handlers=[table], accept=accept
        ) as site,
    ):
        await site.wait_parent()
        assert (await server.request("server.site", "open", "echo", b"hi")).tobytes() == b"hi"
        with pytest.raises(Unauthorized, match="does not accept secret/echo from server"):
            await server.request("server.site", "secret", "echo", b"hi")
        with pytest.raises(Unauthorized, match="does not accept secret/put"):
            await server.stream("server.site", "secret", "put", b"x" * 1000)
    assert ("server", "secret", "put") in seen
