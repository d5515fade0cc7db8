"""The client halves of FedProx, SCAFFOLD and Ditto against their papers' formulas, computed
here by hand: the proximal terms' values and gradients, SCAFFOLD's corrected steps and control
update over two rounds (numpy and torch), Ditto's personal model across rounds and files."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from flare_async.client.algorithms import (
    Ditto,
    FedProxLoss,
    Scaffold,
    fedprox_mu,
    prox_grad,
    prox_term,
)
from flare_async.fl import DITTO_LAMBDA, FEDPROX_MU, SCAFFOLD_CONTROL, FLModel, ParamsType


def _linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- FedProx


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_prox_term_value_and_gradient(framework: str) -> None:
    model, reference = _linear(0), _linear(1)
    if framework == "numpy":
        global_params: dict[str, Any] = _numpy_state(reference)
    else:
        global_params = dict(reference.named_parameters())  # requires_grad: must stay out
    mu = 0.3
    term = prox_term(model, global_params, mu)
    expected = sum(
        float(((p.detach() - q.detach()) ** 2).sum())
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert float(term.detach()) == pytest.approx(mu / 2 * expected, rel=1e-6)
    term.backward()  # type: ignore[no-untyped-call]
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, mu * (p.detach() - q.detach()))
    assert all(q.grad is None for q in reference.parameters())


def test_prox_term_edges() -> None:
    model, reference = _linear(0), _linear(1)
    state = _numpy_state(reference)
    zero = prox_term(model, {}, 0.0)  # mu 0: nothing looked up
    assert float(zero) == 0.0
    model.bias.requires_grad_(False)  # frozen: the global model need not have it
    only_weight = {"weight": state["weight"]}
    assert float(prox_term(model, only_weight, 1.0).detach()) > 0
    with pytest.raises(KeyError, match="weight"):
        prox_term(model, {"bias": state["bias"]}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        prox_term(model, {"weight": state["weight"].T}, 1.0)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="mu"):
            prox_term(model, state, bad)


def test_prox_grad_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": np.ones(2, np.float32)}
    params = {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": np.zeros(2, np.float32)}
    global_params = {"w": rng.normal(size=(2, 3)), "b": np.full(2, 0.5)}  # float64 on purpose
    before = {k: v.copy() for k, v in grads.items()}
    out = prox_grad(grads, params, global_params, 0.1)
    for name, grad in grads.items():
        expected = before[name] + 0.1 * (params[name] - global_params[name])
        np.testing.assert_allclose(out[name], expected, rtol=1e-6)
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(grad, before[name])  # a new dict, inputs untouched
    assert prox_grad(grads, params, global_params, 0.0) == grads
    with pytest.raises(KeyError, match="b"):
        prox_grad(grads, params, {"w": global_params["w"]}, 0.1)

    torch_grads = {k: torch.from_numpy(v.copy()) for k, v in grads.items()}
    torch_out = prox_grad(torch_grads, params, global_params, 0.1)
    for name in grads:
        assert isinstance(torch_out[name], torch.Tensor)
        np.testing.assert_allclose(torch_out[name].numpy(), out[name], rtol=1e-6)


def test_fedprox_loss_is_flares_call_and_equals_prox_term() -> None:
    model, global_model = _linear(0), _linear(1)
    loss_fn = FedProxLoss(mu=0.2)
    loss = loss_fn(input=model, target=global_model)
    direct = prox_term(model, _numpy_state(global_model), 0.2)
    assert float(loss.detach()) == pytest.approx(float(direct.detach()))
    assert float(loss_fn.forward(model, global_model).detach()) == float(loss.detach())
    loss.backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is None for p in global_model.parameters())  # the target is detached
    assert FedProxLoss().mu == 0.01  # FLARE's default
    with pytest.raises(ValueError, match="mu"):
        FedProxLoss(-1.0)


def test_fedprox_mu_edges() -> None:
    assert fedprox_mu(FLModel()) == 0.0
    assert fedprox_mu(FLModel(meta={FEDPROX_MU: 0})) == 0.0
    assert fedprox_mu(FLModel(meta={FEDPROX_MU: 0.01})) == 0.01
    assert fedprox_mu({FEDPROX_MU: 2}) == 2.0
    for bad in (-0.1, math.nan, math.inf, "1", True, None, [1]):
        with pytest.raises(ValueError, match=FEDPROX_MU):
            fedprox_mu(FLModel(meta={FEDPROX_MU: bad}))


def test_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from flare_async.client.algorithms import Scaffold, prox_grad\n"
        "g = prox_grad({'w': np.ones(2)}, {'w': np.ones(2)}, {'w': np.zeros(2)}, 0.5)\n"
        "assert g['w'].tolist() == [1.5, 1.5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- SCAFFOLD

# A quadratic per tensor, f(w) = 1/2 sum h (w - t)^2, so g(w) = h (w - t): the corrected SGD
# of the paper can be run here by hand and compared with the helper's.
TARGET = {"w": np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), "b": np.array([0.25, -0.75])}
CURVE = {"w": np.array([[1.0, 2.0, 0.5], [3.0, 1.5, 1.0]]), "b": np.array([2.0, 0.5])}
LR, STEPS = 0.05, 4


def _grad(name: str, y: np.ndarray) -> np.ndarray:
    grad: np.ndarray = CURVE[name] * (y - TARGET[name])
    return grad


def _task(x: dict[str, np.ndarray], c: dict[str, np.ndarray], rnd: int) -> FLModel:
    params: dict[str, Any] = {k: v.copy() for k, v in x.items()}
    params.update({SCAFFOLD_CONTROL + k: v.astype(np.float32) for k, v in c.items()})
    for v in params.values():
        v.flags.writeable = False  # as decoded from the wire
    return FLModel(params=params, current_round=rnd, total_rounds=2)


def _reference(
    x: dict[str, np.ndarray], c: dict[str, np.ndarray], c_i: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(y after K corrected steps, c_i+) straight from the paper's formulas."""
    y, c_plus = {}, {}
    for name, server in c.items():
        v = x[name].astype(np.float64)
        for _ in range(STEPS):
            v = v - LR * (_grad(name, v) - c_i[name] + server)
        y[name] = v
        c_plus[name] = c_i[name] - server + (x[name] - v) / (STEPS * LR)
    return y, c_plus


def _rounds() -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    x1 = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(2, np.float32)}
    c1 = {"w": np.zeros((2, 3)), "b": np.zeros(2)}
    x2 = {"w": np.full((2, 3), 0.25, np.float32), "b": np.array([0.1, 0.2], np.float32)}
    c2 = {"w": np.full((2, 3), 0.3), "b": np.array([-0.2, 0.4])}
    return [(x1, c1), (x2, c2)]


def test_scaffold_numpy_two_rounds() -> None:
    sc = Scaffold()
    c_i = {"w": np.zeros((2, 3)), "b": np.zeros(2)}
    for rnd, (model_x, c) in enumerate(_rounds()):
        x = {**model_x, "count": np.array(7 * rnd, np.int64)}  # an integer tensor: no control
        task = _task(x, c, rnd)
        params = sc.receive(task)
        assert set(params) == {"w", "b", "count"}  # controls stripped
        assert all(params[k] is task.params[k] for k in params)  # the task's own, not copies
        y = {k: np.array(v, copy=True) for k, v in params.items()}
        for _ in range(STEPS):
            grads = {k: _grad(k, y[k]).astype(np.float32) for k in ("w", "b")}
            corrected = sc.corrected(grads)
            for k in grads:
                y[k] = y[k] - LR * corrected[k]
        y["count"] = y["count"] + 3
        result = sc.result(y, steps=STEPS, lr=LR, meta={"num_samples": 10}, metrics={"l": 1.0})

        ref_y, ref_c = _reference(x, c, c_i)
        assert result.params_type is ParamsType.DIFF
        assert (result.current_round, result.total_rounds) == (rnd, 2)
        assert result.meta == {"num_samples": 10}
        assert result.metrics == {"l": 1.0}
        assert set(result.params) == {
            "w",
            "b",
            "count",
            SCAFFOLD_CONTROL + "w",
            SCAFFOLD_CONTROL + "b",
        }
        for k in ("w", "b"):
            np.testing.assert_allclose(result.params[k], ref_y[k] - x[k], rtol=1e-4, atol=1e-6)
            delta_c = result.params[SCAFFOLD_CONTROL + k]
            assert delta_c.dtype == np.float32
            np.testing.assert_allclose(delta_c, ref_c[k] - c_i[k], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(sc.control[k], ref_c[k], rtol=1e-4, atol=1e-5)
        assert result.params["count"].dtype == np.int64
        assert int(result.params["count"]) == 3
        assert "count" not in sc.control
        c_i = ref_c  # the next round starts from c_i+
        np.testing.assert_array_equal(task.params["w"], x["w"])  # the task untouched
    # Round 2 really used round 1's c_i: with c_i reset to zero the answer differs.
    assert not np.allclose(
        c_i["w"], _reference(*_rounds()[1], {"w": np.zeros((2, 3)), "b": np.zeros(2)})[1]["w"]
    )


class _Quadratic(torch.nn.Module):
    def __init__(self, x: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 3))
        self.b = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.load_state_dict({k: torch.as_tensor(v) for k, v in x.items()})

    def loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for name in ("w", "b"):
            p = getattr(self, name)
            curve = torch.as_tensor(CURVE[name], dtype=torch.float32)
            target = torch.as_tensor(TARGET[name], dtype=torch.float32)
            total = total + 0.5 * (curve * (p - target) ** 2).sum()
        return total


def test_scaffold_torch_two_rounds_with_sgd() -> None:
    sc = Scaffold()
    c_i = {"w": np.zeros((2, 3)), "b": np.zeros(2)}
    for rnd, (model_x, c) in enumerate(_rounds()):
        x = {**model_x, "count": np.array(rnd, np.int64)}
        task = _task(x, c, rnd)
        task.params = {k: torch.from_numpy(np.array(v)) for k, v in task.params.items()}
        sent = {k: v.clone() for k, v in task.params.items()}
        params = sc.receive(task)
        assert all(isinstance(v, torch.Tensor) for v in params.values())
        assert not any(k.startswith(SCAFFOLD_CONTROL) for k in params)
        model = _Quadratic({k: v.numpy() for k, v in params.items()})
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for _ in range(STEPS):
            opt.zero_grad()
            model.loss().backward()  # type: ignore[no-untyped-call]
            sc.correct(model)
            opt.step()
        model.get_buffer("count").add_(1)
        result = sc.result(model.state_dict(), steps=STEPS, lr=LR)

        ref_y, ref_c = _reference(x, c, c_i)
        for k in ("w", "b"):
            dy = result.params[k]
            assert isinstance(dy, torch.Tensor)
            np.testing.assert_allclose(dy.numpy(), ref_y[k] - x[k], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(
                result.params[SCAFFOLD_CONTROL + k].numpy(), ref_c[k] - c_i[k], rtol=1e-4, atol=1e-5
            )
        assert int(result.params["count"]) == 1
        assert SCAFFOLD_CONTROL + "count" not in result.params
        for k, v in sent.items():
            torch.testing.assert_close(task.params[k], v)  # the task untouched
        c_i = ref_c


def test_scaffold_misuse() -> None:
    sc = Scaffold()
    with pytest.raises(RuntimeError, match="receive"):
        sc.result({}, steps=1, lr=0.1)
    x, c = _rounds()[0]
    sc.receive(_task(x, c, 0))
    for steps, lr in ((0, 0.1), (True, 0.1), (1.5, 0.1), (1, 0.0), (1, -1.0), (1, math.nan)):
        with pytest.raises(ValueError, match=r"steps|lr"):
            sc.result(x, steps=steps, lr=lr)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        sc.result({"w": x["w"]}, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="not in the task"):
        sc.result({**x, "extra": np.zeros(1)}, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        sc.result({**x, "b": np.zeros(3)}, steps=1, lr=0.1)
    renamed = torch.nn.Linear(3, 2)  # parameters "weight" and "bias": no control matches
    with pytest.raises(ValueError, match="names"):
        sc.correct(renamed)
    sc.result(x, steps=1, lr=0.1)
    with pytest.raises(RuntimeError, match="receive"):
        sc.result(x, steps=1, lr=0.1)  # one result per task: c_i is not updated twice
    orphan = FLModel(params={"w": np.zeros(2), SCAFFOLD_CONTROL + "v": np.zeros(2)})
    with pytest.raises(ValueError, match="'v'"):
        sc.receive(orphan)
    shaped = FLModel(params={"w": np.zeros(2), SCAFFOLD_CONTROL + "w": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        sc.receive(shaped)


def test_scaffold_control_save_load(tmp_path: Any) -> None:
    sc = Scaffold()
    x, c = _rounds()[1]
    sc.receive(_task(x, c, 0))
    sc.result({k: v - 0.1 for k, v in x.items()}, steps=2, lr=0.5)
    path = tmp_path / "scaffold.safetensors"
    sc.save(path)
    again = Scaffold()
    again.load(path)
    assert again.control.keys() == sc.control.keys()
    for k, v in sc.control.items():
        np.testing.assert_array_equal(again.control[k], v)
    with pytest.raises(ValueError, match="scaffold"):
        Ditto().load(path)


# ---------------------------------------------------------------- Ditto


def test_ditto_personal_model_persists_across_rounds(tmp_path: Any) -> None:
    ditto = Ditto()
    assert ditto.personal is None
    first = FLModel(params={"w": np.ones(3, np.float32)}, meta={DITTO_LAMBDA: 0.5})
    personal = ditto.receive(first)
    assert ditto.lam(first) == 0.5
    np.testing.assert_array_equal(personal["w"], np.ones(3))  # initialised from the global
    personal["w"] += 1.0  # a writable copy: the kept model does not move with it
    np.testing.assert_array_equal(ditto.personal["w"], np.ones(3))  # type: ignore[index]
    ditto.keep({"w": personal["w"]})

    second = FLModel(params={"w": torch.zeros(3)}, meta={DITTO_LAMBDA: 0.1})
    personal = ditto.receive(second)
    assert isinstance(personal["w"], torch.Tensor)  # the task's framework
    np.testing.assert_array_equal(personal["w"].numpy(), np.full(3, 2.0))  # kept, not global
    assert ditto.lam(second) == 0.1

    path = tmp_path / "personal.safetensors"
    ditto.save(path)
    restored = Ditto()
    restored.load(path)
    np.testing.assert_array_equal(restored.personal["w"], np.full(3, 2.0))  # type: ignore[index]
    start = Ditto(personal_init={"w": torch.full((3,), 5.0)})
    assert start.receive(first)["w"].tolist() == [5.0, 5.0, 5.0]
    with pytest.raises(RuntimeError, match="personal"):
        Ditto().save(tmp_path / "none")


def test_ditto_lambda_term_gradient_and_edges() -> None:
    personal_model, global_model = _linear(2), _linear(3)
    global_params = _numpy_state(global_model)
    ditto = Ditto()
    with pytest.raises(RuntimeError, match="lam"):
        ditto.prox_term(personal_model, global_params)
    assert ditto.lam(FLModel()) == 0.0
    for bad in (-1, "0.5", math.nan):
        with pytest.raises(ValueError, match=DITTO_LAMBDA):
            ditto.lam(FLModel(meta={DITTO_LAMBDA: bad}))
    ditto.receive(FLModel(params=global_params, meta={DITTO_LAMBDA: 0.7}))
    term = ditto.prox_term(personal_model, global_params)
    term.backward()  # type: ignore[no-untyped-call]
    for name, v in personal_model.named_parameters():
        assert v.grad is not None
        expected = 0.7 * (v.detach() - torch.from_numpy(global_params[name]))
        torch.testing.assert_close(v.grad, expected)
    assert float(ditto.prox_term(personal_model, global_params, lam=0.0).detach()) == 0.0

    personal = _numpy_state(personal_model)
    grads = {k: np.zeros_like(v) for k, v in personal.items()}
    out = ditto.prox_grad(grads, personal, global_params)
    for k in grads:
        np.testing.assert_allclose(out[k], 0.7 * (personal[k] - global_params[k]), rtol=1e-6)
