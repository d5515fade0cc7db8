"""FedOpt: server optimizers that turn a round's average into the next global model.

Each round the clients' weighted mean ``target`` is computed from the global model ``x``
(FedAvg's result); the pseudo-gradient is ``delta = target - x``. Per tensor, elementwise, at
step ``t = 1, 2, ...`` (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al. 2019
for FedAvgM)::

    sgd      x += lr * delta
    avgm     m = momentum * m + delta;                       x += lr * m
    adagrad  m = beta1 * m + (1 - beta1) * delta
             v = v + delta**2;                               x += lr * m / (sqrt(v) + tau)
    adam     m as above; v = beta2 * v + (1 - beta2) * delta**2;  x += same
    yogi     m as above; v = v - (1 - beta2) * delta**2 * sign(v - delta**2);  x += same

with ``m = 0`` and ``v = tau**2`` (the paper's ``v_{-1} >= tau**2``) before the first step,
and no bias correction (as in the paper: ``tau`` bounds the first steps instead).

Which one: ``sgd`` with ``lr=1`` is exactly FedAvg, and ``avgm`` with ``momentum=0, lr=1``
too. ``avgm`` (momentum around 0.9, lr 1) smooths rounds whose averages zigzag, as with
non-IID clients. The adaptive three give every coordinate its own step (about ``lr`` at first),
which helps when coordinates differ in scale, such as sparse or embedding weights: ``adam`` is
the usual choice; ``yogi`` grows ``v`` more slowly, so the step shrinks less abruptly when
pseudo-gradients spike; ``adagrad`` only ever shrinks the step. Reddi et al. found server
learning rates around ``1e-2 .. 1`` with ``tau = 1e-3`` (their grid ran down to ``1e-5``) and
``beta1 = 0.9``, ``beta2 = 0.99`` good defaults; ``lr=1`` moves every coordinate by about 1 in
the first round, so pass a smaller one for these.

The optimizer's state (``m``, ``v``, the step count) lives with the model: a job checkpoints
:meth:`ServerOptimizer.state` (tensors only, for a safetensors file) beside the global model and
its hyper-parameters (:meth:`ServerOptimizer.config`), and a server that restarts calls
:meth:`ServerOptimizer.load_state` to continue bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import ml_dtypes
import numpy as np

from flare_async.errors import ConfigError
from flare_async.fl._aggregate import to_dtype

OptimizerName = Literal["sgd", "avgm", "adam", "yogi", "adagrad"]

STEP_KEY = "fedopt.step"
M_PREFIX = "fedopt.m/"
V_PREFIX = "fedopt.v/"

_NAMES: tuple[str, ...] = get_args(OptimizerName)
_WITH_M = frozenset({"avgm", "adam", "yogi", "adagrad"})
_WITH_V = frozenset({"adam", "yogi", "adagrad"})
_BF16 = np.dtype(ml_dtypes.bfloat16)
_STATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _state_dtype(name: str, dtype: np.dtype[Any]) -> np.dtype[Any] | None:
    """What the state of a ``dtype`` tensor is kept in: float64 for float64, float32 for the
    other floats; ``None`` for integer and bool tensors, which are not optimized.

    Raises:
        ValueError: a tensor that is neither a float nor an integer (complex, object).
    """
    if dtype.kind in "iub":
        return None
    if dtype == np.float64:
        return np.dtype(np.float64)
    if dtype.kind == "f" or dtype == _BF16:
        return np.dtype(np.float32)
    raise ValueError(f"tensor {name!r} has dtype {dtype}, which cannot be optimized")


def _real(key: str, value: object) -> float:
    """``value`` as a Python float.

    Raises:
        ConfigError: ``value`` is not a real number.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{key} must be a number, not {value!r}")
    return float(value)


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` as an ndarray (0-d results of arithmetic are numpy scalars) marked read-only, so
    that :meth:`ServerOptimizer.state` can hand out the optimizer's own arrays safely."""
    a = np.asarray(a)
    a.flags.writeable = False
    return a


@dataclass(eq=False)
class ServerOptimizer:
    """A server optimizer (FedOpt) applied to each round's pseudo-gradient.

    The defaults are FedAvg for ``sgd`` (``lr=1``) and FedAvgM with momentum 0.9 for
    ``avgm``; for ``adam``, ``yogi`` and ``adagrad`` pass ``lr`` (Reddi et al.: ``1e-2 .. 1``);
    their ``beta1=0.9``, ``beta2=0.99`` and ``tau=1e-3`` are the paper's. See the module
    docstring for the update rules.

    Attributes:
        name: the update rule.
        lr: the server learning rate (``> 0``).
        momentum: ``avgm``'s momentum, in ``[0, 1)``.
        beta1: the decay of the first moment ``m`` (``adam``, ``yogi``, ``adagrad``), in
            ``[0, 1)``.
        beta2: the decay of the second moment ``v`` (``adam``, ``yogi``), in ``[0, 1)``.
        tau: the adaptivity floor (``> 0``): ``v`` starts at ``tau**2`` and ``tau`` is added to
            ``sqrt(v)``.

    Raises:
        ConfigError: an unknown name, ``lr`` or ``tau`` not finite and positive, or
            ``momentum``, ``beta1`` or ``beta2`` outside ``[0, 1)``.
    """

    name: OptimizerName
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    _m: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _v: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _step: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in _NAMES:
            raise ConfigError(f"unknown server optimizer {self.name!r}; one of {_NAMES}")
        for key in ("lr", "tau"):
            value = _real(key, getattr(self, key))
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be finite and > 0, not {value!r}")
            setattr(self, key, value)
        for key in ("momentum", "beta1", "beta2"):
            value = _real(key, getattr(self, key))
            if not 0 <= value < 1:
                raise ConfigError(f"{key} must be in [0, 1), not {value!r}")
            setattr(self, key, value)

    @property
    def _is_fedavg(self) -> bool:
        """Whether the rule reduces to FedAvg: ``sgd`` or momentum-free ``avgm`` with
        ``lr=1``."""
        return self.lr == 1 and (self.name == "sgd" or (self.name == "avgm" and self.momentum == 0))

    @property
    def steps(self) -> int:
        """Steps taken so far (restored by :meth:`load_state`)."""
        return self._step

    def config(self) -> dict[str, float | str]:
        """The hyper-parameters, for the job's record beside the checkpointed state."""
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }

    def step(
        self, params: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next global model from ``params`` and the round's average ``target``.

        Each float tensor is updated by the rule (its state created on first sight) and
        returned in its own dtype, the state kept in float64 for float64 tensors and float32
        for the others. An integer or bool tensor is not optimized: it becomes the target's
        value, rounded, in its own dtype. A tensor only ``target`` has is taken as it is; one
        only ``params`` has stays (the same array object) and its state is left alone. Neither
        mapping's arrays are modified. Nothing changes if this raises.

        Raises:
            ValueError: a tensor whose shape differs between ``params`` and ``target`` or from
                the optimizer's state, or whose dtype is neither float nor integer.
        """
        work: list[tuple[str, np.ndarray, np.ndarray, np.dtype[Any]]] = []
        out: dict[str, np.ndarray] = {}
        for name, value in params.items():
            if name not in target:
                out[name] = value
                continue
            p = np.asarray(value)
            t = np.asarray(target[name])
            if p.shape != t.shape:
                raise ValueError(f"tensor {name!r}: params shape {p.shape}, target {t.shape}")
            sdtype = _state_dtype(name, p.dtype)
            if sdtype is None:
                out[name] = to_dtype(t, p.dtype)
                continue
            for kind, held in (("m", self._m.get(name)), ("v", self._v.get(name))):
                if held is not None and held.shape != p.shape:
                    raise ValueError(
                        f"tensor {name!r} has shape {p.shape} but the optimizer's {kind} has "
                        f"{held.shape}"
                    )
            work.append((name, p, t, sdtype))
            out[name] = p  # keeps params' order; replaced below
        for name, p, t, sdtype in work:
            out[name] = self._update(name, p, t, sdtype)
        for name, value in target.items():
            if name not in params:
                out[name] = value
        self._step += 1
        return out

    def _update(self, name: str, p: np.ndarray, t: np.ndarray, sdtype: np.dtype[Any]) -> np.ndarray:
        """One tensor's step: its new value in ``p``'s dtype; its state replaced (never
        changed in place, since :meth:`state` hands the arrays out)."""
        x = p.astype(sdtype, copy=False)
        if self._is_fedavg:
            # x + (t - x) is not always t in floating point; FedAvg is promised exactly.
            if self.name == "avgm":
                self._m[name] = _frozen(t.astype(sdtype, copy=False) - x)
            return t.astype(p.dtype)
        delta = t.astype(sdtype, copy=False) - x
        if self.name == "sgd":
            return np.asarray(x + self.lr * delta).astype(p.dtype)
        m = self._m.get(name)
        if m is None:
            m = np.zeros(p.shape, dtype=sdtype)
        m = m.astype(sdtype, copy=False)
        if self.name == "avgm":
            m = self.momentum * m + delta
            self._m[name] = _frozen(m)
            return np.asarray(x + self.lr * m).astype(p.dtype)
        v = self._v.get(name)
        if v is None:
            v = np.full(p.shape, self.tau * self.tau, dtype=sdtype)
        v = v.astype(sdtype, copy=False)
        m = self.beta1 * m + (1 - self.beta1) * delta
        d2 = delta * delta
        if self.name == "adagrad":
            v = v + d2
        elif self.name == "adam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:  # yogi
            v = v - (1 - self.beta2) * d2 * np.sign(v - d2)
        self._m[name] = _frozen(m)
        self._v[name] = _frozen(v)
        return np.asarray(x + self.lr * m / (np.sqrt(v) + self.tau)).astype(p.dtype)

    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's state as tensors, for a checkpoint: ``"fedopt.step"`` (0-d int64),
        ``"fedopt.m/NAME"`` and ``"fedopt.v/NAME"`` per tensor as the rule keeps them. The
        arrays are the optimizer's own, read-only; a later :meth:`step` replaces them rather
        than changing them."""
        out: dict[str, np.ndarray] = {STEP_KEY: _frozen(np.array(self._step, dtype=np.int64))}
        out.update((M_PREFIX + name, a) for name, a in self._m.items())
        out.update((V_PREFIX + name, a) for name, a in self._v.items())
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from a :meth:`state` (a resumed server): the next :meth:`step` gives
        exactly what it would have given in the optimizer that saved it, if the
        hyper-parameters are the same. An empty mapping resets the optimizer to no steps.
        The arrays are copied; nothing changes if this raises.

        Raises:
            ValueError: a key this optimizer does not keep (such as ``fedopt.v/...`` for
                ``avgm``), no ``"fedopt.step"`` or one that is not a 0-d non-negative integer,
                a moment that is not float32 or float64, or ``m`` and ``v`` of one tensor that
                differ in shape or dtype or where one is missing.
        """
        if not state:
            self._m, self._v, self._step = {}, {}, 0
            return
        if STEP_KEY not in state:
            raise ValueError(f"optimizer state has no {STEP_KEY!r}")
        step = np.asarray(state[STEP_KEY])
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise ValueError(
                f"{STEP_KEY!r} must be a 0-d non-negative integer, not {step.dtype}{step.shape}"
            )
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        for key, value in state.items():
            if key == STEP_KEY:
                continue
            if key.startswith(M_PREFIX) and self.name in _WITH_M:
                held, name = m, key.removeprefix(M_PREFIX)
            elif key.startswith(V_PREFIX) and self.name in _WITH_V:
                held, name = v, key.removeprefix(V_PREFIX)
            else:
                raise ValueError(f"{key!r} is not part of a {self.name!r} optimizer's state")
            moment = np.asarray(value)
            if not name or moment.dtype not in _STATE_DTYPES:
                raise ValueError(f"{key!r}: a float32 or float64 tensor of a named parameter")
            held[name] = _frozen(moment.copy())
        if self.name in _WITH_V:
            for name in m.keys() | v.keys():
                mi, vi = m.get(name), v.get(name)
                if mi is None or vi is None:
                    raise ValueError(f"optimizer state has only one of m and v for {name!r}")
                if mi.shape != vi.shape or mi.dtype != vi.dtype:
                    raise ValueError(
                        f"optimizer state for {name!r}: m is {mi.dtype}{mi.shape}, "
                        f"v is {vi.dtype}{vi.shape}"
                    )
        self._m, self._v, self._step = m, v, int(step)
