"""The client halves of FedProx, SCAFFOLD and Ditto, for any training script (torch or numpy).

A workflow running one of these algorithms puts what the site needs into each task (the keys
of :mod:`flare_async.fl`: ``FEDPROX_MU``, ``DITTO_LAMBDA``, ``SCAFFOLD_CONTROL``); these helpers
read it, add the algorithm's part to the script's own training loop, and build the result the
server expects::

    # FedProx (Li et al. 2020): minimise F_i(w) + mu/2 ||w - w_global||^2
    mu = fedprox_mu(received)
    loss = criterion(model(x), y) + prox_term(model, received.params, mu)

    # SCAFFOLD (Karimireddy et al. 2020, option II), K steps of SGD at learning rate lr
    scaffold = Scaffold()                       # once per job: it keeps the site's control c_i
    model.load_state_dict(scaffold.receive(received))
    ...; loss.backward(); scaffold.correct(model); optimizer.step()   # each step
    flare.send(scaffold.result(model.state_dict(), steps=K, lr=lr))

    # Ditto (Li et al. 2021): the global model trains and is sent as usual; a personal one
    # stays on the site, pulled towards the global one
    ditto = Ditto()                             # once per job: it keeps the personal model
    personal_model.load_state_dict(ditto.receive(received))
    loss = criterion(personal_model(x), y) + ditto.prox_term(personal_model, received.params)
    ditto.keep(personal_model.state_dict())     # after the personal model's local training

Parameters may be torch tensors or numpy arrays, as the task brings them; received tensors are
never changed in place. torch is imported only when a torch value or module is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Real
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flare_async._files import write_atomic
from flare_async.codecs import as_numpy, decode, encode, to_torch
from flare_async.fl import (
    DITTO_LAMBDA,
    FEDPROX_MU,
    SCAFFOLD_CONTROL,
    SCAFFOLD_CTRL_GLOBAL,
    FLModel,
    ParamsType,
)

if TYPE_CHECKING:
    import torch

Params = Mapping[str, Any]
"""Tensors by name: numpy arrays or torch tensors (a ``state_dict``, ``FLModel.params``)."""

_STATE_KEY = "flare.algorithm"
"""Metadata key naming whose state a saved file holds (``ditto``, ``scaffold``)."""


# ---------------------------------------------------------------- shared pieces


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch")


def _check_weight(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number >= 0, not {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, not {value!r}")
    return float(value)


def _meta_weight(received: FLModel | Mapping[str, Any], key: str) -> float:
    meta = received.meta if isinstance(received, FLModel) else received
    if key not in meta:
        return 0.0
    return _check_weight(meta[key], f"meta[{key!r}]")


def _tensor(params: Params, name: str, what: str) -> Any:
    try:
        return params[name]
    except KeyError:
        raise KeyError(f"{what} has no tensor {name!r}") from None


def _numpy_like(value: Any, ref: np.ndarray, name: str) -> np.ndarray:
    a = as_numpy(value)
    if a.shape != ref.shape:
        raise ValueError(f"tensor {name!r} has shape {a.shape}, not {ref.shape}")
    return a


def _torch_like(value: Any, ref: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` (a tensor or an array) as a tensor on ``ref``'s device with its dtype; never a
    view that a caller could change the original through."""
    import torch  # noqa: PLC0415 - torch only for scripts that use it

    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        t = to_torch({name: as_numpy(value)})[name]  # a copy: received arrays are read-only
    if t.shape != ref.shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, not {tuple(ref.shape)}")
    return t.to(device=ref.device, dtype=ref.dtype)


def _owned(params: Params) -> dict[str, np.ndarray]:
    """Read-only numpy copies: state the helpers keep must not change with the script's
    tensors, nor be changed through what they hand out."""
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        a = np.array(as_numpy(value), copy=True)
        a.flags.writeable = False
        out[name] = a
    return out


def _framework(params: Mapping[str, np.ndarray], torch_out: bool) -> dict[str, Any]:
    """Writable copies of ``params``, as torch tensors when ``torch_out``."""
    if torch_out:
        return to_torch(params)
    return {name: a.copy() for name, a in params.items()}


def _save(path: str | PathLike[str], tensors: Mapping[str, np.ndarray], kind: str) -> None:
    write_atomic(Path(path), encode(tensors, {_STATE_KEY: kind}))


def _load(path: str | PathLike[str], kind: str) -> dict[str, np.ndarray]:
    tensors, meta = decode(Path(path).read_bytes())  # read-only views of the file's bytes
    if meta.get(_STATE_KEY) != kind:
        raise ValueError(f"{path} does not hold {kind} state (it says {meta.get(_STATE_KEY)!r})")
    return tensors


def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- FedProx


def fedprox_mu(received: FLModel | Mapping[str, Any]) -> float:
    """FedProx's μ for this task: ``received.meta[FEDPROX_MU]`` (or a meta mapping's), 0.0 when
    the task has none (plain FedAvg).

    Raises:
        ValueError: a μ that is not a finite number >= 0 (a string is refused, not parsed).
    """
    return _meta_weight(received, FEDPROX_MU)


def prox_term(model: torch.nn.Module, global_params: Params, mu: float) -> torch.Tensor:
    """FedProx's proximal term μ/2 Σ ||w - w_g||² over ``model``'s trainable parameters, each
    matched by name to ``global_params`` (torch tensors or numpy arrays, e.g. the task's
    ``params``): a scalar to add to the loss, differentiable in ``w`` only (its gradient is
    μ (w - w_g)).

    Global tensors on another device or of another dtype are converted on every call: for a
    model on a GPU, move them there once per round (numpy arrays are copied on every call).

    Raises:
        ValueError: a negative or non-finite ``mu``; a global tensor of another shape.
        KeyError: a trainable parameter that ``global_params`` lacks.
    """
    import torch  # noqa: PLC0415 - torch only for scripts that use it

    mu = _check_weight(mu, "mu")
    total: torch.Tensor | None = None
    for name, w in _trainable(model):
        if mu == 0.0:  # plain FedAvg: nothing to convert, nothing to add
            return torch.zeros((), device=w.device, dtype=w.dtype)
        g = _torch_like(_tensor(global_params, name, "the global model"), w, name)
        term = torch.sum(torch.square(w - g))
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return (mu / 2) * total


def prox_grad(grads: Params, params: Params, global_params: Params, mu: float) -> dict[str, Any]:
    """FedProx's proximal term added to gradients computed without it: a new dict of
    ``grads[n] + μ (params[n] - global_params[n])`` for each name in ``grads``, in ``grads``'
    framework and dtype (numpy arrays or torch tensors; ``params`` and ``global_params`` may be
    either).

    Raises:
        ValueError: a negative or non-finite ``mu``; tensors of different shapes.
        KeyError: a gradient whose tensor ``params`` or ``global_params`` lacks.
    """
    mu = _check_weight(mu, "mu")
    if mu == 0.0:
        return dict(grads)
    out: dict[str, Any] = {}
    for name, grad in grads.items():
        w = _tensor(params, name, "params")
        wg = _tensor(global_params, name, "the global model")
        if _is_torch(grad):
            out[name] = grad + mu * (_torch_like(w, grad, name) - _torch_like(wg, grad, name))
        else:
            g = as_numpy(grad)
            pull = _numpy_like(w, g, name) - _numpy_like(wg, g, name)
            out[name] = np.asarray(g + mu * pull).astype(g.dtype, copy=False)
    return out


class FedProxLoss:
    """NVIDIA FLARE's ``PTFedProxLoss``: ``loss_fn(input=model, target=global_model)`` is
    μ/2 Σ ||w - w_t||² over ``input``'s trainable parameters and ``target``'s of the same
    names (``target`` detached), as :func:`prox_term`.

    A plain callable rather than a ``torch.nn.Module``, so that this module imports without
    torch; ``forward`` and calling it are the same.

    Raises:
        ValueError: a negative or non-finite ``mu``.
    """

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = _check_weight(mu, "mu")

    def forward(self, input: torch.nn.Module, target: torch.nn.Module) -> torch.Tensor:
        """The proximal term of ``input`` (the local model) towards ``target`` (the global).

        Raises:
            KeyError: a trainable parameter of ``input`` that ``target`` lacks.
        """
        return prox_term(input, dict(target.named_parameters()), self.mu)

    def __call__(self, input: torch.nn.Module, target: torch.nn.Module) -> torch.Tensor:
        return self.forward(input, target)


# ---------------------------------------------------------------- SCAFFOLD


@dataclass
class _ScaffoldRound:
    """What one task gave SCAFFOLD: the global model x (copies), the server's control c and
    the correction c - c_i added to every gradient."""

    x: dict[str, np.ndarray]
    c: dict[str, np.ndarray]
    drift: dict[str, np.ndarray]
    current_round: int | None
    total_rounds: int | None
    drift_torch: dict[str, torch.Tensor] = field(default_factory=dict)

    def drift_like(self, name: str, ref: torch.Tensor) -> torch.Tensor:
        t = self.drift_torch.get(name)
        if t is None or t.device != ref.device or t.dtype != ref.dtype:
            t = self.drift_torch[name] = _torch_like(self.drift[name], ref, name)
        return t


class Scaffold:
    """The site's half of SCAFFOLD (Karimireddy et al. 2020, option II), for plain SGD.

    The task's params hold the global model x and the server's control c (``SCAFFOLD_CONTROL +
    NAME`` for each floating tensor ``NAME``). The site's own control c_i starts at zero and is
    kept here across rounds (:meth:`save` / :meth:`load` keep it across restarts). Each local
    step is y ← y - η (g(y) - c_i + c); after K steps, :meth:`result` sends y - x and
    c_i⁺ - c_i with c_i⁺ = c_i - c + (x - y) / (K η), and makes c_i⁺ the site's control.

    Tensors without a control in the task (integer ones such as BatchNorm's
    ``num_batches_tracked``) are not corrected; their change is sent as it is. The controls'
    update assumes plain SGD at a fixed learning rate; with momentum or Adam it is only an
    estimate.
    """

    def __init__(self) -> None:
        self._control: dict[str, np.ndarray] = {}
        self._round: _ScaffoldRound | None = None

    @property
    def control(self) -> dict[str, np.ndarray]:
        """The site's control c_i by tensor name (float32, read-only; none before the first
        task that carries controls)."""
        return dict(self._control)

    def receive(self, received: FLModel) -> dict[str, Any]:
        """Read a task: remember x and c, and return the model's params without the controls
        (the task's own tensors, not copied: torch tensors stay torch).

        Raises:
            ValueError: a control for a tensor the task does not have, of another shape, or not
                floating.
        """
        params: dict[str, Any] = {}
        # Where the Client API puts them (FLARE's meta["scaffold_c_global"]), or still beside
        # the model as they travel (a model built by hand).
        controls: dict[str, Any] = dict(received.meta.get(SCAFFOLD_CTRL_GLOBAL) or {})
        for name, value in received.params.items():
            if name.startswith(SCAFFOLD_CONTROL):
                controls[name[len(SCAFFOLD_CONTROL) :]] = value
            else:
                params[name] = value
        x = _owned(params)
        c: dict[str, np.ndarray] = {}
        drift: dict[str, np.ndarray] = {}
        for name, value in controls.items():
            if name not in x:
                raise ValueError(f"the task has a control for {name!r} but no such tensor")
            server = _numpy_like(value, x[name], SCAFFOLD_CONTROL + name)
            if server.dtype.kind != "f":
                raise ValueError(f"the control for {name!r} is {server.dtype}, not floating")
            own = self._control.get(name)
            if own is None:
                own = np.zeros(server.shape, np.float32)
            elif own.shape != server.shape:
                raise ValueError(
                    f"the site's control for {name!r} has shape {own.shape}, "
                    f"the task's {server.shape}"
                )
            c[name] = server.astype(np.float32, copy=False)
            drift[name] = np.asarray(c[name] - own)
        self._round = _ScaffoldRound(
            x=x,
            c=c,
            drift=drift,
            current_round=received.current_round,
            total_rounds=received.total_rounds,
        )
        return params

    def correct(self, model: torch.nn.Module) -> None:
        """Add c - c_i to the gradient of each trainable parameter that has a control: call it
        after ``loss.backward()``, before ``optimizer.step()`` (a parameter without a gradient
        gets c - c_i as its gradient: SCAFFOLD corrects it too).

        Raises:
            RuntimeError: no task received (or its result already made).
            ValueError: controls in the task but none named as the model's parameters.
        """
        state = self._state()
        matched = False
        for name, p in _trainable(model):
            if name not in state.drift:
                continue
            matched = True
            drift = state.drift_like(name, p)
            if p.grad is None:
                p.grad = drift.clone()
            else:
                p.grad.add_(drift)
        if state.drift and not matched:
            raise ValueError(
                "no parameter of the model has a control in the task: "
                f"are its names those of the task ({next(iter(state.drift))!r}...)?"
            )

    def corrected(self, grads: Params) -> dict[str, Any]:
        """A new dict of gradients, ``grads[n] + c - c_i`` for each name with a control (the
        others as they are), in ``grads``' framework and dtype.

        Raises:
            RuntimeError: no task received (or its result already made).
            ValueError: a gradient of another shape than its tensor.
        """
        state = self._state()
        out = dict(grads)
        for name, grad in grads.items():
            if name not in state.drift:
                continue
            if _is_torch(grad):
                out[name] = grad + state.drift_like(name, grad)
            else:
                g = as_numpy(grad)
                drift = _numpy_like(state.drift[name], g, name)
                out[name] = np.asarray(g + drift).astype(g.dtype, copy=False)
        return out

    def result(
        self,
        new_params: Params,
        *,
        steps: int,
        lr: float,
        meta: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> FLModel:
        """The task's result after ``steps`` local SGD steps at learning rate ``lr``: a DIFF
        with y - x for every tensor of the task's model and c_i⁺ - c_i under
        ``SCAFFOLD_CONTROL + NAME`` for those with a control; c_i becomes c_i⁺. The params are
        torch tensors if ``new_params`` are (a ``state_dict``), else numpy arrays.

        Raises:
            RuntimeError: no task received, or its result already made.
            ValueError: ``steps`` not a positive int, ``lr`` not a finite number > 0;
                ``new_params`` without one of the task's tensors, with one the task did not
                have, or of another shape.
        """
        state = self._state()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, not {steps!r}")
        if _check_weight(lr, "lr") == 0.0:
            raise ValueError("lr must be > 0")
        missing = state.x.keys() - new_params.keys()
        extra = new_params.keys() - state.x.keys()
        if missing or extra:
            raise ValueError(
                f"the result's tensors are not the task's: missing {sorted(missing)}, "
                f"not in the task {sorted(extra)}"
            )
        scale = 1.0 / (steps * float(lr))
        out: dict[str, np.ndarray] = {}
        control: dict[str, np.ndarray] = {}
        for name, x in state.x.items():
            y = _numpy_like(new_params[name], x, name)
            out[name] = _difference(y, x)
            c = state.c.get(name)
            if c is None:
                continue
            work = np.float64 if x.dtype == np.float64 else np.float32
            progress: npt.NDArray[np.floating[Any]] = x.astype(work)  # in place: one temporary
            np.subtract(progress, y, out=progress)  # (x - y) / (K lr) - c
            np.multiply(progress, scale, out=progress)
            np.subtract(progress, c, out=progress)
            delta = progress.astype(np.float32, copy=False)
            out[SCAFFOLD_CONTROL + name] = delta
            own = self._control.get(name)
            updated = delta.copy() if own is None else np.asarray(own + delta)
            updated.flags.writeable = False
            control[name] = updated
        self._control.update(control)
        self._round = None
        torch_out = any(_is_torch(v) for v in new_params.values())
        return FLModel(
            params=to_torch(out) if torch_out else out,  # new arrays: no copy needed
            params_type=ParamsType.DIFF,
            meta=dict(meta or {}),
            metrics=dict(metrics or {}),
            current_round=state.current_round,
            total_rounds=state.total_rounds,
        )

    def save(self, path: str | PathLike[str]) -> None:
        """Write the site's control c_i to ``path`` (the tensor layout, written atomically)."""
        _save(path, self._control, "scaffold")

    def load(self, path: str | PathLike[str]) -> None:
        """Make the control saved at ``path`` the site's control c_i.

        Raises:
            OSError: the file cannot be read; DecodeError: not a tensor file; ValueError: a
                file that does not hold SCAFFOLD's state.
        """
        self._control = _load(path, "scaffold")

    def _state(self) -> _ScaffoldRound:
        if self._round is None:
            raise RuntimeError("no SCAFFOLD task in hand: receive() it first (once per result)")
        return self._round


def _difference(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y - x in x's dtype (half-precision floats subtracted in float32)."""
    if x.dtype.itemsize < 4 and x.dtype.name in ("float16", "bfloat16"):
        return np.asarray(y.astype(np.float32) - x.astype(np.float32)).astype(x.dtype)
    return np.asarray(np.subtract(y, x)).astype(x.dtype, copy=False)  # 0-d stays an array


# ---------------------------------------------------------------- Ditto


class Ditto:
    """The site's half of Ditto (Li et al. 2021): beside the global model, which the script
    trains and sends as usual, a personal model v that never leaves the site, trained on
    F_i(v) + λ/2 ||v - w_g||².

    The personal model is kept here across rounds, as read-only numpy arrays: it starts as
    ``personal_init`` or else as the first global model received; :meth:`keep` stores it after
    each round's training; :meth:`save` / :meth:`load` keep it across restarts.
    """

    def __init__(self, personal_init: Params | None = None) -> None:
        self._personal = None if personal_init is None else _owned(personal_init)
        self._lam: float | None = None

    @property
    def personal(self) -> dict[str, np.ndarray] | None:
        """The personal model by tensor name (read-only numpy arrays), None before any."""
        return None if self._personal is None else dict(self._personal)

    def lam(self, received: FLModel | Mapping[str, Any]) -> float:
        """Ditto's λ for this task: ``meta[DITTO_LAMBDA]``, 0.0 when absent. It is also the λ
        :meth:`prox_term` and :meth:`prox_grad` use from now on.

        Raises:
            ValueError: a λ that is not a finite number >= 0.
        """
        self._lam = _meta_weight(received, DITTO_LAMBDA)
        return self._lam

    def receive(self, received: FLModel) -> dict[str, Any]:
        """Read a task (its λ, see :meth:`lam`) and return the personal model to train this
        round: writable copies, torch tensors if the task's are. The first task's global model
        becomes the personal model when there is none yet.

        Raises:
            ValueError: a λ that is not a finite number >= 0.
        """
        self.lam(received)
        if self._personal is None:
            self._personal = _owned(received.params)
        return _framework(self._personal, any(_is_torch(v) for v in received.params.values()))

    def prox_term(
        self, personal_model: torch.nn.Module, global_params: Params, lam: float | None = None
    ) -> torch.Tensor:
        """λ/2 Σ ||v - w_g||² over ``personal_model``'s trainable parameters (see
        :func:`prox_term`), with the task's λ unless ``lam`` is given.

        Raises:
            RuntimeError: no λ known (neither :meth:`receive` nor :meth:`lam` called, no
                ``lam``); ValueError, KeyError: as :func:`prox_term`.
        """
        return prox_term(personal_model, global_params, self._weight(lam))

    def prox_grad(
        self,
        grads: Params,
        personal: Params,
        global_params: Params,
        lam: float | None = None,
    ) -> dict[str, Any]:
        """``grads[n] + λ (personal[n] - global_params[n])`` (see :func:`prox_grad`), with
        the task's λ unless ``lam`` is given.

        Raises:
            RuntimeError: no λ known; ValueError, KeyError: as :func:`prox_grad`.
        """
        return prox_grad(grads, personal, global_params, self._weight(lam))

    def keep(self, personal_params: Params) -> None:
        """Store the personal model after this round's training (copied: a ``state_dict`` or
        numpy arrays)."""
        self._personal = _owned(personal_params)

    def save(self, path: str | PathLike[str]) -> None:
        """Write the personal model to ``path`` (the tensor layout, written atomically).

        Raises:
            RuntimeError: no personal model yet.
        """
        if self._personal is None:
            raise RuntimeError("no personal model to save yet")
        _save(path, self._personal, "ditto")

    def load(self, path: str | PathLike[str]) -> None:
        """Make the personal model saved at ``path`` the site's.

        Raises:
            OSError: the file cannot be read; DecodeError: not a tensor file; ValueError: a
                file that does not hold Ditto's state.
        """
        self._personal = _load(path, "ditto")

    def _weight(self, lam: float | None) -> float:
        if lam is not None:
            return _check_weight(lam, "lam")
        if self._lam is None:
            raise RuntimeError("no task's lambda known: call receive() or lam() first")
        return self._lam


PTFedProxLoss = FedProxLoss
"""NVIDIA FLARE's name (``nvflare.app_opt.pt.fedproxloss.PTFedProxLoss``), for scripts whose
import line is all that changes."""

__all__ = [
    "Ditto",
    "FedProxLoss",
    "PTFedProxLoss",
    "Scaffold",
    "fedprox_mu",
    "prox_grad",
    "prox_term",
]
