"""FedBuff: the sampler draws clients without replacement, skips busy and resting ones; on the
demo task (digits) the asynchronous mode converges with clients of widely different speeds,
and keeps making progress while a third of the clients never answer."""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flare_async.client as flare
from flare_async.fl import (
    FedBuffStats,
    FLModel,
    FLServer,
    RoundFailed,
    fedbuff,
    simulate,
)
from flare_async.fl._fedbuff import Sampler, staleness_weight

pytest.importorskip("torch")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import torch
from fedavg_digits import accuracy, load, make_model, site_data

pytestmark = pytest.mark.anyio
SITES = 6


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # training scripts in threads, real time


def test_the_sampler_uses_every_client_once_per_pass_and_skips_busy_and_resting() -> None:
    clients = [f"c{i}" for i in range(5)]
    sampler = Sampler(clients, random.Random(1))
    first = [sampler.next(0.0) for _ in range(5)]
    assert sorted(first) == clients  # without replacement
    assert sampler.next(0.0) is None  # all busy
    for site in first:
        sampler.done(site)
    second = [sampler.next(0.0) for _ in range(5)]
    assert sorted(second) == clients
    sampler.done(second[0], rest=10.0, now=0.0)
    for site in second[1:]:
        sampler.done(site)
    third = {sampler.next(1.0) for _ in range(4)}
    assert second[0] not in third  # resting
    assert sampler.next(1.0) is None
    for site in third:
        assert site is not None
        sampler.done(site)
    after_rest = {sampler.next(11.0) for _ in range(5)}
    assert second[0] in after_rest  # back once its rest is over


def test_staleness_discounts_older_updates() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(3, 0.0) == 1.0


DELAYS = [0.0, 0.0, 0.05, 0.05, 0.4, 0.4]  # seconds per task: fast, medium, slow sites
FAST_SENT = [0]
"""Updates the two fast sites sent so far: a slow site's k-th answer waits for 12 k of them
(at most 1 s), not for a fixed time, so that it lands late but within the run however fast
the machine trains (with a fixed 0.4 s, a quick run ended before any slow site answered)."""
FAST = threading.Condition()


def train_at_own_speed() -> None:
    """The demo's training loop, one epoch per task, each site at its own pace."""
    config = flare.get_config()
    site = int(config["site_index"])
    x, y = site_data(site, SITES)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    answered = 0
    while (received := flare.receive()) is not None:
        if config.get("offline") and site in config["offline"]:
            continue  # this site never answers: as if it were unreachable
        model.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in received.params.items()}
        )
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(site))
        for i in range(0, len(xt), 32):
            b = perm[i : i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
        answered += 1
        if DELAYS[site] >= 0.4:
            need = 12 * answered
            with FAST:
                FAST.wait_for(lambda: FAST_SENT[0] >= need, timeout=1.0)  # noqa: B023
        else:
            time.sleep(DELAYS[site])
        flare.send(
            FLModel(
                params={k: v.detach().numpy() for k, v in model.state_dict().items()},
                meta={"num_samples": len(xt)},
            )
        )
        if DELAYS[site] == 0.0:
            with FAST:
                FAST_SENT[0] += 1
                FAST.notify_all()


async def run(
    offline: list[int], updates: int, deadline: float, max_staleness: int = 8
) -> tuple[float, FedBuffStats]:
    _, x_test, _, y_test = load()
    FAST_SENT[0] = 0

    async def workflow(server: FLServer) -> FLModel:
        initial = {k: v.numpy() for k, v in make_model().state_dict().items()}
        return await fedbuff(
            server,
            initial,
            updates=updates,
            buffer=3,
            concurrency=SITES,
            max_staleness=max_staleness,
            deadline=deadline,
            retry_after=0.5,
            seed=0,
        )

    final: FLModel = await simulate(
        workflow, train_at_own_speed, clients=SITES, config={"offline": offline}
    )
    stats = final.meta["fedbuff"]
    assert isinstance(stats, FedBuffStats)
    return accuracy(dict(final.params), x_test, y_test), stats


async def test_fedbuff_converges_with_clients_of_widely_different_speeds() -> None:
    acc, stats = await run(offline=[], updates=30, deadline=10.0, max_staleness=100)
    assert stats.version == 30
    assert acc > 0.8, acc  # from 0.1; 0.85-0.96 here, depending on which updates landed when
    fast = stats.updates.get("server.site-1", 0) + stats.updates.get("server.site-2", 0)
    slow = stats.updates.get("server.site-5", 0) + stats.updates.get("server.site-6", 0)
    assert fast > 3 * slow > 0  # nobody waited for the slow sites, and they still counted
    assert max(stats.staleness) >= 5  # slow updates arrived versions late, discounted
    assert stats.stale == 0


async def test_fedbuff_makes_progress_while_a_third_of_clients_are_offline() -> None:
    acc, stats = await run(offline=[2, 4], updates=20, deadline=3.0)  # site-3, site-5
    assert stats.version == 20
    assert acc > 0.8, acc
    for site in ("server.site-3", "server.site-5"):
        assert stats.tasks[site] >= 1  # sampled like the others (without replacement)
        assert stats.updates.get(site, 0) == 0  # and never held a version back
    assert sum(stats.updates.values()) == 20 * 3


async def test_fedbuff_gives_up_by_name_when_no_client_answers() -> None:
    def silent() -> None:
        while flare.receive() is not None:
            pass  # takes every task, answers none

    async def workflow(server: FLServer) -> Any:
        return await fedbuff(
            server, {"w": np.zeros(2)}, updates=1, deadline=0.2, retry_after=0.1,
            give_up_after=1.0,
        )  # fmt: skip

    with pytest.raises(RoundFailed, match="no usable update for 1 s"):
        await simulate(workflow, silent, clients=2)


async def test_a_result_that_weighs_nothing_is_a_failed_task_not_a_crash() -> None:
    # The honest site answers only once the weightless one's answer was taken (send returns
    # when the server has it): otherwise its two updates could end the run first.
    answered = threading.Event()

    def weightless() -> None:
        while (model := flare.receive()) is not None:
            flare.send(FLModel(params=dict(model.params), meta={"num_samples": 0}))
            answered.set()

    def honest() -> None:
        while (model := flare.receive()) is not None:
            answered.wait(30)
            params = {k: np.asarray(v) + 1 for k, v in model.params.items()}
            flare.send(FLModel(params=params, meta={"num_samples": 1}))

    async def workflow(server: FLServer) -> FLModel:
        return await fedbuff(server, {"w": np.zeros(2)}, updates=2, buffer=1, deadline=5)

    out = await simulate(
        workflow, {"server.site-1": weightless, "server.site-2": honest}, clients=2
    )
    stats = out.meta["fedbuff"]
    assert stats.failed.get("server.site-1", 0) >= 1
    assert "server.site-1" not in stats.updates
    assert np.allclose(out.params["w"], 2.0)
