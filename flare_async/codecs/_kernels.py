"""Quantization kernels in numpy: blockwise absmax int8, 4-bit NF4 and FP4 (two codes per
byte), and bf16 rounding. Pure functions over 1-D float32 arrays, processed a slice at a time
so that the temporaries stay in cache (a whole-array expression over 256 MiB makes every pass
go to memory: about three times slower here).

Error bounds (``x`` a value, ``m`` the absmax of its block, ``x'`` after a round trip):

* int8: ``|x - x'| <= m / 254`` (half a step of ``m / 127``), plus float32 rounding
  (``2**-22 * m``).
* Every scheme: a block whose absmax is under 1e-30 is stored as zeros (error under 1e-30).
* NF4, rounded to the nearest code: ``|x - x'| <= 0.1520 * m`` (half the widest gap of the NF4
  code book, between -1 and -0.696), plus ``m / 32767`` (the lookup table's resolution).
  Rounded stochastically (the codecs' default): ``|x - x'| < 0.3039 * m`` (the widest gap),
  plus ``m / 32767``, and unbiased: ``x'`` is one of the two codes around ``x``, the upper one
  with probability the fraction of the gap below ``x`` (to 1/4096 of the gap).
* FP4 (e2m1, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 scaled so that 6 is the absmax):
  ``|x - x'| <= m / 6`` (half the widest gap, 4 to 6) to the nearest code, ``< m / 3``
  stochastically, plus ``m / 32767``.
* Stochastic rounding keeps a value that is on a code (within a table step of it: what a
  decoded tensor holds, encoded again with the same absmax) on that code, zero included. Its
  dither is a fixed pseudo-random pool read at an offset hashed from the slice's scales and
  position: the same tensor always gives the same bytes, and a tensor whose scales changed
  draws afresh.
* bf16: relative ``2**-9`` (round to nearest even on 8 mantissa bits); fp16: relative
  ``2**-11`` within its range.
"""

from __future__ import annotations

import hashlib
from typing import Final

import numpy as np

_SLICE: Final = 1 << 18
"""Values per slice (1 MiB of float32): in L2 here."""

NF4_CODES: Final = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
"""The NF4 code book (QLoRA): quantiles of a normal distribution, scaled to [-1, 1]."""

_FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32) / 6.0
FP4_CODES: Final = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).astype(np.float32)
"""FP4 (e2m1): code ``s << 3 | e_m``; magnitudes scaled so that the largest is 1."""

NF4_BOUND: Final = 0.1520
FP4_BOUND: Final = 1.0 / 6.0
NF4_STOCHASTIC_BOUND: Final = 0.3039
FP4_STOCHASTIC_BOUND: Final = 1.0 / 3.0
INT8_BOUND: Final = 1.0 / 254.0
LUT_RESOLUTION: Final = 1.0 / 32767.0

_LUT_HALF = 32767
_LUT_SIZE = 1 << 16


def _nearest_lut(codes: np.ndarray) -> np.ndarray:
    """Nearest code for ``y = k / 32767``, stored at ``k mod 65536`` for k in [-32767, 32767],
    so that a signed index (numpy wraps negative ones) looks it up without an offset pass."""
    k = np.arange(-_LUT_HALF, _LUT_HALF + 1)
    grid = k.astype(np.float64) / _LUT_HALF
    dist = np.abs(grid[:, None] - codes.astype(np.float64)[None, :])
    lut = np.zeros(_LUT_SIZE, dtype=np.uint8)
    lut[k % _LUT_SIZE] = np.argmin(dist, axis=1)
    return lut


_FRAC_BITS = 12
"""Stochastic rounding resolves the fraction of a gap to 1/4096."""


def _stochastic_lut(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``y = k / 32767`` (stored like :func:`_nearest_lut`'s): ``(i + f) * 4096`` as uint16,
    ``i`` the rank of the code at or below ``y`` among the distinct codes and ``f`` how far ``y``
    is towards the next one; adding a uniform 12-bit dither and shifting right by 12 gives the
    rank of the code to send, which the second table turns into its 4-bit code. Grid points
    within one step of a code are that code exactly (so a decoded value encodes back to itself
    whichever way ``y * 32767`` was truncated)."""
    values, first = np.unique(codes.astype(np.float64), return_index=True)  # -0.0 == 0.0
    k = np.arange(-_LUT_HALF, _LUT_HALF + 1)
    grid = k.astype(np.float64) / _LUT_HALF
    i = np.clip(np.searchsorted(values, grid, side="right") - 1, 0, values.size - 2)
    frac = (grid - values[i]) / (values[i + 1] - values[i])
    fixed = np.rint((i + frac) * (1 << _FRAC_BITS))
    nearest = np.argmin(np.abs(grid[:, None] - values[None, :]), axis=1)
    on_code = np.abs(grid - values[nearest]) * _LUT_HALF <= 1.0 + 1e-9
    fixed[on_code] = nearest[on_code] << _FRAC_BITS
    table = np.zeros(_LUT_SIZE, dtype=np.uint16)
    table[k % _LUT_SIZE] = fixed.astype(np.uint16)
    return table, first.astype(np.uint8)


_LUTS = {"nf4": _nearest_lut(NF4_CODES), "fp4": _nearest_lut(FP4_CODES)}
_STOCHASTIC = {"nf4": _stochastic_lut(NF4_CODES), "fp4": _stochastic_lut(FP4_CODES)}
CODEBOOKS = {"nf4": NF4_CODES, "fp4": FP4_CODES}
_ZERO = {"nf4": int(np.flatnonzero(NF4_CODES == 0)[0]), "fp4": 0}


def _fp4_code(rank: np.ndarray) -> np.ndarray:
    """FP4 code of each rank (-6/6 is rank 0 and code 15, 0 rank 7 and code 0, +6/6 rank 14
    and code 7): sign and magnitude, in uint8 arithmetic that wraps, in place; a gather through
    a table indexed by rank, or np.where, costs ten times as much here."""
    d = rank - np.uint8(7)  # 0..7 for the positive codes, 249..255 for the negative ones
    out: np.ndarray = np.minimum(d, -d)  # the magnitude: -d wraps to 7 - rank for those
    d >>= 4
    d &= 8  # the sign bit
    out |= d
    return out


# NF4's ranks are its codes; FP4's are mapped by arithmetic: both checked against the tables.
assert np.array_equal(_STOCHASTIC["nf4"][1], np.arange(16))
assert np.array_equal(_fp4_code(np.arange(15, dtype=np.uint8)), _STOCHASTIC["fp4"][1])

_DITHER: Final = np.random.Generator(np.random.PCG64(0x5EED)).integers(
    0, 1 << _FRAC_BITS, 2 * _SLICE, dtype=np.uint16
)
"""Uniform 12-bit dither, read from an offset below ``_SLICE`` (1 MiB, made once)."""


def _dither(absmax: np.ndarray, start: int, size: int) -> np.ndarray:
    digest = hashlib.blake2b(absmax.tobytes(), digest_size=8, key=start.to_bytes(8, "little"))
    offset = int.from_bytes(digest.digest(), "little") % _SLICE
    out: np.ndarray = _DITHER[offset : offset + size]
    return out


class NonFinite(ValueError):
    """The input holds NaN or infinity: it has no absmax to scale by."""


def _check_finite(am: np.ndarray | np.floating) -> None:
    # NaN or inf in a block shows in its absmax: one check per block, not per value.
    if not np.isfinite(am).all():
        raise NonFinite("NaN or infinity in the tensor")


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def absmax_int8(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (float32, 1-D) -> (int8 codes of len(x), float32 absmax per block)."""
    n = x.size
    nblocks = _blocks(n, block)
    codes = np.empty(n, dtype=np.int8)
    absmax = np.empty(nblocks, dtype=np.float32)
    step = max(block, (_SLICE // block) * block)
    for start in range(0, n, step):
        xs = x[start : start + step]
        b0 = start // block
        full = (xs.size // block) * block
        if full:
            xb = xs[:full].reshape(-1, block)
            am = _absmax_rows(xb)
            _check_finite(am)
            absmax[b0 : b0 + am.size] = am
            scale = _scale(127.0, am)
            q = xb * scale[:, None]
            np.rint(q, out=q)
            codes[start : start + full] = q.reshape(-1)
        if full < xs.size:  # the ragged last block
            tail = xs[full:]
            am_t = np.float32(np.max(np.abs(tail)))
            _check_finite(am_t)
            absmax[b0 + full // block] = am_t
            s = np.float32(127.0) / am_t if am_t > TINY else np.float32(0.0)
            codes[start + full : start + xs.size] = np.rint(tail * s)
    return codes, absmax


def dequant_int8(codes: np.ndarray, absmax: np.ndarray, block: int) -> np.ndarray:
    n = codes.size
    out = np.empty(n, dtype=np.float32)
    scale = absmax / np.float32(127.0)
    full = (n // block) * block
    if full:
        np.multiply(
            codes[:full].reshape(-1, block),
            scale[: full // block, None],
            out=out[:full].reshape(-1, block),
            dtype=np.float32,
        )
    if full < n:
        out[full:] = codes[full:] * scale[-1]
    return out


TINY: Final = 1e-30
"""Blocks whose absmax is below this are stored as zeros (absolute error under 1e-30): their
scale would overflow float32."""


def _scale(num: float, am: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.divide(np.float32(num), am, out=np.zeros_like(am), where=am > TINY)
    return out


def _absmax_rows(xb: np.ndarray) -> np.ndarray:
    # abs then max over rows: faster here than max(max, -min) (2.3 against 1.5 GB/s for rows
    # of 128), the temporary being one slice, in cache.
    out: np.ndarray = np.abs(xb).max(axis=1)
    return out


def absmax_4bit(
    x: np.ndarray, block: int, scheme: str, stochastic: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (float32, 1-D) -> (codes packed two per byte, float32 absmax per block), each
    value rounded to the nearest code or ``stochastic``-ally (see the module's notes)."""
    lut = _LUTS[scheme]
    table = _STOCHASTIC[scheme][0]
    n = x.size
    nblocks = _blocks(n, block)
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(nblocks, dtype=np.float32)
    step = max(block, (_SLICE // block) * block)
    if step % 2:
        step *= 2
    for start in range(0, n, step):
        xs = x[start : start + step]
        b0 = start // block
        nb = _blocks(xs.size, block)
        padded = xs
        if xs.size % block:
            padded = np.zeros(nb * block, dtype=np.float32)
            padded[: xs.size] = xs
        xb = padded.reshape(nb, block)
        am = _absmax_rows(xb)
        _check_finite(am)
        absmax[b0 : b0 + nb] = am
        scale = _scale(_LUT_HALF, am)
        # y * 32767, truncated toward zero as it is stored into integers (one pass): off by
        # less than one table step (2**-15).
        k = np.empty(xb.size, dtype=np.intp)
        np.multiply(xb, scale[:, None], out=k.reshape(xb.shape), casting="unsafe")
        if stochastic:
            fixed = table[k]
            fixed += _dither(am, start, fixed.size)  # at most 15 * 4096 + 4095: no overflow
            idx = np.empty(fixed.size, dtype=np.uint8)
            np.right_shift(fixed, _FRAC_BITS, out=idx, casting="unsafe")  # the codes' ranks
            if scheme == "fp4":
                idx = _fp4_code(idx)
        else:
            idx = lut[k]
        # padded to whole blocks: even, except a block size that is odd
        if idx.size % 2:
            idx = np.append(idx, np.uint8(_ZERO[scheme]))  # a zero pads the last byte
        # Two codes per byte through 16-bit lanes (little-endian: the first code is the low
        # byte): 6x faster here than two strided byte passes.
        pairs = idx.view(np.uint16)
        both = pairs << 4
        both |= pairs >> 8
        count = (xs.size + 1) // 2
        packed[start // 2 : start // 2 + count] = both[:count]
    return packed, absmax


def dequant_4bit(
    packed: np.ndarray, absmax: np.ndarray, n: int, block: int, scheme: str
) -> np.ndarray:
    book = CODEBOOKS[scheme]
    idx = np.empty(packed.size * 2, dtype=np.uint8)
    idx[0::2] = packed >> 4
    idx[1::2] = packed & 0x0F
    values = book[idx[:n]]
    full = (n // block) * block
    if full:
        values[:full].reshape(-1, block)[...] *= absmax[: full // block, None]
    if full < n:
        values[full:] *= absmax[-1]
    return values


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = x.astype(np.float32, copy=False).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x0040)
    return out
