"""``Cell.request``, ``Cell.send_event`` and ``Cell.broadcast``: the public face of calls.

A mixin of :class:`~flare_async.Cell` (as ``_stream_api.py`` is for streams), over the
router the cell composes: a request is a waiter in the router's pending table, an entry in its
deadline timer, and a frame routed by :meth:`Router.send`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

import anyio

from flare_async.cell._api import Body
from flare_async.cell._payload import Payload, as_payload
from flare_async.cell._router import Router
from flare_async.cell._rpc import Waiter
from flare_async.errors import CellClosed, ConfigError, DeadlineExceeded, FlareError
from flare_async.routing import validate_name
from flare_async.wire import Event, Frame, Request, originate

DEFAULT: Final = object()
"""The cell's own default timeout (``Cell(default_timeout=)``)."""

Outcome = Payload | FlareError


class BroadcastResults(dict[str, Outcome]):
    """Per-target outcomes of :meth:`Cell.broadcast`: a reply payload or the error, per name."""

    @property
    def replies(self) -> dict[str, Payload]:
        return {k: v for k, v in self.items() if isinstance(v, Payload)}

    @property
    def errors(self) -> dict[str, FlareError]:
        return {k: v for k, v in self.items() if isinstance(v, FlareError)}


class CallsMixin:
    """The request, event and broadcast methods of :class:`~flare_async.Cell`, which sets
    what they use."""

    name: str
    default_timeout: float | None
    _router: Router

    def _check_running(self) -> None:
        if not self._router.running:
            raise CellClosed(f"cell {self.name} is not running")

    def _timeout(self, timeout: float | object | None) -> float | None:
        value = self.default_timeout if timeout is DEFAULT else timeout
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value)
        ):
            raise ConfigError(f"timeout must be a number of seconds or None, not {value!r}")
        return value

    def _call(
        self,
        kind: type[Request] | type[Event],
        dst: str,
        channel: str,
        topic: str,
        payload: Body,
        timeout: float | object | None,
        headers: Mapping[str, str] | None,
    ) -> tuple[Frame, int, float]:
        """The sealed frame of a request or event this cell originates, its id, and its
        deadline on this cell's clock (``inf``: none)."""
        self._check_running()
        validate_name(dst)
        body = as_payload(payload)
        budget = self._timeout(timeout)
        if kind is Request and budget is not None and budget <= 0:
            raise DeadlineExceeded(f"request to {dst} has no time left (timeout {budget})")
        router = self._router
        msg_id = router.next_id()
        header = originate(
            kind,
            msg_id,
            self.name,
            dst,
            budget=budget,
            headers=dict(headers) if headers is not None else dict(body.headers),
            channel=channel,
            topic=topic,
            codec=body.codec,
        )
        deadline = math.inf if budget is None else router.clock() + budget
        frame = Frame(header, body.parts, None if budget is None else deadline)
        return router.seal(frame), msg_id, deadline

    async def request(
        self,
        dst: str,
        channel: str,
        topic: str,
        payload: Body = None,
        *,
        timeout: float | Any | None = DEFAULT,
        headers: Mapping[str, str] | None = None,
    ) -> Payload:
        """Send a request and wait for its reply.

        Args:
            dst: destination cell name.
            channel / topic: what to address at the destination.
            payload: the request body.
            timeout: seconds until the deadline, which travels with the message and is enforced
                at every hop and at the handler; ``None`` for none. Defaults to the cell's.
            headers: extension headers (override the payload's).

        Returns:
            The reply payload.

        Raises:
            Unreachable: no route to ``dst`` (reported at once, by this or a relaying cell).
            DeadlineExceeded: no reply before the deadline.
            RemoteError: the destination answered with an error (``NoHandler``,
                ``InternalError``, ``BadRequest``, ``Overloaded``...).
            TransportError: the link the request left on closed or broke before the reply.
            CellClosed: this cell is not running.
            InvalidName: ``dst`` is not a valid cell name.

        Cancelling the caller abandons the request; a reply arriving later is dropped.
        """
        call = self._call(Request, dst, channel, topic, payload, timeout, headers)
        frame, msg_id, deadline = call
        router = self._router
        waiter = Waiter(dst, f"{channel}/{topic}")
        router.pending.add(msg_id, waiter)
        try:
            if deadline != math.inf:
                router.timer.add(deadline, waiter)
            await router.send(frame, deadline, waiter)
            await waiter.done.wait()
        finally:
            router.pending.pop(msg_id)
            waiter.done.set()  # an abandoned waiter is no longer live for the timer
        # The deadline timer may hold the waiter until its deadline: keep no payload alive.
        reply, waiter.reply = waiter.reply, None
        if reply is not None:
            return reply
        assert waiter.error is not None
        raise waiter.error

    async def send_event(
        self,
        dst: str,
        channel: str,
        topic: str,
        payload: Body = None,
        *,
        timeout: float | Any | None = DEFAULT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a one-way event. Returns once the first hop has taken it.

        A failure further on (no route, no handler, overloaded) comes back as an error report
        that this cell logs; events are at-most-once.

        Raises:
            Unreachable: no route from this cell.
            TransportError: the first hop's link failed.
            CellClosed: this cell is not running.
            InvalidName: ``dst`` is not a valid cell name.
        """
        frame, _, deadline = self._call(Event, dst, channel, topic, payload, timeout, headers)
        await self._router.send(frame, deadline)

    async def broadcast(
        self,
        dsts: Iterable[str],
        channel: str,
        topic: str,
        payload: Body = None,
        *,
        timeout: float | Any | None = DEFAULT,
        headers: Mapping[str, str] | None = None,
    ) -> BroadcastResults:
        """Send one request to many cells at once and collect every outcome.

        The payload buffers are shared by all the requests (encoded once). A target that fails
        is a result, not an exception for all: each name maps to its reply :class:`Payload`
        or to the :class:`~flare_async.errors.FlareError` it ended with.
        """
        self._check_running()
        body = as_payload(payload)
        results = BroadcastResults.fromkeys(dsts)

        async def one(dst: str) -> None:
            try:
                results[dst] = await self.request(
                    dst, channel, topic, body, timeout=timeout, headers=headers
                )
            except FlareError as exc:
                results[dst] = exc

        async with anyio.create_task_group() as tg:
            for dst in results:
                tg.start_soon(one, dst)
        return results  # type: ignore[return-value]


__all__ = ["DEFAULT", "BroadcastResults", "CallsMixin", "Outcome"]
