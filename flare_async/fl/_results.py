"""What a round gathers: each task's collector (results folded in as they arrive, relays'
partial sums checked against the sites they were armed for) and the receiving of one result
stream, in memory or through a spill file, with its signature checked and its seal opened."""

from __future__ import annotations

import math
import mmap
import secrets
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import blake3
import msgspec
import numpy as np

from flare_async.cell import Cell, IncomingStream
from flare_async.errors import BadRequest, DecodeError, FlareError, IntegrityError
from flare_async.fl._aggregate import (
    WEIGHT_KEY,
    Folded,
    RoundMismatch,
    WeightedSum,
    result_weight,
)
from flare_async.fl._model import FLModel, model_from_parts
from flare_async.fl._signed import CHANNEL, E2E, check_signed
from flare_async.fl._updates import Updates
from flare_async.security import Decryptor, SignatureVerifier
from flare_async.streaming import format_digest


class RoundFailed(FlareError):
    """Fewer clients than the minimum answered a round before its deadline.

    Attributes:
        failed: each client that did not answer, and why (as it said).
    """

    def __init__(self, message: str, failed: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})


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
        updates: see below.
    """

    round: int
    sum: WeightedSum = field(default_factory=WeightedSum)
    responded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    late: int = 0
    partials: int = 0
    updates: Updates | None = None
    """Each site's result itself, when the round collected them one by one
    (``run_round(collect="each")``); then :attr:`sum` stays empty."""

    def mean_metrics(self) -> dict[str, float]:
        """Each metric averaged over the clients that reported it."""
        keys = {k for m in self.metrics.values() for k in m}
        return {
            k: sum(m[k] for m in self.metrics.values() if k in m)
            / sum(1 for m in self.metrics.values() if k in m)
            for k in sorted(keys)
        }


class Collector:
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
        """Fold one site's result in (a site's own, weighted by :func:`result_weight`, or a
        relay's partial sum for its sites).

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
                    if self.fold_with is not None:
                        fold = partial(self.fold_with, site, update)
                    else:
                        weight = result_weight(update.meta)
                        fold = partial(
                            result.sum.add, update.params, weight, update.params_type, on_folded
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
    collector: Collector,
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


def digest_of(parts: Any) -> str:
    """The BLAKE3 digest of ``parts`` in a stream's text form (``"blake3:<hex>"``): what a
    signed task's stream announces and its signature covers."""
    h = blake3.blake3()
    for p in parts:
        h.update(p)
    return format_digest("blake3", h.hexdigest())


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


class RelayPlan(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a cell tells a relay directly below it before a task (``fl/expect``, JSON): the
    task, the sites under the relay that answer it, the seconds the relay has to send its
    partial sum up, and (a secure round) the secure-aggregation session."""

    task: str
    deadline: float
    sites: list[str] = msgspec.field(default_factory=list)
    secure: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.deadline) and 0 < self.deadline <= MAX_PLAN_DEADLINE):
            raise ValueError(f"a relay's deadline must be within (0, {MAX_PLAN_DEADLINE:g}] s")

    def below(self) -> RelayPlan:
        """The plan for the relays below this one: a little less time, to fold and send up."""
        return msgspec.structs.replace(self, deadline=0.9 * self.deadline)


MAX_PLAN_DEADLINE = 7 * 86400.0


def child_on_path(cell: str, site: str) -> str | None:
    """The relay directly below ``cell`` on the way to ``site``; None if ``site`` is ``cell``'s
    own child (or not below it)."""
    rest = site.removeprefix(cell + ".")
    if rest == site or "." not in rest:
        return None
    return f"{cell}.{rest.split('.', 1)[0]}"


async def arm_relays_below(
    cell: Cell, collector: Collector, sites: Sequence[str], plan: RelayPlan, timeout: float
) -> None:
    """Tell each relay directly below ``cell`` which of ``sites`` under it answer the task
    (``fl/expect``: ``plan`` plus its share of the sites), all at once; only they may then send
    ``collector`` partial sums, for those sites. The sites of a relay that cannot be armed
    within ``timeout`` count as failed."""
    groups: dict[str, list[str]] = {}
    for site in sites:
        relay = child_on_path(cell.name, site)
        if relay is not None:
            groups.setdefault(relay, []).append(site)

    async def arm(relay: str, share: list[str]) -> None:
        collector.relays[relay] = set(share)
        body = msgspec.json.encode(msgspec.structs.replace(plan, sites=share))
        try:
            await cell.request(relay, CHANNEL, "expect", body, timeout=timeout)
        except FlareError as exc:
            del collector.relays[relay]
            for site in share:
                collector.result.failed[site] = f"relay {relay}: {exc}"
                collector.settle(site)

    async with anyio.create_task_group() as tg:
        for relay, share in groups.items():
            tg.start_soon(arm, relay, sorted(share))


__all__ = [
    "SPILL_AT",
    "Collector",
    "RoundFailed",
    "RelayPlan",
    "RoundResult",
    "arm_relays_below",
    "child_on_path",
    "receive_result",
    "digest_of",
]
