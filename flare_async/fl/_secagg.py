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
2. each client still there (``U2``) sends ``y = x + PRG(b) + sum_v +-PRG(s_uv)`` (mod 2^32),
   where ``s_uv`` is the key it agreed with each ``v`` of ``U2`` (``+`` if ``u < v``, ``-``
   otherwise: the pairwise masks cancel in the sum);
3. the clients still there (``U3`` answered step 2) reveal, for every other client, the share
   of ``b`` (if that client sent ``y``) or of its masking key (if it dropped after step 1).
   With ``threshold`` of them, the server removes every self-mask and the dropped clients'
   pairwise masks, and is left with ``sum x`` over ``U3``.

The server never holds both secrets of one client: a client that sent ``y`` has only its ``b``
revealed, a dropped one only its masking key, so a late ``y`` cannot be unmasked. Vectors are
``uint32`` in the ring of integers mod 2^32: :func:`encode` and :func:`decode` map floats to
fixed point (the caller picks a scale with room for the sum). Relays may add masked vectors of
their subtree (mod 2^32) before the server: the masks cancel in any grouping.

Not defended here (see docs/threat-model.md): a server that lies about who dropped to two
different halves of the clients (the paper's malicious-server variant adds signatures and a
consistency round), and poisoned inputs (masks hide them as well).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


class SecAggError(FlareError):
    """Secure aggregation cannot finish: too few clients left, or a message does not fit."""


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


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform uint32 from a seed (the same on every machine: PCG64 by numpy's spec)."""
    state = int.from_bytes(_kdf(seed, b"flare-async secagg prg", 16), "big")
    return np.random.Generator(np.random.PCG64(state)).integers(0, 2**32, size=n, dtype=np.uint32)


def encode(x: np.ndarray, scale: float) -> np.ndarray:
    """Floats to fixed point in the ring (``round(x * scale)`` mod 2^32)."""
    return np.rint(np.asarray(x, np.float64) * scale).astype(np.int64).astype(np.uint32)


def decode(y: np.ndarray, scale: float) -> np.ndarray:
    """The ring back to floats (values read as signed 32-bit integers)."""
    return np.asarray(y, np.uint32).view(np.int32).astype(np.float64) / scale


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

    def __init__(self, cid: int, vector_len: int) -> None:
        if cid < 1:
            raise ValueError("client ids start at 1 (0 is the secret's point)")
        self.cid = cid
        self.n = vector_len
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
        y = np.asarray(x, np.uint32).reshape(-1).copy()
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
        y += prg(self._b, self.n)
        for v in self._u2:
            if v == self.cid:
                continue
            seed = self._s.exchange(_pub(self._keys[v].mask))
            mask = prg(seed, self.n)
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

    def __init__(self, vector_len: int, threshold: int) -> None:
        self.n = vector_len
        self.threshold = threshold
        self.keys: dict[int, Keys] = {}
        self.shares: dict[int, dict[int, bytes]] = {}  # from u: {v: ciphertext}
        self.inputs: dict[int, np.ndarray] = {}
        self._sum = np.zeros(vector_len, np.uint32)

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
        y = np.asarray(y, np.uint32).reshape(-1)
        if y.size != self.n:
            raise SecAggError(f"an input of {y.size} values from {u}, not {self.n}")
        self._sum += y
        self.inputs[u] = np.empty(0, np.uint32)  # who sent; the vector itself is not kept

    def add_sum(self, ids: Sequence[int], y: np.ndarray) -> None:
        """A relay's sum of the masked vectors of ``ids`` (mod 2^32), folded as theirs."""
        ids = list(ids)
        if not ids or len(set(ids)) != len(ids):
            raise SecAggError(f"a partial sum names its clients badly: {ids}")
        for u in ids:
            if u not in self.shares or u in self.inputs:
                raise SecAggError(f"a partial sum with {u}, which did not share keys or sent")
        y = np.asarray(y, np.uint32).reshape(-1)
        if y.size != self.n:
            raise SecAggError(f"a partial sum of {y.size} values, not {self.n}")
        self._sum += y
        for u in ids:
            self.inputs[u] = np.empty(0, np.uint32)

    def survivors(self) -> list[int]:
        """Step 2 -> 3: ``U3``, to broadcast."""
        if len(self.inputs) < self.threshold:
            raise SecAggError(f"{len(self.inputs)} masked inputs, {self.threshold} needed")
        return sorted(self.inputs)

    def finish(self, revealed: Mapping[int, Mapping[int, tuple[str, int]]]) -> np.ndarray:
        """Step 3: the revealed shares in, ``sum x`` over ``U3`` (uint32) out.

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
                total -= prg(secret.to_bytes(32, "big"), self.n)
                continue
            key = X25519PrivateKey.from_private_bytes(secret.to_bytes(32, "big"))
            for u in sorted(u3):  # v dropped: take its pairwise masks out of u's input
                mask = prg(key.exchange(_pub(self.keys[u].mask)), self.n)
                if u < v:
                    total -= mask
                else:
                    total += mask
        return total


__all__ = [
    "PRIME",
    "Keys",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "decode",
    "encode",
    "prg",
    "reconstruct",
    "share",
]
