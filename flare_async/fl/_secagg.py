"""Secure aggregation (Bonawitz et al., CCS 2017: pairwise masks, double masking, dropout
recovery by Shamir secret sharing): the server learns the sum of the clients' vectors and
nothing about any one of them, and the sum still comes out when some clients drop mid-round.

Sans-IO: :class:`SecAggClient` and :class:`SecAggServer` turn each round's incoming messages
into outgoing ones; whoever carries them (the fabric, a test, a benchmark) is free. The four
rounds, for the clients ``U1`` that start:

0. each client advertises two X25519 public keys (one to encrypt shares, one to mask);
1. each client draws a self-mask seed ``b``, splits ``b`` and its masking private key into
   ``threshold``-of-``n`` Shamir shares, and sends each other client its two shares,
   encrypted (AES-GCM) under their pairwise key; the server only routes ciphertexts;
2. each client still there (``U2``) sends ``y = x + PRG(b) + sum_v +-PRG(s_uv)`` (mod 2^bits),
   where ``s_uv`` is the key it agreed with each ``v`` of ``U2`` (``+`` if ``u < v``, ``-``
   otherwise: the pairwise masks cancel in the sum);
3. the clients still there (``U3`` answered step 2) reveal, for every other client, the share
   of ``b`` (if that client sent ``y``) or of its masking key (if it dropped after step 1).
   With ``threshold`` of them, the server removes every self-mask and the dropped clients'
   pairwise masks, and is left with ``sum x`` over ``U3``.

The server never holds both secrets of one client: a client that sent ``y`` has only its ``b``
revealed, a dropped one only its masking key, so a late ``y`` cannot be unmasked. Relays may
add masked vectors of their subtree (mod 2^bits) before the server: the masks cancel in any
grouping.

The ring. Vectors are integers mod 2^bits (``bits`` 64, ``uint64``, by default; or 32,
``uint32``, half the bytes on the wire): :func:`encode` maps a float ``v`` to
``round(v * scale)`` and :func:`decode` reads the ring back as signed ``bits``-bit integers.
The sum is right only if it never leaves ``(-2^(bits-1), 2^(bits-1))``, and modular arithmetic
gives no sign when it does: the sum comes out wrong, silently. So every round declares its
range, and :func:`check_range` refuses (:class:`SecAggRangeError`) one that could wrap, before
anything is sent. With ``n`` sites, each entry a site encodes at most ``max_weight * clip`` in
absolute value (a value within the clip ``C`` times a weight within ``W``; the weight itself,
at most ``W``, is an entry too), the bound is::

    n * (W * max(C, 1) * scale * (1 + 2^-50) + 1/2) < 2^(bits-1)

(``1/2``: the rounding to integers; ``2^-50``: float64 rounding of the products, at most
2^-52 relative). Every term is at most that, so no partial sum of them (a relay's, the
server's) can wrap. :func:`encode` refuses (never wraps) a value beyond its ``limit`` or not
finite. The defaults of ``flare_async.fl.SecureAggregation`` (64 bits, scale 2^16, clip 2^10,
weight up to 2^20) leave room for 2^17 - 1 sites. The quantization error of the sum is at most
``n / (2 * scale)`` per entry (``n / (2 * scale * total weight)`` in a weighted mean).

Not defended here (see docs/threat-model.md): a server that lies about who dropped to two
different halves of the clients (the paper's malicious-server variant adds signatures and a
consistency round), and poisoned inputs (masks hide them as well).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flare_async.errors import FlareError

PRIME = 2**521 - 1
"""The Shamir field: a Mersenne prime above every secret shared (32-byte keys)."""

_RAW = serialization.Encoding.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_RAW_PUB = serialization.PublicFormat.Raw


BITS = (32, 64)
"""The rings: integers mod 2^32 (``uint32``) or mod 2^64 (``uint64``)."""

_DTYPE: dict[int, np.dtype[Any]] = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_SIGNED: dict[int, np.dtype[Any]] = {32: np.dtype(np.int32), 64: np.dtype(np.int64)}
_MARGIN = Fraction(1) + Fraction(1, 2**50)


class SecAggError(FlareError):
    """Secure aggregation cannot finish: too few clients left, or a message does not fit."""


class SecAggRangeError(SecAggError, ValueError):
    """A round, a value or a weight that the fixed-point ring cannot hold without wrapping
    (refused before anything is encoded or sent)."""


def ring(bits: int) -> np.dtype[Any]:
    """The vectors' dtype for a ring of ``bits`` bits.

    Raises:
        SecAggRangeError: ``bits`` is not 32 or 64.
    """
    if not isinstance(bits, int) or bits not in _DTYPE:
        raise SecAggRangeError(f"the ring has 32 or 64 bits, not {bits!r}")
    return _DTYPE[bits]


def check_range(sites: int, max_weight: float, clip: float, scale: float, bits: int) -> None:
    """Refuse a round whose sum could leave the ring (the bound in the module text), computed
    exactly (rationals, not floats).

    Raises:
        SecAggRangeError: the bound does not hold, or a parameter is not a positive number.
    """
    ring(bits)
    for name, value in (("max_weight", max_weight), ("clip", clip), ("scale", scale)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise SecAggRangeError(f"{name} must be a positive finite number, not {value!r}")
    if sites < 1:
        raise SecAggRangeError(f"a round of {sites} sites")
    entry = Fraction(max_weight) * max(Fraction(clip), Fraction(1)) * Fraction(scale)
    need = sites * (entry * _MARGIN + Fraction(1, 2))
    if need >= 2 ** (bits - 1):
        fit = int((2 ** (bits - 1)) / (entry * _MARGIN + Fraction(1, 2)))
        fit -= fit * (entry * _MARGIN + Fraction(1, 2)) >= 2 ** (bits - 1)
        raise SecAggRangeError(
            f"{sites} site(s) x max weight {max_weight:g} x clip {clip:g} x scale {scale:g} "
            f"does not fit a {bits}-bit ring (needs < 2^{bits - 1}; at most {max(fit, 0)} "
            "site(s) fit): lower the clip, the maximum weight or the scale, or use 64 bits"
        )


# ------------------------------------------------------------------ primitives
def share(secret: int, ids: Sequence[int], threshold: int) -> dict[int, int]:
    """Shamir shares of ``secret`` (< PRIME) for the points ``ids`` (nonzero, distinct): any
    ``threshold`` of them give it back, fewer say nothing about it."""
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in ids:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int]) -> int:
    """The secret from shares (Lagrange interpolation at 0)."""
    total = 0
    points = list(shares)
    for i in points:
        num, den = 1, 1
        for j in points:
            if j != i:
                num = num * -j % PRIME
                den = den * (i - j) % PRIME
        total = (total + shares[i] * num * pow(den, -1, PRIME)) % PRIME
    return total


def _kdf(material: bytes, info: bytes, n: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(material)


def prg(seed: bytes, n: int, bits: int = 64) -> np.ndarray:
    """``n`` uniform ring elements from a seed (the same on every machine: PCG64 by numpy's
    spec)."""
    state = int.from_bytes(_kdf(seed, b"flare-async secagg prg", 16), "big")
    gen = np.random.Generator(np.random.PCG64(state))
    return gen.integers(0, 2**bits, size=n, dtype=ring(bits))


def encode(
    x: np.ndarray, scale: float, bits: int = 64, *, limit: float | None = None
) -> np.ndarray:
    """Floats to fixed point in the ring (``round(x * scale)`` mod 2^bits).

    Raises:
        SecAggRangeError: a value not finite, beyond ``limit`` in absolute value, or whose
            fixed point does not fit ``bits`` signed bits: refused, never wrapped.
    """
    dtype = ring(bits)
    v = np.asarray(x, np.float64)
    if v.size:
        top = float(np.max(np.abs(v)))
        if not math.isfinite(top):
            raise SecAggRangeError("a value that is not finite (NaN or infinity)")
        if limit is not None and top > limit:
            raise SecAggRangeError(f"a value beyond the declared {limit:g}")
    fixed = np.rint(v * scale)
    if fixed.size and float(np.max(np.abs(fixed))) >= 2.0 ** (bits - 1):
        raise SecAggRangeError(f"a value beyond +-2^{bits - 1} / scale ({scale:g})")
    return fixed.astype(np.int64).astype(dtype)


def decode(y: np.ndarray, scale: float) -> np.ndarray:
    """The ring back to floats (values read as signed integers of the ring's width)."""
    y = np.asarray(y)
    bits = y.dtype.itemsize * 8
    if y.dtype != _DTYPE.get(bits):
        raise SecAggError(f"a {y.dtype} vector is in no ring (uint32 or uint64)")
    out: np.ndarray = y.view(_SIGNED[bits]).astype(np.float64) / scale
    return out


def as_ring(y: np.ndarray, dtype: np.dtype[Any], what: str) -> np.ndarray:
    """``y`` as one flat vector of ``dtype``, refused (not cast) if it is of another dtype: a
    cast would wrap or widen silently."""
    y = np.asarray(y)
    if y.dtype != dtype:
        raise SecAggError(f"{what}: a {y.dtype} vector in a {dtype} ring")
    return y.reshape(-1)


def _pub(key: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(key)


# ------------------------------------------------------------------ client
@dataclass(frozen=True)
class Keys:
    """A client's advertised public keys (step 0)."""

    cipher: bytes
    mask: bytes


class SecAggClient:
    """One client's side. ``cid`` is its index in the round (1..n: also its Shamir point)."""

    def __init__(self, cid: int, vector_len: int, bits: int = 64) -> None:
        if cid < 1:
            raise ValueError("client ids start at 1 (0 is the secret's point)")
        self.cid = cid
        self.n = vector_len
        self.bits = bits
        self.dtype = ring(bits)
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = os.urandom(32)
        self._keys: dict[int, Keys] = {}
        self._u2: list[int] = []
        self._held: dict[int, tuple[int, int]] = {}  # from v: (share of b_v, share of s_v)

    def advertise(self) -> Keys:
        """Step 0."""
        return Keys(
            self._c.public_key().public_bytes(_RAW, _RAW_PUB),
            self._s.public_key().public_bytes(_RAW, _RAW_PUB),
        )

    def _aead(self, v: int) -> AESGCM:
        shared = self._c.exchange(_pub(self._keys[v].cipher))
        return AESGCM(_kdf(shared, b"flare-async secagg shares"))

    def share_keys(self, keys: Mapping[int, Keys], threshold: int) -> dict[int, bytes]:
        """Step 1: every client's keys in; an encrypted pair of shares for each other out."""
        if self.cid not in keys or len(keys) < threshold:
            raise SecAggError(f"client {self.cid}: {len(keys)} clients, threshold {threshold}")
        self._keys = dict(keys)
        ids = sorted(keys)
        s_raw = self._s.private_bytes(_RAW, _RAW_PRIV, serialization.NoEncryption())
        b_shares = share(int.from_bytes(self._b, "big"), ids, threshold)
        s_shares = share(int.from_bytes(s_raw, "big"), ids, threshold)
        self._held[self.cid] = (b_shares[self.cid], s_shares[self.cid])
        out = {}
        for v in ids:
            if v == self.cid:
                continue
            plain = b_shares[v].to_bytes(66, "big") + s_shares[v].to_bytes(66, "big")
            nonce = os.urandom(12)
            aad = f"{self.cid}->{v}".encode()
            out[v] = nonce + self._aead(v).encrypt(nonce, plain, aad)
        return out

    def masked_input(self, x: np.ndarray, ciphertexts: Mapping[int, bytes]) -> np.ndarray:
        """Step 2: the shares sent to this client (by the clients of ``U2``) in, ``y`` out."""
        y = as_ring(x, self.dtype, f"client {self.cid}").copy()
        if y.size != self.n:
            raise SecAggError(f"client {self.cid}: a vector of {y.size}, not {self.n}")
        for u, blob in ciphertexts.items():
            aad = f"{u}->{self.cid}".encode()
            try:
                plain = self._aead(u).decrypt(blob[:12], blob[12:], aad)
            except Exception as exc:  # InvalidTag: tampered or misrouted
                raise SecAggError(f"client {self.cid}: the shares from {u} do not open") from exc
            self._held[u] = (int.from_bytes(plain[:66], "big"), int.from_bytes(plain[66:], "big"))
        self._u2 = sorted({*ciphertexts, self.cid})
        y += prg(self._b, self.n, self.bits)
        for v in self._u2:
            if v == self.cid:
                continue
            seed = self._s.exchange(_pub(self._keys[v].mask))
            mask = prg(seed, self.n, self.bits)
            if self.cid < v:
                y += mask
            else:
                y -= mask
        return y

    def unmask(self, u3: Sequence[int]) -> dict[int, tuple[str, int]]:
        """Step 3: for each client of ``U2``: ``("b", share)`` if it is in ``U3`` (sent ``y``),
        ``("s", share)`` if it dropped. Never both for one client."""
        survivors = set(u3)
        if self.cid not in survivors:
            raise SecAggError(f"client {self.cid} is not among the survivors it is asked about")
        return {
            v: ("b", self._held[v][0]) if v in survivors else ("s", self._held[v][1])
            for v in self._u2
            if v in self._held
        }


# ------------------------------------------------------------------ server
class SecAggServer:
    """The server's side: routes ciphertexts, sums masked inputs, removes the masks."""

    def __init__(self, vector_len: int, threshold: int, bits: int = 64) -> None:
        self.n = vector_len
        self.threshold = threshold
        self.bits = bits
        self.dtype = ring(bits)
        self.keys: dict[int, Keys] = {}
        self.shares: dict[int, dict[int, bytes]] = {}  # from u: {v: ciphertext}
        self.inputs: dict[int, np.ndarray] = {}
        self._sum = np.zeros(vector_len, self.dtype)

    def collect_keys(self, keys: Mapping[int, Keys]) -> dict[int, Keys]:
        """Step 0 -> 1: every advertised key, to broadcast."""
        if len(keys) < self.threshold:
            raise SecAggError(f"{len(keys)} clients advertised keys, {self.threshold} needed")
        self.keys = dict(keys)
        return self.keys

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Step 1 -> 2: what each client of ``U2`` sent, regrouped per recipient."""
        self.shares = {u: dict(c) for u, c in sent.items() if u in self.keys}
        if len(self.shares) < self.threshold:
            raise SecAggError(f"{len(self.shares)} clients shared keys, {self.threshold} needed")
        u2 = set(self.shares)
        return {v: {u: c[v] for u, c in self.shares.items() if v in c and u != v} for v in u2}

    def add_input(self, u: int, y: np.ndarray) -> None:
        """Step 2: one masked vector, folded at once (the server keeps one sum)."""
        if u not in self.shares or u in self.inputs:
            raise SecAggError(f"an input from {u}, which did not share keys or sent already")
        y = as_ring(y, self.dtype, f"the input from {u}")
        if y.size != self.n:
            raise SecAggError(f"an input of {y.size} values from {u}, not {self.n}")
        self._sum += y
        self.inputs[u] = np.empty(0, self.dtype)  # who sent; the vector itself is not kept

    def add_sum(self, ids: Sequence[int], y: np.ndarray) -> None:
        """A relay's sum of the masked vectors of ``ids`` (mod 2^bits), folded as theirs."""
        ids = list(ids)
        if not ids or len(set(ids)) != len(ids):
            raise SecAggError(f"a partial sum names its clients badly: {ids}")
        for u in ids:
            if u not in self.shares or u in self.inputs:
                raise SecAggError(f"a partial sum with {u}, which did not share keys or sent")
        y = as_ring(y, self.dtype, "a partial sum")
        if y.size != self.n:
            raise SecAggError(f"a partial sum of {y.size} values, not {self.n}")
        self._sum += y
        for u in ids:
            self.inputs[u] = np.empty(0, self.dtype)

    def survivors(self) -> list[int]:
        """Step 2 -> 3: ``U3``, to broadcast."""
        if len(self.inputs) < self.threshold:
            raise SecAggError(f"{len(self.inputs)} masked inputs, {self.threshold} needed")
        return sorted(self.inputs)

    def finish(self, revealed: Mapping[int, Mapping[int, tuple[str, int]]]) -> np.ndarray:
        """Step 3: the revealed shares in, ``sum x`` over ``U3`` (in the ring) out.

        Raises:
            SecAggError: fewer than ``threshold`` clients answered, or shares that do not
                fit (a client asked for both secrets of one peer).
        """
        if len(revealed) < self.threshold:
            raise SecAggError(f"{len(revealed)} clients helped unmask, {self.threshold} needed")
        u2, u3 = set(self.shares), set(self.inputs)
        total = self._sum.copy()
        for v in sorted(u2):
            kind = "b" if v in u3 else "s"
            points = {
                w: value
                for w, answer in revealed.items()
                if v in answer
                for k, value in [answer[v]]
                if k == kind
            }
            if len(points) < self.threshold:
                raise SecAggError(f"{len(points)} shares for client {v}, {self.threshold} needed")
            secret = reconstruct(dict(list(points.items())[: self.threshold]))
            if kind == "b":
                total -= prg(secret.to_bytes(32, "big"), self.n, self.bits)
                continue
            key = X25519PrivateKey.from_private_bytes(secret.to_bytes(32, "big"))
            for u in sorted(u3):  # v dropped: take its pairwise masks out of u's input
                mask = prg(key.exchange(_pub(self.keys[u].mask)), self.n, self.bits)
                if u < v:
                    total -= mask
                else:
                    total += mask
        return total


__all__ = [
    "BITS",
    "PRIME",
    "Keys",
    "SecAggClient",
    "SecAggError",
    "SecAggRangeError",
    "SecAggServer",
    "as_ring",
    "check_range",
    "decode",
    "encode",
    "prg",
    "reconstruct",
    "ring",
    "share",
]
