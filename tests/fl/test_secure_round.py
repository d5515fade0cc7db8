"""Secure aggregation in FL rounds: sites' results are masked, the server's sum is the plain
weighted sum, and a minority of sites dropping mid-round does not stop the round."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pytest

import flare_async.client as flare
from flare_async.cli._job import add_parser, secure_knobs
from flare_async.errors import ConfigError
from flare_async.fl import (
    FedAvgRecipe,
    FLModel,
    FLServer,
    SecAggRangeError,
    SecureAggregation,
    _secure,
    fedavg,
    fedavg_step,
    simulate,
)
from flare_async.fl._secagg import SecAggServer, decode

pytestmark = pytest.mark.anyio
SITES = 5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def add_weight() -> None:
    i = int(flare.get_config()["site_index"])
    while (model := flare.receive()) is not None:
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": i + 1}))


def crash_on_round_1() -> None:
    model = flare.receive()
    assert model is not None
    flare.send(
        FLModel(
            params={k: np.asarray(v) + 5 for k, v in model.params.items()}, meta={"num_samples": 5}
        )
    )
    flare.receive()
    raise RuntimeError("the site went down mid-round")


async def run(
    scripts: Any, monkeypatch: pytest.MonkeyPatch, rounds: int = 2
) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[Any]]:
    seen: list[np.ndarray] = []
    add = SecAggServer.add_input

    def spy(self: SecAggServer, u: int, y: np.ndarray) -> None:
        seen.append(np.array(y))  # what the server gets of one site
        add(self, u, y)

    monkeypatch.setattr(SecAggServer, "add_input", spy)
    results: list[Any] = []

    async def workflow(server: FLServer) -> dict[str, np.ndarray]:
        params = {"w": np.zeros(200), "b": np.zeros(3)}
        for rnd in range(rounds):
            result = await _secure.secure_round(
                server, FLModel(params=params, current_round=rnd), server.clients, deadline=20
            )
            results.append(result)
            params = fedavg_step(params, result.sum)
        return params

    out: dict[str, np.ndarray] = await simulate(workflow, scripts, clients=SITES)
    return out, seen, results


async def test_the_secure_sum_is_the_plain_weighted_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    out, seen, results = await run(add_weight, monkeypatch)
    step = sum((i + 1) ** 2 for i in range(SITES)) / sum(i + 1 for i in range(SITES))
    assert np.allclose(out["w"], 2 * step, atol=1e-3)
    assert np.allclose(out["b"], 2 * step, atol=1e-3)
    assert sorted(results[0].responded) == [f"server.site-{i + 1}" for i in range(SITES)]
    # Each site's vector, as the server saw it, is noise: the plain one would be w * (x + 1)
    # (a constant per site), then w.
    assert len(seen) == 2 * SITES
    for y in seen:
        values = decode(y, 2.0**16)
        assert np.unique(values[:200]).size > 150
        assert y.dtype == np.uint64
        assert 0.3 < np.mean(y >= 2**63) < 0.7


async def test_a_minority_dropping_mid_round_still_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripts: dict[str, Any] = {f"server.site-{i + 1}": add_weight for i in range(SITES)}
    scripts["server.site-2"] = crash_on_round_1
    out, _, results = await run(scripts, monkeypatch)
    # round 0: site-2 adds 5 with weight 5, the others add i + 1 with weight i + 1
    first = (sum((i + 1) ** 2 for i in range(SITES) if i != 1) + 5 * 5) / (
        sum(i + 1 for i in range(SITES) if i != 1) + 5
    )
    rest = [i for i in range(SITES) if i != 1]
    second = sum((i + 1) ** 2 for i in rest) / sum(i + 1 for i in rest)
    assert "server.site-2" in results[1].failed
    assert np.allclose(out["w"], first + second, atol=1e-3)


async def test_relays_add_masked_vectors_of_their_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    add_sum = SecAggServer.add_sum

    def spy(self: SecAggServer, ids: Any, y: np.ndarray) -> None:
        seen.append(np.array(y))
        add_sum(self, ids, y)

    monkeypatch.setattr(SecAggServer, "add_sum", spy)
    results: list[Any] = []

    async def workflow(server: FLServer) -> dict[str, np.ndarray]:
        params = {"w": np.zeros(50)}
        result = await _secure.secure_round(
            server, FLModel(params=params, current_round=0), server.clients, deadline=20
        )
        results.append(result)
        return fedavg_step(params, result.sum)

    out = await simulate(workflow, add_weight, clients=6, relays=2)
    step = sum((i + 1) ** 2 for i in range(6)) / sum(i + 1 for i in range(6))
    assert np.allclose(out["w"], step, atol=1e-3)
    assert len(seen) == 2  # one masked sum per relay, not six vectors
    assert results[0].partials == 2
    assert len(results[0].responded) == 6


# ------------------------------------------------------------------ the ring's range
def gaussian_site() -> None:
    """Site i sends N(0, std) weights (seeded by i) with ``samples`` as its weight."""
    config = flare.get_config()
    rng = np.random.default_rng(100 + int(config["site_index"]))
    while (model := flare.receive()) is not None:
        params = {
            k: rng.normal(0, float(config["std"]), np.shape(v)) for k, v in model.params.items()
        }
        flare.send(
            FLModel(params=params, meta={"num_samples": config["samples"]}, metrics={"loss": 1.0})
        )


def plain_fedavg(std: float, samples: float, sites: int, shape: tuple[int, ...]) -> np.ndarray:
    xs = [np.random.default_rng(100 + i).normal(0, std, shape) for i in range(sites)]
    return sum(samples * x for x in xs) / (samples * sites)


@pytest.mark.parametrize(
    ("samples", "std"),
    [(20_000, 0.05), (3_000, 3.0), (10_000, 0.05)],
    ids=["20k", "3k-std3", "10k"],
)
async def test_secure_fedavg_equals_plain_fedavg_with_large_weights(
    samples: int, std: float
) -> None:
    async def workflow(server: FLServer) -> Any:
        return await fedavg(server, {"w": np.zeros(300)}, rounds=1, secure=True, deadline=20)

    out = await simulate(
        workflow, gaussian_site, clients=4, config={"std": std, "samples": samples}
    )
    expect = plain_fedavg(std, samples, 4, (300,))
    # The documented quantization error: n / (2 * scale * total weight), float64 rounding aside.
    assert np.allclose(out.params["w"], expect, rtol=1e-9, atol=4 / (2 * 2.0**16 * 4 * samples))


def ranged_site() -> None:
    """Site i sends +-values[i] (and half of it) with weight weights[i], and loss i + 1."""
    config = flare.get_config()
    i = int(config["site_index"])
    value, weight = float(config["values"][i]), float(config["weights"][i])
    while (model := flare.receive()) is not None:
        params = {
            k: np.resize([value, -value, value / 2], np.shape(v)) for k, v in model.params.items()
        }
        flare.send(FLModel(params=params, meta={"num_samples": weight}, metrics={"loss": i + 1.0}))


async def secure_run(
    config: SecureAggregation,
    values: list[float],
    weights: list[float],
    monkeypatch: pytest.MonkeyPatch,
    relays: int = 0,
) -> tuple[FLModel, list[FLModel]]:
    """One round of ``fedavg(secure=config)``; what left each site (masked or refused)."""
    sent: list[FLModel] = []
    mask = _secure.SecureSite.mask

    def spy(self: _secure.SecureSite, sid: str, model: FLModel) -> FLModel:
        sent.append(mask(self, sid, model))
        return sent[-1]

    monkeypatch.setattr(_secure.SecureSite, "mask", spy)

    async def workflow(server: FLServer) -> Any:
        initial = {"w": np.zeros(30)}
        return await fedavg(server, initial, rounds=1, secure=config, deadline=20, min_responses=1)

    settings = {"values": values, "weights": weights}
    rounds: list[Any] = []
    out = await simulate(
        workflow,
        ranged_site,
        clients=len(values),
        config=settings,
        relays=relays,
        on_round=rounds.append,
    )
    out.meta["failed"] = rounds[0].failed  # with why
    return out, sent


def mean_of(
    values: list[float], weights: list[float], sites: list[int], clip: float = np.inf
) -> np.ndarray:
    """Plain FedAvg of what ``ranged_site`` sends, each site's values clipped to ``clip``."""
    sent = [np.clip(np.resize([v, -v, v / 2], 30), -clip, clip) for v in values]
    return sum(sent[i] * weights[i] for i in sites) / sum(weights[i] for i in sites)


async def test_a_round_that_could_wrap_is_refused_before_any_site_is_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[Any] = []
    monkeypatch.setattr(_secure.SecureSite, "handle", lambda self, body: asked.append(body))
    monkeypatch.setattr(FLServer, "_deliver", lambda *a, **k: asked.append(a))
    # One site fits a 32-bit ring at 2^14 x 1 x 2^16 = 2^30; two would sum to 2^31.
    config = SecureAggregation(bits=32, clip=1.0, max_weight=2.0**14, scale=2.0**16)

    async def workflow(server: FLServer) -> Any:
        return await fedavg(server, {"w": np.zeros(3)}, rounds=1, secure=config, deadline=20)

    with pytest.raises(SecAggRangeError, match="2 site\\(s\\) x max weight 16384 x clip 1"):
        await simulate(workflow, add_weight, clients=2)
    assert asked == []
    # Settings that no round fits are refused where they are made (a recipe: at submission).
    with pytest.raises(SecAggRangeError, match="at most 0 site"):
        SecureAggregation(bits=32, max_weight=2.0**20)
    with pytest.raises(SecAggRangeError):
        FedAvgRecipe(initial={}, script="m:f", secure={"max_weight": 2.0**40})


async def test_values_at_the_clip_and_weights_at_the_maximum_sum_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 sites, 32 bits, clip 4, scale 2^8: just room for W = 2^31 // (3 * 1024) - 1 each.
    top = float(2**31 // (3 * 1024) - 1)
    config = SecureAggregation(bits=32, clip=4.0, max_weight=top, scale=2.0**8)
    out, sent = await secure_run(config, [4.0, -4.0, 4.0], [top, top, top], monkeypatch)
    assert np.array_equal(out.params["w"], mean_of([4.0, -4.0, 4.0], [top] * 3, [0, 1, 2]))
    assert all(m.params["secagg.y"].dtype == np.uint32 for m in sent)
    # One site alone, at the edge of a 64-bit ring (2^20 x 2^10 x 2^16 x 2^16 sites is 2^62).
    config = SecureAggregation(clip=2.0**10, max_weight=2.0**36, scale=2.0**16)
    out, _ = await secure_run(config, [-(2.0**10)], [2.0**36], monkeypatch)
    assert np.array_equal(out.params["w"], mean_of([-(2.0**10)], [2.0**36], [0]))


async def test_a_site_beyond_the_declared_range_refuses_and_the_round_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = SecureAggregation(clip=2.0, max_weight=100.0)
    values, weights = [1.0, 2.5, 1.5, -0.5, 2.0], [10.0, 10.0, 100.5, 20.0, 100.0]
    out, sent = await secure_run(config, values, weights, monkeypatch)
    # site-2: a value beyond the clip; site-3: a weight beyond max_weight; the rest count.
    assert np.allclose(out.params["w"], mean_of(values, weights, [0, 3, 4]), atol=1e-9)
    failed = out.meta["failed"]
    assert sorted(failed) == ["server.site-2", "server.site-3"]
    assert "refused to encode its result: tensor 'w'" in failed["server.site-2"]
    refusals = sorted(m.meta[_secure.REFUSED] for m in sent if _secure.REFUSED in m.meta)
    assert refusals[0] == (
        "a weight (num_samples or NUM_STEPS_CURRENT_ROUND) outside 0..100, the declared max_weight"
    )
    assert refusals[1] == "tensor 'w': a value beyond the declared clip 2"  # no value named
    assert all(not m.params for m in sent if _secure.REFUSED in m.meta)  # nothing else leaves
    # With clamp, site-2's values are clipped to +-2 instead (the weight is still refused).
    clamp = SecureAggregation(clip=2.0, max_weight=100.0, clamp=True)
    out, _ = await secure_run(clamp, values, weights, monkeypatch, relays=2)
    expect = mean_of(values, weights, [0, 1, 3, 4], clip=2.0)
    assert np.allclose(out.params["w"], expect, atol=1e-9)
    assert list(out.meta["failed"]) == ["server.relay-1.site-3"]
    why = out.meta["failed"]["server.relay-1.site-3"]
    assert "refused to encode" in why
    assert "reported by server.relay-1" in why


@pytest.mark.parametrize("relays", [0, 2])
async def test_site_metrics_do_not_travel_in_clear_unless_the_job_asks(
    monkeypatch: pytest.MonkeyPatch, relays: int
) -> None:
    values, weights = [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]
    out, sent = await secure_run(SecureAggregation(), values, weights, monkeypatch, relays)
    assert all(m.metrics == {} for m in sent)
    assert out.meta["history"][0]["metrics"] == {}  # dropped
    # Declared metrics are averaged inside the masked sum (weighted by num_samples).
    config = SecureAggregation(metrics=("loss", "absent"))
    out, sent = await secure_run(config, values, weights, monkeypatch, relays)
    assert all(m.metrics == {} for m in sent)
    assert out.meta["history"][0]["metrics"] == pytest.approx({"loss": 30 / 10})
    # clear_metrics: as outside secure aggregation, each site's in clear (a plain mean).
    out, sent = await secure_run(
        SecureAggregation(clear_metrics=True), values, weights, monkeypatch, relays
    )
    assert sorted(m.metrics["loss"] for m in sent) == [1.0, 2.0, 3.0, 4.0]
    assert out.meta["history"][0]["metrics"] == pytest.approx({"loss": 2.5})


def test_the_job_settings_come_from_a_recipe_or_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "job",
            "submit",
            "m:r",
            "--secure-clip",
            "8",
            "--secure-bits",
            "32",
            "--secure-metrics",
            "loss,acc",
            "--secure-max-weight",
            "64",
        ]
    )
    knobs = secure_knobs(args)
    assert knobs == {"clip": 8.0, "max_weight": 64.0, "bits": 32, "metrics": ["loss", "acc"]}
    recipe = FedAvgRecipe(initial={}, script="m:f", secure=knobs)  # the job's override
    assert SecureAggregation.of(recipe.secure) == SecureAggregation(
        clip=8.0, max_weight=64.0, bits=32, metrics=("loss", "acc")
    )
    assert secure_knobs(parser.parse_args(["job", "submit", "m:r", "--secure"])) == {}
    assert SecureAggregation.of(True) == SecureAggregation()
    assert SecureAggregation.of(False) is None
    with pytest.raises(ConfigError, match="unknown secure aggregation settings"):
        SecureAggregation.of({"clipp": 1.0})


def flare_weighted_site() -> None:
    """Site i adds i + 1, weighted as a FLARE script weighs: NUM_STEPS_CURRENT_ROUND."""
    i = int(flare.get_config()["site_index"])
    while flare.is_running():
        model = flare.receive()
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 10 * (i + 1)}))


async def test_a_secure_round_weighs_by_num_steps_as_a_plain_one_does() -> None:
    async def workflow(server: FLServer, secure: bool) -> Any:
        return await fedavg(server, {"w": np.zeros(4)}, rounds=1, secure=secure, deadline=20)

    plain = await simulate(lambda s: workflow(s, False), flare_weighted_site, clients=3)
    masked = await simulate(lambda s: workflow(s, True), flare_weighted_site, clients=3)
    # (10*1 + 20*2 + 30*3) / 60 = 7/3: weighted, not the plain mean 2
    assert np.allclose(plain.params["w"], 7 / 3)
    assert np.allclose(masked.params["w"], 7 / 3, atol=1e-6)
