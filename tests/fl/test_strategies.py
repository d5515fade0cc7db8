"""The algorithms on FedAvg's loop, end to end in the simulator, against numpy references
written here from the papers' formulas: FedProx's μ reaching the sites, FedOpt's server
optimizer (and its state across a server restart), SCAFFOLD's two halves, robust rules over
every site's update (flat and through relays), and what may not be combined."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flare_async.client as flare
from flare_async.client.algorithms import Scaffold as ScaffoldSite
from flare_async.errors import ConfigError, DecodeError
from flare_async.fl import (
    FEDPROX_MU,
    SCAFFOLD_CONTROL,
    Ditto,
    FedAvg,
    FedAvgRecipe,
    FedOpt,
    FedProx,
    FLModel,
    ParamsType,
    Robust,
    RobustAggregation,
    Scaffold,
    fedavg,
    simulate,
)
from flare_async.fl._checkpoint import load
from tests._fl_scripts import answer_tasks

pytestmark = pytest.mark.anyio

INIT = {"w": np.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": np.array([0.5, -0.25])}
"""float64: the arithmetic is compared exactly (up to float64 rounding)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def site_result(i: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What site ``i`` (0-based) answers: a fixed affine map of what it got, its own."""
    a, c = 1.0 - 0.1 * (i + 1), 0.05 * (i + 1) * (-1) ** i
    return {k: a * np.asarray(v) + c for k, v in params.items()}


def weight(i: int) -> int:
    return i + 1


seen_meta: list[dict[str, Any]] = []


def affine(i: int, task: FLModel) -> FLModel:
    """Site ``i``'s answer: ``site_result`` of what it got, weighed ``weight(i)``."""
    out = site_result(i, {k: np.asarray(v) for k, v in task.params.items()})
    return FLModel(params=out, meta={"num_samples": weight(i)})


def affine_script() -> None:
    def respond(i: int, task: FLModel) -> FLModel:
        seen_meta.append(dict(task.meta))
        return affine(i, task)

    answer_tasks(respond)


def mean_of(params: dict[str, np.ndarray], sites: int) -> dict[str, np.ndarray]:
    total = sum(weight(i) for i in range(sites))
    return {
        k: sum(weight(i) * site_result(i, params)[k] for i in range(sites)) / total for k in params
    }


def run(strategy: FedAvg, rounds: int, sites: int = 3, relays: int = 0, **kw: Any) -> Any:
    return simulate(
        lambda s: fedavg(s, INIT, rounds=rounds, strategy=strategy, **kw),
        affine_script,
        clients=sites,
        relays=relays,
    )


async def test_fedprox_sends_mu_with_every_task_and_averages_as_fedavg() -> None:
    seen_meta.clear()
    out = await run(FedProx(mu=0.25), rounds=2)
    assert [m[FEDPROX_MU] for m in seen_meta] == [0.25] * 6
    ref = INIT
    for _ in range(2):
        ref = mean_of(ref, 3)
    for k in INIT:
        np.testing.assert_allclose(out.params[k], ref[k], rtol=1e-12)
    assert out.meta["strategy"] == {"name": "fedprox", "mu": 0.25}


def adam_reference(rounds: int, lr: float, b1: float, b2: float, tau: float) -> dict[str, Any]:
    x = {k: v.copy() for k, v in INIT.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v2 = {k: np.full_like(v, tau**2) for k, v in x.items()}
    for _ in range(rounds):
        target = mean_of(x, 3)
        for k, xk in x.items():
            d = target[k] - xk
            m[k] = b1 * m[k] + (1 - b1) * d
            v2[k] = b2 * v2[k] + (1 - b2) * d * d
            x[k] = xk + lr * m[k] / (np.sqrt(v2[k]) + tau)
    return x


async def test_fedopt_adam_steps_the_pseudo_gradient_as_the_paper_writes() -> None:
    out = await run(FedOpt(optimizer="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3), rounds=4)
    ref = adam_reference(4, 0.1, 0.9, 0.99, 1e-3)
    for k in INIT:
        np.testing.assert_allclose(out.params[k], ref[k], rtol=1e-12, atol=1e-15)


async def test_fedavgm_momentum_reference() -> None:
    out = await run(FedOpt(optimizer="avgm", lr=0.7, momentum=0.5), rounds=3)
    x = {k: v.copy() for k, v in INIT.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    for _ in range(3):
        target = mean_of(x, 3)
        for k, xk in x.items():
            m[k] = 0.5 * m[k] + (target[k] - xk)
            x[k] = xk + 0.7 * m[k]
    for k in INIT:
        np.testing.assert_allclose(out.params[k], x[k], rtol=1e-12)


class ServerDied(Exception):
    pass


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_fedopt_state_survives_a_server_restart(tmp_path: Path) -> None:
    """The moments are checkpointed with the model: a server that dies after round 2 and
    starts again on the same folder ends exactly where an uninterrupted one does (with the
    moments lost it would not: Adam's first step after a reset differs)."""
    strategy = FedOpt(optimizer="yogi", lr=0.05)
    whole = await run(strategy, rounds=5)

    def dies(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
        if rnd == 3:
            raise ServerDied
        return {}

    with pytest.raises(ServerDied):
        await run(strategy, rounds=5, checkpoints=tmp_path, evaluate=dies)
    assert listing(tmp_path) == ["last.safetensors", "last.state-2.safetensors"]
    resumed = await run(strategy, rounds=5, checkpoints=tmp_path)
    for k in INIT:  # the sites' results may fold in another order: float64 rounding
        np.testing.assert_allclose(resumed.params[k], whole.params[k], rtol=1e-12)
    assert [h["round"] for h in resumed.meta["history"]] == [0, 1, 2, 3, 4]
    assert listing(tmp_path) == ["last.safetensors", "last.state-4.safetensors"]


async def test_a_checkpoint_whose_state_file_is_gone_is_refused(tmp_path: Path) -> None:
    """Resuming without the moments would silently change the algorithm: refused by name."""
    await run(FedOpt(), rounds=1, checkpoints=tmp_path)
    (tmp_path / "last.state-0.safetensors").unlink()
    with pytest.raises(DecodeError, match="not a flare_async checkpoint"):
        await run(FedOpt(), rounds=2, checkpoints=tmp_path)


# ------------------------------------------------------------------------------------ SCAFFOLD
TARGETS = [np.array([1.0, -2.0, 0.5]), np.array([-1.0, 0.0, 3.0]), np.array([2.0, 2.0, -1.0])]
K, ETA = 4, 0.1


def scaffold_script() -> None:
    """Site i minimises 1/2 ||y - t_i||² by K corrected steps (the client helper's)."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    helper = ScaffoldSite()
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        y = {k: np.array(v, dtype=np.float32) for k, v in helper.receive(task).items()}
        for _ in range(K):
            g = helper.corrected({"w": y["w"] - TARGETS[i].astype(np.float32)})
            y["w"] = y["w"] - np.float32(ETA) * np.asarray(g["w"], dtype=np.float32)
        flare.send(helper.result(y, steps=K, lr=ETA, meta={"num_samples": weight(i)}))


def scaffold_reference(
    rounds: int, lr_g: float, sites: int = 3, taking: list[list[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SCAFFOLD as the paper writes it; ``taking[r]``: the sites sampled in round r (all)."""
    x = np.zeros(3)
    c = np.zeros(3)
    ci = [np.zeros(3) for _ in range(sites)]
    for r in range(rounds):
        chosen = taking[r] if taking is not None else list(range(sites))
        total = sum(weight(i) for i in chosen)
        dy, dc = np.zeros(3), np.zeros(3)
        for i in chosen:
            y = x.copy()
            for _ in range(K):
                y = y - ETA * ((y - TARGETS[i]) - ci[i] + c)
            new_ci = ci[i] - c + (x - y) / (K * ETA)
            dy += weight(i) * (y - x)
            dc += weight(i) * (new_ci - ci[i])
            ci[i] = new_ci
        x = x + lr_g * dy / total
        c = c + (len(chosen) / sites) * dc / total
    return x, c


@pytest.mark.parametrize(("lr", "relays"), [(1.0, 0), (0.5, 0), (1.0, 2)])
async def test_scaffold_matches_the_paper_both_halves(lr: float, relays: int) -> None:
    """Exact against the paper's update, flat and through relays (which fold the control
    changes beside the model's: one partial sum each)."""

    async def workflow(server: Any) -> FLModel:
        return await fedavg(server, {"w": np.zeros(3, np.float32)}, rounds=3, strategy=Scaffold(lr))

    out = await simulate(workflow, scaffold_script, clients=3, relays=relays)
    x, _ = scaffold_reference(3, lr)
    np.testing.assert_allclose(out.params["w"], x, rtol=1e-5, atol=1e-6)
    assert set(out.params) == {"w"}  # the control variate is state, not model


async def test_scaffold_with_partial_participation(tmp_path: Path) -> None:
    """Two of three sites a round: c moves by |S|/N of the sampled sites' mean change, and a
    site's own control changes only in the rounds it trains."""

    async def workflow(server: Any) -> FLModel:
        return await fedavg(
            server,
            {"w": np.zeros(3, np.float32)},
            rounds=4,
            fraction=0.6,
            strategy=Scaffold(),
            checkpoints=tmp_path,
        )

    out = await simulate(workflow, scaffold_script, clients=3)
    taking = [
        sorted(int(s.rsplit("-", 1)[1]) - 1 for s in h["responded"]) for h in out.meta["history"]
    ]
    assert all(len(t) == 2 for t in taking)
    x, c = scaffold_reference(4, 1.0, taking=taking)
    np.testing.assert_allclose(out.params["w"], x, rtol=1e-5, atol=1e-6)
    saved = load(tmp_path)
    assert saved is not None
    np.testing.assert_allclose(saved.state[SCAFFOLD_CONTROL + "w"], c, rtol=1e-5, atol=1e-6)


async def test_scaffold_control_variate_is_checkpointed(tmp_path: Path) -> None:
    async def workflow(server: Any, rounds: int) -> FLModel:
        return await fedavg(
            server,
            {"w": np.zeros(3, np.float32)},
            rounds=rounds,
            strategy=Scaffold(),
            checkpoints=tmp_path,
        )

    await simulate(lambda s: workflow(s, 2), scaffold_script, clients=3)
    saved = load(tmp_path)
    assert saved is not None
    _, c = scaffold_reference(2, 1.0)
    np.testing.assert_allclose(saved.state[SCAFFOLD_CONTROL + "w"], c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- robust
@pytest.mark.parametrize("relays", [0, 2])
async def test_robust_median_of_every_sites_update(relays: int) -> None:
    """Each site's update (FULL results: minus the global model) reaches the rule whole, also
    through relays (they forward, not fold); the next model is the global plus the median."""
    out = await run(Robust(RobustAggregation("median")), rounds=2, sites=5, relays=relays)
    x = {k: v.copy() for k, v in INIT.items()}
    for _ in range(2):
        diffs = [site_result(i, x) for i in range(5)]
        x = {k: x[k] + np.median([d[k] - x[k] for d in diffs], axis=0) for k in x}
    for k in INIT:
        np.testing.assert_allclose(out.params[k], x[k], rtol=1e-12, atol=1e-15)
    robust = out.meta["history"][-1]["robust"]
    assert sorted(robust["selected"]) == sorted(
        (f"server.relay-{i % 2 + 1}.site-{i + 1}" if relays else f"server.site-{i + 1}")
        for i in range(5)
    )


def nan_script() -> None:
    """Site 1 (index 0) sends NaN: a hostile or broken update."""

    def respond(i: int, task: FLModel) -> FLModel:
        out = affine(i, task)
        if i == 0:
            out.params = {k: np.full_like(v, np.nan) for k, v in out.params.items()}
        return out

    answer_tasks(respond)


async def test_robust_drops_a_non_finite_update_and_says_so() -> None:
    out = await simulate(
        lambda s: fedavg(s, INIT, rounds=1, strategy=Robust(RobustAggregation("median"))),
        nan_script,
        clients=4,
    )
    note = out.meta["history"][0]["robust"]
    assert list(note["dropped"]) == ["server.site-1"]
    assert np.isfinite(out.params["w"]).all()


async def test_a_round_with_too_few_usable_updates_keeps_the_model_and_says_why() -> None:
    """Krum with f=1 needs 2f + 3 = 5 updates: with 4 the round is skipped (the model stays,
    the history says why), not the job ended: one hostile site sending NaN at the rule's
    minimum must not stop everyone's training."""
    rule = RobustAggregation("krum", f=1)
    out = await run(Robust(rule), rounds=2, sites=4)
    for k, v in INIT.items():
        np.testing.assert_array_equal(out.params[k], v)
    assert all("needs at least 5" in h["skipped"] for h in out.meta["history"])
    out = await run(Robust(rule), rounds=1, sites=5)
    assert len(out.meta["history"][0]["robust"]["selected"]) == 1


# ------------------------------------------------------------------------------ combinations
@pytest.mark.parametrize("strategy", [Robust(), Scaffold()])
def test_strategies_that_need_more_than_the_sum_refuse_secure_aggregation(
    strategy: FedAvg,
) -> None:
    with pytest.raises(ConfigError, match="secure aggregation"):
        FedAvgRecipe(initial=INIT, script=affine_script, strategy=strategy, secure=True)


@pytest.mark.parametrize("strategy", [FedProx(mu=0.1), Ditto(lam=0.5), FedOpt()])
def test_strategies_that_need_only_the_sum_take_secure_aggregation(strategy: FedAvg) -> None:
    FedAvgRecipe(initial=INIT, script=affine_script, strategy=strategy, secure=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedProx(mu=-0.1),
        lambda: FedProx(mu=float("nan")),
        lambda: FedProx(mu=True),
        lambda: Ditto(lam=float("inf")),
        lambda: FedOpt(optimizer="rmsprop"),  # type: ignore[arg-type]
        lambda: FedOpt(lr=0.0),
        lambda: FedOpt(beta1=1.0),
        lambda: Scaffold(lr=0.0),
        lambda: Scaffold(lr=float("nan")),
    ],
)
def test_settings_out_of_range_are_refused_at_the_recipe(make: Any) -> None:
    with pytest.raises(ConfigError):
        make()


def test_range_edges_accepted() -> None:
    assert FedProx(mu=0.0).meta() == {FEDPROX_MU: 0.0}
    FedOpt(beta1=0.0, beta2=0.0)
    Ditto(lam=0.0)


def test_a_recipe_refuses_a_strategy_that_is_not_one() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        FedAvgRecipe(initial=INIT, script=affine_script, strategy="fedprox")  # type: ignore[arg-type]


async def test_a_diff_result_under_a_robust_rule() -> None:
    """DIFF results are the updates themselves (not minus the global model)."""

    def diff_script() -> None:
        answer_tasks(
            lambda i, task: FLModel(
                params={k: np.full(np.shape(v), float(i)) for k, v in task.params.items()},
                params_type=ParamsType.DIFF,
            )
        )

    out = await simulate(
        lambda s: fedavg(s, INIT, rounds=1, strategy=Robust(RobustAggregation("median"))),
        diff_script,
        clients=3,
    )
    for k, v in INIT.items():
        np.testing.assert_allclose(out.params[k], v + 1.0)


def misfit_script() -> None:
    """Site 1 sends a tensor of another shape and one the model lacks (answering first or
    not, it must not decide what the others' updates look like)."""

    def respond(i: int, task: FLModel) -> FLModel:
        out = affine(i, task)
        if i == 0:
            out.params = {"w": np.zeros((3, 2)), "b": out.params["b"], "extra": np.ones(2)}
        return out

    answer_tasks(respond)


async def test_robust_drops_an_update_that_does_not_fit_the_model() -> None:
    out = await simulate(
        lambda s: fedavg(s, INIT, rounds=1, strategy=Robust(RobustAggregation("median"))),
        misfit_script,
        clients=4,
    )
    note = out.meta["history"][0]["robust"]
    assert list(note["dropped"]) == ["server.site-1"]
    assert "extra" in note["dropped"]["server.site-1"]
    diffs = [site_result(i, INIT) for i in (1, 2, 3)]
    for k, v in INIT.items():
        np.testing.assert_allclose(out.params[k], v + np.median([d[k] - v for d in diffs], axis=0))
