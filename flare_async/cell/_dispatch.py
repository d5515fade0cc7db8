"""Handler workers: a bounded queue and a pool of tasks that grows on demand.

Workers are long-lived tasks (no task creation per message); the pool grows only while every
worker is busy, up to ``max_concurrency``, so a cell that handles little stays small (10,000
edge cells in one process must be cheap). A full queue refuses new work at once instead of
making the link reader wait.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import anyio

from flare_async._concurrency import Channel
from flare_async.cell._api import CellAPI
from flare_async.cell._handlers import AnyHandler, Context
from flare_async.cell._payload import Payload, as_payload
from flare_async.cell._port import Port
from flare_async.errors import (
    BadRequest,
    ConfigError,
    DecodeError,
    IntegrityError,
    Overloaded,
    ProtocolError,
    Status,
    StreamError,
    Unauthorized,
    status_for_error,
)
from flare_async.wire import Error, Event, Frame, Reply, Request, originate

_RELEASED = Payload()
_RELEASED_HEADER = originate(Event, 0, "-", "-", channel="", topic="")


async def _released(ctx: Context, payload: Payload) -> None:
    """A finished job's handler (never run: the job is not queued again)."""


_PASSED_THROUGH = (BadRequest, Unauthorized, IntegrityError, Overloaded, StreamError, DecodeError)
"""Errors a handler raises on purpose (or a stream it read failed with): their status and
message go back to the caller."""


class Job:
    """One request or event waiting for, or running in, a handler."""

    __slots__ = ("deadline", "expired", "finished", "fn", "header", "payload", "scope")

    def __init__(
        self, header: Request | Event, payload: Payload, fn: AnyHandler, deadline: float
    ) -> None:
        self.header = header
        self.payload = payload
        self.fn = fn
        self.deadline = deadline
        self.scope: anyio.CancelScope | None = None
        self.expired = False
        self.finished = False

    @property
    def live(self) -> bool:
        return not self.finished

    def expire(self) -> None:
        """Deadline passed: cancel the handler if it runs; otherwise it will not be started."""
        self.expired = True
        if self.scope is not None:
            self.scope.cancel()


class Workers:
    """The handler pool of one cell: runs handlers with ``face`` as their ``ctx.cell`` and
    sends their answers through ``port``."""

    def __init__(
        self,
        port: Port,
        face: CellAPI,
        max_concurrency: int,
        queue_size: int,
        idle_workers: int | None = None,
    ) -> None:
        if max_concurrency < 1 or queue_size < 0:
            raise ConfigError("max_concurrency must be >= 1 and queue_size >= 0")
        if idle_workers is not None and idle_workers < 0:
            raise ConfigError("idle_workers must be >= 0")
        self._port = port
        self._face = face
        self.max_concurrency = max_concurrency
        self.idle_workers = max_concurrency if idle_workers is None else idle_workers
        """Workers that wait when the queue is empty; the others end (one starts on demand)."""
        self.queue_size = queue_size
        self._queue: Channel[Job] = Channel(queue_size + max_concurrency)
        self.count = 0
        self.busy = 0
        self.handled = 0
        self.rejected = 0

    def submit(self, job: Job) -> bool:
        """Queue a job without waiting; False when the queue is full (caller answers Overloaded)
        or the cell is shutting down."""
        if not self._port.running or self.busy >= self.max_concurrency + self.queue_size:
            self.rejected += 1
            return False
        self._queue.put_nowait(job)
        self.busy += 1
        if not math.isinf(job.deadline):
            self._port.expire_at(job.deadline, job)
        if self.busy > self.count and self.count < self.max_concurrency:
            self.count += 1
            self._port.spawn(self._work, name=f"{self._port.name} worker {self.count}")
        return True

    async def _work(self) -> None:
        """Run jobs one after another inside one long-lived cancel scope.

        The deadline timer cancels the scope when the running job's deadline passes; only then
        is a new scope made. Entering a scope per job would cost more than the job's routing.
        """
        name = self._port.name
        while True:
            running: Job | None = None
            late: Job | None = None
            with anyio.CancelScope() as scope:
                while late is None:
                    if not len(self._queue) and self.count > self.idle_workers:
                        self.count -= 1  # submit() starts another when one is needed
                        return
                    job = await self._queue.get()
                    try:
                        if job.expired:
                            await self._answer(job, *_deadline_status(name))
                            continue
                        running, job.scope = job, scope
                        outcome = await self._call(job)
                        running, job.scope = None, None
                        if scope.cancel_called:
                            # The deadline passed just as the handler finished (or it ignored
                            # the cancellation): this scope is spent, and the next job must
                            # not run in it. Answer outside, then take a fresh scope.
                            late = job
                        else:
                            await self._answer(job, *outcome)
                    finally:
                        job.finished = True
                        # The timer may hold the job until its deadline: what it holds goes
                        # (the handler, an inline request's closure, the header: 7 KB a site
                        # in a simulation), the header only once answered (a late job is
                        # answered below, as is one whose deadline cancelled it).
                        job.payload = _RELEASED
                        job.fn = _released
                        if late is not job and not scope.cancel_called:
                            job.header = _RELEASED_HEADER
                        self.busy -= 1
                        self.handled += 1
            # Only our own scope's cancellation is caught here (the timer expired the running
            # job); the task group's cancellation propagates.
            if scope.cancelled_caught and running is not None:
                late = running
            if late is not None:
                await self._answer(late, *_deadline_status(name))

    async def _call(self, job: Job) -> tuple[Status | None, str, Any]:
        port = self._port
        h = job.header
        ctx = Context(
            self._face,
            h.src,
            h.channel,
            h.topic,
            h.id,
            h.route,
            h.headers,
            job.deadline,
            port.clock,
        )
        try:
            return None, "", await job.fn(ctx, job.payload)
        except Exception as exc:
            return (*handler_failure(port, exc, h.channel, h.topic, h.src), None)

    async def _answer(self, job: Job, status: Status | None, message: str, result: Any) -> None:
        """Send the reply or error for a finished request; log a failed event."""
        port = self._port
        h = job.header
        if isinstance(h, Event):
            if status is not None:
                port.log.warning(
                    "event handler failed",
                    channel=h.channel,
                    topic=h.topic,
                    src=h.src,
                    reason=message,
                )
            return
        budget = None if math.isinf(job.deadline) else job.deadline - port.clock()
        if status is None:
            try:
                body = as_payload(result)
            except TypeError as exc:
                ref = uuid.uuid4().hex[:12]
                port.log.error(  # noqa: TRY400 - the reply is bad, not our code
                    "handler returned a bad reply", ref=ref, error=str(exc)
                )
                status = Status.INTERNAL
                message = f"internal error in {port.name}: bad reply type (ref {ref})"
            else:
                reply = originate(
                    Reply,
                    port.next_id(),
                    port.name,
                    h.src,
                    budget=budget,
                    headers=dict(body.headers),
                    corr=h.id,
                    codec=body.codec,
                )
                expires = None if budget is None else job.deadline
                await port.answer(port.seal(Frame(reply, body.parts, expires)))
                return
        err = originate(
            Error,
            port.next_id(),
            port.name,
            h.src,
            budget=budget,
            corr=h.id,
            status=int(status),
            message=message,
        )
        await port.answer(port.seal(Frame(err, (), None if budget is None else job.deadline)))


def handler_failure(
    port: Port, exc: Exception, channel: str, topic: str, src: str
) -> tuple[Status, str]:
    """The status and message a handler's exception sends back: its own for the errors a
    handler raises on purpose (and stream errors), else ``INTERNAL`` with a reference whose
    traceback is logged here and never leaves this cell."""
    if isinstance(exc, _PASSED_THROUGH):
        return status_for_error(exc), str(exc)
    if isinstance(exc, ProtocolError):  # the peer broke the protocol (a stream read says so)
        return Status.BAD_REQUEST, str(exc)
    ref = uuid.uuid4().hex[:12]
    port.log.error("handler failed", ref=ref, channel=channel, topic=topic, src=src, exc_info=exc)
    return Status.INTERNAL, f"internal error in {port.name} handling {channel}/{topic} (ref {ref})"


def _deadline_status(cell_name: str) -> tuple[Status, str, None]:
    return Status.DEADLINE_EXCEEDED, f"handler cancelled at the deadline in {cell_name}", None
