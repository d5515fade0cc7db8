"""The built-in ``sys`` handlers every role mounts: liveness and introspection for operators."""

from __future__ import annotations

import msgspec

from flare_async.cell._handlers import Context, HandlerTable
from flare_async.cell._payload import Payload

_json = msgspec.json.Encoder()


class CellInfo(msgspec.Struct, frozen=True):
    """What ``sys/info`` answers (JSON)."""

    name: str
    parent: str | None
    children: list[str]
    statistics: dict[str, object]


def system_handlers() -> HandlerTable:
    """``sys/ping`` (answers ``pong`` and echoes the payload) and ``sys/info`` (JSON
    :class:`CellInfo`: the cell's links and counters)."""
    table = HandlerTable("system")

    @table.request("sys", "ping")
    async def ping(ctx: Context, msg: Payload) -> bytes:
        return b"pong " + msg.tobytes()

    @table.request("sys", "info")
    async def info(ctx: Context, msg: Payload) -> bytes:
        cell = ctx.cell
        stats = msgspec.structs.asdict(cell.statistics())
        return _json.encode(CellInfo(cell.name, cell.parent_name, cell.children, stats))

    return table
