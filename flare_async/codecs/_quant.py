"""Lossy codecs for model traffic: fp16 and bf16 casts, blockwise int8, NF4 and FP4.

Each encodes a tensor dict into the same safetensors layout as the ``tensors`` codec, so the
bytes stay inspectable and storable: a quantized tensor ``w`` travels as ``w`` (its codes: int8,
or uint8 holding two 4-bit codes per byte) and ``w::absmax`` (float32, one per block), and the
header's metadata says how to undo it (``flare.quant``: per name, scheme, block, original dtype
and shape). Decoding gives back every tensor in its original dtype and shape.

Only floating-point tensors of at least ``min_elements`` values are quantized (or cast), and
only if they hold no NaN or infinity (those travel unquantized rather than be corrupted);
integers, booleans and small tensors (biases, norms, where the scales would eat the gain)
pass through unchanged. Error bounds are in :mod:`flare_async.codecs._kernels`.

NF4 and FP4 round stochastically by default (``rounding="nearest"`` for the nearest code) in
blocks of 128: model traffic is quantized again every round, and rounding to the nearest code
loses every change smaller than half a gap (a site that trained from a decoded model and sends
it back gets the same codes), which cost the digits demo 1.3 points (97.3% to 96.0%, NF4
with blocks of 256); unbiased rounding keeps them on average. The decoder is the same either
way: the layout records the block, so payloads of both kinds (and of older versions) decode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import ml_dtypes
import numpy as np

from flare_async.codecs import _kernels as k
from flare_async.codecs._tensors import _DTYPES, Buffer, as_numpy, dtype_name
from flare_async.codecs._tensors import decode as decode_tensors
from flare_async.codecs._tensors import encode as encode_tensors
from flare_async.errors import DecodeError

QUANT_KEY: Final = "flare.quant"
SCALE_SUFFIX: Final = "::absmax"
_FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16"})
_BF16 = np.dtype(ml_dtypes.bfloat16)
_FP16_MAX = float(np.finfo(np.float16).max)


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype == _BF16


class QuantCodec:
    """One lossy scheme: ``fp16``, ``bf16``, ``q8`` (int8), ``nf4`` or ``fp4``.

    Args:
        scheme: the scheme.
        block: values per absmax scale (``q8``: 256, ``nf4`` and ``fp4``: 128 by default).
        min_elements: smaller tensors pass through unquantized.
        rounding: ``"stochastic"`` (``nf4`` and ``fp4``'s default: unbiased, deterministic for
            a given tensor) or ``"nearest"`` (``q8``'s only rounding).
    """

    def __init__(
        self, scheme: str, *, block: int = 0, min_elements: int = 1024, rounding: str = ""
    ) -> None:
        if scheme not in ("fp16", "bf16", "q8", "nf4", "fp4"):
            raise ValueError(f"unknown quantization scheme {scheme!r}")
        self.name = scheme
        self.scheme = scheme
        self.block = block or {"q8": 256, "nf4": 128, "fp4": 128}.get(scheme, 0)
        if scheme in ("q8", "nf4", "fp4") and not 16 <= self.block <= 1 << 20:
            raise ValueError("block must be between 16 and 2**20 values")
        self.min_elements = min_elements
        four_bit = scheme in ("nf4", "fp4")
        self.rounding = rounding or ("stochastic" if four_bit else "nearest")
        if self.rounding not in (("nearest", "stochastic") if four_bit else ("nearest",)):
            raise ValueError(f"rounding {rounding!r} is not one of {scheme}'s")

    def encode(self, tensors: Mapping[str, Any]) -> list[Buffer]:
        out: dict[str, Any] = {}
        plan: dict[str, dict[str, Any]] = {}
        for name, value in tensors.items():
            a = as_numpy(value)
            if not _is_float(a) or a.size < self.min_elements:
                out[name] = a
                continue
            entry: dict[str, Any] = {
                "scheme": self.scheme,
                "dtype": dtype_name(a.dtype),
                "shape": list(a.shape),
            }
            if self.scheme == "fp16":
                if a.size and not np.abs(a).max() <= _FP16_MAX:
                    out[name] = a  # out of fp16's range (or NaN): sent as it is, never inf
                    continue
                out[name] = a.astype(np.float16)
            elif self.scheme == "bf16":
                out[name] = a if a.dtype == _BF16 else _to_bf16(a)
            else:
                flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
                try:
                    if self.scheme == "q8":
                        codes, absmax = k.absmax_int8(flat, self.block)
                    else:
                        codes, absmax = k.absmax_4bit(
                            flat, self.block, self.scheme, self.rounding == "stochastic"
                        )
                except k.NonFinite:
                    out[name] = a  # NaN or inf: sent as it is, never silently turned to 0
                    continue
                entry["block"] = self.block
                out[name] = codes
                out[name + SCALE_SUFFIX] = absmax
            plan[name] = entry
        return encode_tensors(out, {QUANT_KEY: json.dumps(plan, separators=(",", ":"))})

    def decode(self, parts: Sequence[Buffer] | Buffer) -> dict[str, np.ndarray]:
        return dequantize(*decode_tensors(parts))


def _to_bf16(a: np.ndarray) -> np.ndarray:
    bits = k.to_bf16_bits(np.ascontiguousarray(a, dtype=np.float32))
    out: np.ndarray = bits.view(_BF16).reshape(a.shape)
    return out


def dequantize(tensors: dict[str, np.ndarray], meta: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Undo what :class:`QuantCodec` did, from the decoded layout and its metadata.

    Raises:
        DecodeError: metadata that does not match the tensors.
    """
    try:
        plan = json.loads(meta.get(QUANT_KEY, "{}"))
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"bad {QUANT_KEY} metadata: {exc}") from None
    if not isinstance(plan, dict):
        raise DecodeError(f"bad {QUANT_KEY} metadata")
    out: dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in plan:
            continue
        entry = plan.get(name)
        out[name] = a if entry is None else _restore(name, a, entry, tensors)
    return out


def _restore(
    name: str, codes: np.ndarray, entry: Any, tensors: Mapping[str, np.ndarray]
) -> np.ndarray:
    if not isinstance(entry, dict):
        raise DecodeError(f"tensor {name!r}: bad quantization entry")
    scheme = entry.get("scheme")
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape = entry.get("shape")
    if dtype is None or entry.get("dtype") not in _FLOAT_NAMES:
        raise DecodeError(f"tensor {name!r}: bad original dtype {entry.get('dtype')!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(f"tensor {name!r}: bad shape {shape!r}")
    if len(shape) > 64 or any(d > 1 << 48 for d in shape):
        raise DecodeError(f"tensor {name!r}: shape {shape!r} out of range")
    n = math.prod(shape)
    if scheme in ("fp16", "bf16"):
        want = np.float16 if scheme == "fp16" else _BF16
        if codes.dtype != want or codes.size != n:
            raise DecodeError(f"tensor {name!r}: {codes.dtype} x {codes.size} for a {scheme} cast")
        return codes.astype(dtype).reshape(shape)
    block = entry.get("block")
    if type(block) is not int or not 16 <= block <= 1 << 20:
        raise DecodeError(f"tensor {name!r}: bad block {block!r}")
    absmax = tensors.get(name + SCALE_SUFFIX)
    nblocks = -(-n // block)
    if absmax is None or absmax.dtype != np.float32 or absmax.shape != (nblocks,):
        raise DecodeError(f"tensor {name!r}: scales missing or of the wrong size")
    if scheme == "q8":
        if codes.dtype != np.int8 or codes.shape != (n,):
            raise DecodeError(f"tensor {name!r}: int8 codes of the wrong size")
        values = k.dequant_int8(codes, absmax, block)
    elif scheme in ("nf4", "fp4"):
        if codes.dtype != np.uint8 or codes.shape != ((n + 1) // 2,):
            raise DecodeError(f"tensor {name!r}: 4-bit codes of the wrong size")
        values = k.dequant_4bit(codes, absmax, n, block, scheme)
    else:
        raise DecodeError(f"tensor {name!r}: unknown scheme {scheme!r}")
    return values.astype(dtype, copy=False).reshape(shape)
