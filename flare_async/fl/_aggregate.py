"""Streaming aggregation: updates are folded into a running weighted sum as they arrive.

The server holds one accumulator the size of the model, never one copy per client. Each tensor
is summed in float32 when it is float32 or narrower (fp16, bf16: the sum is wider than the
values), in float64 when it is float64 or an integer tensor; ``precision="float64"`` sums every
tensor in float64 (twice the memory of a float32 model). A relay folds its subtree the same
way and sends up one partial sum (the weighted sum and the total weight, in the accumulator's
dtype), which the server merges as if it were the subtree's clients one by one, so hierarchical
FedAvg equals flat FedAvg up to the rounding of the accumulator's dtype (exactly as float64
for float64 models).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

from flare_async.fl._model import FLModel, ParamsType

WEIGHT_KEY = "flare.partial_weight"
COUNT_KEY = "flare.partial_count"


Folded = Callable[[str, np.ndarray], None]
"""Called after each tensor of an update is folded, with its name and array."""


class RoundMismatch(ValueError):
    """Updates that cannot be summed together (other tensors, shapes or params types)."""


class WeightedSum:
    """``sum_i w_i * params_i`` and ``sum_i w_i``, one update at a time."""

    def __init__(self, precision: Literal["native", "float64"] = "native") -> None:
        self.precision = precision
        self._sum: dict[str, np.ndarray] | None = None
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self.weight = 0.0
        self.count = 0
        self.params_type: ParamsType | None = None

    def add(
        self,
        params: Mapping[str, Any],
        weight: float,
        params_type: ParamsType,
        on_folded: Folded | None = None,
    ) -> None:
        """Fold one update in (``on_folded(name, array)`` after each tensor: a caller reading the
        update from a mapped file drops the pages it no longer needs).

        Raises:
            RoundMismatch: tensors or params type differ from the updates folded before.
            ValueError: a negative or non-finite weight.
        """
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite non-negative number, not {weight!r}")
        self._fold(params, weight, params_type, scale=weight, on_folded=on_folded)
        self.weight += weight
        self.count += 1

    def merge(self, partial: FLModel, on_folded: Folded | None = None) -> None:
        """Fold a relay's partial sum (see :meth:`partial`) in."""
        weight = float(partial.meta[WEIGHT_KEY])
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"partial weight must be finite and non-negative, not {weight!r}")
        self._fold(partial.params, weight, partial.params_type, scale=1.0, on_folded=on_folded)
        self.weight += weight
        self.count += int(partial.meta.get(COUNT_KEY, 1))

    def _fold(
        self,
        params: Mapping[str, Any],
        weight: float,
        params_type: ParamsType,
        scale: float,
        on_folded: Folded | None = None,
    ) -> None:
        if self.params_type is None:
            self.params_type = params_type
        elif params_type is not self.params_type:
            raise RoundMismatch(f"a {params_type.value} update among {self.params_type.value} ones")
        if self._sum is None:
            self._sum = {}
            for name, value in params.items():
                a = np.asarray(value)
                self._dtypes[name] = a.dtype
                acc = np.empty(a.shape, self._acc_dtype(a.dtype))
                _fold_into(acc.reshape(-1), a.reshape(-1), scale, first=True)
                self._sum[name] = acc
                if on_folded is not None:
                    on_folded(name, a)
            return
        if set(params) != set(self._sum):
            raise RoundMismatch("an update with other tensors than the ones before")
        arrays = {name: np.asarray(value) for name, value in params.items()}
        for name, a in arrays.items():  # all checked before any is folded
            if a.shape != self._sum[name].shape:
                raise RoundMismatch(
                    f"tensor {name!r}: shape {a.shape}, expected {self._sum[name].shape}"
                )
        for name, a in arrays.items():
            _fold_into(self._sum[name].reshape(-1), a.reshape(-1), scale)
            if on_folded is not None:
                on_folded(name, a)

    def _acc_dtype(self, dtype: np.dtype[Any]) -> type[np.floating[Any]]:
        if self.precision == "float64" or dtype == np.float64 or dtype.kind in "iub":
            return np.float64
        return np.float32

    def partial(self) -> FLModel:
        """The sum so far, to send up a tier (the accumulator's dtypes, total weight in
        ``meta``)."""
        assert self._sum is not None, "nothing folded"
        return FLModel(
            params=dict(self._sum),
            params_type=self.params_type or ParamsType.FULL,
            meta={WEIGHT_KEY: self.weight, COUNT_KEY: self.count},
        )

    def dtype(self, name: str) -> np.dtype[Any]:
        return self._dtypes[name]

    def names(self) -> list[str]:
        return list(self._sum or {})

    def mean_of(self, name: str) -> np.ndarray:
        """One tensor's weighted mean, in the accumulator's dtype.

        Raises:
            ValueError: nothing folded, or a total weight of zero.
        """
        if self._sum is None or self.weight <= 0:
            raise ValueError("no update with a positive weight to average")
        acc = self._sum[name]
        out: np.ndarray = acc / acc.dtype.type(self.weight)
        return out

    def release(self, name: str) -> None:
        """Forget one tensor's sum (its memory goes back)."""
        if self._sum is not None:
            self._sum.pop(name, None)

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean, in each tensor's original dtype.

        Raises:
            ValueError: nothing folded, or a total weight of zero.
        """
        return {n: self.mean_of(n).astype(self._dtypes[n]) for n in self.names()}


_SLICE = 1 << 18


def _fold_into(acc: np.ndarray, a: np.ndarray, scale: float, *, first: bool = False) -> None:
    """``acc += a * scale`` (``acc = a * scale`` if ``first``) in the accumulator's dtype, a
    slice at a time (temporaries stay in cache: a 100 MB model folds in a fraction of the time
    of whole-array expressions)."""
    tmp = np.empty(min(acc.size, _SLICE), dtype=acc.dtype)
    for start in range(0, acc.size, _SLICE):
        end = min(start + _SLICE, acc.size)
        if first:
            np.multiply(a[start:end], scale, out=acc[start:end], dtype=acc.dtype)
            continue
        t = tmp[: end - start]
        np.multiply(a[start:end], scale, out=t, dtype=acc.dtype)
        acc[start:end] += t


def fedavg_step(
    global_params: Mapping[str, Any], agg: WeightedSum, *, consume: bool = False
) -> dict[str, np.ndarray]:
    """The next global model: the weighted mean of FULL updates, or the global model plus the
    weighted mean of DIFF updates. One tensor at a time: the temporaries are one tensor's, and
    with ``consume`` each accumulator tensor is released once used (the new model grows as the
    sum shrinks; ``agg`` is empty afterwards)."""
    out: dict[str, np.ndarray] = {}
    for n in agg.names():
        m = agg.mean_of(n)
        if consume:
            agg.release(n)
        g = np.asarray(global_params[n]) if n in global_params else None
        dtype = g.dtype if g is not None else agg.dtype(n)
        if agg.params_type is ParamsType.DIFF and g is not None:
            m += g
        value = m
        if dtype.kind in "iub":
            value = np.rint(value)  # integer tensors: rounded, not truncated
        out[n] = value.astype(dtype, copy=False)  # the global model's dtype, however it travelled
    return out
