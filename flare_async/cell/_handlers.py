"""Handler tables: declare what a cell answers, mount the tables, freeze them at start.

Shaped after aiohttp's ``RouteTableDef``: a table only records definitions; a
:class:`~flare_async.Cell` merges the tables it is given into one frozen dispatch map when it
starts, and refuses two handlers for the same kind, channel and topic.

Handlers are plain async functions::

    table = HandlerTable()

    @table.request("admin", "echo")
    async def echo(ctx: Context, msg: Payload) -> bytes:
        return msg.tobytes()

    @table.event("metrics", "*")          # "*" matches any topic of the channel
    async def on_metric(ctx: Context, msg: Payload) -> None: ...

A request handler returns the reply (``Payload``, bytes-like, or ``None`` for an empty reply)
or raises. :class:`~flare_async.errors.BadRequest`, :class:`~flare_async.errors.Unauthorized`
and :class:`~flare_async.errors.Overloaded` travel back with their message; any other
exception becomes :class:`~flare_async.errors.InternalError` whose text stays here. A handler
runs inside a cancel scope bound to the caller's deadline: when the deadline passes, it is
cancelled.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from flare_async.cell._api import CellAPI
from flare_async.cell._payload import Payload
from flare_async.errors import ConfigError, Status
from flare_async.wire import Buffer

WILDCARD = "*"


class Kind(enum.Enum):
    """What a handler answers."""

    REQUEST = "request"
    EVENT = "event"
    STREAM = "stream"


class Context:
    """What a handler knows about the message it is handling.

    Attributes:
        cell: the cell running the handler (to make calls of its own).
        src: the origin cell's name.
        channel / topic: what was addressed.
        msg_id: the message id, unique per origin.
        route: cells the message passed through, origin first.
        headers: the message's extension headers.
        deadline: the caller's deadline on this cell's clock (``inf`` when none).
    """

    __slots__ = (
        "_clock",
        "cell",
        "channel",
        "deadline",
        "headers",
        "msg_id",
        "route",
        "src",
        "topic",
    )

    def __init__(
        self,
        cell: CellAPI,
        src: str,
        channel: str,
        topic: str,
        msg_id: int,
        route: Sequence[str],
        headers: Mapping[str, str],
        deadline: float,
        clock: Callable[[], float],
    ) -> None:
        self.cell = cell
        self._clock = clock
        self.src = src
        self.channel = channel
        self.topic = topic
        self.msg_id = msg_id
        self.route = route
        self.headers = headers
        self.deadline = deadline

    def remaining(self) -> float:
        """Seconds left until the caller's deadline (``inf`` when it has none)."""
        return self.deadline - self._clock()


RequestHandler = Callable[[Context, Payload], Awaitable[Payload | Buffer | None]]
EventHandler = Callable[[Context, Payload], Awaitable[None]]
AnyHandler = Callable[[Context, Payload], Awaitable[Any]]
_F = TypeVar("_F", bound=AnyHandler)
_S = TypeVar("_S", bound=Callable[..., Awaitable[Any]])


class HandlerDef:
    """One recorded handler definition."""

    __slots__ = ("channel", "fn", "kind", "topic")

    def __init__(self, kind: Kind, channel: str, topic: str, fn: AnyHandler) -> None:
        self.kind = kind
        self.channel = channel
        self.topic = topic
        self.fn = fn

    @property
    def key(self) -> tuple[Kind, str, str]:
        return (self.kind, self.channel, self.topic)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<{self.kind.value} {self.channel}/{self.topic} -> {name}>"


def _check_address(channel: str, topic: str) -> None:
    if not channel or not isinstance(channel, str):
        raise ConfigError("a handler needs a non-empty channel")
    if channel == WILDCARD:
        raise ConfigError("the channel cannot be a wildcard; only the topic can")
    if not topic or not isinstance(topic, str):
        raise ConfigError("a handler needs a non-empty topic (or '*' for any)")


class HandlerTable:
    """A list of handler definitions, to be mounted on one or more cells."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._defs: list[HandlerDef] = []

    def __iter__(self) -> Any:
        return iter(self._defs)

    def __len__(self) -> int:
        return len(self._defs)

    def add(self, kind: Kind, channel: str, topic: str, fn: AnyHandler) -> None:
        """Record ``fn`` as the handler for ``kind`` messages on ``channel``/``topic``.

        Raises:
            ConfigError: empty channel or topic, or a wildcard channel.
        """
        _check_address(channel, topic)
        self._defs.append(HandlerDef(kind, channel, topic, fn))

    def request(self, channel: str, topic: str = WILDCARD) -> Callable[[_F], _F]:
        """Decorator: handle requests on ``channel``/``topic``."""

        def deco(fn: _F) -> _F:
            self.add(Kind.REQUEST, channel, topic, fn)
            return fn

        return deco

    def event(self, channel: str, topic: str = WILDCARD) -> Callable[[_F], _F]:
        """Decorator: handle events on ``channel``/``topic``."""

        def deco(fn: _F) -> _F:
            self.add(Kind.EVENT, channel, topic, fn)
            return fn

        return deco

    def stream(self, channel: str, topic: str = WILDCARD) -> Callable[[_S], _S]:
        """Decorator: receive streams on ``channel``/``topic``.

        The handler is called as ``await fn(ctx, stream)`` with an
        :class:`~flare_async.cell.IncomingStream`; what it returns goes back to the sender.
        """

        def deco(fn: _S) -> _S:
            self.add(Kind.STREAM, channel, topic, fn)
            return fn

        return deco


class Dispatch:
    """The frozen dispatch map a cell builds from its tables at start.

    ``defaults`` are the cell's own tables (``sys/fanout``, :func:`~flare_async.cell._system.
    routing_handlers`): each of their handlers is added only where the ``tables`` have none
    for that kind, channel and topic, exactly or by a ``*`` topic, so a user's handler wins.
    """

    __slots__ = ("_map",)

    def __init__(
        self, tables: Iterable[HandlerTable], defaults: Iterable[HandlerTable] = ()
    ) -> None:
        found: dict[tuple[Kind, str, str], HandlerDef] = {}
        for table in tables:
            for d in table:
                if d.key in found:
                    raise ConfigError(
                        f"two handlers for {d.kind.value} {d.channel}/{d.topic}: "
                        f"{found[d.key]!r} and {d!r}"
                    )
                found[d.key] = d
        given = set(found)
        for table in defaults:
            for d in table:
                if d.key not in given and (d.kind, d.channel, WILDCARD) not in given:
                    found.setdefault(d.key, d)
        self._map = {key: d.fn for key, d in found.items()}

    def lookup(self, kind: Kind, channel: str, topic: str) -> AnyHandler | None:
        fn = self._map.get((kind, channel, topic))
        if fn is None:
            fn = self._map.get((kind, channel, WILDCARD))
        return fn

    def admit(
        self,
        kind: Kind,
        src: str,
        channel: str,
        topic: str,
        *,
        accept: Callable[[str, str, str], bool] | None,
        me: str,
    ) -> AnyHandler | tuple[Status, str]:
        """The handler for a request, event or stream from ``src``, or why it is refused: no
        handler, then the cell's policy (``accept``), in that order for every kind. Capacity
        (a full handler queue, too many streams) is the caller's to check, last."""
        fn = self.lookup(kind, channel, topic)
        if fn is None:
            return Status.NO_HANDLER, f"no {kind.value} handler for {channel}/{topic}"
        if accept is not None and not accept(src, channel, topic):
            return Status.UNAUTHORIZED, f"{me} does not accept {channel}/{topic} from {src}"
        return fn

    def __len__(self) -> int:
        return len(self._map)
