"""What a handler can do with the cell running it: :attr:`Context.cell`'s type.

A protocol, not the ``Cell`` class: the handler workers and the stream hub, which make the
contexts, sit below the ``Cell`` that composes them and never import it. ``Cell`` satisfies
this protocol (mypy checks it where the cell hands itself to its parts); the methods'
documentation is on ``Cell``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import msgspec

from flare_async.cell._payload import Payload
from flare_async.cell._sources import StreamSource
from flare_async.errors import FlareError
from flare_async.streaming import Progress
from flare_async.wire import Buffer

ProgressCallback = Callable[[Progress], None]
"""Called with a stream's :class:`~flare_async.streaming.Progress` as the receiver commits."""

Seal = Callable[[str, str], Mapping[str, str]]
"""``(dst, digest) -> headers`` for a stream's end message (a signature over the digest,
which comes in text form: ``"blake3:<hex>"``)."""

Body = Payload | Buffer | None


class StreamStatistics(msgspec.Struct, frozen=True):
    """A cell's stream counters (``CellStatistics.streams``)."""

    receiving: int = 0
    """Streams being received now."""
    sending: int = 0
    """Streams being sent now."""
    received: int = 0
    """Streams accepted for receiving, in all."""
    sent: int = 0
    """Streams started (one per destination), in all."""
    damaged_chunks: int = 0
    """Chunks that failed their CRC here (asked again)."""
    resends_asked: int = 0
    """Acknowledgements asking a sender to send again from the committed offset."""
    resumes: int = 0
    """A sender's open or probe for a stream already here, answered with where it stands."""
    rewinds: int = 0
    """As a sender: went back to the receiver's committed offset."""
    probes: int = 0
    """As a sender: asked where the receiver stands after a quiet probe interval."""
    waits: int = 0
    """As a sender: opened again after the receiver had no slot for the stream."""
    failed: int = 0
    """As a sender: gave up after the idle limit without progress."""
    inline_sent: int = 0
    """Small objects sent whole in one request instead (one per destination), in all."""
    inline_received: int = 0
    """Small objects received whole in one request, admitted to a stream handler, in all."""


class CellStatistics(msgspec.Struct, frozen=True):
    """A snapshot of a cell's queues and counters (see :meth:`Cell.statistics`)."""

    name: str
    children: int
    has_parent: bool
    pending_requests: int
    handlers_busy: int
    handler_queue_size: int
    workers: int
    handled: int
    forwarded: int
    rejected_overloaded: int
    errors_returned: int
    undeliverable: int
    bad_signatures: int = 0
    """Messages refused because their signature failed (``Cell(signing=)``)."""
    backlog: int = 0
    """Frames forwarded to a peer whose link was full, waiting for it (a full link holds up
    only its own frames)."""
    streams: StreamStatistics = msgspec.field(default_factory=StreamStatistics)
    """Stream counters."""


class CellAPI(Protocol):
    """The calls a handler may make through ``ctx.cell`` (see :class:`~flare_async.Cell`)."""

    @property
    def name(self) -> str: ...

    @property
    def parent_name(self) -> str | None:
        """See :attr:`Cell.parent_name <flare_async.Cell.parent_name>`."""
        ...

    @property
    def children(self) -> list[str]:
        """See :attr:`Cell.children <flare_async.Cell.children>`."""
        ...

    def statistics(self) -> CellStatistics:
        """See :meth:`Cell.statistics <flare_async.Cell.statistics>`."""
        ...

    def encode(self, obj: Any, codec: str | None = None, *, channel: str | None = None) -> Payload:
        """See :meth:`Cell.encode <flare_async.Cell.encode>`."""
        ...

    def decode(self, payload: Payload) -> Any:
        """See :meth:`Cell.decode <flare_async.Cell.decode>`."""
        ...

    async def request(
        self,
        dst: str,
        channel: str,
        topic: str,
        payload: Body = None,
        *,
        timeout: float | Any | None = ...,
        headers: Mapping[str, str] | None = None,
    ) -> Payload:
        """See :meth:`Cell.request <flare_async.Cell.request>`."""
        ...

    async def send_event(
        self,
        dst: str,
        channel: str,
        topic: str,
        payload: Body = None,
        *,
        timeout: float | Any | None = ...,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """See :meth:`Cell.send_event <flare_async.Cell.send_event>`."""
        ...

    async def broadcast(
        self,
        dsts: Iterable[str],
        channel: str,
        topic: str,
        payload: Body = None,
        *,
        timeout: float | Any | None = ...,
        headers: Mapping[str, str] | None = None,
    ) -> Mapping[str, Payload | FlareError]:
        """See :meth:`Cell.broadcast <flare_async.Cell.broadcast>`."""
        ...

    async def stream(
        self,
        dst: str,
        channel: str,
        topic: str,
        source: StreamSource,
        *,
        size: int | None = None,
        chunk: int | None = None,
        window: int = ...,
        digest: bool | str = True,
        sha256: str = "",
        idle: float = 60.0,
        probe: float | None = None,
        codec: str = "",
        headers: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        seal: Seal | None = None,
    ) -> Payload:
        """See :meth:`Cell.stream <flare_async.Cell.stream>`."""
        ...

    async def stream_many(
        self,
        dsts: Iterable[str],
        channel: str,
        topic: str,
        source: StreamSource,
        *,
        size: int | None = None,
        chunk: int | None = None,
        window: int = ...,
        digest: bool | str = True,
        sha256: str = "",
        idle: float = 60.0,
        probe: float | None = None,
        codec: str = "",
        headers: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        seal: Seal | None = None,
        via_relays: bool = True,
    ) -> dict[str, Payload | FlareError]:
        """See :meth:`Cell.stream_many <flare_async.Cell.stream_many>`."""
        ...


__all__ = [
    "Body",
    "CellAPI",
    "CellStatistics",
    "ProgressCallback",
    "Seal",
    "StreamStatistics",
]
