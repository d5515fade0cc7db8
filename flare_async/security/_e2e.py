"""End-to-end encryption of a payload to one recipient's key, so the relays on the way forward
bytes they cannot read.

ECIES with the recipient's certificate key (P-256): a fresh ephemeral key per payload, ECDH,
HKDF-SHA256 to an AES-256-GCM key; the payload is cut into blocks, each sealed with its index
as nonce and the header as associated data (a block moved, dropped or changed fails to open).
Layout: ``b"FAE1"``, the ephemeral public key (65 bytes, uncompressed), the block size (4 bytes
big-endian), then the sealed blocks (block + 16-byte tag each; the last may be shorter).

Layer L1: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flare_async.errors import ConfigError, IntegrityError
from flare_async.security._kits import Kit

MAGIC = b"FAE1"
BLOCK = 4 << 20
_POINT = 65
_HEAD = len(MAGIC) + _POINT + 4
_TAG = 16


def _key(shared: bytes, point: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"flare-async e2e " + point)
    return AESGCM(hkdf.derive(shared))


def _blocks(parts: Sequence[bytes | bytearray | memoryview], size: int) -> Iterator[bytes]:
    pending = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            take = min(size - len(pending), view.nbytes)
            pending += view[:take]
            view = view[take:]
            if len(pending) == size:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)


def encrypt_for(
    certificate_der: bytes, parts: Sequence[bytes | bytearray | memoryview], block: int = BLOCK
) -> list[bytes]:
    """The payload ``parts`` sealed for the holder of ``certificate_der``'s key."""
    public = x509.load_der_x509_certificate(certificate_der).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ConfigError("the recipient's certificate holds no elliptic-curve key")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    aead = _key(ephemeral.exchange(ec.ECDH(), public), point)
    header = MAGIC + point + block.to_bytes(4, "big")
    out = [header]
    for i, data in enumerate(_blocks(parts, block)):
        out.append(aead.encrypt(i.to_bytes(12, "big"), data, header))
    return out


class Decryptor:
    """Opens payloads sealed for a kit's key."""

    def __init__(self, kit: Kit) -> None:
        try:
            key = serialization.load_pem_private_key(Path(kit.key).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the key of kit {kit.name!r}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"kit {kit.name!r}: the key is not an elliptic-curve key")
        self._key = key

    def _open(self, header: bytes) -> tuple[AESGCM, int]:
        if len(header) != _HEAD or not header.startswith(MAGIC):
            raise IntegrityError("not an end-to-end sealed payload")
        point = header[len(MAGIC) : len(MAGIC) + _POINT]
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError as exc:
            raise IntegrityError(f"a sealed payload with a bad key: {exc}") from None
        return _key(self._key.exchange(ec.ECDH(), peer), point), int.from_bytes(header[-4:], "big")

    def decrypt(self, parts: Sequence[bytes | bytearray | memoryview]) -> Iterator[bytes]:
        """The plaintext, block by block.

        Raises:
            IntegrityError: not sealed for this key, or changed on the way.
        """
        blob = _blocks(parts, 1 << 62)  # header and blocks are cut below, by their sizes
        data = memoryview(next(blob, b""))
        header = bytes(data[:_HEAD])
        aead, block = self._open(header)
        body = data[_HEAD:]
        step = block + _TAG
        for i, start in enumerate(range(0, body.nbytes, step)):
            try:
                yield aead.decrypt(i.to_bytes(12, "big"), bytes(body[start : start + step]), header)
            except InvalidTag:
                raise IntegrityError(
                    f"sealed block {i} does not open: changed on the way"
                ) from None

    def decrypt_file(self, src: Path, dst: Path) -> None:
        """Open a sealed payload stored in ``src`` into ``dst``, a block at a time."""
        with src.open("rb") as f, dst.open("wb") as out:
            header = f.read(_HEAD)
            aead, block = self._open(header)
            for i in range(1 << 62):
                sealed = f.read(block + _TAG)
                if not sealed:
                    return
                try:
                    out.write(aead.decrypt(i.to_bytes(12, "big"), sealed, header))
                except InvalidTag:
                    raise IntegrityError(f"sealed block {i} does not open") from None


__all__ = ["BLOCK", "Decryptor", "encrypt_for"]
