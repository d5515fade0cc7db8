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

import hashlib
import json
import math
import mmap
import os
import random
import secrets
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from flare_async import _logging
from flare_async._memory import return_large_blocks
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.errors import BadRequest, DecodeError, FlareError, IntegrityError, StreamError
from flare_async.fl._aggregate import WEIGHT_KEY, Folded, RoundMismatch, WeightedSum
from flare_async.fl._model import FLModel, model_from_parts, model_parts
from flare_async.fl._signed import CHANNEL, E2E, check_signed
from flare_async.security import Decryptor, SignatureVerifier, Signer


class RoundFailed(FlareError):
    """Fewer clients than the minimum answered a round before its deadline."""


@dataclass
class RoundResult:
    """What a round gathered.

    Attributes:
        sum: the weighted sum of the results (see ``fedavg_step``).
        responded: clients whose result was folded in, in arrival order.
        failed: clients that could not take the task or sent no usable result, with why.
        metrics: each responding client's metrics.
        late: results that arrived after the round closed (so far).
        partials: partial sums merged (from relays aggregating their sites).
    """

    round: int
    sum: WeightedSum = field(default_factory=WeightedSum)
    responded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    late: int = 0
    partials: int = 0

    def mean_metrics(self) -> dict[str, float]:
        """Each metric averaged over the clients that reported it."""
        keys = {k for m in self.metrics.values() for k in m}
        return {
            k: sum(m[k] for m in self.metrics.values() if k in m)
            / sum(1 for m in self.metrics.values() if k in m)
            for k in sorted(keys)
        }


class _Collector:
    def __init__(
        self,
        task: str,
        rnd: int,
        targets: Sequence[str],
        fold_with: Callable[[str, FLModel], None] | None = None,
    ) -> None:
        self.fold_with = fold_with
        """Folds each site's result instead of the weighted sum (secure aggregation)."""
        self.task = task
        self.result = RoundResult(rnd)
        self.pending = set(targets)
        self.relays: dict[str, set[str]] = {}
        """Relays armed for this task, and the sites each aggregates: only they may send
        partial sums, and only for those sites."""
        self.closed = False
        self.changed = anyio.Event()
        self.folding = anyio.Lock()
        """Held while an update is folded (in a worker thread): one fold at a time, and the
        round reads its sum only once the fold in progress is done."""

    def reject(self, site: str, reason: str) -> None:
        """A result that will not count (the site, if still awaited, failed)."""
        if site in self.pending and not self.closed:
            self.result.failed[site] = reason
            self.settle(site)

    def settle(self, site: str) -> None:
        self.pending.discard(site)
        self.changed.set()

    async def close(self) -> None:
        """No more results; wait for a fold in progress to finish (it counts)."""
        self.closed = True
        async with self.folding:
            pass

    async def offer(
        self, site: str, parts: Any, *, in_thread: bool = False, on_folded: Folded | None = None
    ) -> bytes:
        """Fold one site's result in (a site's own, or a relay's partial sum for its sites).

        Args:
            parts: the result's bytes (buffers, or one buffer such as a mapped file).
            in_thread: fold in a worker thread (a large result: the event loop stays free).

        Raises:
            BadRequest: a result that cannot be folded (the site counts as failed).
        """
        async with self.folding:
            if self.closed:
                return b"late"
            result = self.result
            try:
                update = model_from_parts(parts)
                if WEIGHT_KEY in update.meta:
                    covered = self._check_partial(site, update)
                    fold = (
                        partial(self.fold_with, site, update)
                        if self.fold_with is not None
                        else partial(result.sum.merge, update, on_folded)
                    )
                else:
                    if site not in self.pending:
                        return b"duplicate"
                    weight = float(update.meta.get("num_samples", 1.0))
                    fold = (
                        partial(self.fold_with, site, update)
                        if self.fold_with is not None
                        else partial(
                            result.sum.add, update.params, weight, update.params_type, on_folded
                        )
                    )
                if in_thread:
                    await anyio.to_thread.run_sync(fold)
                else:
                    fold()
            except (DecodeError, RoundMismatch, ValueError, KeyError, TypeError) as exc:
                if site in self.pending:
                    result.failed[site] = f"unusable result: {exc}"
                    self.settle(site)
                raise BadRequest(f"unusable result: {exc}") from None
            if WEIGHT_KEY in update.meta:
                self._commit_partial(site, update, covered)
                return b"taken"
            result.responded.append(site)
            result.metrics[site] = update.metrics
            self.settle(site)
            return b"taken"

    def _check_partial(self, relay: str, partial: FLModel) -> list[str]:
        group = self.relays.get(relay)
        if group is None:
            raise ValueError(f"{relay} sent a partial sum but aggregates nothing for this task")
        covered = [str(s) for s in partial.meta.get("responded", [])]
        if not covered or len(set(covered)) != len(covered):
            raise ValueError(f"a partial sum from {relay} names its sites badly: {covered}")
        if not set(covered) <= group & self.pending:
            raise ValueError(f"a partial sum from {relay} for sites not awaited from it: {covered}")
        weight = float(partial.meta.get(WEIGHT_KEY, float("nan")))
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"a partial sum from {relay} with weight {weight!r}")
        return covered

    def _commit_partial(self, relay: str, partial: FLModel, covered: list[str]) -> None:
        result = self.result
        group = self.relays[relay]
        result.partials += 1
        for site in covered:
            result.responded.append(site)
            self.settle(site)
        for site, metrics in dict(partial.meta.get("metrics", {})).items():
            if site in covered:
                result.metrics[str(site)] = {str(k): float(v) for k, v in dict(metrics).items()}
        for site, why in dict(partial.meta.get("failed", {})).items():
            if site in self.pending and site in group:
                result.failed[str(site)] = f"{why} (reported by {relay})"
                self.settle(str(site))


SPILL_AT = 8 << 20
"""Results at least this large (or of unknown size) go to a file first and are folded from it
(mapped, a tensor at a time) once complete and verified: the receiver's memory stays one
tensor's, whatever the number of clients sending at once."""


async def receive_result(
    collector: _Collector,
    site: str,
    stream: IncomingStream,
    spill: Path | None,
    verifier: SignatureVerifier | None = None,
    receiver: str = "",
    decryptor: Decryptor | None = None,
) -> bytes:
    """Take one result stream into ``collector``: small ones in memory, large ones through a
    spill file in ``spill`` (default: the system's temporary folder). With ``verifier``, the
    result counts only if its end-to-end signature holds (checked once all bytes arrived).

    A result sealed for this cell's key (``enc`` header) is opened with ``decryptor`` once it
    arrived whole and its signature held.

    Raises:
        IntegrityError: a signature that does not hold, or a sealed result that does not open
            (or no key to open it); the site counts as failed.
    """
    sealed = stream.headers.get("enc", "")
    if sealed and (sealed != E2E or decryptor is None):
        collector.reject(site, f"IntegrityError: a sealed result ({sealed}) this cell cannot open")
        raise IntegrityError(f"{receiver} cannot open a result sealed as {sealed!r}")

    def check() -> None:
        if verifier is None:
            return
        try:
            check_signed(verifier, stream, receiver)
        except IntegrityError as exc:
            collector.reject(site, f"IntegrityError: {exc}")
            raise

    if stream.size is not None and stream.size < SPILL_AT:
        payload = await stream.read_all()
        check()
        parts = payload.parts
        if sealed and decryptor is not None:
            parts = (b"".join(await anyio.to_thread.run_sync(_opened, decryptor, parts)),)
        return await collector.offer(site, parts)
    folder = spill if spill is not None else Path(tempfile.gettempdir())
    path = folder / f"flare-result-{secrets.token_hex(8)}"
    await anyio.to_thread.run_sync(lambda: folder.mkdir(parents=True, exist_ok=True))
    try:
        await stream.save(path)
        check()
        if sealed and decryptor is not None:
            opened = path.with_name(path.name + ".open")
            try:
                await anyio.to_thread.run_sync(decryptor.decrypt_file, path, opened)
            except IntegrityError as exc:
                collector.reject(site, f"IntegrityError: {exc}")
                raise
            finally:
                await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
            opened.rename(path)
        with path.open("rb") as f:  # opening a local file is quick
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # The arrays are views of the mapping; it unmaps when the last of them is gone.
        return await collector.offer(
            site, memoryview(mapped), in_thread=True, on_folded=_dropper(mapped)
        )
    finally:
        await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))


def _sha256(parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def _opened(decryptor: Decryptor, parts: Any) -> list[bytes]:
    return list(decryptor.decrypt(parts))


def _dropper(mapped: mmap.mmap) -> Folded:
    """After a tensor is folded, drop its pages from this process (they stay in the page
    cache until the file is removed)."""
    base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data if len(mapped) else 0
    page = mmap.PAGESIZE

    def drop(name: str, array: np.ndarray) -> None:
        start = array.ctypes.data - base
        if array.nbytes == 0 or not 0 <= start <= len(mapped) - array.nbytes:
            return  # not a view of the file (a dequantized copy)
        aligned = start - start % page
        mapped.madvise(mmap.MADV_DONTNEED, aligned, start + array.nbytes - aligned)

    return drop


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
        on_round: called with each finished round (progress output, metrics).
        spill: where large results wait, complete, before they are folded (default: the
            system's temporary folder).
        on_reject: called with ``(site, task, reason)`` for every result refused (unusable,
            damaged, or failing its signature): the job service writes it to the audit log.
        verifier: check every result's end-to-end signature (a deployment: the project CA).
        decryptor: opens results sealed for this server's key (``FedAvgRecipe(encrypt=)``).
        signer: signs every task (the digest of the model, the task id) so sites can check
            that no relay changed the model on its way down.
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
    ) -> None:
        self.signer = signer
        self.decryptor = decryptor
        self.on_reject = on_reject
        self.verifier = verifier
        if verifier is not None:
            cell.require_digest(CHANNEL, "result")  # the signed digest is checked against it
        self.cell = cell
        self.spill = Path(spill) if spill is not None else None
        return_large_blocks()  # a new model every round: freed memory goes back
        self.digest = digest
        self.hierarchical = hierarchical
        self.clients = list(clients)
        self.job = job
        self.codec = codec
        self.rng = random.Random(seed)
        self.on_round = on_round
        self._open: dict[str, _Collector] = {}
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

        return table

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
        n = len(self.clients)
        want = min(n, max(minimum, math.ceil(fraction * n)))
        return sorted(self.rng.sample(self.clients, want))

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
    ) -> RoundResult:
        """Send ``model`` to ``targets`` and fold their results in as they arrive, until all
        answered or ``deadline`` seconds passed.

        ``fold_with`` replaces the weighted sum for this round (each result goes to it; see
        ``secure_round``), ``headers`` go with every task.

        Raises:
            RoundFailed: fewer than ``min_responses`` (default: all targets) results.
        """
        need = len(targets) if min_responses is None else min_responses
        self._tasks += 1
        # A fresh random part: after a restart the same round must not reuse a task id (a
        # result signed for the old one could be replayed into the new one).
        task_id = f"{self.job}:{model.current_round}:{self._tasks}:{secrets.token_hex(4)}"
        collector = _Collector(task_id, model.current_round or 0, targets, fold_with)
        self._open[task_id] = collector
        task_headers = {**(headers or {}), "job": self.job, "task": task_id, "kind": task}
        try:
            parts = model_parts(model, self.cell.codecs, self.codec)
            sha = ""
            if self.signer is not None:  # one digest, one signature, for every destination
                sha = await anyio.to_thread.run_sync(_sha256, parts)
                fields = {"src": self.cell.name, "task": task_id, "sha256": sha, "topic": "task"}
                task_headers.update(self.signer.sign(fields))
            if self.hierarchical:
                task_headers["aggregate"] = "parent"
                secure = task_headers.get("secagg", "")
                await self._arm_relays(collector, list(targets), task_id, deadline, secure)
            with anyio.move_on_after(deadline):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._deliver, collector, list(targets), parts, task_headers, sha)
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
                f"answered, {need} needed ({result.failed})"
            )
        self._log.info(
            "round done",
            round=result.round,
            responded=len(result.responded),
            failed=len(result.failed),
        )
        if self.on_round is not None:
            self.on_round(result)
        return result

    async def _arm_relays(
        self,
        collector: _Collector,
        targets: list[str],
        task_id: str,
        deadline: float,
        secure: str = "",
    ) -> None:
        """Tell each relay which of its children answer this task, and by when (a little
        before the round's deadline, so its partial sum arrives in time); in a secure round
        (``secure``: the session), it adds up masked vectors instead."""
        groups: dict[str, list[str]] = {}
        for site in targets:
            parent = site.rsplit(".", 1)[0]
            if parent != self.cell.name:
                groups.setdefault(parent, []).append(site)
        for relay, sites in groups.items():
            collector.relays[relay] = set(sites)
            plan = {"task": task_id, "sites": sites, "deadline": 0.9 * deadline, "secure": secure}
            body = json.dumps(plan)
            try:
                await self.cell.request(relay, CHANNEL, "expect", body.encode(), timeout=10)
            except FlareError as exc:
                for site in sites:
                    collector.result.failed[site] = f"relay {relay}: {exc}"
                    collector.settle(site)

    async def _deliver(
        self,
        collector: _Collector,
        targets: list[str],
        parts: list[Any],
        headers: dict[str, str],
        sha: str = "",
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

    async def stop_clients(self) -> None:
        """Tell every client the job is over (their ``is_running()`` turns False)."""
        await self.cell.broadcast(
            self.clients, CHANNEL, "stop", b"", timeout=10, headers={"job": self.job}
        )
