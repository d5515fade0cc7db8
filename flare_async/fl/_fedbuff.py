"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022).

The server keeps ``concurrency`` clients training at once, each on the model version that was
current when it was sampled. A client's update (its model minus the version it trained on, or
its DIFF) enters a buffer weighted by ``num_samples`` and by its staleness ``tau`` (versions
published since it was sampled): ``s(tau) = (1 + tau) ** -staleness_exponent``; updates staler
than ``max_staleness`` are dropped. Every ``buffer`` updates the server publishes a new version:
``x += server_lr * sum(s * n * delta) / sum(n)``. No round waits for its slowest client: a
fast client trains again as soon as it answers, a slow one contributes when it can, an offline
one does not hold anything up.

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

from flare_async.fl._model import FLModel, ParamsType
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


def _params_of(result: Any) -> tuple[dict[str, np.ndarray], float, ParamsType]:
    """One client's params (its weighted sum divided by its weight) and weight."""
    total = result.sum
    return total.mean(), float(total.weight), total.params_type or ParamsType.FULL


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
) -> FLModel:
    """Run FedBuff until ``updates`` model versions are published (see the module text).

    Args:
        buffer: client updates per new version (K).
        concurrency: clients training at once.
        max_staleness: updates from more versions back than this are dropped.
        staleness_exponent: ``a`` in ``s(tau) = (1 + tau) ** -a`` (0: no discount).
        server_lr: the server's step on the buffered mean update.
        deadline: seconds a client has for one task.
        retry_after: seconds a client whose task failed rests before it is sampled again.
        give_up_after: seconds without a usable update before the run fails with
            ``RoundFailed`` (default: ten times ``deadline``).
        evaluate: ``(version, params) -> metrics`` on each new version (server-side data).
        on_update: called with the statistics after each new version.

    Returns:
        the last version, with ``meta["fedbuff"]``: the statistics.
    """
    if updates < 1 or buffer < 1 or concurrency < 1:
        raise ValueError("updates, buffer and concurrency must be at least 1")
    if not server.clients:
        raise RoundFailed("FedBuff needs clients; the server has none")
    now = clock or anyio.current_time
    patience = 10 * deadline if give_up_after is None else give_up_after
    rng = random.Random(seed)
    sampler = Sampler(server.clients, rng)
    model = {k: np.array(v, dtype=np.float32) for k, v in initial.items()}
    snapshots: dict[int, dict[str, np.ndarray]] = {0: model}
    stats = FedBuffStats()
    acc: dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in model.items()}
    acc_weight = 0.0
    acc_count = 0
    gave_up: RoundFailed | None = None
    send, receive = anyio.create_memory_object_stream[tuple[str, int, Any]](concurrency)

    async def train(site: str, version: int) -> None:
        task = FLModel(params=snapshots[version], current_round=version)
        try:
            result: Any = await server.run_round(task, [site], min_responses=1, deadline=deadline)
        except RoundFailed as exc:
            result = exc
        await send.send((site, version, result))

    async with send, receive, anyio.create_task_group() as tg:
        in_flight = 0
        last_good = now()
        while stats.version < updates:
            if now() - last_good > patience:  # raised below, outside the task group
                gave_up = RoundFailed(
                    f"FedBuff: no usable update for {patience:g} s (version {stats.version}, "
                    f"failures {stats.failed})"
                )
                break
            while in_flight < concurrency:
                site = sampler.next(now())
                if site is None:
                    break
                tg.start_soon(train, site, stats.version)
                stats.tasks[site] = stats.tasks.get(site, 0) + 1
                in_flight += 1
            if in_flight == 0:  # everyone is resting: wait for the first to be back
                wake = min(sampler.resting.values(), default=now() + retry_after)
                await anyio.sleep(min(max(0.0, wake - now()), patience))
                continue
            site, version, result = await receive.receive()
            in_flight -= 1
            if isinstance(result, RoundFailed) or not result.responded or not result.sum.weight:
                # no result, or one that weighs nothing (num_samples 0): nothing to fold
                stats.failed[site] = stats.failed.get(site, 0) + 1
                sampler.done(site, rest=retry_after, now=now())
                continue
            sampler.done(site)
            tau = stats.version - version
            if tau > max_staleness:
                stats.stale += 1
                continue
            params, weight, kind = _params_of(result)
            base = snapshots[version]
            scale = weight * staleness_weight(tau, staleness_exponent)
            for name, value in params.items():
                delta = value if kind is ParamsType.DIFF else value - base[name]
                acc[name] += (scale * delta).astype(np.float32)
            acc_weight += weight
            acc_count += 1
            stats.updates[site] = stats.updates.get(site, 0) + 1
            stats.staleness.append(tau)
            last_good = now()
            if acc_count < buffer:
                continue
            step = server_lr / acc_weight
            model = {k: (v + step * acc[k]).astype(np.float32) for k, v in model.items()}
            acc = {k: np.zeros_like(v) for k, v in model.items()}
            acc_weight, acc_count = 0.0, 0
            stats.version += 1
            snapshots[stats.version] = model
            for old in [v for v in snapshots if v < stats.version - max_staleness]:
                del snapshots[old]  # no update that old is accepted any more
            if evaluate is not None:
                stats.metrics[stats.version] = dict(evaluate(stats.version, model))
            if on_update is not None:
                on_update(stats)
        tg.cancel_scope.cancel()  # the clients still training: their answers are not needed
    if gave_up is not None:
        raise gave_up
    return FLModel(
        params=model,
        current_round=stats.version,
        meta={"fedbuff": stats, "passes": sampler.passes},
        metrics=stats.metrics.get(stats.version, {}),
    )


__all__ = ["FedBuffStats", "Sampler", "fedbuff", "staleness_weight"]
