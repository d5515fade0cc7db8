"""Handlers the deployment tests mount on a cell process with ``--handlers``."""

from __future__ import annotations

import anyio

from flare_async import Context, HandlerTable, Payload
from flare_async.cli._kit import emit


def table() -> HandlerTable:
    t = HandlerTable("test")

    @t.request("test", "slow")
    async def slow(ctx: Context, msg: Payload) -> bytes:
        emit("slow-started", cell=ctx.cell.name)
        await anyio.sleep(float(msg.tobytes()))
        return b"slept"

    return t
