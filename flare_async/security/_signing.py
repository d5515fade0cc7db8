"""End-to-end signatures: the origin signs what it sends, the final receiver checks it, and the
relays between them cannot change a signed field or the payload without being found out.

A signed message carries three extension headers:

- ``sig.fields``: canonical JSON (sorted keys, no spaces) of what is signed: at least the
  origin ``src``, the destination ``dst``, the payload's ``sha256``, and whatever the protocol
  binds to it (the FL layer binds the job, the task and the round);
- ``sig.value``: the ECDSA P-256 / SHA-256 signature of those bytes, base64;
- ``sig.cert``: the origin's certificate (DER, base64), issued by the project's CA.

The receiver checks that the certificate is the CA's and valid now, that it names the cell the
message comes from, that the signature holds, and that each signed field has the value the
message shows (:meth:`SignatureVerifier.verify`). The payload digest itself is checked by the
stream layer (the stream is opened with the signed SHA-256 and fails if the bytes differ).

Requests, events, replies and errors are signed by the cells that send them
(:mod:`flare_async.security._messages`); results and tasks, which are streams, by the FL layer.

Layer L1: no clock (``now`` is an argument), no I/O besides reading the kit.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flare_async.errors import ConfigError, IdentityError, IntegrityError
from flare_async.security._identity import Identity, identity_from_certificate
from flare_async.security._kits import Kit

FIELDS, VALUE, CERT = "sig.fields", "sig.value", "sig.cert"
MAC, TO = "sig.mac", "sig.to"
"""A message authenticated by a session MAC (:mod:`flare_async.security._sessions`) carries
``sig.mac`` instead of ``sig.value``, and ``sig.to``: which receiver certificate its key was
derived with."""
SIGNATURE_HEADERS = frozenset({FIELDS, VALUE, CERT, MAC, TO})
"""The headers of a signature or MAC themselves: the only ones a message's ``meta`` leaves out."""
MAX_CERT_CHARS = 16384
"""A ``sig.cert`` longer than this is refused before it is decoded (ours are about 700)."""
MAX_FIELDS_CHARS = 65536
"""A ``sig.fields`` longer than this is refused before it is parsed (ours are about 300)."""


_CACHED_CERTIFICATES = 4096
"""Certificates whose CA signature was checked, kept (every message carries its sender's)."""


_decode = msgspec.json.Decoder().decode


def canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":")).encode()


def fingerprint(der: bytes) -> str:
    """A certificate's SHA-256 over its DER bytes, lowercase hex (``sig.to``)."""
    return hashlib.sha256(der).hexdigest()


def header_text(headers: Mapping[str, object], key: str, most: int, src: str) -> str:
    """The header ``key``, if it is text of at most ``most`` characters.

    Raises:
        IntegrityError: missing ("not signed"), not text, or longer.
    """
    value = headers.get(key)
    if not isinstance(value, str) or len(value) > most:
        shown = (
            "missing"
            if value is None
            else f"{len(value)} characters"
            if isinstance(value, str)
            else "not text"
        )
        raise IntegrityError(f"a message from {src} is not signed ({key}: {shown})")
    return value


def check_fields(
    data: bytes | str,
    *,
    identity: str,
    src: str,
    expect: Mapping[str, Any],
    how: str = "signed",
) -> dict[str, Any]:
    """The fields of ``data`` (authenticated as ``identity``'s already: ``how``, signed or
    MAC'd), if they are a JSON object whose ``src`` is ``identity`` and whose every ``expect``
    key has that value.

    Raises:
        IntegrityError: otherwise (a field that differs was changed on the way).
    """
    try:
        fields = _decode(data)
    except (ValueError, RecursionError):
        raise IntegrityError(f"the {how} fields of {src} are not JSON") from None
    if not isinstance(fields, dict):
        raise IntegrityError(f"the {how} fields of {src} are not a JSON object")
    if fields.get("src") != identity:
        raise IntegrityError(f"{identity} {how} for {fields.get('src')!r:.80}")
    for key, value in expect.items():
        if fields.get(key) != value:
            raise IntegrityError(
                f"{src} {how} {key}={fields.get(key)!r:.80} but the message says "
                f"{value!r:.80}: changed on the way"
            )
    return fields


def check_age(
    signed: Mapping[str, Any],
    expect: Mapping[str, Any],
    now: float,
    max_age: float,
    how: str = "signed",
) -> None:
    """Refuse fields whose ``at`` is not a number within ``max_age`` seconds of ``now``
    (either way: a replay, or a clock far off).

    Raises:
        IntegrityError: otherwise.
    """
    at = signed.get("at")
    if not isinstance(at, int | float) or isinstance(at, bool) or abs(now - at) > max_age:
        raise IntegrityError(
            f"{expect.get('topic')} from {expect.get('cell')} was {how} at {at!r:.40}, not "
            f"within {max_age:g} s of now: a replay, or a clock far off"
        )


class Signer:
    """Signs for the participant of a kit (its own key and certificate)."""

    def __init__(self, kit: Kit) -> None:
        try:
            key = serialization.load_pem_private_key(Path(kit.key).read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(Path(kit.cert).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the signing key of kit {kit.name!r}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"kit {kit.name!r}: the key is not an elliptic-curve key")
        der = cert.public_bytes(serialization.Encoding.DER)
        self.name = kit.name
        self._key = key
        self._cert = base64.b64encode(der).decode()
        self.certificate = self._cert
        """This participant's certificate, DER, base64 (``sig.cert``)."""
        self.fingerprint = fingerprint(der)
        """SHA-256 of the certificate's DER, hex (what ``sig.to`` names)."""
        self.agrees = isinstance(key.curve, ec.SECP256R1)
        """Whether the key can agree session MAC keys with peers (a P-256 key, as kits have)."""

    def agree(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """The ECDH shared secret of this participant's key and ``peer`` (static-static: the
        same on both sides, for as long as both keep their certificates).

        Raises:
            ValueError: ``peer`` is on another curve.
        """
        return self._key.exchange(ec.ECDH(), peer)

    def sign(self, fields: Mapping[str, Any]) -> dict[str, str]:
        """The headers that carry ``fields`` signed (``src`` must be this participant)."""
        if fields.get("src") != self.name:
            raise ValueError(f"{self.name} cannot sign for {fields.get('src')!r}")
        data = canonical(fields)
        signature = self._key.sign(data, ec.ECDSA(hashes.SHA256()))
        return {
            FIELDS: data.decode(),
            VALUE: base64.b64encode(signature).decode(),
            CERT: self._cert,
        }


class SignatureVerifier:
    """Checks signed headers against the project's CA."""

    def __init__(self, ca_pem: bytes) -> None:
        try:
            self._ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError as exc:
            raise ConfigError(f"cannot load the CA certificate: {exc}") from None
        self._issued: dict[bytes, tuple[x509.Certificate, Identity]] = {}

    @classmethod
    def from_kit(cls, kit: Kit) -> SignatureVerifier:
        try:
            return cls(Path(kit.ca).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the CA of kit {kit.name!r}: {exc}") from None

    def verify(
        self, headers: Mapping[str, str], *, src: str, expect: Mapping[str, Any], now: datetime
    ) -> dict[str, Any]:
        """Check a signed message from ``src``; returns the signed fields.

        Args:
            expect: fields whose signed value must be exactly this (the message's own header
                values: a relay that rewrote one is caught here).

        Raises:
            IntegrityError: unsigned, a certificate not from the CA (or expired, or naming
                another cell), a bad signature, or a signed field that differs.
        """
        return self.verify_signer(headers, src=src, expect=expect, now=now)[0]

    def verify_signer(
        self, headers: Mapping[str, str], *, src: str, expect: Mapping[str, Any], now: datetime
    ) -> tuple[dict[str, Any], Identity]:
        """:meth:`verify`, and the signer's identity (its role) from its certificate.

        Raises:
            IntegrityError: see :meth:`verify`.
        """
        text = header_text(headers, FIELDS, MAX_FIELDS_CHARS, src)
        value = header_text(headers, VALUE, 512, src)
        cert_text = header_text(headers, CERT, MAX_CERT_CHARS, src)
        try:
            data = text.encode()
            signature = base64.b64decode(value, validate=True)
            der = base64.b64decode(cert_text, validate=True)
        except (ValueError, UnicodeError) as exc:
            raise IntegrityError(f"a message from {src} is not signed ({exc!r:.200})") from None
        identity, cert = self._check_certificate(der, src, now)
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise IntegrityError(f"{src}'s certificate does not hold an elliptic-curve key")
        try:
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise IntegrityError(f"the signature of {src} does not match what it signed") from None
        return check_fields(data, identity=identity.name, src=src, expect=expect), identity

    def check_certificate(self, der: bytes, name: str, now: datetime) -> Identity:
        """The identity in ``der`` if it is this CA's, valid ``now`` and names ``name``.

        Raises:
            IntegrityError: otherwise.
        """
        return self._check_certificate(der, name, now)[0]

    def checked_certificate(
        self, der: bytes, name: str, now: datetime
    ) -> tuple[Identity, x509.Certificate]:
        """:meth:`check_certificate`, and the certificate itself (for its key and dates).

        Raises:
            IntegrityError: see :meth:`check_certificate`.
        """
        return self._check_certificate(der, name, now)

    def _check_certificate(
        self, der: bytes, src: str, now: datetime
    ) -> tuple[Identity, x509.Certificate]:
        known = self._issued.get(der)
        if known is None:
            try:
                cert = x509.load_der_x509_certificate(der)
                cert.verify_directly_issued_by(self._ca)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise IntegrityError(
                    f"{src}'s certificate is not from this project's CA: {exc}"
                ) from None
            try:
                identity = identity_from_certificate(cert)
            except IdentityError as exc:
                raise IntegrityError(f"{src}'s certificate names no identity: {exc}") from None
            if len(self._issued) >= _CACHED_CERTIFICATES:
                self._issued.pop(next(iter(self._issued)))
            # The CA's check holds for good; the validity period is checked every time.
            known = self._issued[der] = (cert, identity)
        cert, identity = known
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise IntegrityError(f"{src}'s certificate is not valid at {now.isoformat()}")
        if identity.name != src:
            raise IntegrityError(
                f"a message from {src} is signed with {identity.name}'s certificate"
            )
        return identity, cert


__all__ = [
    "CERT",
    "FIELDS",
    "MAC",
    "SIGNATURE_HEADERS",
    "TO",
    "VALUE",
    "SignatureVerifier",
    "Signer",
    "canonical",
    "check_fields",
    "fingerprint",
    "header_text",
]
