"""Robust aggregation rules against straightforward numpy references, and under attack."""

from __future__ import annotations

import math
import pickle
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from flare_async.errors import ConfigError, FlareError
from flare_async.fl._robust import (
    RULES,
    SLICE_ELEMENTS,
    NotEnoughUpdates,
    RobustAggregation,
    RuleName,
    minimum_updates,
)

Arrays = dict[str, npt.NDArray[Any]]

# "big" is larger than one slice, so every rule works across slice boundaries.
SHAPES: dict[str, tuple[int, ...]] = {"w": (3, 4), "b": (), "big": (513, 513), "v": (7,)}
assert math.prod(SHAPES["big"]) > SLICE_ELEMENTS


def _random_updates(
    n: int, dtype: type[np.floating], seed: int, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> list[Arrays]:
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
        for _ in range(n)
    ]


def _weights(n: int, seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed + 1000).uniform(0.5, 3.0, n)]


# ---------------------------------------------------------------- references (whole-stack numpy)


def _stack(updates: list[Arrays], name: str) -> npt.NDArray[np.floating]:
    return np.stack([np.asarray(u[name]).reshape(-1) for u in updates])


def _flat_all(update: Arrays) -> npt.NDArray[np.float64]:
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in update.values()])


def _ref_scores(vectors: list[npt.NDArray[np.float64]], f: int) -> list[float]:
    n = len(vectors)
    closest = max(n - f - 2, 0)
    scores = []
    for i in range(n):
        distances = []
        for j in range(n):
            if j != i:
                diff = vectors[i] - vectors[j]
                distances.append(float(np.sum(diff * diff)))
        distances.sort()
        scores.append(sum(distances[:closest]))
    return scores


def _ref_vectors(updates: list[Arrays]) -> list[npt.NDArray[np.float64]]:
    # Distances from the values in their own dtype, as the rule sees them.
    return [_flat_all(u) for u in updates]


def _ref_krum_select(updates: list[Arrays], f: int) -> int:
    scores = _ref_scores(_ref_vectors(updates), f)
    return min(range(len(scores)), key=lambda i: (scores[i], i))


def _ref_multi_krum_select(updates: list[Arrays], f: int, m: int) -> list[int]:
    scores = _ref_scores(_ref_vectors(updates), f)
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:m])


def _ref_bulyan_select(updates: list[Arrays], f: int) -> list[int]:
    vectors = _ref_vectors(updates)
    whole = _ref_scores(vectors, f)
    remaining = list(range(len(updates)))
    chosen = []
    for _ in range(len(updates) - 2 * f):
        scores = _ref_scores([vectors[i] for i in remaining], f)
        # Ties (late picks have no neighbours to score on): the whole set's score, then index.
        best = min(range(len(remaining)), key=lambda k: (scores[k], whole[remaining[k]], k))
        chosen.append(remaining.pop(best))
    return sorted(chosen)


def _ref_weighted(
    updates: list[Arrays], weights: list[float], name: str
) -> npt.NDArray[np.float64]:
    return np.average(_stack(updates, name).astype(np.float64), axis=0, weights=weights)


def _reference(
    rule: RuleName, updates: list[Arrays], weights: list[float], f: int
) -> tuple[Arrays, list[int]]:
    n = len(updates)
    out: Arrays = {}
    selected = list(range(n))
    if rule == "krum":
        selected = [_ref_krum_select(updates, f)]
    elif rule == "multi_krum":
        selected = _ref_multi_krum_select(updates, f, n - f)
    elif rule == "bulyan":
        selected = _ref_bulyan_select(updates, f)
    for name, first in updates[0].items():
        x = _stack(updates, name)
        if rule == "median":
            value = np.median(x, axis=0)
        elif rule == "trimmed_mean":
            value = np.sort(x, axis=0)[f : n - f].mean(axis=0)
        elif rule == "krum":
            value = x[selected[0]]
        elif rule == "multi_krum":
            value = _ref_weighted(
                [updates[i] for i in selected], [weights[i] for i in selected], name
            )
        elif rule == "bulyan":
            # The beta values closest to the median, found by a distance threshold rather than
            # a sort of indices (random data has no ties at the threshold).
            s = x[selected]
            beta = len(selected) - 2 * f
            distance = np.abs(s - np.median(s, axis=0))
            threshold = np.sort(distance, axis=0)[beta - 1]
            mask = distance <= threshold
            assert (mask.sum(axis=0) == beta).all()
            value = (s * mask).sum(axis=0) / beta
        else:
            value = _ref_weighted(updates, weights, name)
        out[name] = np.asarray(value).reshape(np.shape(first))
    return out, selected


def _assert_close(got: Arrays, want: Arrays, dtype: type[np.floating], first: Arrays) -> None:
    assert list(got) == list(first)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for name, value in got.items():
        assert value.dtype == np.dtype(dtype), name
        assert value.shape == np.shape(first[name]), name
        np.testing.assert_allclose(value, want[name], rtol=tol, atol=tol, err_msg=name)


# ---------------------------------------------------------------- exactness

EXACT_CASES = [
    ("median", 1, 0),
    ("median", 4, 1),
    ("median", 7, 1),
    ("trimmed_mean", 3, 1),
    ("trimmed_mean", 6, 1),
    ("trimmed_mean", 9, 2),
    ("trimmed_mean", 4, 0),
    ("krum", 5, 1),
    ("krum", 8, 2),
    ("multi_krum", 5, 1),
    ("multi_krum", 9, 2),
    ("bulyan", 7, 1),
    ("bulyan", 8, 1),
    ("bulyan", 11, 2),
    ("bulyan", 3, 0),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("rule", "n", "f"), EXACT_CASES)
def test_matches_reference(rule: RuleName, n: int, f: int, dtype: type[np.floating]) -> None:
    seed = EXACT_CASES.index((rule, n, f))
    updates = _random_updates(n, dtype, seed)
    weights = _weights(n, seed)
    result, report = RobustAggregation(rule, f=f).aggregate_with_report(updates, weights)
    want, selected = _reference(rule, updates, weights, f)
    _assert_close(result, want, dtype, updates[0])
    assert report.selected == selected
    assert report.dropped == {}
    if rule in ("krum", "multi_krum", "bulyan"):
        np.testing.assert_allclose(report.scores, _ref_scores(_ref_vectors(updates), f), rtol=1e-9)
    else:
        assert report.scores == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_krum_result_is_the_selected_update_exactly(dtype: type[np.floating]) -> None:
    updates = _random_updates(6, dtype, 5)
    result, report = RobustAggregation("krum", f=1).aggregate_with_report(updates, [1.0] * 6)
    (pick,) = report.selected
    for name, value in result.items():
        np.testing.assert_array_equal(value, updates[pick][name])


@pytest.mark.parametrize("m", [1, 3, 7])
def test_multi_krum_m(m: int) -> None:
    updates = _random_updates(7, np.float64, 11, {"w": (5,), "b": (2, 2)})
    weights = _weights(7, 11)
    result, report = RobustAggregation("multi_krum", f=2, m=m).aggregate_with_report(
        updates, weights
    )
    selected = _ref_multi_krum_select(updates, 2, m)
    assert report.selected == selected
    for name in result:
        want = _ref_weighted([updates[i] for i in selected], [weights[i] for i in selected], name)
        np.testing.assert_allclose(result[name].reshape(-1), want, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipped_mean_matches_reference(dtype: type[np.floating]) -> None:
    updates = _random_updates(5, dtype, 3)
    weights = _weights(5, 3)
    norms = [float(np.linalg.norm(_flat_all(u))) for u in updates]
    # between the 2nd and 3rd largest norms, not on one: a norm at the bound itself is clipped
    # or not by its last bit, which the summation order decides (it flipped one run in many)
    high = sorted(norms)
    max_norm = (high[2] + high[3]) / 2
    result, report = RobustAggregation("clipped_mean", max_norm=max_norm).aggregate_with_report(
        updates, weights
    )
    scaled = [
        {k: np.asarray(v, dtype=np.float64) * min(1.0, max_norm / norm) for k, v in u.items()}
        for u, norm in zip(updates, norms, strict=True)
    ]
    for name in result:
        want = _ref_weighted(scaled, weights, name).reshape(SHAPES[name])
        assert result[name].dtype == np.dtype(dtype)
        np.testing.assert_allclose(result[name], want, rtol=1e-6, atol=1e-6)
    assert report.clipped == pytest.approx(
        {i: norm for i, norm in enumerate(norms) if norm > max_norm}
    )
    assert report.selected == [0, 1, 2, 3, 4]


def test_clipping_to_max_norm() -> None:
    over = {"a": np.full((3, 4), 2.0), "b": np.array(5.0)}
    norm = float(np.linalg.norm(_flat_all(over)))
    rule = RobustAggregation("clipped_mean", max_norm=norm / 4)
    clipped = rule.aggregate([over], [1.0])
    assert np.linalg.norm(_flat_all(clipped)) == pytest.approx(norm / 4, rel=1e-12)
    for name, value in over.items():
        np.testing.assert_allclose(clipped[name], value / 4, rtol=1e-12)

    under = RobustAggregation("clipped_mean", max_norm=norm * 2)
    result, report = under.aggregate_with_report([over], [1.0])
    assert report.clipped == {}
    for name, value in over.items():
        np.testing.assert_array_equal(result[name], value)


def test_max_norm_applies_before_another_rule() -> None:
    updates = [{"a": np.array([3.0, 4.0])}, {"a": np.array([30.0, 40.0])}]
    result, report = RobustAggregation("median", max_norm=5.0).aggregate_with_report(
        updates, [1.0, 1.0]
    )
    np.testing.assert_allclose(result["a"], [3.0, 4.0])
    assert report.clipped == {1: pytest.approx(50.0)}


def test_weights_of_zero() -> None:
    updates = [{"a": np.array([1.0])}, {"a": np.array([100.0])}, {"a": np.array([3.0])}]
    rule = RobustAggregation("clipped_mean", max_norm=1000.0)
    np.testing.assert_allclose(rule.aggregate(updates, [1.0, 0.0, 1.0])["a"], [2.0])
    # Unweighted rules count a weight-0 update like any other.
    median = RobustAggregation("median").aggregate(updates, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(median["a"], [3.0])
    with pytest.raises(ValueError, match="sum to 0"):
        rule.aggregate(updates, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("weights", [[1.0, -1.0, 1.0], [1.0, math.nan, 1.0], [1.0, math.inf, 1.0]])
def test_bad_weights(weights: list[float]) -> None:
    updates = _random_updates(3, np.float64, 1, {"a": (2,)})
    with pytest.raises(ValueError, match="weights"):
        RobustAggregation("median").aggregate(updates, weights)


def test_weights_count_must_match() -> None:
    updates = _random_updates(3, np.float64, 1, {"a": (2,)})
    with pytest.raises(ValueError, match="expected 3 weights"):
        RobustAggregation("median").aggregate(updates, [1.0, 1.0])


# ---------------------------------------------------------------- under attack


def _attacked(seed: int) -> tuple[list[Arrays], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    true = {"w": rng.uniform(0.5, 1.5, (6, 8)), "b": rng.uniform(0.5, 1.5, (8,))}
    honest = [{k: v + rng.normal(0, 0.1, v.shape) for k, v in true.items()} for _ in range(8)]
    byzantine = [{k: -10.0 * v for k, v in true.items()}, {k: 100.0 * v for k, v in true.items()}]
    honest_mean = np.mean([_flat_all(u) for u in honest], axis=0)
    return [*honest[:3], byzantine[0], *honest[3:6], byzantine[1], *honest[6:]], honest_mean


@pytest.mark.parametrize(
    ("rule", "f"),
    [("median", 2), ("trimmed_mean", 2), ("krum", 2), ("multi_krum", 2), ("bulyan", 1)],
)
def test_byzantine_updates_are_resisted(rule: RuleName, f: int) -> None:
    updates, honest_mean = _attacked(7)
    scale = float(np.linalg.norm(honest_mean))
    result, report = RobustAggregation(rule, f=f).aggregate_with_report(updates, [1.0] * 10)
    assert np.linalg.norm(_flat_all(result) - honest_mean) < 0.2 * scale
    # The attack is real: the plain weighted mean is pulled far off.
    plain = np.mean([_flat_all(u) for u in updates], axis=0)
    assert np.linalg.norm(plain - honest_mean) > 5 * scale
    if rule in ("krum", "multi_krum"):
        assert 3 not in report.selected
        assert 7 not in report.selected
    if rule == "bulyan":
        # n = 10 allows f = 1 only: one attacker may be selected, the trimming absorbs it.
        assert 7 not in report.selected


# ---------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_update_is_dropped(bad: float) -> None:
    updates = _random_updates(6, np.float32, 2)
    updates[2]["big"].reshape(-1)[SLICE_ELEMENTS + 5] = bad
    updates[4]["b"] = np.array(bad, dtype=np.float32)
    clean = [u for i, u in enumerate(updates) if i not in (2, 4)]
    for rule in ("median", "trimmed_mean", "krum"):
        f = 0 if rule == "krum" else 1
        result, report = RobustAggregation(rule, f=f).aggregate_with_report(updates, [1.0] * 6)
        assert sorted(report.dropped) == [2, 4]
        assert "non-finite" in report.dropped[2]
        assert "'big'" in report.dropped[2]
        assert "'b'" in report.dropped[4]
        want = RobustAggregation(rule, f=f).aggregate(clean, [1.0] * 4)
        for name in want:
            np.testing.assert_array_equal(result[name], want[name])
        assert all(np.isfinite(v).all() for v in result.values())


def test_krum_scores_mark_dropped_updates() -> None:
    updates = _random_updates(6, np.float64, 4, {"a": (3,)})
    updates[1]["a"][0] = math.nan
    report = RobustAggregation("krum", f=1).aggregate_with_report(updates, [1.0] * 6)[1]
    assert len(report.scores) == 6
    assert math.isnan(report.scores[1])
    assert all(math.isfinite(s) for i, s in enumerate(report.scores) if i != 1)
    assert 1 not in report.selected


def test_mismatched_updates_are_dropped() -> None:
    updates = _random_updates(6, np.float64, 9, {"w": (3, 4), "b": (2,)})
    updates[1]["w"] = np.zeros((4, 3))
    del updates[3]["b"]
    updates[5]["extra"] = np.zeros(2)
    result, report = RobustAggregation("median").aggregate_with_report(updates, [1.0] * 6)
    assert sorted(report.dropped) == [1, 3, 5]
    assert "'w'" in report.dropped[1]
    assert "names" in report.dropped[3]
    assert "names" in report.dropped[5]
    assert report.selected == [0, 2, 4]
    kept = [updates[i] for i in (0, 2, 4)]
    for name in ("w", "b"):
        np.testing.assert_array_equal(result[name], np.median(np.stack([u[name] for u in kept]), 0))


def test_drops_can_leave_too_few() -> None:
    updates = _random_updates(5, np.float64, 9, {"a": (3,)})
    updates[0]["a"][1] = math.inf
    with pytest.raises(NotEnoughUpdates, match=r"needs at least 5 updates, got 4 usable \(1"):
        RobustAggregation("krum", f=1).aggregate(updates, [1.0] * 5)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("f", [0, 1, 2])
def test_minimum_edges(rule: RuleName, f: int) -> None:
    rule_obj = RobustAggregation(rule, f=f, max_norm=10.0)
    minimum = minimum_updates(rule, f)
    assert rule_obj.minimum_updates() == minimum
    expected = {
        "median": 1,
        "clipped_mean": 1,
        "trimmed_mean": 2 * f + 1,
        "krum": 2 * f + 3,
        "multi_krum": 2 * f + 3,
        "bulyan": 4 * f + 3,
    }[rule]
    assert minimum == expected
    updates = _random_updates(minimum, np.float64, 13, {"a": (4,), "s": ()})
    result = rule_obj.aggregate(updates, [1.0] * minimum)
    assert list(result) == ["a", "s"]
    with pytest.raises(NotEnoughUpdates) as caught:
        rule_obj.aggregate(updates[:-1], [1.0] * (minimum - 1))
    assert caught.value.n == minimum - 1
    assert caught.value.minimum == minimum
    assert isinstance(caught.value, FlareError)
    assert f"got {minimum - 1}" in str(caught.value)


def test_not_enough_updates_pickles() -> None:
    error = pickle.loads(pickle.dumps(NotEnoughUpdates("krum", 4, 5, 1)))
    assert isinstance(error, NotEnoughUpdates)
    assert (error.rule, error.n, error.minimum, error.dropped) == ("krum", 4, 5, 1)
    assert str(error) == "krum needs at least 5 updates, got 4 usable (1 dropped)"


def test_multi_krum_minimum_includes_m() -> None:
    rule = RobustAggregation("multi_krum", f=1, m=7)
    assert rule.minimum_updates() == 7
    updates = _random_updates(6, np.float64, 1, {"a": (2,)})
    with pytest.raises(NotEnoughUpdates):
        rule.aggregate(updates, [1.0] * 6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "mean"},
        {"rule": "median", "f": -1},
        {"rule": "multi_krum", "m": 0},
        {"rule": "median", "max_norm": 0.0},
        {"rule": "median", "max_norm": -1.0},
        {"rule": "median", "max_norm": math.inf},
        {"rule": "median", "max_norm": math.nan},
        {"rule": "clipped_mean"},
    ],
)
def test_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RobustAggregation(**kwargs)  # type: ignore[arg-type]


def test_minimum_updates_unknown_rule() -> None:
    with pytest.raises(ConfigError):
        minimum_updates("mean")  # type: ignore[arg-type]


# ---------------------------------------------------------------- dtypes


def test_integer_tensors_take_the_rounded_median() -> None:
    updates = [
        {"w": np.array([1.0, 2.0]), "steps": np.array([10, 20], dtype=np.int64)},
        {"w": np.array([5.0, 6.0]), "steps": np.array([11, 25], dtype=np.int64)},
        {"w": np.array([3.0, 1.0]), "steps": np.array([40, 21], dtype=np.int64)},
        {"w": np.array([2.0, 2.0]), "steps": np.array([16, 30], dtype=np.int64)},
    ]
    result = RobustAggregation("clipped_mean", max_norm=1e9).aggregate(updates, [1.0] * 4)
    assert result["steps"].dtype == np.int64
    np.testing.assert_array_equal(result["steps"], [14, 23])  # medians 13.5 (to even) and 23.0
    np.testing.assert_allclose(result["w"], [2.75, 2.75])


def test_float16_keeps_its_dtype() -> None:
    updates = _random_updates(5, np.float16, 3, {"a": (10,)})
    result = RobustAggregation("trimmed_mean", f=1).aggregate(updates, [1.0] * 5)
    assert result["a"].dtype == np.float16
    want = np.sort(_stack(updates, "a").astype(np.float32), axis=0)[1:4].mean(axis=0)
    np.testing.assert_array_equal(result["a"], want.astype(np.float16))


# ---------------------------------------------------------------- memmaps


def _to_memmaps(updates: list[Arrays], folder: Path) -> list[Arrays]:
    mapped: list[Arrays] = []
    for i, update in enumerate(updates):
        arrays: Arrays = {}
        for name, value in update.items():
            path = folder / f"{i}-{name}.npy"
            out = np.lib.format.open_memmap(path, mode="w+", dtype=value.dtype, shape=value.shape)
            out[...] = value
            out.flush()
            del out
            arrays[name] = np.load(path, mmap_mode="r")
        mapped.append(arrays)
    return mapped


@pytest.mark.parametrize("rule", RULES)
def test_memmaps_give_the_same_result(rule: RuleName, tmp_path: Path) -> None:
    updates = _random_updates(7, np.float32, 21)
    mapped = _to_memmaps(updates, tmp_path)
    assert isinstance(mapped[0]["big"], np.memmap)
    weights = _weights(7, 21)
    max_norm = float(np.median([np.linalg.norm(_flat_all(u)) for u in updates]))
    aggregation = RobustAggregation(rule, f=1, max_norm=max_norm)
    want, want_report = aggregation.aggregate_with_report(updates, weights)
    got, got_report = aggregation.aggregate_with_report(mapped, weights)
    assert got_report == want_report
    assert want_report.clipped  # max_norm bites on some updates
    for name in want:
        assert type(got[name]) is np.ndarray
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("rule", ["median", "krum", "clipped_mean"])
def test_non_contiguous_arrays(rule: RuleName) -> None:
    updates = _random_updates(5, np.float32, 8)
    fortran = [{k: np.asfortranarray(v) for k, v in u.items()} for u in updates]
    assert not fortran[0]["big"].flags.c_contiguous
    aggregation = RobustAggregation(rule, f=1, max_norm=1e6)
    want = aggregation.aggregate(updates, [1.0] * 5)
    got = aggregation.aggregate(fortran, [1.0] * 5)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.fixture(scope="module")
def large_memmaps(tmp_path_factory: pytest.TempPathFactory) -> list[Arrays]:
    """Seven 16 MiB updates on disk (112 MiB in all)."""
    folder = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    mapped: list[Arrays] = []
    for i in range(7):
        path = folder / f"{i}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1 << 22,))
        out[:] = rng.standard_normal(1 << 22, dtype=np.float32)
        out.flush()
        del out
        mapped.append({"w": np.load(path, mmap_mode="r")})
    return mapped


@pytest.mark.parametrize("rule", RULES)
def test_working_memory_is_slices_not_models(rule: RuleName, large_memmaps: list[Arrays]) -> None:
    output = 16 << 20
    tracemalloc.start()
    try:
        RobustAggregation(rule, f=1, max_norm=1000.0).aggregate(large_memmaps, [1.0] * 7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # About 7 slices (float32 and float64 copies) beside the result; the updates are 112 MiB.
    assert peak < output + (32 << 20)


def test_bulyan_does_not_depend_on_the_order_the_updates_arrived_in() -> None:
    """With n = 4f + 4 the last Krum pick scores every candidate 0: the tie must not go to
    whichever update came first (it did: the result changed with the order)."""
    rng = np.random.default_rng(7)
    updates = [{"w": rng.standard_normal(16).astype(np.float64)} for _ in range(8)]
    rule = RobustAggregation("bulyan", f=1)
    first = rule.aggregate(updates, [1.0] * 8)["w"]
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(8)
        again = rule.aggregate([updates[i] for i in order], [1.0] * 8)["w"]
        np.testing.assert_allclose(again, first, rtol=1e-12)


@pytest.mark.parametrize("rule", ["median", "multi_krum", "clipped_mean"])
def test_full_models_with_their_base_are_their_differences(rule: RuleName) -> None:
    """``bases``: a FULL model minus the global one, a slice at a time, gives what the
    difference itself gives (DIFF and FULL updates mixed)."""
    diffs = _random_updates(7, np.float64, seed=3)
    base = _random_updates(1, np.float64, seed=4)[0]
    full = [{k: v + base[k] for k, v in d.items()} for d in diffs]
    given = [full[i] if i % 2 else diffs[i] for i in range(7)]
    bases = [base if i % 2 else None for i in range(7)]
    agg = RobustAggregation(rule, f=1, max_norm=5.0)
    want = agg.aggregate(diffs, [1.0] * 7)
    got, _ = agg.aggregate_with_report(given, [1.0] * 7, bases)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-12)


def test_full_models_with_a_base_cost_slices_not_models(large_memmaps: list[Arrays]) -> None:
    """What the server's robust round does with FULL results: never a whole difference."""
    base = {k: np.zeros_like(np.asarray(v)) for k, v in large_memmaps[0].items()}
    tracemalloc.start()
    try:
        RobustAggregation("median").aggregate_with_report(large_memmaps, [1.0] * 7, [base] * 7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20) + (32 << 20)
