"""Streaming aggregation: updates are folded into a running weighted sum as they arrive.

A result's weight is ``meta["num_samples"]``, else ``meta["NUM_STEPS_CURRENT_ROUND"]`` (NVIDIA
FLARE's ``FLMetaKey.NUM_STEPS_CURRENT_ROUND``), else 1 (:func:`result_weight`). An update may
carry some of the model's tensors only (a DIFF of LoRA adapters): each tensor is averaged over
the updates that carried it, with their weights (its own total weight), and a tensor no update
carried (or only updates of weight 0) stays as it was.

The server holds one accumulator the size of the model, never one copy per client. Each tensor
is summed in float32 when it is float32 or narrower (fp16, bf16: the sum is wider than the
values), in float64 when it is float64 or an integer tensor; ``precision="float64"`` sums every
tensor in float64 (twice the memory of a float32 model). A relay folds its subtree the same
way and sends up one partial sum (the weighted sum in the accumulator's dtype, the total weight,
and each tensor's own total weight where it differs), which the server merges as if it were the
subtree's clients one by one, so hierarchical FedAvg equals flat FedAvg up to the rounding of
the accumulator's dtype (exactly as float64 for float64 models).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

from flare_async.codecs import dtype_name, dtype_named
from flare_async.errors import DecodeError
from flare_async.fl._model import FLModel, ParamsType

WEIGHT_KEY = "flare.partial_weight"
COUNT_KEY = "flare.partial_count"
TENSOR_WEIGHTS_KEY = "flare.partial_tensor_weights"
"""In a partial sum's meta: ``{name: total weight}`` for the tensors whose total weight is not
``WEIGHT_KEY``'s (some of the subtree's updates did not carry them); absent when none is (a
partial sum without it, from an older relay, weighs every tensor ``WEIGHT_KEY``)."""
DTYPES_KEY = "flare.partial_dtypes"
"""In a partial sum's meta: the updates' own dtypes where they differ from the accumulator's
(safetensors names), so the tier above averages back into them."""
NUM_SAMPLES_KEY = "num_samples"
NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"
"""NVIDIA FLARE's ``FLMetaKey.NUM_STEPS_CURRENT_ROUND``: the weight when ``num_samples`` is not
given."""


def result_weight(meta: Mapping[str, Any]) -> float:
    """A result's weight in the weighted aggregations: ``meta["num_samples"]`` if present, else
    ``meta["NUM_STEPS_CURRENT_ROUND"]`` (as NVIDIA FLARE weighs), else 1.0.

    Raises:
        ValueError: the weight read is not a number (``bool`` and numeric strings included),
            or negative, NaN or infinite.
    """
    for key in (NUM_SAMPLES_KEY, NUM_STEPS_KEY):
        if key in meta:
            value = meta[key]
            break
    else:
        return 1.0
    return checked_weight(value, f"the result's weight meta[{key!r}]")


Folded = Callable[[str, np.ndarray], None]
"""Called after each tensor of an update is folded, with its name and array."""


class RoundMismatch(ValueError):
    """Updates that cannot be summed together (other tensors, shapes or params types)."""


class WeightedSum:
    """``sum_i w_i * params_i`` and ``sum_i w_i``, one update at a time, per tensor: an update
    may carry some tensors only, and each tensor's total weight counts the updates that carried
    it (:meth:`weight_of`); :attr:`weight` is the total weight of all the updates."""

    def __init__(self, precision: Literal["native", "float64"] = "native") -> None:
        self.precision = precision
        self._sum: dict[str, np.ndarray] = {}
        self._weights: dict[str, float] = {}
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
            RoundMismatch: a tensor of another shape than the same name's before, or another
                params type than the updates folded before (nothing of the update is folded).
            ValueError: a negative or non-finite weight.
        """
        weight = checked_weight(weight, "weight")
        self._fold(params, weight, params_type, None, scale=weight, on_folded=on_folded)
        self.weight += weight
        self.count += 1

    def merge(
        self, partial: FLModel, on_folded: Folded | None = None, *, adopt: bool = False
    ) -> None:
        """Fold a relay's partial sum (see :meth:`partial`) in. With ``adopt`` the caller gives
        the partial's arrays up: a tensor this sum does not hold yet takes its array (of the
        accumulator's dtype, over writable memory: made writable) as its accumulator, uncopied.

        Raises:
            RoundMismatch: as :meth:`add`.
            KeyError: no ``WEIGHT_KEY`` in its meta.
            ValueError: a weight (the partial's, or a tensor's) that is not a number, or is
                negative or not finite.
        """
        weight = checked_weight(partial.meta[WEIGHT_KEY], "partial weight")
        own = partial.meta.get(TENSOR_WEIGHTS_KEY) or {}
        if not isinstance(own, Mapping):
            msg = f"a partial sum's per-tensor weights are not a mapping: {own!r}"
            raise ValueError(msg)  # noqa: TRY004 - a bad value in the meta, as below
        weights = {}
        for name, w in own.items():
            if name not in partial.params:
                raise ValueError(f"a partial sum weighs tensor {name!r}, which it does not carry")
            weights[str(name)] = checked_weight(w, f"partial weight of {name!r}")
        dtypes = _partial_dtypes(partial)
        self._fold(
            partial.params, weight, partial.params_type, weights, 1.0, on_folded, dtypes, adopt
        )
        self.weight += weight
        self.count += int(partial.meta.get(COUNT_KEY, 1))

    def _fold(
        self,
        params: Mapping[str, Any],
        weight: float,
        params_type: ParamsType,
        weights: Mapping[str, float] | None,
        scale: float,
        on_folded: Folded | None = None,
        dtypes: Mapping[str, np.dtype[Any]] | None = None,
        adopt: bool = False,
    ) -> None:
        if self.params_type is not None and params_type is not self.params_type:
            raise RoundMismatch(f"a {params_type.value} update among {self.params_type.value} ones")
        arrays = {name: np.asarray(value) for name, value in params.items()}
        for name, a in arrays.items():  # all checked before any is folded
            acc = self._sum.get(name)
            if acc is not None and a.shape != acc.shape:
                raise RoundMismatch(f"tensor {name!r}: shape {a.shape}, expected {acc.shape}")
        self.params_type = params_type
        for name, a in arrays.items():
            acc = self._sum.get(name)
            if acc is None:
                dtype = self._dtypes[name] = (dtypes or {}).get(name, a.dtype)
                kind = self._acc_dtype(dtype)
                if adopt and scale == 1.0 and a.dtype == kind and _writable(a):
                    self._sum[name] = a
                else:
                    acc = self._sum[name] = np.empty(a.shape, kind)
                    _fold_into(acc.reshape(-1), a.reshape(-1), scale, first=True)
            else:
                _fold_into(acc.reshape(-1), a.reshape(-1), scale)
            own = weight if weights is None else weights.get(name, weight)
            self._weights[name] = self._weights.get(name, 0.0) + own
            if on_folded is not None:
                on_folded(name, a)

    def _acc_dtype(self, dtype: np.dtype[Any]) -> type[np.floating[Any]]:
        return np.float64 if self.precision == "float64" else acc_dtype(dtype)

    def partial(self) -> FLModel:
        """The sum so far, to send up a tier (the accumulator's dtypes; in ``meta`` the total
        weight, and the tensors whose own total weight differs from it, with theirs)."""
        assert self.count, "nothing folded"
        meta: dict[str, Any] = {WEIGHT_KEY: self.weight, COUNT_KEY: self.count}
        own = {n: w for n, w in self._weights.items() if w != self.weight}
        if own:
            meta[TENSOR_WEIGHTS_KEY] = own
        kept = {n: dtype_name(d) for n, d in self._dtypes.items() if d != self._sum[n].dtype}
        if kept:
            meta[DTYPES_KEY] = kept
        return FLModel(
            params=dict(self._sum), params_type=self.params_type or ParamsType.FULL, meta=meta
        )

    def dtype(self, name: str) -> np.dtype[Any]:
        return self._dtypes[name]

    def names(self) -> list[str]:
        return list(self._sum)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._sum[name].shape)

    def weight_of(self, name: str) -> float:
        """The total weight of the updates that carried tensor ``name`` (0 if none did)."""
        return self._weights.get(name, 0.0)

    def mean_of(self, name: str) -> np.ndarray:
        """One tensor's weighted mean over the updates that carried it, in the accumulator's
        dtype.

        Raises:
            ValueError: no update carried it with a positive weight.
        """
        w = self._weights.get(name, 0.0)
        if w <= 0:
            raise ValueError(f"no update with a positive weight carried tensor {name!r}")
        acc = self._sum[name]
        out: np.ndarray = acc / acc.dtype.type(w)
        return out

    def release(self, name: str) -> None:
        """Forget one tensor's sum (its memory goes back)."""
        self._sum.pop(name, None)

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean of each tensor some update of positive weight carried, in its
        original dtype (integers rounded).

        Raises:
            ValueError: no update of positive weight.
        """
        _check_positive(self)
        return {
            n: to_dtype(self.mean_of(n), self._dtypes[n])
            for n in self.names()
            if self.weight_of(n) > 0
        }


def checked_weight(value: Any, what: str) -> float:
    """``value`` as a float, if it is a finite real number >= 0 (not a bool, not text).

    Raises:
        ValueError: it is not (``what`` names it in the message).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} is not a number: {value!r}")  # noqa: TRY004 - a bad meta value
    try:
        weight = float(value)
    except OverflowError:
        weight = math.inf
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{what} must be finite and non-negative, not {value!r}")
    return weight


def _check_positive(agg: WeightedSum) -> None:
    if agg.weight <= 0:
        raise ValueError(
            f"the {agg.count} update(s) to average all weigh 0 (num_samples or "
            f"{NUM_STEPS_KEY}): no weighted mean"
        )


def _writable(a: np.ndarray) -> bool:
    """Whether ``a`` is, or can be made, writable (its memory is)."""
    if not a.flags.writeable:
        try:
            a.flags.writeable = True
        except ValueError:
            return False
    return True


def _partial_dtypes(partial: FLModel) -> dict[str, np.dtype[Any]]:
    """The updates' own dtypes a partial sum names (see :data:`DTYPES_KEY`).

    Raises:
        ValueError: not a mapping of its tensors to dtype names.
    """
    named = partial.meta.get(DTYPES_KEY) or {}
    if not isinstance(named, Mapping):
        raise ValueError(f"a partial sum's dtypes are not a mapping: {named!r:.80}")  # noqa: TRY004
    out = {}
    for name, value in named.items():
        if name not in partial.params:
            raise ValueError(f"a partial sum names the dtype of {name!r:.80}, which it lacks")
        try:
            out[str(name)] = dtype_named(value)
        except DecodeError as exc:
            raise ValueError(f"a partial sum's dtype of {name!r:.80}: {exc}") from None
    return out


def acc_dtype(dtype: np.dtype[Any]) -> type[np.floating[Any]]:
    """What a sum of ``dtype`` tensors is kept in: float32 for float32 and narrower floats,
    float64 for float64 and integer tensors."""
    return np.float64 if dtype == np.float64 or dtype.kind in "iub" else np.float32


def to_dtype(value: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``value`` in ``dtype``: integer tensors rounded, not truncated."""
    if dtype.kind in "iub":
        value = np.rint(value)
    return value.astype(dtype, copy=False)


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
    """The next global model: each tensor's weighted mean over the FULL updates that carried
    it, or the global tensor plus the weighted mean of the DIFF updates that carried it; a
    tensor no update of positive weight carried stays as it was (the same array), in the global
    model's order (new tensors after). Each tensor keeps the global model's dtype (integers
    rounded, not truncated). One tensor at a time: the temporaries are one tensor's, and with
    ``consume`` each accumulator tensor is released once used (the new model grows as the sum
    shrinks; ``agg`` is empty afterwards).

    Raises:
        ValueError: updates were folded but all of weight 0 (nothing can be averaged).
    """
    if agg.count:
        _check_positive(agg)
    out: dict[str, np.ndarray] = {n: np.asarray(v) for n, v in global_params.items()}
    for n in agg.names():
        if agg.weight_of(n) <= 0:
            if consume:
                agg.release(n)
            continue
        m = agg.mean_of(n)
        if consume:
            agg.release(n)
        g = out.get(n)
        if agg.params_type is ParamsType.DIFF and g is not None:
            m += g
        out[n] = to_dtype(m, g.dtype if g is not None else agg.dtype(n))  # however it travelled
    return out
