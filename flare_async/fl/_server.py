"""The server side of federated learning: what a workflow uses to run rounds.

A workflow is a plain async function over an :class:`FLServer`: sample clients, send them a task
with the current model, and collect their results into a running weighted sum as they arrive,
with a minimum number of responses and a deadline::

    async def my_workflow(server: FLServer, rounds: int) -> FLModel:
        model = FLModel(params=...)
        for r in range(rounds):
            result = await server.run_round(model, server.sample(0.5, minimum=2), deadline=60)
            model = FLModel(params=fedavg_step(model.params, result.sum), current_round=r)
        return model

The task goes to every sampled client as one stream (encoded once; through relays, one upstream
copy), each result comes back as a stream and is folded in at once: the server holds the model
and one float64 accumulator, whatever the number of clients. A client that fails (unreachable,
crashed, refused) is counted and excluded; one that answers after the round closed is counted as
late and ignored; if fewer than ``min_responses`` answered by the deadline, the round fails with
:class:`RoundFailed`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread

from flare_async import _logging
from flare_async._memory import return_large_blocks
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.errors import (
    BadRequest,
    ConfigError,
    FlareError,
    IntegrityError,
    StreamError,
    Unauthorized,
)
from flare_async.fl._handoff import ROUTE_FIELDS
from flare_async.fl._keys import SWARM_PLAN
from flare_async.fl._model import FLModel, model_parts
from flare_async.fl._results import (
    Collector,
    RelayPlan,
    RoundFailed,
    RoundResult,
    arm_relays_below,
    digest_of,
    receive_result,
)
from flare_async.fl._secure import SecureAggregation, secure_round
from flare_async.fl._signed import CHANNEL
from flare_async.fl._tracking import MAX_PER_SITE, check_batch
from flare_async.fl._updates import MEMORY_BOUND, Updates
from flare_async.security import Decryptor, SignatureVerifier, Signer

PULL_WAIT = 5.0
"""Seconds an edge client is told to stay away when no workflow hands out tasks to pull."""

Collect = Literal["sum", "each"]
"""How a round gathers its results: folded into one weighted sum as they arrive (``sum``), or
kept one by one (``each``: :attr:`RoundResult.updates`, for rules that need them all)."""

Grant = Callable[[str], Awaitable[dict[str, Any]]]
"""What answers a pull (``fl/pull``): the site's name in, the reply out (see ``fedbuff``)."""


def sample(
    clients: Sequence[str], rng: random.Random, fraction: float = 1.0, minimum: int = 1
) -> list[str]:
    """A random share of ``clients``: ``ceil(fraction * n)``, at least ``minimum``."""
    n = len(clients)
    want = min(n, max(minimum, math.ceil(fraction * n)))
    return sorted(rng.sample(list(clients), want))


class Rounds(Protocol):
    """What a workflow needs of its server: an :class:`FLServer`, or, in a job's own process
    on a deployment, that process's link to the server's (``flare_async.fl._jobproc``)."""

    clients: list[str]
    params_format: str | None

    def sample(self, fraction: float = 1.0, minimum: int = 1) -> list[str]: ...

    async def run_round(
        self,
        model: FLModel,
        targets: Sequence[str],
        *,
        min_responses: int | None = None,
        deadline: float = 60.0,
        task: str = "train",
        secure: SecureAggregation | None = None,
        collect: Collect = "sum",
        headers: Mapping[str, str] | None = None,
    ) -> RoundResult: ...


class FLServer:
    """Runs rounds for a workflow on a cell.

    Args:
        cell: the server's cell (mount :meth:`handlers` on it before it starts).
        clients: the client cells of the job.
        job: the job's id, carried with every task.
        codec: how models travel to clients (``tensors``, or a quantized codec).
        digest: whole-model SHA-256 on every transfer (chunks always carry a CRC-32C); the
            simulator turns it off, its bytes never leave the process.
        hierarchical: clients below a relay send their results to it; the relay (running a
            :class:`RelayAggregator`) folds them and sends the server one partial sum.
        on_round: called with each finished training round (progress output, metrics):
            ``train`` tasks only; a cross-site evaluation's rounds are not the job's rounds.
        spill: where large results wait, complete, before they are folded (default: the
            system's temporary folder).
        on_reject: called with ``(site, task, reason)`` for every result refused (unusable,
            damaged, or failing its signature): the job service writes it to the audit log.
        verifier: check every result's end-to-end signature (a deployment: the project CA).
        decryptor: opens results sealed for this server's key (``FedAvgRecipe(encrypt=)``).
        signer: signs every task (the digest of the model, the task id) so sites can check
            that no relay changed the model on its way down.
        on_metrics: called with ``(site, records)`` for every batch of values a client's
            script tracked (``fl/metrics``; see :mod:`flare_async.fl._tracking`); without
            it they are kept in :attr:`tracked`.
    """

    def __init__(
        self,
        cell: Cell,
        clients: Sequence[str],
        *,
        job: str = "job",
        codec: str = "tensors",
        seed: int | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
        digest: bool = True,
        hierarchical: bool = False,
        spill: str | os.PathLike[str] | None = None,
        on_reject: Callable[[str, str, str], None] | None = None,
        verifier: SignatureVerifier | None = None,
        decryptor: Decryptor | None = None,
        signer: Signer | None = None,
        on_metrics: Callable[[str, list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.on_metrics = on_metrics
        self.tracked: list[dict[str, Any]] = []
        """Values the clients tracked, each with its ``site`` (when no ``on_metrics``)."""
        self._tracked_per_site: dict[str, int] = {}
        self.params_format: str | None = None
        """The framework the workflow's model came in (``torch``: the sites' scripts get torch
        tensors); set by the workflows from the initial model."""
        self.signer = signer
        self.decryptor = decryptor
        self.on_reject = on_reject
        self.verifier = verifier
        if verifier is not None:
            cell.require_digest(CHANNEL, "result")  # the signed digest is checked against it
        self.cell = cell
        self.spill = Path(spill) if spill is not None else None
        self.memory_bound = MEMORY_BOUND
        """Bytes of a round's kept results (``collect="each"``) held in memory; beyond them
        each further result is kept in a spill file in ``spill``, mapped."""
        return_large_blocks()  # a new model every round: freed memory goes back
        self.digest = digest
        self.hierarchical = hierarchical
        self.clients = list(clients)
        self.job = job
        self.codec = codec
        self.rng = random.Random(seed)
        self.on_round = on_round
        self._open: dict[str, Collector] = {}
        self._members = frozenset(self.clients)
        self._grant: Grant | None = None
        self.stopped = False
        """Set by :meth:`stop_clients`: pulls are answered "done" from then on."""
        self._tasks = 0
        self.late_total = 0
        self._log = _logging.get_logger(cell=cell.name, job=job)

    def handlers(self) -> HandlerTable:
        table = HandlerTable("fl server")

        @table.stream(CHANNEL, "result")
        async def result(ctx: Context, stream: IncomingStream) -> bytes:
            return await self.take_result(ctx.src, stream)

        @table.request(CHANNEL, "failed")
        async def failed(ctx: Context, msg: Payload) -> bytes:
            return self.take_failure(ctx.src, ctx.headers.get("task", ""), msg)

        @table.request(CHANNEL, "pull")
        async def pull(ctx: Context, msg: Payload) -> bytes:
            return json.dumps(await self.take_pull(ctx.src)).encode()

        @table.request(CHANNEL, "metrics")
        async def metrics(ctx: Context, msg: Payload) -> bytes:
            return self.take_metrics(ctx.src, msg)

        return table

    async def take_pull(self, site: str) -> dict[str, Any]:
        """An edge client asks for work (``fl/pull``). The answer is ``{"task": ID, "version":
        V}`` once the task's model reached the client, ``{"wait": SECONDS}`` when there is no
        work for it now, or ``{"done": true}`` once the job is over.

        Raises:
            Unauthorized: ``site`` is not one of the job's clients.
        """
        if site not in self._members:
            raise Unauthorized(f"{site} is not a client of job {self.job}")
        if self.stopped:
            return {"done": True}
        if self._grant is None:
            return {"wait": PULL_WAIT}
        return await self._grant(site)

    def take_metrics(self, site: str, msg: Payload) -> bytes:
        """A batch of values a client's script tracked (``fl/metrics``). Only the job's
        clients may send them; each record is checked; past ``MAX_PER_SITE`` records from one
        site the rest are dropped (and counted in the answer).

        Raises:
            Unauthorized: ``site`` is not one of the job's clients.
            BadRequest: a malformed batch.
        """
        if site not in self._members:
            raise Unauthorized(f"{site} is not a client of job {self.job}")
        try:
            recs = check_batch(msg.tobytes())
        except (ValueError, TypeError, RecursionError) as exc:
            raise BadRequest(f"bad tracked values: {exc}") from None
        seen = self._tracked_per_site.get(site, 0)
        room = max(0, MAX_PER_SITE - seen)
        kept, dropped = recs[:room], len(recs) - min(room, len(recs))
        self._tracked_per_site[site] = seen + len(kept)
        for rec in kept:
            rec["site"] = site
        if kept:
            if self.on_metrics is not None:
                self.on_metrics(site, kept)
            else:
                self.tracked.extend(kept)
        if dropped:
            self._log.warning("tracked values over the limit dropped", site=site, n=dropped)
        return json.dumps({"kept": len(kept), "dropped": dropped}).encode()

    def awaiting(self, task: str, site: str) -> bool:
        """Whether ``task`` is open and still waits for ``site``'s result."""
        collector = self._open.get(task)
        return collector is not None and not collector.closed and site in collector.pending

    @contextlib.contextmanager
    def serving_pulls(self, grant: Grant) -> Iterator[None]:
        """Answer pulls with ``grant`` for the duration (one workflow at a time)."""
        if self._grant is not None:
            raise RuntimeError("another workflow already hands out tasks to pull")
        self._grant = grant
        try:
            yield
        finally:
            self._grant = None

    async def take_result(self, site: str, stream: IncomingStream) -> bytes:
        """A client's (or a relay's) result stream for one of this server's tasks."""
        task_id = stream.headers.get("task", "")
        collector = self._open.get(task_id)
        if collector is None or collector.closed:
            self.late_total += 1
            self._log.info("late or unknown result ignored", site=site, task=task_id)
            return b"late"
        try:
            return await receive_result(
                collector, site, stream, self.spill, self.verifier, self.cell.name, self.decryptor
            )
        except (BadRequest, IntegrityError, StreamError) as exc:
            if self.on_reject is not None:
                self.on_reject(site, task_id, f"{type(exc).__name__}: {exc}")
            raise

    def take_failure(self, site: str, task: str, msg: Payload) -> bytes:
        """A client's report that it will not answer ``task``."""
        collector = self._open.get(task)
        if collector is not None and site in collector.pending:
            reason = msg.tobytes().decode(errors="replace")
            collector.result.failed[site] = reason
            self._log.warning("client failed its task", site=site, reason=reason)
            collector.settle(site)
        return b"noted"

    def sample(self, fraction: float = 1.0, minimum: int = 1) -> list[str]:
        """A random share of the clients: ``ceil(fraction * n)``, at least ``minimum``."""
        return sample(self.clients, self.rng, fraction, minimum)

    async def run_round(
        self,
        model: FLModel,
        targets: Sequence[str],
        *,
        min_responses: int | None = None,
        deadline: float = 60.0,
        task: str = "train",
        fold_with: Callable[[str, FLModel], None] | None = None,
        headers: Mapping[str, str] | None = None,
        on_delivered: Callable[[str, Mapping[str, Any]], None] | None = None,
        secure: SecureAggregation | None = None,
        collect: Collect = "sum",
    ) -> RoundResult:
        """Send ``model`` to ``targets`` and fold their results in as they arrive, until all
        answered or ``deadline`` seconds passed (with ``secure``, under secure aggregation:
        ``secure_round``). With ``collect="each"`` the results are kept one by one instead
        (:attr:`RoundResult.updates`, in memory up to a bound, then in spill files); relays
        then forward every site's result rather than fold them.

        ``fold_with`` replaces the weighted sum for this round (each result goes to it; see
        ``secure_round``), ``headers`` go with every task. ``on_delivered`` is called with the
        task's id and each target's delivery outcome (its reply, or the ``FlareError``) once
        the task reached them all (a pulled task: the pull is answered then).

        Raises:
            RoundFailed: fewer than ``min_responses`` (default: all targets) results.
            SecAggRangeError: ``secure``, and the round's sum could wrap.
            ConfigError: ``secure`` with another task than ``train``, or with ``fold_with``,
                ``headers``, ``on_delivered`` or ``collect="each"`` (a secure round has its
                own folding); ``collect="each"`` with ``fold_with``.
        """
        if collect not in ("sum", "each"):
            raise ConfigError(f"a round collects 'sum' or 'each', not {collect!r}")
        if secure is not None:
            if task != "train" or fold_with or headers or on_delivered or collect != "sum":
                raise ConfigError("a secure round trains, with secure aggregation's own folding")
            return await secure_round(
                self, model, targets, config=secure, min_responses=min_responses, deadline=deadline
            )
        need = len(targets) if min_responses is None else min_responses
        self._tasks += 1
        # A fresh random part: after a restart the same round must not reuse a task id (a
        # result signed for the old one could be replayed into the new one).
        task_id = f"{self.job}:{model.current_round}:{self._tasks}:{secrets.token_hex(4)}"
        updates = None
        if collect == "each":
            if fold_with is not None:
                raise ConfigError("a round that keeps each result folds nothing: no fold_with")
            updates = Updates(self.spill, self.memory_bound)
            fold_with = updates.add
        collector = Collector(task_id, model.current_round or 0, targets, fold_with)
        collector.result.updates = updates
        self._open[task_id] = collector
        task_headers = {**(headers or {}), "job": self.job, "task": task_id, "kind": task}
        try:
            parts = model_parts(model, self.cell.codecs, self.codec, self.params_format)
            sha = ""
            if self.signer is not None:  # one digest, one signature, for every destination
                sha = await anyio.to_thread.run_sync(digest_of, parts)
                fields = {"src": self.cell.name, "task": task_id, "sha256": sha, "topic": "task"}
                fields |= {k: task_headers.get(k, "") for k in (*ROUTE_FIELDS, SWARM_PLAN)}
                task_headers.update(self.signer.sign(fields))
            if self.hierarchical and updates is None:
                task_headers["aggregate"] = "parent"
                session = task_headers.get("secagg", "")
                await self._arm_relays(collector, list(targets), task_id, deadline, session)
            with anyio.move_on_after(deadline):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        self._deliver,
                        collector,
                        list(targets),
                        parts,
                        task_headers,
                        sha,
                        on_delivered,
                    )
                    while collector.pending:
                        collector.changed = anyio.Event()
                        await collector.changed.wait()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await collector.close()
            self._open.pop(task_id, None)
        result = collector.result
        for site in collector.pending:
            result.failed.setdefault(site, "no result before the deadline")
        if len(result.responded) < need:
            raise RoundFailed(
                f"round {result.round}: {len(result.responded)} of {len(targets)} clients "
                f"answered, {need} needed ({result.failed})",
                result.failed,
            )
        self._log.info(
            "round done",
            round=result.round,
            responded=len(result.responded),
            failed=len(result.failed),
        )
        if self.on_round is not None and task == "train":
            self.on_round(result)
        return result

    async def _arm_relays(
        self,
        collector: Collector,
        targets: list[str],
        task_id: str,
        deadline: float,
        secure: str = "",
    ) -> None:
        """Tell each relay below this cell which of the sites under it answer this task, and
        by when (a little before the round's deadline, so its partial sum arrives in time); it
        arms the relays below it the same way, so every tier folds, and this cell gets one
        partial sum per relay directly below it. In a secure round (``secure``: the session),
        relays add up masked vectors instead."""
        plan = RelayPlan(task=task_id, deadline=0.9 * deadline, secure=secure)
        await arm_relays_below(self.cell, collector, targets, plan, timeout=10)

    async def _deliver(
        self,
        collector: Collector,
        targets: list[str],
        parts: list[Any],
        headers: dict[str, str],
        sha: str = "",
        on_delivered: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> None:
        outcomes = await self.cell.stream_many(
            targets,
            CHANNEL,
            "task",
            list(parts),
            codec=self.codec,
            headers=headers,
            digest=self.digest or bool(sha),
            sha256=sha,
        )
        for site, outcome in outcomes.items():
            if isinstance(outcome, FlareError) and site in collector.pending:
                collector.result.failed[site] = f"{type(outcome).__name__}: {outcome}"
                collector.settle(site)
        if on_delivered is not None:
            on_delivered(collector.task, outcomes)

    async def stop_clients(self) -> None:
        """Tell every client the job is over (their ``is_running()`` turns False); edge
        clients, offline now, learn it at their next pull."""
        self.stopped = True
        await self.cell.broadcast(
            self.clients, CHANNEL, "stop", b"", timeout=10, headers={"job": self.job}
        )


__all__ = ["PULL_WAIT", "Collect", "FLServer", "Grant", "RoundFailed", "RoundResult", "Rounds"]
