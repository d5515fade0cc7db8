"""The narrow port through which a cell's parts reach its router.

The router (``_router.py``) owns the peers, the pending requests, the deadline timer, message
ids and the cell's task group. The handler workers (``_dispatch.py``) and the stream hub
(``_stream_in.py`` / ``_stream_out.py``) see only this port: they send frames, start tasks,
read the clock and ask whether a message may reach a handler, and never the ``Cell`` itself.
Calls go one way: the cell wires its parts together, the parts call the port.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from flare_async.cell._deadlines import Expirable
from flare_async.cell._handlers import AnyHandler, Kind
from flare_async.errors import Status
from flare_async.wire import Frame, Limits


class Port(Protocol):
    """What the workers and the stream hub may ask of the router."""

    @property
    def name(self) -> str:
        """The cell's name."""
        ...

    @property
    def limits(self) -> Limits:
        """The cell's wire limits."""
        ...

    @property
    def running(self) -> bool:
        """False once the cell is shutting down."""
        ...

    @property
    def log(self) -> Any:
        """The cell's bound logger."""
        ...

    def clock(self) -> float:
        """The event loop's clock (the one deadlines are on)."""
        ...

    def next_id(self) -> int:
        """A fresh message id."""
        ...

    def random(self) -> float:
        """Jitter in [0, 1) from the cell's seeded generator."""
        ...

    def spawn(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str | None = None
    ) -> bool:
        """Start a task in the cell's group; False (nothing started) once shutting down."""
        ...

    def expire_at(self, deadline: float, item: Expirable) -> None:
        """Have ``item.expire()`` called at ``deadline`` if it is still live then."""
        ...

    def seal(self, frame: Frame) -> Frame:
        """Sign a frame this cell originates (when the cell signs)."""
        ...

    def post(self, frame: Frame) -> None:
        """Send a small frame nobody waits for; never waits, never raises."""
        ...

    async def send(self, frame: Frame, deadline: float = ...) -> None:
        """Route a frame this cell originates and send it, waiting for room until
        ``deadline`` (a link that takes nothing for as long as a silent link lives counts as
        full).

        Raises:
            Unreachable / TransportError / ProtocolError / DeadlineExceeded: not sent.
        """
        ...

    async def answer(self, frame: Frame) -> None:
        """Route a reply or error back to its origin, waiting for room until its deadline;
        failures are counted and logged, never raised."""
        ...

    def admit(
        self, kind: Kind, src: str, channel: str, topic: str
    ) -> AnyHandler | tuple[Status, str]:
        """The handler a call or stream from ``src`` reaches, or why it is refused (no handler,
        then the cell's policy)."""
        ...


__all__ = ["Port"]
