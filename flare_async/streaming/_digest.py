"""A stream's whole-object digest: the algorithms, their text form, and CRC-32C combined from
the chunks' own checks.

Every chunk already carries its CRC-32C (computed on hot bytes at both ends). The default
whole-object digest, ``crc32c``, is the CRC-32C of the whole object *combined* from those chunk
CRCs (the way zlib's ``crc32_combine`` does it, in GF(2)): it costs no pass over the bytes, does
not depend on where the chunks were cut (a resumed or re-chunked stream gives the same value),
and catches lost, repeated or misplaced chunks. It is not cryptographic: a stream whose digest
is signed (``seal``), or a receiver that requires a digest for its signature checks, uses
``blake3`` (cryptographic, ~2.5x SHA-256's speed here); ``sha256`` on request.

A digest travels as text, ``"<algorithm>:<hex>"`` (a bare 64-digit hex is SHA-256, as before
the algorithm was named): a signature over that text binds the algorithm too, so a relay that
rewrites the announced algorithm to a weaker one is caught by the signature check.

Layer L1: pure functions and small state, no I/O.
"""

from __future__ import annotations

import functools
import string

from flare_async.errors import ProtocolError

CRC32C = "crc32c"
BLAKE3 = "blake3"
SHA256 = "sha256"

ALGORITHMS = (CRC32C, BLAKE3, SHA256)
"""The whole-object digests a stream may announce (``StreamOpen.digest_alg``)."""

CRYPTOGRAPHIC = frozenset({BLAKE3, SHA256})
"""Algorithms a signature may rest on."""

_HEX_LENGTH = {CRC32C: 8, BLAKE3: 64, SHA256: 64}
_HEX = frozenset(string.hexdigits.lower())

_POLY = 0x82F63B78
"""CRC-32C's polynomial, bit-reflected (as the CRC is computed)."""


def format_digest(algorithm: str, hexvalue: str) -> str:
    """The text form of a digest: ``"<algorithm>:<hex>"``."""
    return f"{algorithm}:{hexvalue}"


def parse_digest(text: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of a digest's text form; a bare 64-digit hex is SHA-256.

    Raises:
        ProtocolError: an unknown algorithm, or hex of the wrong length or alphabet.
    """
    algorithm, sep, value = text.partition(":")
    if not sep:
        algorithm, value = SHA256, text
    expected = _HEX_LENGTH.get(algorithm)
    if expected is None:
        raise ProtocolError(f"unknown digest algorithm {algorithm[:32]!r}")
    if len(value) != expected or not _HEX.issuperset(value):
        raise ProtocolError(f"a {algorithm} digest is {expected} lowercase hex digits")
    return algorithm, value


def normalize_digest(text: str) -> str:
    """``text`` in its text form with the algorithm named (``""`` stays ``""``).

    Raises:
        ProtocolError: as :func:`parse_digest`.
    """
    if not text:
        return ""
    return format_digest(*parse_digest(text))


def check_algorithm(algorithm: str) -> str:
    """``algorithm`` if it is one of :data:`ALGORITHMS`.

    Raises:
        ProtocolError: otherwise.
    """
    if algorithm not in _HEX_LENGTH:
        raise ProtocolError(
            f"unknown digest algorithm {algorithm[:32]!r} (known: {', '.join(ALGORITHMS)})"
        )
    return algorithm


def _multiply(a: int, b: int) -> int:
    """``a * b`` modulo the polynomial (both reflected, x^0 in the top bit)."""
    product = 0
    bit = 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multiply(table[-1], table[-1]))  # x^(2^k)
    return table


_X_POW_2K = _powers()


@functools.lru_cache(maxsize=64)
def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: appending ``nbytes`` zero bytes to a CRC's input.
    Cached: a stream's chunks share one length (all but the last)."""
    result = 1 << 31  # x^0
    k = 3  # 8 bits a byte: x^(2^3) per byte
    while nbytes:
        if nbytes & 1:
            result = _multiply(_X_POW_2K[k % 32], result)
        nbytes >>= 1
        k += 1
    return result


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of ``A + B`` from ``crc1`` = CRC-32C(A), ``crc2`` = CRC-32C(B), ``len2`` = len(B)."""
    if len2 <= 0:
        return crc1
    return _multiply(_shift(len2), crc1) ^ crc2


class CrcDigest:
    """The whole object's CRC-32C, combined from chunk CRCs as they become known.

    Chunks may be reported out of order (a fan-out's receivers ask for them at their own
    pace); they are folded in offset order. Reports held aside are bounded by the caller's
    window (a sender reports only chunks in its log; a receiver only delivered ones, in order).
    """

    __slots__ = ("_crc", "_pending", "nbytes")

    def __init__(self) -> None:
        self._crc = 0
        self.nbytes = 0
        """Bytes folded in so far (the offset the next chunk must start at)."""
        self._pending: dict[int, tuple[int, int]] = {}

    def add(self, offset: int, length: int, crc: int) -> None:
        """Chunk ``[offset, offset + length)`` has CRC-32C ``crc`` (a repeat is ignored)."""
        if offset < self.nbytes or length <= 0:
            return
        if offset > self.nbytes:
            self._pending[offset] = (length, crc)
            return
        self._fold(length, crc)
        pending = self._pending
        while pending:
            nxt = pending.pop(self.nbytes, None)
            if nxt is None:
                break
            self._fold(*nxt)

    def _fold(self, length: int, crc: int) -> None:
        self._crc = crc32c_combine(self._crc, crc, length) if self.nbytes else crc
        self.nbytes += length

    def hexdigest(self) -> str:
        """The text form, ``"crc32c:<8 hex>"`` (of the bytes folded so far)."""
        return format_digest(CRC32C, f"{self._crc:08x}")


__all__ = [
    "ALGORITHMS",
    "BLAKE3",
    "CRC32C",
    "CRYPTOGRAPHIC",
    "SHA256",
    "CrcDigest",
    "check_algorithm",
    "crc32c_combine",
    "format_digest",
    "normalize_digest",
    "parse_digest",
]
