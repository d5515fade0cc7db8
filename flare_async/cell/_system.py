"""The built-in ``sys`` handlers: what every cell serves for the fabric's own features
(:func:`routing_handlers`: ``sys/fanout``), and what every role mounts for operators
(:func:`system_handlers`: liveness and introspection, and the routing ones)."""

from __future__ import annotations

import math
import time

import msgspec

from flare_async.cell._handlers import Context, HandlerTable
from flare_async.cell._payload import Payload
from flare_async.cell._stream_api import FanoutOutcome, FanoutRequest
from flare_async.cell._stream_in import (
    FANOUT_CHANNEL,
    FANOUT_TOPIC,
    ORIGIN_HEADER,
    IncomingStream,
)
from flare_async.errors import BadRequest, FlareError

_json = msgspec.json.Encoder()


class CellInfo(msgspec.Struct, frozen=True):
    """What ``sys/info`` answers (JSON)."""

    name: str
    parent: str | None
    children: list[str]
    statistics: dict[str, object]


class Reach(msgspec.Struct, frozen=True):
    """What ``sys/reach`` answers (JSON): can this cell reach ``dst``, and how fast."""

    dst: str
    ok: bool
    rtt: float | None = None
    error: str | None = None


def system_handlers() -> HandlerTable:
    """The operator's view of a cell.

    * ``sys/ping``: answers ``pong`` followed by the payload.
    * ``sys/info``: JSON :class:`CellInfo` (links and counters).
    * ``sys/reach``: the payload names a destination; this cell pings it and answers JSON
      :class:`Reach` (used by health checks and ``flare-async up`` to test paths end to end).
    * ``sys/fanout`` (stream): as :func:`routing_handlers` (which every cell serves unless
      built with ``routing_handlers=False``; mounted here too for those).
    """
    table = HandlerTable("system")

    @table.request("sys", "ping")
    async def ping(ctx: Context, msg: Payload) -> bytes:
        return b"pong " + msg.tobytes()

    @table.request("sys", "info")
    async def info(ctx: Context, msg: Payload) -> bytes:
        cell = ctx.cell
        stats = msgspec.structs.asdict(cell.statistics())
        return _json.encode(CellInfo(cell.name, cell.parent_name, cell.children, stats))

    @table.request("sys", "reach")
    async def reach(ctx: Context, msg: Payload) -> bytes:
        dst = msg.tobytes().decode(errors="replace")
        start = time.perf_counter()
        left = ctx.remaining()
        try:
            await ctx.cell.request(
                dst, "sys", "ping", b"reach", timeout=None if math.isinf(left) else left
            )
        except FlareError as exc:
            return _json.encode(Reach(dst, ok=False, error=f"{type(exc).__name__}: {exc}"))
        return _json.encode(Reach(dst, ok=True, rtt=time.perf_counter() - start))

    _add_fanout(table)
    return table


def routing_handlers() -> HandlerTable:
    """What a cell serves for the fabric's routing features, mounted by every cell unless it
    is built with ``Cell(routing_handlers=False)``; a table the user mounts with a handler for
    the same address wins (``Dispatch(defaults=)``).

    * ``sys/fanout`` (stream): feeds one incoming stream to several cells below this one
      (``Cell.stream_many`` through relays); answers JSON ``{dst: FanoutOutcome}``.
    """
    table = HandlerTable("routing")
    _add_fanout(table)
    return table


def _add_fanout(table: HandlerTable) -> None:
    @table.stream(FANOUT_CHANNEL, FANOUT_TOPIC)
    async def fanout(ctx: Context, stream: IncomingStream) -> bytes:
        try:
            request = msgspec.json.decode(stream.headers.get("fanout", ""), type=FanoutRequest)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"bad fan-out request: {exc}") from None
        me = ctx.cell.name
        strangers = [t for t in request.targets if not t.startswith(me + ".")]
        if strangers or not request.targets:
            raise BadRequest(f"{me} fans out only to cells below it, not {strangers}")
        headers = {k: v for k, v in stream.headers.items() if k != "fanout"}
        headers[ORIGIN_HEADER] = stream.origin  # who sent it to this relay (or further up)
        results = await ctx.cell.stream_many(
            request.targets,
            request.channel,
            request.topic,
            stream,
            size=stream.size,
            chunk=stream.chunk,
            window=stream.window,
            digest=stream.digest_requested,
            idle=stream.idle,
            codec=request.codec,
            headers=headers,
        )
        outcomes = {
            dst: FanoutOutcome(ok=True, reply=r.tobytes(), codec=r.codec)
            if isinstance(r, Payload)
            else FanoutOutcome(
                ok=False,
                error=str(r.args[0]) if r.args else "",
                kind=type(r).__name__,
                reported_by=r.reported_by,
            )
            for dst, r in results.items()
        }
        return _json.encode(outcomes)
