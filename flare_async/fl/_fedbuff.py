"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022).

The server keeps ``concurrency`` clients training at once, each on the model version that was
current when it was sampled. A client's update (its model minus the version it trained on, or
its DIFF) enters a buffer weighted by its weight ``n`` (``result_weight``: ``num_samples``, else
``NUM_STEPS_CURRENT_ROUND``, else 1) and by its staleness ``tau`` (versions published since it
was sampled): ``s(tau) = (1 + tau) ** -staleness_exponent``; updates staler than
``max_staleness`` are dropped. Every ``buffer`` updates the server publishes a new version:
``x += server_lr * sum(s * n * delta) / sum(n)``, tensor by tensor over the updates that carried
that tensor (one no update carried stays as it was), in each tensor's own dtype (integer
tensors rounded; the sums in float32, or float64 for float64 and integer tensors). No round
waits for its slowest client: a fast client trains again as soon as it answers, a slow one
contributes when it can, an offline one does not hold anything up.

Clients are sampled without replacement: every client is used once before any is used again
(a pass), skipping those busy or resting. A client whose task failed (unreachable, no answer
by ``deadline``, its script failed) rests ``retry_after`` seconds and is then sampled again,
so clients that join late, leave and come back are picked up as they are.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from flare_async.codecs import as_numpy
from flare_async.fl._aggregate import acc_dtype, to_dtype
from flare_async.fl._model import FLModel, ParamsType, params_format_of
from flare_async.fl._server import FLServer, RoundFailed


@dataclass
class FedBuffStats:
    """What a FedBuff run did (``on_update`` gets it after every new version).

    Attributes:
        version: model versions published so far.
        tasks: tasks sent, per client.
        updates: client updates folded in, per client.
        stale: updates dropped for staleness beyond the maximum.
        failed: tasks that failed (the client then rested), per client.
        staleness: the staleness of every update folded in, in order.
        metrics: what ``evaluate`` returned, per version.
    """

    version: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)
    stale: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    staleness: list[int] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)


class Sampler:
    """Clients without replacement: each pass uses every available client once, in a random
    order; busy and resting clients are skipped (and taken in the next pass)."""

    def __init__(self, clients: Sequence[str], rng: random.Random) -> None:
        self.clients = list(clients)
        self.rng = rng
        self.busy: set[str] = set()
        self.resting: dict[str, float] = {}
        self._pass: list[str] = []
        self.passes = 0

    def next(self, now: float) -> str | None:
        """The next client to train, or None when every client is busy or resting."""
        for site in [s for s, until in self.resting.items() if until <= now]:
            del self.resting[site]
        for _ in range(2):
            while self._pass:
                site = self._pass.pop()
                if site not in self.busy and site not in self.resting:
                    self.busy.add(site)
                    return site
            free = [s for s in self.clients if s not in self.busy and s not in self.resting]
            if not free:
                return None
            self.rng.shuffle(free)
            self._pass = free
            self.passes += 1
        return None

    def done(self, site: str, *, rest: float | None = None, now: float = 0.0) -> None:
        self.busy.discard(site)
        if rest is not None:
            self.resting[site] = now + rest


def staleness_weight(tau: int, exponent: float = 0.5) -> float:
    """``s(tau) = (1 + tau) ** -exponent``: the weight of an update ``tau`` versions old."""
    return math.pow(1.0 + tau, -exponent)


class _Run:
    """One FedBuff run's state: the model, its recent versions, the buffer."""

    def __init__(
        self,
        server: FLServer,
        initial: Mapping[str, Any],
        *,
        buffer: int,
        max_staleness: int,
        staleness_exponent: float,
        server_lr: float,
        deadline: float,
        evaluate: Callable[[int, dict[str, np.ndarray]], Mapping[str, float]] | None,
        on_update: Callable[[FedBuffStats], None] | None,
        concurrency: int,
    ) -> None:
        self.server = server
        self.buffer = buffer
        self.max_staleness = max_staleness
        self.exponent = staleness_exponent
        self.server_lr = server_lr
        self.deadline = deadline
        self.evaluate = evaluate
        self.on_update = on_update
        self.model = {k: np.array(as_numpy(v)) for k, v in initial.items()}  # dtypes kept
        self.snapshots: dict[int, dict[str, np.ndarray]] = {0: self.model}
        self.stats = FedBuffStats()
        self.acc: dict[str, np.ndarray] = {}
        """``sum(s * n * delta)`` of each tensor some buffered update carried."""
        self.acc_weights: dict[str, float] = {}
        """``sum(n)`` of each tensor, over the buffered updates that carried it."""
        self.acc_count = 0
        self.send, self.receive = anyio.create_memory_object_stream[tuple[str, int, Any]](
            concurrency
        )

    async def train(
        self,
        site: str,
        version: int,
        on_delivered: Callable[[str, Mapping[str, Any]], None] | None = None,
        scope: anyio.CancelScope | None = None,
    ) -> None:
        """One task for ``site`` on ``version``; its outcome goes to :attr:`receive`. If
        ``scope`` is cancelled while the task waits, it is withdrawn (no outcome)."""
        task = FLModel(params=self.snapshots[version], current_round=version)
        self.stats.tasks[site] = self.stats.tasks.get(site, 0) + 1
        result: Any = None
        with scope or anyio.CancelScope():
            try:
                result = await self.server.run_round(
                    task, [site], min_responses=1, deadline=self.deadline, on_delivered=on_delivered
                )
            except RoundFailed as exc:
                result = exc
        if result is not None:
            await self.send.send((site, version, result))

    def take(self, site: str, version: int, result: Any) -> bool | None:
        """Fold one outcome in: ``None`` if it failed (no result, one weighing nothing, or one
        with tensors the model has not or of other shapes), False if it was too stale to count,
        True if it was folded."""
        stats = self.stats
        if isinstance(result, RoundFailed) or not result.responded or not result.sum.weight:
            stats.failed[site] = stats.failed.get(site, 0) + 1
            return None
        tau = stats.version - version
        if tau > self.max_staleness:
            stats.stale += 1
            return False
        total = result.sum
        base = self.snapshots[version]
        names = [n for n in total.names() if total.weight_of(n) > 0]
        for name in names:  # all checked before any is folded
            shape = base[name].shape if name in base else None
            if shape != total.shape_of(name):
                self.server._log.warning(
                    "FedBuff update does not fit the model", site=site, tensor=name
                )
                stats.failed[site] = stats.failed.get(site, 0) + 1
                return None
        discount = staleness_weight(tau, self.exponent)
        for name in names:
            weight = total.weight_of(name)
            mean = total.mean_of(name)
            delta = mean if total.params_type is ParamsType.DIFF else mean - base[name]
            acc = self.acc.get(name)
            if acc is None:
                acc = self.acc[name] = np.zeros(mean.shape, acc_dtype(self.model[name].dtype))
            acc += (weight * discount * delta).astype(acc.dtype, copy=False)
            self.acc_weights[name] = self.acc_weights.get(name, 0.0) + weight
        self.acc_count += 1
        stats.updates[site] = stats.updates.get(site, 0) + 1
        stats.staleness.append(tau)
        if self.acc_count >= self.buffer:
            self._publish()
        return True

    def _publish(self) -> None:
        model = dict(self.model)  # the tensors no buffered update carried: the same arrays
        for name, acc in self.acc.items():
            was = model[name]
            step = self.server_lr / self.acc_weights[name]
            model[name] = to_dtype(was + step * acc, was.dtype)
        self.model = model
        self.acc, self.acc_weights, self.acc_count = {}, {}, 0
        stats = self.stats
        stats.version += 1
        self.snapshots[stats.version] = self.model
        for old in [v for v in self.snapshots if v < stats.version - self.max_staleness]:
            del self.snapshots[old]  # no update that old is accepted any more
        if self.evaluate is not None:
            stats.metrics[stats.version] = dict(self.evaluate(stats.version, self.model))
        if self.on_update is not None:
            self.on_update(stats)

    def result(self, passes: int) -> FLModel:
        return FLModel(
            params=self.model,
            current_round=self.stats.version,
            meta={"fedbuff": self.stats, "passes": passes},
            metrics=self.stats.metrics.get(self.stats.version, {}),
        )


async def fedbuff(
    server: FLServer,
    initial: Mapping[str, Any],
    *,
    updates: int,
    buffer: int = 10,
    concurrency: int = 20,
    max_staleness: int = 10,
    staleness_exponent: float = 0.5,
    server_lr: float = 1.0,
    deadline: float = 60.0,
    retry_after: float = 5.0,
    give_up_after: float | None = None,
    evaluate: Callable[[int, dict[str, np.ndarray]], Mapping[str, float]] | None = None,
    on_update: Callable[[FedBuffStats], None] | None = None,
    seed: int | None = None,
    clock: Callable[[], float] | None = None,
    pull: bool = False,
) -> FLModel:
    """Run FedBuff until ``updates`` model versions are published (see the module text).

    Args:
        buffer: client updates per new version (K).
        concurrency: clients training at once.
        max_staleness: updates from more versions back than this are dropped.
        staleness_exponent: ``a`` in ``s(tau) = (1 + tau) ** -a`` (0: no discount).
        server_lr: the server's step on the buffered mean update.
        deadline: seconds a client has for one task (pulled: from the pull to the push).
        retry_after: seconds a client whose task failed rests before it is sampled again;
            pulled: what a client is told to wait when every slot is taken.
        give_up_after: seconds without a usable update before the run fails with
            ``RoundFailed`` (default: ten times ``deadline``).
        evaluate: ``(version, params) -> metrics`` on each new version (server-side data).
        on_update: called with the statistics after each new version.
        pull: the clients come for their tasks (``fl/pull``: edge clients online now and
            then, see :class:`~flare_async.fl.EdgeClient`) instead of being sent them.

    Returns:
        the last version, with ``meta["fedbuff"]``: the statistics.
    """
    if updates < 1 or buffer < 1 or concurrency < 1:
        raise ValueError("updates, buffer and concurrency must be at least 1")
    if not server.clients:
        raise RoundFailed("FedBuff needs clients; the server has none")
    if pull and server.hierarchical:
        raise ValueError("pulled tasks are answered to the server: no relay folds them")
    if server.params_format is None:  # the sites' scripts get their framework back
        server.params_format = params_format_of(initial)
    run = _Run(
        server,
        initial,
        buffer=buffer,
        max_staleness=max_staleness,
        staleness_exponent=staleness_exponent,
        server_lr=server_lr,
        deadline=deadline,
        evaluate=evaluate,
        on_update=on_update,
        concurrency=concurrency,
    )
    now = clock or anyio.current_time
    patience = 10 * deadline if give_up_after is None else give_up_after
    if pull:
        return await _pulled(run, updates, concurrency, retry_after, patience, now)
    sampler = Sampler(server.clients, random.Random(seed))
    gave_up: RoundFailed | None = None
    stats = run.stats
    async with run.send, run.receive, anyio.create_task_group() as tg:
        in_flight = 0
        last_good = now()
        while stats.version < updates:
            if now() - last_good > patience:  # raised below, outside the task group
                gave_up = _give_up(patience, stats)
                break
            while in_flight < concurrency:
                site = sampler.next(now())
                if site is None:
                    break
                tg.start_soon(run.train, site, stats.version)
                in_flight += 1
            if in_flight == 0:  # everyone is resting: wait for the first to be back
                wake = min(sampler.resting.values(), default=now() + retry_after)
                await anyio.sleep(min(max(0.0, wake - now()), patience))
                continue
            site, version, result = await run.receive.receive()
            in_flight -= 1
            taken = run.take(site, version, result)
            sampler.done(site, rest=retry_after if taken is None else None, now=now())
            if taken:
                last_good = now()
        tg.cancel_scope.cancel()  # the clients still training: their answers are not needed
    if gave_up is not None:
        raise gave_up
    return run.result(sampler.passes)


def _give_up(patience: float, stats: FedBuffStats) -> RoundFailed:
    return RoundFailed(
        f"FedBuff: no usable update for {patience:g} s (version {stats.version}, "
        f"failures {stats.failed})"
    )


@dataclass
class _Held:
    """A pulled task out: its cancel scope, and its id once it reached the client."""

    scope: anyio.CancelScope
    task: str = ""


async def _pulled(
    run: _Run,
    updates: int,
    concurrency: int,
    retry_after: float,
    patience: float,
    now: Callable[[], float],
) -> FLModel:
    """FedBuff with tasks pulled by the clients: at most ``concurrency`` out at once, one per
    client. A client that pulls while holding a task lost it (its link dropped mid-download,
    it restarted): the old task is dropped and a new one granted.

    Pulls are sampled without replacement too: a pass serves each client once; a client
    already served in this pass is told to wait while a client not yet served is checking in
    (was told to wait within the last ``3 * retry_after``); once none is, a new pass begins
    (those not seen are offline, and not waited for). A client that pulls again while its
    result is already in is not treated as having lost its task."""
    stats = run.stats
    holding: dict[str, _Held] = {}  # the task each client holds
    served: set[str] = set()
    asked: dict[str, float] = {}  # sites told to wait, by when they asked, oldest first
    passes = 0
    gave_up: RoundFailed | None = None

    def fair(site: str) -> bool:
        nonlocal passes
        recent = now() - 3 * retry_after
        while asked and next(iter(asked.values())) < recent:
            del asked[next(iter(asked))]
        if site not in served:
            return True
        if any(s not in served for s in asked):
            return False
        served.clear()
        passes += 1
        return True

    async def grant(site: str) -> dict[str, Any]:
        old = holding.pop(site, None)
        if old is not None and old.task and run.server.awaiting(old.task, site):
            old.scope.cancel()  # it lost its task: a new one replaces it
        if len(holding) >= concurrency or not fair(site):
            asked.pop(site, None)
            asked[site] = now()
            return {"wait": retry_after}
        served.add(site)
        asked.pop(site, None)
        version = stats.version
        held = holding[site] = _Held(anyio.CancelScope())
        delivered = anyio.Event()
        outcome: dict[str, Any] = {}

        def on_delivered(task: str, outcomes: Mapping[str, Any]) -> None:
            held.task = task
            outcome["task"], outcome["outcome"] = task, outcomes.get(site)
            delivered.set()

        async def train() -> None:
            try:
                await run.train(site, version, on_delivered, held.scope)
            finally:
                delivered.set()
                if holding.get(site) is held:
                    del holding[site]

        tg.start_soon(train)
        await delivered.wait()
        sent = outcome.get("outcome")
        if "task" not in outcome or isinstance(sent, BaseException):
            return {"wait": retry_after, "error": str(sent or "the task was withdrawn")}
        return {"task": outcome["task"], "version": version}

    async with run.send, run.receive, anyio.create_task_group() as tg:
        with run.server.serving_pulls(grant):
            last_good = now()
            while stats.version < updates:
                left = patience - (now() - last_good)
                if left <= 0:
                    gave_up = _give_up(patience, stats)
                    break
                with anyio.move_on_after(left):
                    site, version, result = await run.receive.receive()
                    if run.take(site, version, result):
                        last_good = now()
        tg.cancel_scope.cancel()
    if gave_up is not None:
        raise gave_up
    return run.result(passes + 1)


__all__ = ["FedBuffStats", "Sampler", "fedbuff", "staleness_weight"]
