"""The built-in ``sys`` handlers: what every cell serves for the fabric's own features
(:func:`routing_handlers`: ``sys/fanout``), and what every role mounts for operators
(:func:`system_handlers`: liveness and introspection, and the routing ones)."""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict

import msgspec

from flare_async.cell._handlers import Context, HandlerTable
from flare_async.cell._inline import InlineStream
from flare_async.cell._payload import Payload
from flare_async.cell._stream_api import PARK_TOPIC, FanoutOutcome, FanoutRequest
from flare_async.cell._stream_in import (
    FANOUT_CHANNEL,
    FANOUT_TOPIC,
    ORIGIN_HEADER,
    IncomingStream,
)
from flare_async.errors import BadRequest, FlareError
from flare_async.streaming import DEFAULT_WINDOW

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
    * ``sys/fanout-targets`` (request): parks a target list too long for a fan-out's header
      (JSON list of names); answers the ref the fan-out then names.
    """
    table = HandlerTable("routing")
    _add_fanout(table)
    return table


class _Parked:
    """Target lists parked at this relay for fan-outs to come (``sys/fanout-targets``), by
    (sender, ref), each taken once; at most :data:`PARKED_LISTS` lists and
    :data:`PARKED_NAMES` names in all, the oldest dropped first."""

    def __init__(self) -> None:
        self._lists: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        self._names = 0

    def park(self, src: str, targets: list[str]) -> str:
        if not targets or len(targets) > PARKED_NAMES:
            raise BadRequest(f"a parked target list holds 1 to {PARKED_NAMES} names")
        ref = secrets.token_hex(8)
        self._lists[(src, ref)] = targets
        self._names += len(targets)
        while len(self._lists) > PARKED_LISTS or self._names > PARKED_NAMES:
            _, dropped = self._lists.popitem(last=False)
            self._names -= len(dropped)
        return ref

    def take(self, src: str, ref: str) -> list[str]:
        targets = self._lists.pop((src, ref), None)
        if targets is None:
            raise BadRequest(f"no target list {ref!r} parked here by {src}")
        self._names -= len(targets)
        return targets


PARKED_LISTS = 64
"""Target lists a relay keeps parked at most (the oldest goes first)."""
PARKED_NAMES = 1_000_000
"""Names a relay keeps parked at most, over all lists."""


def _add_fanout(table: HandlerTable) -> None:
    parked = _Parked()

    @table.request(FANOUT_CHANNEL, PARK_TOPIC)
    async def park(ctx: Context, msg: Payload) -> bytes:
        try:
            targets = msgspec.json.decode(msg.tobytes(), type=list[str])
        except msgspec.DecodeError as exc:
            raise BadRequest(f"bad target list: {exc}") from None
        return parked.park(ctx.src, targets).encode()

    @table.stream(FANOUT_CHANNEL, FANOUT_TOPIC)
    async def fanout(ctx: Context, stream: IncomingStream) -> bytes:
        try:
            request = msgspec.json.decode(stream.headers.get("fanout", ""), type=FanoutRequest)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"bad fan-out request: {exc}") from None
        targets = parked.take(stream.src, request.ref) if request.ref else request.targets
        me = ctx.cell.name
        strangers = [t for t in targets if not t.startswith(me + ".")]
        if strangers or not targets:
            raise BadRequest(f"{me} fans out only to cells below it, not {strangers[:10]}")
        headers = {k: v for k, v in stream.headers.items() if k != "fanout"}
        headers[ORIGIN_HEADER] = stream.origin  # who sent it to this relay (or further up)
        inline = isinstance(stream, InlineStream)
        results = await ctx.cell.stream_many(
            targets,
            request.channel,
            request.topic,
            stream.parts if isinstance(stream, InlineStream) else stream,
            sha256=stream.digest if inline else "",
            size=stream.size,
            chunk=None if inline else stream.chunk,
            window=DEFAULT_WINDOW if inline else stream.window,
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
