"""The client side: a site's cell takes tasks for its training script and sends results back.

The training script runs in a worker thread (in-process) and talks to this runtime through the
Client API (:mod:`flare_async.client`): ``receive()`` blocks until a task arrives (or the job
ends), ``send()`` streams the result to the server from the cell's event loop. The thread never
touches the event loop's objects: a thread-safe queue brings tasks in, a blocking portal takes
results out.

Why one file of ~930 lines: the runtime's state (the inbox, the task in hand, where its result
goes, the site's failure, the values waiting for the server) is shared by the three ways a
script runs (a thread, the cell's loop, a worker process) and by the failure path that must
see all of them; split apart, each part would reach into the others' privates. What the
algorithms add (handovers, a swarm's rounds) lives in ``_handoff.py`` and ``_swarm.py``; only
their hooks into that state are here. The worker
process's side of the pipe is ``worker.py``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import inspect
import json
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.from_thread

from flare_async._concurrency import Lock, Signal, SignalLike
from flare_async._memory import return_large_blocks
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.errors import (
    BadRequest,
    CellClosed,
    DeadlineExceeded,
    FlareError,
    RoutingError,
    TransportError,
    Unauthorized,
)
from flare_async.fl._artifact import code_path_env, python
from flare_async.fl._handoff import (
    PASS_TO,
    ROUTE_FIELDS,
    TAKE_FROM,
    TAKE_SHA,
    Handoffs,
    hand_over,
    handed,
)
from flare_async.fl._keys import SWARM_PLAN
from flare_async.fl._model import (
    NUMPY,
    FLModel,
    ParamsType,
    controls_from_meta,
    controls_to_meta,
    model_from_parts,
    model_parts,
    params_format_of,
    script_format,
    to_framework,
    wire_format,
)
from flare_async.fl._privacy import PrivacyFilter, SitePolicy
from flare_async.fl._secagg import SecAggError
from flare_async.fl._secure import SecureSite
from flare_async.fl._signed import CHANNEL, E2E, stream_signed
from flare_async.fl._swarm import SwarmMember, SwarmPlan
from flare_async.fl._tracking import AnalyticsDataType, MetricsBuffer, check_batch, records
from flare_async.security import SignatureVerifier, Signer, encrypt_for
from flare_async.transport import TcpLink
from flare_async.wire import Event, Frame, Limits

_STOP = object()


@dataclass
class _Task:
    """A task as it waits in the inbox."""

    id: str
    model: FLModel
    reply_to: str
    kind: str = "train"
    """The task's name: ``train``, ``validate``, ``submit_model`` (FLARE's names)."""
    format: str = NUMPY
    """The framework the server's model came in (``numpy`` or ``torch``)."""
    pass_to: str = ""
    """The site the result is handed over to (see ``fl/_handoff.py``), if any."""
    swarm_round: int = -1
    """A swarm's round (its result goes to the round's aggregator), or -1."""


def log_records(
    key: str,
    value: Any,
    data_type: AnalyticsDataType | str | int | None,
    step: int | None,
    kwargs: dict[str, Any],
) -> list[dict[str, Any]]:
    """The records of one ``flare.log`` call, in either of its shapes: ours ``log(key, value,
    step)`` and FLARE's ``log(key, value, data_type, global_step=...)``."""
    kind: AnalyticsDataType | str = AnalyticsDataType.SCALAR
    if isinstance(data_type, AnalyticsDataType | str):
        kind = data_type
    elif isinstance(data_type, int) and not isinstance(data_type, bool):
        step = data_type  # log(key, value, 3): ours, with a positional step
    step = kwargs.pop("global_step", kwargs.pop("step", step))
    return records(key, value, kind, step)


_local = threading.local()
_in_loop: contextvars.ContextVar[ClientRuntime | None] = contextvars.ContextVar(
    "flare_async_site", default=None
)
"""The runtime of an async script running on its cell's own event loop (``in_loop``)."""


class SiteRuntime(Protocol):
    """What the Client API calls: a :class:`ClientRuntime` in-process, or the worker
    process's pipe runtime."""

    config: dict[str, Any]

    @property
    def site(self) -> str: ...

    def is_running(self) -> bool: ...

    def receive(self, timeout: float | None = None) -> FLModel | None: ...

    def send(self, model: FLModel) -> None: ...

    def log(
        self,
        key: str,
        value: Any,
        data_type: AnalyticsDataType | str | int | None = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> None: ...

    def track(self, recs: list[dict[str, Any]]) -> None: ...

    def system_info(self) -> dict[str, Any]: ...

    def get_task_name(self) -> str | None: ...


_process_runtime: SiteRuntime | None = None


def bind_process_runtime(runtime: SiteRuntime) -> None:
    """In a worker process (``flare_async.fl.worker``): every thread talks to ``runtime``."""
    global _process_runtime  # noqa: PLW0603 - one runtime per worker process
    _process_runtime = runtime


def loop_runtime() -> ClientRuntime | None:
    """The runtime of the calling async script if it runs on its cell's event loop."""
    return _in_loop.get()


def current_runtime() -> SiteRuntime:
    """The site runtime the calling script runs under (a :class:`ClientRuntime` in-process,
    the worker's pipe runtime in a subprocess).

    Raises:
        RuntimeError: called outside a running site.
    """
    runtime: SiteRuntime | None = (
        _in_loop.get() or getattr(_local, "runtime", None) or _process_runtime
    )
    if runtime is None:
        raise RuntimeError("the Client API is used outside a running site")
    return runtime


class ClientRuntime:
    """One site's side of a job.

    Args:
        cell: the site's cell (mount :meth:`handlers` on it before it starts).
        server: the server cell's name.
        config: what ``get_config()`` returns to the script.
        codec: how results travel to the server.
        signer: signs every result end to end (a deployment: the site's kit).
        policy: the site's privacy filters and result codec, forced on every result whatever
            the job asks (``on_privacy`` gets each filtered result's DP metrics).
        encrypt_to: the server's certificate (DER): results are sealed for its key, so the
            relays on the way cannot read them.
        task_verifier: every task must carry the server's signature over the model's digest
            (the project CA): a relay cannot change the model on its way down.
        job: the job's id (``system_info()["job_id"]``).
    """

    def __init__(
        self,
        cell: Cell,
        server: str,
        *,
        config: dict[str, Any] | None = None,
        codec: str = "tensors",
        digest: bool = True,
        signer: Signer | None = None,
        policy: SitePolicy | None = None,
        on_privacy: Callable[[dict[str, float]], None] | None = None,
        encrypt_to: bytes | None = None,
        task_verifier: SignatureVerifier | None = None,
        job: str = "",
    ) -> None:
        self.job = job
        self.encrypt_to = encrypt_to
        self.task_verifier = task_verifier
        if task_verifier is not None:
            cell.require_digest(CHANNEL, "task")  # checked against the server's signature
        self.cell = cell
        self.signer = signer
        self.policy = policy or SitePolicy()
        self._filter = PrivacyFilter(self.policy) if self.policy.filters else None
        self._received: dict[str, dict[str, Any]] = {}
        self.on_privacy = on_privacy
        self.secure = SecureSite(signer, task_verifier)
        self._secure_tasks: dict[str, str] = {}  # task -> secure aggregation session
        self.digest = digest
        return_large_blocks()  # a new model every round: freed memory goes back
        self.server = server
        self.config = dict(config or {})
        self.codec = codec
        # A SimpleQueue: a Queue's lock and three conditions were 3 KB a simulated site.
        self._inbox: queue.SimpleQueue[_Task | object] = queue.SimpleQueue()
        self._running = True
        self._arrived: SignalLike | None = None  # an in-loop script waits on it
        self._task: str | None = None
        self._peeked: FLModel | None = None  # taken by is_running(), returned by receive()
        self.task_name: str | None = None
        self._reply_to = server
        self._pass_to = ""
        self._swarm_round = -1
        self.swarm: SwarmMember | None = None
        """This site's part in a swarm, once the server started one (``fl/_swarm.py``)."""
        self.handoffs = Handoffs(job)
        """Models other sites handed over to this one (cyclic training)."""
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._sent_format: str | None = None  # what the script sent last (numpy or torch)
        self.metrics = MetricsBuffer()
        self._flushing = Lock()  # ours: anyio's was 2.3 KB a simulated site
        self.metrics_sent = 0
        self.metrics_lost = 0
        self.failed: str | None = None
        """Why the training script cannot answer tasks any more (it raised, or ended while
        the job runs): every task from then on is refused at once with this reason."""
        self.sent = 0

    @property
    def site(self) -> str:
        return self.cell.name

    def handlers(self) -> HandlerTable:
        table = HandlerTable("fl client")

        @table.stream(CHANNEL, "task")
        async def task(ctx: Context, stream: IncomingStream) -> bytes:
            return await self.take_task(stream)

        @table.stream(CHANNEL, "handoff")
        async def handoff(ctx: Context, stream: IncomingStream) -> bytes:
            return await self.handoffs.take_stream(stream)

        @table.stream(CHANNEL, "swarm_update")
        async def swarm_update(ctx: Context, stream: IncomingStream) -> bytes:
            return await self.in_swarm().take_update(stream)

        @table.stream(CHANNEL, "swarm_model")
        async def swarm_model(ctx: Context, stream: IncomingStream) -> bytes:
            return await self.in_swarm().take_model(stream)

        @table.request(CHANNEL, "stop")
        async def stop(ctx: Context, msg: Payload) -> bytes:
            if ctx.src != self.server:
                raise Unauthorized(f"only {self.server} stops this site's job, not {ctx.src}")
            self.stop()
            return b"stopping"

        @table.request(CHANNEL, "secagg")
        async def secagg(ctx: Context, msg: Payload) -> bytes:
            return await self.secagg_step(ctx.src, msg)

        return table

    def in_swarm(self) -> SwarmMember:
        """This site's part in the job's swarm.

        Raises:
            BadRequest: the job runs no swarm here.
        """
        if self.swarm is None:
            raise BadRequest(f"no swarm runs on {self.site} for job {self.job!r:.80}")
        return self.swarm

    def _start_swarm(self, text: str, task: str, model: FLModel, fmt: str) -> None:
        """The server's task that starts a swarm: its plan, and round 0 for the script."""
        try:
            plan = SwarmPlan.decode(text)
        except ValueError as exc:
            raise BadRequest(f"not a swarm plan: {exc}") from None
        if self.site not in plan.members:
            raise BadRequest(f"{self.site} is not a member of the swarm")
        if self.swarm is not None and self.swarm.final is None:
            raise BadRequest(f"a swarm of job {self.job!r:.80} already runs on {self.site}")

        def deliver(rnd: int, given: FLModel) -> None:
            if self._filter is not None:  # the site's filters apply to what it sends peers
                self._received[f"{task}#{rnd}"] = dict(given.params)
            self._put(_Task(f"{task}#{rnd}", given, self.server, "train", fmt, swarm_round=rnd))

        async def answer(result: FLModel) -> None:
            codec = self._result_codec(task)
            await self._stream_result(
                model_parts(result, self.cell.codecs, codec), task, self.server, codec
            )

        self.swarm = SwarmMember(
            self.cell,
            plan,
            self.job,
            task,
            self.server,
            deliver,
            self.stop,
            answer,
            signer=self.signer,
            verifier=self.task_verifier,
        )
        self.swarm.start(0, model)

    async def secagg_step(self, src: str, msg: Payload) -> bytes:
        """One step of a secure round (see :mod:`flare_async.fl._secure`), from the server."""
        if src != self.server:
            raise Unauthorized(f"secure aggregation steps come from {self.server}, not {src}")
        try:
            body = json.loads(msg.tobytes())
            answer = await anyio.to_thread.run_sync(self.secure.handle, body)
        except (SecAggError, ValueError, KeyError, TypeError) as exc:
            raise BadRequest(f"secure aggregation: {type(exc).__name__}: {exc}") from None
        return json.dumps(answer).encode()

    async def take_task(self, stream: IncomingStream) -> bytes:
        """A task stream from the server: queued for the script's next ``receive()``.

        Raises:
            Unauthorized: the stream does not come from the server (directly, or fanned out
                by the relays above this site: its origin).
        """
        if stream.origin != self.server:
            raise Unauthorized(f"tasks come from {self.server}, not {stream.origin}")
        if self.failed is not None:
            raise BadRequest(f"{self.site} cannot train: {self.failed}")
        data = await stream.read_joined()
        route = {k: stream.headers.get(k, "") for k in (*ROUTE_FIELDS, SWARM_PLAN)}
        if self.task_verifier is not None:
            expect = {
                "task": stream.headers.get("task", ""),
                "sha256": stream.digest,
                "topic": "task",
                **route,
            }
            self.task_verifier.verify(
                stream.headers, src=self.server, expect=expect, now=datetime.now(UTC)
            )
        model = model_from_parts(data)
        fmt = wire_format(data)
        if route[TAKE_FROM]:  # the model another site handed over, as the server named it
            given = self.handoffs.pop(route[TAKE_FROM], route[TAKE_SHA])
            model.params, fmt = model_from_parts(given).params, wire_format(given)
        reply_to = self.server
        if stream.headers.get("aggregate") == "parent" and self.cell.parent_name:
            reply_to = self.cell.parent_name  # the relay folds its children's results
        task = stream.headers.get("task", "")
        if "secagg" in stream.headers:
            self._secure_tasks[task] = stream.headers["secagg"]
        if self._filter is not None:
            self._received[task] = dict(model.params)  # the filters need what was sent
        kind = stream.headers.get("kind", "train")
        if stream.headers.get(SWARM_PLAN):
            self._start_swarm(stream.headers[SWARM_PLAN], task, model, fmt)
            return b"accepted"
        self._put(_Task(task, model, reply_to, kind, fmt, route[PASS_TO]))
        return b"accepted"

    def stop(self) -> None:
        self._running = False
        self._put(_STOP)

    def _put(self, item: object) -> None:
        self._inbox.put(item)
        if self._arrived is not None:
            self._arrived.set()  # an in-loop script waiting in areceive()

    # ------------------------------------------------------------ called from the script thread
    def is_running(self) -> bool:
        """Whether the job goes on, as FLARE's: while no task is in hand this waits for the
        next one (kept for ``receive()``), so ``while flare.is_running(): m = receive()``
        never gets ``None`` at the end of the job. A script on the cell's own loop gets the
        flag without waiting."""
        if _in_loop.get() is self or not self._running:
            return self._running
        if self._task is not None or self._peeked is not None:
            return True
        model = self.receive()
        if model is None:
            return False
        self._peeked = model
        return True

    def _pop_peeked(self) -> FLModel | None:
        model, self._peeked = self._peeked, None
        return model

    def receive(self, timeout: float | None = None) -> FLModel | None:
        """The next task's model; ``None`` once the job is over (or after ``timeout``)."""
        if _in_loop.get() is self:
            raise RuntimeError("an async script on the cell's loop uses await receive_async()")
        if (peeked := self._pop_peeked()) is not None:
            return peeked
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return self._take(item)

    def system_info(self) -> dict[str, Any]:
        """``{"job_id", "site_name"}``, as FLARE's ``flare.system_info()``."""
        return {"job_id": self.job, "site_name": self.site}

    def get_task_name(self) -> str | None:
        """The name of the task in hand (``train``, ``validate``, ``submit_model``)."""
        return self.task_name

    async def areceive(self, timeout: float | None = None) -> FLModel | None:
        """:meth:`receive` for a script on the cell's own loop: waits without a thread."""
        with anyio.move_on_after(timeout):
            # The wait is not in an ``except queue.Empty``: that exception and its traceback
            # would stay alive for as long as the site waits for its next task.
            while self._inbox.empty():  # this loop is the only taker in-loop
                arrived = self._arrived = Signal()  # 200 B, where anyio's Event is 1 KB
                await arrived.wait()
            return self._take(self._inbox.get_nowait())
        return None

    def _take(self, item: object) -> FLModel | None:
        if item is _STOP:
            self._inbox.put(_STOP)  # later calls see it too
            return None
        assert isinstance(item, _Task)
        self._task = item.id
        self._reply_to = item.reply_to
        self._pass_to = item.pass_to
        self._swarm_round = item.swarm_round
        self.task_name = item.kind
        model = item.model
        # Shared with the received bytes unless a filter keeps them.
        fmt = script_format(self.config, item.format, self._sent_format)
        model.params = to_framework(model.params, fmt, share=self._filter is None)
        return controls_to_meta(model)

    def send(self, model: FLModel) -> None:
        """Stream ``model`` to the server as the result of the last task received.

        A result the server did not take (the link failed for good, the server refused it) is
        logged, not raised: the round counts this site as failed, and the script goes on to
        the next task.
        """
        if self._task is None:
            raise RuntimeError("send() before receive(): no task to answer")
        if _in_loop.get() is self:
            raise RuntimeError("an async script on the cell's loop uses await send_async()")
        assert self._portal is not None, "the script must run under ClientRuntime.run_script"
        task, self._task = self._task, None
        try:
            self._portal.call(
                self._send, model, task, self._reply_to, self._pass_to, self._swarm_round
            )
        except FlareError as exc:
            self.cell._log.warning("result not delivered", task=task, error=str(exc))
        except (concurrent.futures.CancelledError, RuntimeError) as exc:
            # The job ended (its portal cancelled or closed) while the result was on its way:
            # the script's loop ends at its next is_running(), as FLARE's does.
            self._running = False
            self.cell._log.info("job ended before the result was sent", task=task, error=repr(exc))

    async def asend(self, model: FLModel) -> None:
        """:meth:`send` for a script on the cell's own loop."""
        if self._task is None:
            raise RuntimeError("send() before receive(): no task to answer")
        task, self._task = self._task, None
        try:
            await self._send(model, task, self._reply_to, self._pass_to, self._swarm_round)
        except FlareError as exc:
            self.cell._log.warning("result not delivered", task=task, error=str(exc))

    async def _send(
        self, model: FLModel, task: str, dst: str, pass_to: str = "", swarm_round: int = -1
    ) -> Payload | None:
        model = controls_from_meta(model)  # a FLARE SCAFFOLD script's control change
        self._sent_format = params_format_of(model.params)
        await self.flush_metrics()  # the round's values are stored before its result counts
        codec = self._result_codec(task)  # before _outgoing forgets the task's session
        model = await self._outgoing(model, task)
        parts = model_parts(model, self.cell.codecs, codec)
        if swarm_round >= 0:
            await self.in_swarm().submit(swarm_round, parts)
            return None
        if pass_to:
            parts = await self._pass(model, parts, task, pass_to, codec)
        return await self._stream_result(parts, task, dst, codec)

    async def _pass(
        self, model: FLModel, parts: list[Any], task: str, pass_to: str, codec: str
    ) -> list[Any]:
        """Hand the result over to ``pass_to`` (see ``fl/_handoff.py``); what the server gets
        then: where it went, or, if the handover failed, the result itself and why. A DIFF
        is no model to train on: it goes to the server (which holds what it is a change of)."""
        if model.params_type is ParamsType.DIFF:  # the server applies it (no failure)
            why = {"handoff_skipped": f"{pass_to}: a DIFF result is not handed over"}
        else:
            try:
                sha = await hand_over(self.cell, pass_to, parts, self.job, task)
            except FlareError as exc:
                why = {"handoff_failed": f"{pass_to}: {type(exc).__name__}: {exc}"[:1000]}
            else:
                return model_parts(handed(model, pass_to, sha), self.cell.codecs, codec)
        # The result itself, to the server, saying why (the script's own model untouched).
        noted = dataclasses.replace(model, meta={**model.meta, **why})
        return model_parts(noted, self.cell.codecs, codec)

    async def _outgoing(self, model: FLModel, task: str) -> FLModel:
        """The result as it leaves: the site's filters, then masked in a secure round."""
        model = self._filtered(model, task)
        sid = self._secure_tasks.pop(task, None)
        if sid is not None:
            model = await anyio.to_thread.run_sync(self.secure.mask, sid, model)
        return model

    def _result_codec(self, task: str) -> str:
        """Secure rounds send a uint32 vector as it is (masks are not quantizable)."""
        if task in self._secure_tasks:
            return "tensors"
        return self.policy.codec or self.codec

    def _filtered(self, model: FLModel, task: str) -> FLModel:
        """The result as the site's policy lets it go (the job has no say)."""
        received = self._received.pop(task, None)
        if self._filter is None or received is None:
            return model
        out = self._filter.apply(model, received)
        if self.on_privacy is not None:
            self.on_privacy({k: v for k, v in out.metrics.items() if k.startswith("dp_")})
        return out

    async def _stream_result(self, parts: list[Any], task: str, dst: str, codec: str) -> Payload:
        """Stream a result's bytes to ``dst``; with a signer, signed end to end (the digest of
        the bytes, the task and both ends), so no relay can change or replay it unseen; with
        ``encrypt_to``, sealed for the server's key first."""
        headers: dict[str, str] = {}
        if self.encrypt_to is not None:
            parts = await anyio.to_thread.run_sync(encrypt_for, self.encrypt_to, parts)
            headers["enc"] = E2E
        answer = await stream_signed(
            self.cell,
            self.signer,
            dst,
            "result",
            parts,
            task,
            codec=codec,
            digest=self.digest,
            headers=headers,
        )
        self.sent += 1
        return answer

    async def report_failure(self, reason: str) -> None:
        """Tell the server the task in hand will not be answered (the script failed), so the
        round does not wait for it until its deadline."""
        task, self._task = self._task, None
        self._peeked = None
        if task is not None:
            await self._report(task, self._reply_to, reason)

    async def _report(self, task: str, reply_to: str, reason: str) -> None:
        self._received.pop(task, None)
        self._secure_tasks.pop(task, None)
        try:
            await self.cell.request(
                reply_to, CHANNEL, "failed", reason.encode()[:1000], headers={"task": task}
            )
        except FlareError as exc:
            self.cell._log.info("could not report the failure", error=str(exc))

    async def fail(self, reason: str) -> None:
        """The training script cannot answer any more (it raised ``reason``, or ended while
        the job runs): the task in hand and every task waiting are reported failed with that
        reason at once, and tasks that come later are refused with it (the round goes on
        without this site, or fails for want of it, saying why)."""
        self.failed = reason
        self._running = False
        self.cell._log.warning("training script failed", site=self.site, reason=reason)
        await self.report_failure(reason)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Task):
                await self._report(item.id, item.reply_to, reason)
        self._put(_STOP)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self.flush_metrics()

    def log(
        self,
        key: str,
        value: Any,
        data_type: AnalyticsDataType | str | int | None = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Track a value (see :mod:`flare_async.fl._tracking`): sent to the server in the
        background, and before the next result at the latest."""
        self.track(log_records(key, value, data_type, step, kwargs))

    def track(self, recs: list[dict[str, Any]]) -> None:
        """Queue ``recs`` for the server; from the script's thread, a send starts at once."""
        if self.metrics.add(recs) and self._portal is not None and _in_loop.get() is not self:
            with contextlib.suppress(RuntimeError):  # the job (and its portal) just ended
                self._portal.start_task_soon(self.flush_metrics)

    async def flush_metrics(self) -> bool:
        """Send every value tracked so far to the server (``fl/metrics``), in batches, in
        order; True if none is left. Values the server could not be reached for wait for the
        next flush (at most ``MAX_WAITING``); values it refused are counted in
        ``metrics_lost``."""
        async with self._flushing:
            while batch := self.metrics.take():
                try:
                    await self.cell.request(
                        self.server,
                        CHANNEL,
                        "metrics",
                        json.dumps(batch).encode(),
                        headers={"job": self.job},
                        timeout=30,
                    )
                    self.metrics_sent += len(batch)
                except (TransportError, RoutingError, DeadlineExceeded, CellClosed) as exc:
                    self.metrics.put_back(batch)  # not now: the next flush tries again
                    self.cell._log.info("tracked values wait", error=str(exc))
                    return False
                except FlareError as exc:
                    self.metrics_lost += len(batch)
                    self.cell._log.warning("tracked values refused", error=str(exc))
            return True

    # ------------------------------------------------------------ running a script
    async def run_script(self, script: Callable[[], object], *, in_loop: bool = False) -> None:
        """Run ``script`` (the training loop, Client API calls inside) in a worker thread.

        Args:
            in_loop: an ``async def`` script runs on this cell's event loop instead (no thread,
                no loop of its own: what lets one process simulate thousands of sites). It must
                not block: heavy work goes to ``anyio.to_thread``; it uses the awaitable Client
                API (``receive_async`` / ``send_async``).

        A script that raises fails the site's part of the job at once (:meth:`fail`, with the
        exception's own text; then it is raised here); one that returns while the job still
        runs is failed the same way. Values it tracked are flushed to the server either way.
        """
        try:
            await self._run_script(script, in_loop)
        except Exception as exc:
            await self.fail(f"training script failed: {type(exc).__name__}: {exc}")
            raise
        if self._running:
            await self.fail("the training script returned while the job runs")
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self.flush_metrics()

    async def _run_script(self, script: Callable[[], object], in_loop: bool) -> None:
        if in_loop and inspect.iscoroutinefunction(script):
            token = _in_loop.set(self)
            try:
                await script()
            finally:
                _in_loop.reset(token)
            return
        error: Exception | None = None
        async with anyio.from_thread.BlockingPortal() as portal:
            self._portal = portal

            def body() -> None:
                _local.runtime = self
                try:
                    run_any(script)
                finally:
                    _local.runtime = None

            try:
                # Its own thread token: a job's scripts hold theirs for the whole job, and
                # must not starve anyio's shared pool (40 by default) of file and hash work.
                await anyio.to_thread.run_sync(
                    body, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1)
                )
            except Exception as exc:  # raised below, as it is (not inside the portal's group)
                error = exc
        if error is not None:
            raise error

    async def run_subprocess(
        self,
        spec: str,
        *,
        stop_timeout: float = 10.0,
        log: str | os.PathLike[str] | None = None,
        on_start: Callable[[int], None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        code: Path | None = None,
    ) -> None:
        """Run the training script ``MODULE:FUNCTION`` in its own Python process
        (``flare_async.fl.worker``), passing tasks and results over a socket pair; with
        ``code`` (the job's own code, ``fl/_artifact.py``) first on its path.

        A script process that exits or breaks its pipe while holding a task is reported to the
        server as a failure of that task, at once. Cancelled (the job aborted), the process gets
        SIGTERM at once and SIGKILL after ``stop_timeout`` seconds; otherwise it gets
        ``stop_timeout`` seconds to end by itself after the job's stop.

        Args:
            log: a file for the process's stdout and stderr (default: this process's).
            on_start: called with the process id once it runs.
        """
        self._waiter = anyio.CapacityLimiter(1)
        parent, child = socket.socketpair()
        env = {
            **code_path_env(code),
            "FLARE_ASYNC_FD": str(child.fileno()),
            "FLARE_ASYNC_SITE": self.site,
            "FLARE_ASYNC_CONFIG": json.dumps(self.config),
            "FLARE_ASYNC_CODEC": self.codec,
            "FLARE_ASYNC_JOB": self.job,
        }
        out = None if log is None else os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # Shielded: a job aborted right now must not leave a started process (or the
            # socket pair) behind; the abort takes effect at the next wait, below.
            with anyio.CancelScope(shield=True):
                proc = await anyio.open_process(
                    [*python(code), "-m", "flare_async.fl.worker", spec],
                    env=env,
                    pass_fds=(child.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    cwd=cwd,
                )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
            if out is not None:
                os.close(out)
        if on_start is not None:
            on_start(proc.pid)
        parent.setblocking(False)
        link = TcpLink(parent, PIPE_LIMITS, local_address="pipe:site", peer_address="pipe:worker")
        link.peer_limits = PIPE_LIMITS
        aborted = False
        try:
            await self._serve_worker(link, stop_timeout)
        except anyio.get_cancelled_exc_class():
            aborted = True
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if aborted and proc.returncode is None:
                    proc.terminate()
                with anyio.move_on_after(stop_timeout):
                    await link.aclose()
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    async def _serve_worker(self, link: TcpLink, stop_timeout: float) -> None:
        """Feed the worker tasks and take its results, while reading everything else it says
        (tracked values, the script's exception) as it comes."""
        results_in, results = anyio.create_memory_object_stream[Frame](1)
        read_done = anyio.Event()
        async with results, anyio.create_task_group() as tg:

            async def read() -> None:
                try:
                    await self._read_worker(link, results_in, tg)
                finally:
                    read_done.set()

            tg.start_soon(read)
            await self._feed_worker(link, results)
            with anyio.move_on_after(stop_timeout):  # the worker's last values, its exit
                await read_done.wait()
            tg.cancel_scope.cancel()

    async def _read_worker(
        self, link: TcpLink, results: anyio.abc.ObjectSendStream[Frame], tg: anyio.abc.TaskGroup
    ) -> None:
        error = ""
        async with results:
            while True:
                try:
                    frame = await link.receive()
                except FlareError:
                    break
                topic = frame.header.topic if isinstance(frame.header, Event) else ""
                body = b"".join(bytes(p) for p in frame.parts) if topic != "result" else b""
                if topic == "result":
                    await results.send(frame)
                elif topic == "metrics":
                    try:  # here too, not only at the server: a bad record from the
                        # script sinks its own frame, not the site's batch it would join
                        recs = check_batch(body)
                    except (ValueError, TypeError) as exc:
                        self.cell._log.warning("bad tracked values from the worker", error=str(exc))
                        continue
                    if self.metrics.add(recs):
                        tg.start_soon(self.flush_metrics)
                elif topic == "error":
                    error = body.decode(errors="replace")[:2000]
            if self._running and self.failed is None:
                await self.fail(
                    f"training script failed: {error}"
                    if error
                    else "the training process ended while the job runs"
                )

    async def _feed_worker(
        self, link: TcpLink, results: anyio.abc.ObjectReceiveStream[Frame]
    ) -> None:
        while True:
            try:
                item = await anyio.to_thread.run_sync(
                    self._inbox.get, abandon_on_cancel=True, limiter=self._waiter
                )
            except anyio.get_cancelled_exc_class():
                # The abandoned get still blocks its worker thread: a stop word releases it,
                # or the thread outlives the event loop and the process never exits.
                self._inbox.put(_STOP)
                raise
            if item is _STOP:
                self._inbox.put(_STOP)
                with contextlib.suppress(FlareError):
                    await link.send(Frame(_event("stop")))
                return
            assert isinstance(item, _Task)
            task, model, reply_to = item.id, item.model, item.reply_to
            self._task, self._reply_to = task, reply_to  # a failure is reported where results go
            parts = model_parts(model, self.cell.codecs, "tensors", params_format=item.format)
            with contextlib.suppress(FlareError):  # a dead worker: the reader reports it
                await link.send(
                    Frame(_event("task", {"task": task, "kind": item.kind}), tuple(parts))
                )
            try:
                frame = await results.receive()
            except anyio.EndOfStream:
                return  # the worker ended; the reader failed the task in hand
            self._task = None
            parts = list(frame.parts)
            codec = self._result_codec(task)
            result = None
            if self._filter is not None or self.policy.codec or task in self._secure_tasks:
                result = await self._outgoing(model_from_parts(parts), task)
                parts = model_parts(result, self.cell.codecs, codec)
            if item.pass_to:
                result = result or model_from_parts(parts)
                parts = await self._pass(result, parts, task, item.pass_to, codec)
            await self.flush_metrics()
            if item.swarm_round >= 0:
                with contextlib.suppress(FlareError):  # the aggregator counts it missing
                    await self.in_swarm().submit(item.swarm_round, parts)
                continue
            try:
                await self._stream_result(parts, task, reply_to, codec)
            except FlareError as exc:  # this round's result is lost; the script goes on
                self.cell._log.warning("result not delivered", task=task, error=str(exc))


def run_any(script: Callable[[], object]) -> None:
    """Call a training script: a plain function, or an ``async def`` one on an event loop of
    its own (in the calling thread)."""
    if inspect.iscoroutinefunction(script):
        anyio.run(script)
    else:
        script()


def _event(topic: str, headers: dict[str, str] | None = None) -> Event:
    return Event(
        id=0,
        src="site",
        dst="worker",
        route=["site"],
        budget=None,
        headers=headers or {},
        channel=CHANNEL,
        topic=topic,
    )


PIPE_LIMITS = Limits(max_frame=(1 << 63) - 1)


__all__ = ["ClientRuntime", "bind_process_runtime", "current_runtime", "loop_runtime"]
