"""FedOpt server optimizers: every rule against a float64 reference written from the formulas,
FedAvg exactly at lr=1, bit-identical resumption from state() (also through a safetensors
file), integer and new tensors, dtypes, untouched inputs, and the refusals."""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from flare_async.codecs import decode, encode
from flare_async.errors import ConfigError
from flare_async.fl._fedopt import ServerOptimizer

NAMES = ("sgd", "avgm", "adam", "yogi", "adagrad")
SHAPES = {"bias": (), "vec": (3,), "mat": (4, 5)}
ROUNDS = 6
# Not the defaults, so that a rule reading the wrong hyper-parameter shows.
HYPER: dict[str, Any] = {"momentum": 0.8, "beta1": 0.85, "beta2": 0.97, "tau": 1e-2}
LR = {"sgd": 0.7, "avgm": 0.4, "adam": 0.05, "yogi": 0.05, "adagrad": 0.1}


def make(name: str, **kw: Any) -> ServerOptimizer:
    return ServerOptimizer(name, **{"lr": LR[name], **HYPER, **kw})  # type: ignore[arg-type]


def model(rng: np.random.Generator, dtype: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(rng.normal(size=s)).astype(dtype) for k, s in SHAPES.items()}


def targets(seed: int, dtype: Any, rounds: int = ROUNDS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [model(rng, dtype) for _ in range(rounds)]


def reference(
    name: str, params: dict[str, np.ndarray], rounds: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The rules of Reddi et al. / Hsu et al., one scalar at a time, in float64."""
    lr, mom, b1, b2, tau = LR[name], HYPER["momentum"], HYPER["beta1"], HYPER["beta2"], HYPER["tau"]
    x = {k: [float(e) for e in a.ravel()] for k, a in params.items()}
    m = {k: [0.0] * len(e) for k, e in x.items()}
    v = {k: [tau * tau] * len(e) for k, e in x.items()}
    out = []
    for target in rounds:
        for k, xs in x.items():
            ts = [float(e) for e in target[k].ravel()]
            for i in range(len(xs)):
                d = ts[i] - xs[i]
                if name == "sgd":
                    xs[i] += lr * d
                    continue
                if name == "avgm":
                    m[k][i] = mom * m[k][i] + d
                    xs[i] += lr * m[k][i]
                    continue
                m[k][i] = b1 * m[k][i] + (1 - b1) * d
                if name == "adagrad":
                    v[k][i] = v[k][i] + d * d
                elif name == "adam":
                    v[k][i] = b2 * v[k][i] + (1 - b2) * d * d
                else:
                    diff = v[k][i] - d * d
                    sign = (diff > 0) - (diff < 0)
                    v[k][i] = v[k][i] - (1 - b2) * d * d * sign
                xs[i] += lr * m[k][i] / (v[k][i] ** 0.5 + tau)
        out.append({k: np.array(xs).reshape(SHAPES[k]) for k, xs in x.items()})
    return out


def run(
    opt: ServerOptimizer, params: dict[str, np.ndarray], rounds: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    out = []
    for target in rounds:
        params = opt.step(params, target)
        out.append(params)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name: str, dtype: Any) -> None:
    params = model(np.random.default_rng(1), dtype)
    rounds = targets(2, dtype)
    got = run(make(name), params, rounds)
    want = reference(name, params, rounds)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys()
        for k in g:
            assert g[k].dtype == dtype
            assert g[k].shape == SHAPES[k]
            np.testing.assert_allclose(g[k], w[k], rtol=tol, atol=tol, err_msg=f"round {r + 1} {k}")
    # The reference moves: a rule that returned the target, or the params, would not pass.
    assert not np.allclose(want[-1]["mat"], rounds[-1]["mat"])
    assert not np.allclose(want[-1]["mat"], params["mat"])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opt", [ServerOptimizer("sgd"), ServerOptimizer("avgm", momentum=0.0)])
def test_fedavg_exactly(opt: ServerOptimizer, dtype: Any) -> None:
    rng = np.random.default_rng(3)
    # Magnitudes far apart: x + (t - x) would round away from t.
    params = {"w": (rng.normal(size=50) * 1e8).astype(dtype)}
    for _ in range(4):
        target = {"w": (rng.normal(size=50) * 1e-3).astype(dtype)}
        params = opt.step(params, target)
        np.testing.assert_array_equal(params["w"], target["w"])
        assert params["w"].dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_state_is_bit_identical(name: str) -> None:
    params = model(np.random.default_rng(4), np.float32)
    params["f64"] = np.random.default_rng(5).normal(size=(2, 3))
    rounds = targets(6, np.float32)
    for r, t in enumerate(rounds):
        t["f64"] = np.random.default_rng(100 + r).normal(size=(2, 3))

    whole = make(name)
    x = run(whole, params, rounds[:3])[-1]
    state = whole.state()
    saved = {k: a.copy() for k, a in state.items()}
    uninterrupted = run(whole, x, rounds[3:])

    assert int(state["fedopt.step"]) == 3
    assert state["fedopt.step"].dtype == np.int64
    for k, a in state.items():  # later steps replace the state, never change what was handed out
        np.testing.assert_array_equal(a, saved[k])
    if name in ("adam", "yogi", "adagrad"):
        assert state["fedopt.v/mat"].dtype == np.float32
        assert state["fedopt.v/f64"].dtype == np.float64
    expected = {"sgd": 1, "avgm": 1 + 4, "adam": 1 + 8, "yogi": 1 + 8, "adagrad": 1 + 8}
    assert len(state) == expected[name]

    resumed = make(name)
    given = {k: a.copy() for k, a in state.items()}
    resumed.load_state(given)
    for kept in given.values():  # the caller's arrays are copied, not kept
        kept[...] = 0
    assert resumed.steps == 3
    for got, want in zip(run(resumed, x, rounds[3:]), uninterrupted, strict=True):
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype


@pytest.mark.parametrize("name", NAMES)
def test_resume_through_a_safetensors_file(name: str) -> None:
    params = model(np.random.default_rng(7), np.float64)
    rounds = targets(8, np.float64)
    whole = make(name)
    x = run(whole, params, rounds[:3])[-1]
    blob = b"".join(
        bytes(memoryview(p)) for p in encode(whole.state(), {"fedopt": json.dumps(whole.config())})
    )
    uninterrupted = run(whole, x, rounds[3:])

    tensors, meta = decode(blob)
    assert all(not a.flags.writeable for a in tensors.values())
    config = json.loads(meta["fedopt"])
    resumed = ServerOptimizer(**config)
    assert resumed.config() == whole.config()
    resumed.load_state(tensors)
    for a, b in zip(run(resumed, x, rounds[3:]), uninterrupted, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("name", NAMES)
def test_load_empty_state_resets(name: str) -> None:
    params = model(np.random.default_rng(9), np.float64)
    rounds = targets(10, np.float64)
    used = make(name)
    run(used, params, rounds)
    used.load_state({})
    assert used.steps == 0
    assert used.state().keys() == {"fedopt.step"}
    for a, b in zip(run(used, params, rounds), run(make(name), params, rounds), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("name", NAMES)
def test_integer_new_and_missing_tensors(name: str) -> None:
    opt = make(name)
    params = {
        "count": np.array([1, 2, 3, -4], dtype=np.int32),
        "flag": np.array([True, False]),
        "w": np.zeros(3, dtype=np.float32),
        "frozen": np.ones(2, dtype=np.float32),
    }
    new = np.arange(3.0)
    target = {
        "count": np.array([1.4, 2.6, -0.5, -4.6]),
        "flag": np.array([0.2, 0.9]),
        "w": np.ones(3, dtype=np.float32),
        "new": new,
    }
    out = opt.step(params, target)
    assert list(out) == ["count", "flag", "w", "frozen", "new"]
    np.testing.assert_array_equal(out["count"], [1, 3, 0, -5])
    assert out["count"].dtype == np.int32
    np.testing.assert_array_equal(out["flag"], [False, True])
    assert out["flag"].dtype == np.bool_
    assert out["frozen"] is params["frozen"]
    assert out["new"] is new
    assert not any(k.endswith(("/count", "/flag", "/frozen", "/new")) for k in opt.state())


@pytest.mark.parametrize("name", NAMES)
def test_dtypes_kept(name: str) -> None:
    dtypes = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
    opt = make(name)
    params = {f"p{i}": np.full((2, 2), 0.5, dtype=d) for i, d in enumerate(dtypes)}
    target = {k: np.full((2, 2), 1.0) for k in params}  # float64 targets for every tensor
    for _ in range(3):
        params = opt.step(params, target)
    for i, d in enumerate(dtypes):
        assert params[f"p{i}"].dtype == np.dtype(d)
        assert np.all(np.asarray(params[f"p{i}"], dtype=np.float64) > 0.5)
    state_dtype = {k: a.dtype for k, a in opt.state().items() if "/" in k}
    for k, dt in state_dtype.items():
        assert dt == (np.float64 if k.endswith("/p3") else np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_not_modified(name: str) -> None:
    opt = make(name)
    params = model(np.random.default_rng(11), np.float32)
    params["n"] = np.arange(4)
    for r, target in enumerate(targets(12, np.float32, 3)):
        target["n"] = np.arange(4) + 0.3
        copies = [{k: a.copy() for k, a in d.items()} for d in (params, target)]
        for d in (params, target):
            for a in d.values():
                a.flags.writeable = False
        out = opt.step(params, target)
        for d, c in zip((params, target), copies, strict=True):
            for k in d:
                np.testing.assert_array_equal(d[k], c[k], err_msg=f"round {r + 1} {k}")
        params = out


def test_config_errors() -> None:
    assert issubclass(ConfigError, ValueError)
    ServerOptimizer("adam", beta1=0.0, beta2=0.0, momentum=0.0)
    bad: list[dict[str, Any]] = [
        {"beta1": 1.0},
        {"beta2": 1.0},
        {"momentum": 1.0},
        {"beta1": -0.1},
        {"lr": 0.0},
        {"lr": -1.0},
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"tau": float("nan")},
        {"tau": 0.0},
        {"lr": "1"},
        {"beta2": float("nan")},
    ]
    for kw in bad:
        with pytest.raises(ConfigError):
            ServerOptimizer("adam", **kw)
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        ServerOptimizer("lamb")  # type: ignore[arg-type]
    yogi = ServerOptimizer("yogi", lr=np.float32(0.5))  # type: ignore[arg-type]
    assert yogi.config() == {
        "name": "yogi",
        "lr": 0.5,
        "momentum": 0.9,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }


def test_shape_changes_refused() -> None:
    opt = make("adam")
    params = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    params = opt.step(params, {"w": np.ones((2, 3)), "b": np.ones(3)})
    before = opt.state()
    with pytest.raises(ValueError, match="'w'"):
        opt.step({"w": np.zeros((3, 2)), "b": params["b"]}, {"w": np.ones((3, 2)), "b": np.ones(3)})
    with pytest.raises(ValueError, match="'b'"):
        opt.step(params, {"w": np.ones((2, 3)), "b": np.ones(4)})
    with pytest.raises(ValueError, match="'c'"):
        opt.step({"c": np.zeros(2, dtype=np.complex64)}, {"c": np.zeros(2)})
    after = opt.state()  # nothing changed by the refused steps
    assert after.keys() == before.keys()
    for k in after:
        np.testing.assert_array_equal(after[k], before[k])


def test_bad_states_refused() -> None:
    good = make("adam")
    good.step({"w": np.zeros(3)}, {"w": np.ones(3)})
    state = good.state()
    step = state["fedopt.step"]
    bad: list[dict[str, np.ndarray]] = [
        {**state, "other": np.zeros(3)},
        {**state, "fedopt.x/w": np.zeros(3)},
        {**state, "fedopt.v/w": np.zeros(4)},
        {**state, "fedopt.m/w": np.zeros((3, 1))},
        {**state, "fedopt.step": np.array([1])},
        {**state, "fedopt.step": np.array(1.0)},
        {**state, "fedopt.step": np.array(-1)},
        {**state, "fedopt.m/w": np.zeros(3, dtype=np.int64)},
        {**state, "fedopt.m/w": np.zeros(3, dtype=np.float32)},
        {"fedopt.step": step, "fedopt.m/w": state["fedopt.m/w"]},
        {k: a for k, a in state.items() if k != "fedopt.step"},
        {"fedopt.step": step, "fedopt.m/": np.zeros(1), "fedopt.v/": np.zeros(1)},
    ]
    for s in bad:
        opt = make("adam")
        opt.step({"w": np.zeros(3)}, {"w": np.full(3, 2.0)})
        before = opt.state()
        with pytest.raises(ValueError):
            opt.load_state(s)
        assert opt.state() == before  # the same (read-only) arrays: nothing replaced
    with pytest.raises(ValueError, match="avgm"):
        make("avgm").load_state(state)  # an adam state has v, which avgm does not keep
    with pytest.raises(ValueError, match="sgd"):
        make("sgd").load_state(state)
    loaded = make("avgm")
    loaded.load_state({"fedopt.step": step, "fedopt.m/w": state["fedopt.m/w"]})
    assert loaded.steps == 1
    # A state whose shapes no longer match the model is refused when the step meets it.
    with pytest.raises(ValueError, match="'w'"):
        loaded.step({"w": np.zeros(4)}, {"w": np.ones(4)})
