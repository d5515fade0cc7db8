"""What a round's results add up to: partial updates (some tensors only) averaged per tensor over
the sites that sent them, flat and through relays; each result's weight (``num_samples``, else
FLARE's ``NUM_STEPS_CURRENT_ROUND``, else 1) and bad weights failing the site; dtypes kept by
FedBuff and by the other workflows."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import flare_async.client as flare
from flare_async.fl import (
    FLModel,
    FLServer,
    ParamsType,
    RoundMismatch,
    WeightedSum,
    fedavg,
    fedavg_step,
    fedbuff,
    simulate,
)
from flare_async.fl._aggregate import (
    DTYPES_KEY,
    NUM_STEPS_KEY,
    TENSOR_WEIGHTS_KEY,
    WEIGHT_KEY,
    result_weight,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from workflow_cyclic import cyclic

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # scripts run in worker threads: real clocks


SHAPES = {"base.w": (3, 4), "base.b": (4,), "lora.a": (4, 2), "lora.b": (2, 4)}
INITIAL = {
    k: np.random.default_rng(i).standard_normal(s) for i, (k, s) in enumerate(SHAPES.items())
}
KEYSETS = [
    ["lora.a", "lora.b"],
    ["base.w", "base.b", "lora.a", "lora.b"],
    ["lora.a", "base.b"],
    ["lora.b"],
    ["base.w"],
    ["lora.a", "lora.b"],
    ["base.b", "lora.b"],
    ["lora.a"],
]
"""The tensors site i sends (i modulo 8): every relay's sites send different key sets."""


def delta(i: int, name: str) -> np.ndarray:
    """Site i's change to tensor ``name`` (every tensor and site differ)."""
    k = list(SHAPES).index(name)
    return np.full(SHAPES[name], (i + 1) * (k + 1) + 0.25 * i, dtype=np.float64)


def sent(i: int) -> list[str]:
    return KEYSETS[i % len(KEYSETS)]


def partial_script(kind: ParamsType) -> Any:
    """Site i sends only its key set, weighted by i + 1 samples."""

    def script() -> None:
        flare.init()
        i = int(flare.get_config()["site_index"])
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            params = {
                k: delta(i, k)
                if kind is ParamsType.DIFF
                else np.asarray(model.params[k]) + delta(i, k)
                for k in sent(i)
            }
            flare.send(FLModel(params=params, params_type=kind, meta={"num_samples": i + 1}))

    return script


def reference(sites: int, rounds: int) -> dict[str, np.ndarray]:
    """numpy: each tensor moves by the weighted mean of its senders' changes, every round."""
    out = {}
    for name, value in INITIAL.items():
        senders = [i for i in range(sites) if name in sent(i)]
        step = sum((i + 1) * delta(i, name) for i in senders) / sum(i + 1 for i in senders)
        out[name] = value + rounds * step
    return out


# -- item 2: partial updates ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", [ParamsType.FULL, ParamsType.DIFF])
def test_tensors_nobody_sent_stay_and_each_is_averaged_over_its_senders(kind: ParamsType) -> None:
    agg = WeightedSum()
    for i in range(4):
        params = {k: delta(i, k) + (INITIAL[k] if kind is ParamsType.FULL else 0) for k in sent(i)}
        agg.add(params, float(i + 1), kind)
    assert agg.weight == 1 + 2 + 3 + 4
    assert agg.weight_of("base.w") == 2  # only site 1 sent it
    out = fedavg_step(INITIAL, agg)
    assert list(out) == list(INITIAL)
    ref = reference(4, 1)
    for k, v in INITIAL.items():
        assert out[k].dtype == v.dtype
        assert np.allclose(out[k], ref[k], rtol=0, atol=1e-12), k


def test_a_lora_diff_leaves_the_rest_of_the_model_as_it_was() -> None:
    model = {
        "encoder.w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "lora.A": np.zeros((4, 2), np.float16),
        "lora.B": np.zeros((2, 4), np.float16),
    }
    agg = WeightedSum()
    agg.add(
        {"lora.A": np.full((4, 2), 0.5, np.float16), "lora.B": np.ones((2, 4), np.float16)},
        3.0,
        ParamsType.DIFF,
    )
    out = fedavg_step(model, agg, consume=True)
    assert out["encoder.w"] is model["encoder.w"]  # not even copied
    assert out["bn.num_batches_tracked"] == 7
    assert out["lora.A"].dtype == np.float16
    assert np.all(out["lora.A"] == 0.5)
    assert np.all(out["lora.B"] == 1.0)


def test_a_shape_mismatch_for_the_same_name_is_still_a_round_mismatch() -> None:
    agg = WeightedSum()
    agg.add({"a": np.zeros(3), "b": np.zeros(2)}, 1.0, ParamsType.FULL)
    with pytest.raises(RoundMismatch, match="'b'"):
        agg.add({"b": np.zeros(5), "c": np.ones(1)}, 1.0, ParamsType.FULL)
    assert agg.names() == ["a", "b"]
    assert agg.count == 1
    other = WeightedSum()
    other.add({"a": np.zeros(4)}, 1.0, ParamsType.FULL)
    with pytest.raises(RoundMismatch):
        agg.merge(other.partial())


def test_partial_sums_carry_per_tensor_weights_only_where_they_differ() -> None:
    updates = [({k: delta(i, k) for k in sent(i)}, float(i + 1)) for i in range(8)]
    flat = WeightedSum()
    for params, n in updates:
        flat.add(params, n, ParamsType.DIFF)
    top = WeightedSum()
    for group in (updates[0::2], updates[1::2]):  # two relays, then a relay of relays
        middle = WeightedSum()
        for sub in (group[0::2], group[1::2]):
            leaf = WeightedSum()
            for params, n in sub:
                leaf.add(params, n, ParamsType.DIFF)
            middle.merge(leaf.partial())
        top.merge(middle.partial())
    assert top.count == 8
    assert top.weight == flat.weight
    for k in SHAPES:
        assert top.weight_of(k) == flat.weight_of(k)
        assert np.allclose(top.mean_of(k), flat.mean_of(k), rtol=0, atol=1e-12)
    same = WeightedSum()
    same.add({"a": np.ones(2), "b": np.ones(1)}, 2.0, ParamsType.FULL)
    assert TENSOR_WEIGHTS_KEY not in same.partial().meta  # as before: the total weight only
    mixed = WeightedSum()
    mixed.add({"a": np.ones(2), "b": np.ones(1)}, 2.0, ParamsType.FULL)
    mixed.add({"a": np.ones(2)}, 3.0, ParamsType.FULL)
    p = mixed.partial()
    assert p.meta[WEIGHT_KEY] == 5.0
    assert p.meta[TENSOR_WEIGHTS_KEY] == {"b": 2.0}


def test_a_partial_sum_without_per_tensor_weights_still_merges() -> None:
    old = FLModel(params={"a": np.full(2, 6.0)}, meta={WEIGHT_KEY: 3.0})  # an older relay's
    agg = WeightedSum()
    agg.merge(old)
    assert np.array_equal(agg.mean()["a"], np.full(2, 2.0))
    assert agg.count == 1


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "x", None])
def test_bad_per_tensor_weights_in_a_partial_sum_are_refused_untouched(bad: Any) -> None:
    agg = WeightedSum()
    agg.add({"a": np.ones(2)}, 1.0, ParamsType.FULL)
    p = FLModel(params={"a": np.ones(2)}, meta={WEIGHT_KEY: 1.0, TENSOR_WEIGHTS_KEY: {"a": bad}})
    with pytest.raises(ValueError, match="weight"):
        agg.merge(p)
    q = FLModel(params={"a": np.ones(2)}, meta={WEIGHT_KEY: 1.0, TENSOR_WEIGHTS_KEY: {"z": 1.0}})
    with pytest.raises(ValueError, match="'z'"):
        agg.merge(q)
    assert agg.count == 1
    assert agg.weight_of("a") == 1.0


def test_a_tensor_of_weight_zero_stays_and_all_weights_zero_is_an_error() -> None:
    agg = WeightedSum()
    agg.add({"a": np.full(2, 100.0), "b": np.full(2, 100.0)}, 0.0, ParamsType.FULL)
    agg.add({"b": np.full(2, 4.0)}, 2.0, ParamsType.FULL)
    out = fedavg_step({"a": np.ones(2), "b": np.ones(2)}, agg)
    assert np.array_equal(out["a"], np.ones(2))  # only a weightless site sent it
    assert np.array_equal(out["b"], np.full(2, 4.0))
    zero = WeightedSum()
    zero.add({"a": np.ones(2)}, 0.0, ParamsType.FULL)
    with pytest.raises(ValueError, match="weight"):
        fedavg_step({"a": np.ones(2)}, zero)
    nothing = WeightedSum()
    assert np.array_equal(fedavg_step({"a": np.ones(2)}, nothing)["a"], np.ones(2))


@pytest.mark.parametrize("kind", [ParamsType.FULL, ParamsType.DIFF])
@pytest.mark.parametrize("relays", [0, 2, (2, 2)], ids=["flat", "one-tier", "two-tiers"])
async def test_fedavg_with_partial_updates_flat_and_through_relays(
    kind: ParamsType, relays: Any
) -> None:
    rounds: list[Any] = []
    out = await simulate(
        lambda s: fedavg(s, INITIAL, rounds=2),
        partial_script(kind),
        clients=8,
        relays=relays,
        on_round=rounds.append,
    )
    ref = reference(8, 2)
    for k in INITIAL:
        assert np.allclose(out.params[k], ref[k], rtol=0, atol=1e-12), k
    assert [len(r.responded) for r in rounds] == [8, 8]
    assert [r.partials for r in rounds] == [0 if relays == 0 else 2] * 2


# -- item 3: weights -----------------------------------------------------------------------------


def test_the_weight_is_num_samples_else_flares_steps_else_one() -> None:
    assert NUM_STEPS_KEY == "NUM_STEPS_CURRENT_ROUND"
    assert result_weight({"num_samples": 12, NUM_STEPS_KEY: 40}) == 12.0
    assert result_weight({NUM_STEPS_KEY: 40}) == 40.0
    assert result_weight({"num_samples": 0}) == 0.0
    assert result_weight({}) == 1.0
    assert result_weight({"num_samples": np.int64(3)}) == 3.0


@pytest.mark.parametrize(
    "meta",
    [
        {"num_samples": "12"},
        {"num_samples": None},
        {"num_samples": True},
        {"num_samples": [1]},
        {"num_samples": -1},
        {"num_samples": math.nan},
        {NUM_STEPS_KEY: math.inf},
        {NUM_STEPS_KEY: 10**400},
        {"num_samples": 1, NUM_STEPS_KEY: "ignored"},
    ],
)
def test_a_bad_weight_is_a_clear_value_error(meta: dict[str, Any]) -> None:
    if NUM_STEPS_KEY in meta and "num_samples" in meta:
        assert result_weight(meta) == 1.0  # num_samples wins; the other is not read
        return
    with pytest.raises(ValueError, match="weight"):
        result_weight(meta)


def weighted_by(metas: list[dict[str, Any]]) -> Any:
    """Site i adds (i + 1) to every parameter and reports ``metas[i]``."""

    def script() -> None:
        flare.init()
        i = int(flare.get_config()["site_index"])
        while (model := flare.receive()) is not None:
            params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
            flare.send(FLModel(params=params, meta=metas[i]))

    return script


@pytest.mark.parametrize("relays", [0, 2])
async def test_flares_steps_weigh_a_result_unless_num_samples_is_given(relays: int) -> None:
    metas = [
        {NUM_STEPS_KEY: 3},  # FLARE's key only
        {"num_samples": 1, NUM_STEPS_KEY: 100},  # ours first
        {},  # neither: 1
        {NUM_STEPS_KEY: 5.5},
    ]
    out = await simulate(
        lambda s: fedavg(s, {"w": np.zeros(2)}, rounds=1),
        weighted_by(metas),
        clients=4,
        relays=relays,
    )
    w = [3, 1, 1, 5.5]
    assert np.allclose(out.params["w"], sum(wi * (i + 1) for i, wi in enumerate(w)) / sum(w))


@pytest.mark.parametrize("relays", [0, 2])
async def test_a_bad_weight_fails_its_site_not_the_workflow(relays: int) -> None:
    metas = [
        {"num_samples": 2},
        {"num_samples": "lots"},
        {NUM_STEPS_KEY: 10**400},
        {"num_samples": -3},
        {NUM_STEPS_KEY: math.nan},
        {"num_samples": 2},
    ]
    rounds: list[Any] = []
    out = await simulate(
        lambda s: fedavg(s, {"w": np.zeros(2)}, rounds=1, min_responses=2, deadline=30),
        weighted_by(metas),
        clients=6,
        relays=relays,
        on_round=rounds.append,
    )
    assert np.allclose(out.params["w"], (2 * 1 + 2 * 6) / 4)
    failed = rounds[0].failed
    assert sorted(name.rsplit("-", 1)[1] for name in failed) == ["2", "3", "4", "5"]
    assert len(rounds[0].responded) == 2
    assert all("weight" in why for why in failed.values()), failed


# -- item 4: dtypes ------------------------------------------------------------------------------


DTYPED = {
    "w32": np.zeros(3, np.float32),
    "w64": np.full(3, 0.1, np.float64),
    "w16": np.zeros(3, np.float16),
    "bf16": np.zeros(3, ml_dtypes.bfloat16),
    "steps": np.zeros(2, np.int64),
    "frozen": np.full(2, 7, np.int32),
}


def add_to_some() -> None:
    """Adds 1 to every tensor but ``frozen``, which it does not send."""
    flare.init()
    while (model := flare.receive()) is not None:
        params = {
            k: (np.asarray(v).astype(np.float64) + 1).astype(np.asarray(v).dtype)
            for k, v in model.params.items()
            if k != "frozen"
        }
        flare.send(FLModel(params=params, meta={"num_samples": 2}))


async def test_fedbuff_keeps_every_tensors_dtype_and_rounds_integers() -> None:
    async def workflow(server: FLServer) -> FLModel:
        return await fedbuff(
            server, DTYPED, updates=2, buffer=1, concurrency=1, deadline=10, server_lr=0.6
        )

    out = await simulate(workflow, add_to_some, clients=1)
    for k, v in DTYPED.items():
        assert out.params[k].dtype == v.dtype, k
    # each version moves by 0.6: integers are rounded (0 -> 0.6 -> 1, then 1 + 0.6 -> 2)
    assert np.array_equal(out.params["steps"], [2, 2])
    assert np.array_equal(out.params["frozen"], [7, 7])  # nobody sent it
    assert np.allclose(out.params["w64"], 1.3, rtol=0, atol=1e-12)  # in float64
    assert np.allclose(out.params["w32"], 1.2, rtol=0, atol=1e-6)
    assert np.allclose(out.params["w16"].astype(np.float32), 1.2, atol=2e-3)
    assert np.allclose(out.params["bf16"].astype(np.float32), 1.2, atol=2e-2)


async def test_fedbuff_with_partial_updates_moves_only_what_was_sent() -> None:
    async def workflow(server: FLServer) -> FLModel:
        return await fedbuff(server, INITIAL, updates=1, buffer=1, concurrency=1, deadline=10)

    out = await simulate(workflow, partial_script(ParamsType.DIFF), clients=1)
    for k, v in INITIAL.items():  # site 0 sends the lora tensors only
        expected = v + delta(0, k) if k in sent(0) else v
        assert np.allclose(out.params[k], expected, rtol=0, atol=1e-12), k


async def test_fedavg_and_the_cyclic_example_keep_dtypes_and_unsent_tensors() -> None:
    cases = [(lambda s: fedavg(s, DTYPED, rounds=2), 2), (lambda s: cyclic(s, DTYPED, rounds=2), 4)]
    for workflow, visits in cases:  # cyclic: every site in turn, twice
        out = await simulate(workflow, add_to_some, clients=2)
        for k, v in DTYPED.items():
            assert out.params[k].dtype == v.dtype, k
        assert np.array_equal(out.params["frozen"], [7, 7])
        assert np.array_equal(out.params["steps"], [visits, visits])


def test_a_partial_sum_carries_its_updates_dtypes_up_a_tier() -> None:
    """A relay's partial of fp16 / int updates keeps its float32 / float64 accumulators on the
    wire, and names the updates' own dtypes: the tier above averages back into them (before,
    a tensor new to the global model came out in the accumulator's dtype)."""
    relay = WeightedSum()
    relay.add({"h": np.ones(3, np.float16), "i": np.arange(3)}, 1.0, ParamsType.FULL)
    partial = relay.partial()
    assert partial.params["h"].dtype == np.float32
    assert partial.meta[DTYPES_KEY] == {"h": "F16", "i": "I64"}
    server = WeightedSum()
    server.merge(partial)
    assert (server.dtype("h"), server.dtype("i")) == (np.float16, np.int64)
    out = fedavg_step({}, server)
    assert (out["h"].dtype, out["i"].dtype) == (np.float16, np.int64)
    same = WeightedSum()
    same.add({"w": np.ones(2, np.float32)}, 1.0, ParamsType.FULL)
    assert DTYPES_KEY not in same.partial().meta  # nothing to say: the old format


def test_merge_adopts_the_partials_arrays_only_when_asked() -> None:
    part = WeightedSum()
    part.add({"w": np.ones(4, np.float32)}, 2.0, ParamsType.FULL)
    partial = part.partial()
    copied, adopted = WeightedSum(), WeightedSum()
    copied.merge(partial)
    adopted.merge(partial, adopt=True)
    assert not np.shares_memory(copied.partial().params["w"], partial.params["w"])
    assert np.shares_memory(adopted.partial().params["w"], partial.params["w"])
    assert np.array_equal(fedavg_step({}, copied)["w"], fedavg_step({}, adopted)["w"])
    frozen = np.frombuffer(partial.params["w"].tobytes(), np.float32)  # read-only memory
    readonly = WeightedSum()
    readonly.merge(FLModel(params={"w": frozen}, meta=partial.meta), adopt=True)
    assert not np.shares_memory(readonly.partial().params["w"], frozen)


@pytest.mark.parametrize(
    ("dtypes", "why"),
    [
        (["F16"], "not a mapping"),
        ({"x": "F16"}, "which it lacks"),
        ({"w": "F128"}, "no tensor dtype is named"),
        ({"w": 7}, "no tensor dtype is named"),
    ],
)
def test_a_partial_sum_with_bad_dtypes_is_refused(dtypes: Any, why: str) -> None:
    meta = {WEIGHT_KEY: 1.0, DTYPES_KEY: dtypes}
    with pytest.raises(ValueError, match=why):
        WeightedSum().merge(FLModel(params={"w": np.ones(2, np.float32)}, meta=meta))
