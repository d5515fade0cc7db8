"""Session MACs: what two cells that know each other's certificates use instead of signatures.

A signature costs its signer about 84 µs and its checker 161 µs; an HMAC-SHA256 of the fields
about 2 µs. Two
cells whose certificates the same CA issued share a secret without exchanging a message:
static-static ECDH between their certified P-256 keys (``ECDH(a, B) == ECDH(b, A)``). From it,
HKDF-SHA256 derives one key per direction, bound to both identities and both certificates::

    key(A -> B) = HKDF-SHA256(ikm = ECDH(a, B), salt = b"flare-async sig.mac v1",
                              info = canonical({"from": A, "from_cert": fp(A),
                                                "to": B, "to_cert": fp(B)}), length = 32)

(``fp``: SHA-256 of the certificate's DER, hex). A MAC'd message carries the same
``sig.fields`` and ``sig.cert`` as a signed one, ``sig.mac`` (HMAC-SHA256 of the
``sig.fields`` bytes under ``key(sender -> receiver)``, lowercase hex) instead of ``sig.value``,
and ``sig.to``: the fingerprint of the receiver certificate the key was derived with.

Only the two ends hold the key: a relay can neither forge nor change a MAC'd message, and a MAC
made for one pair or direction does not verify for another. Unlike a signature, a MAC convinces
only its receiver (who could have made it): it proves nothing to a third party, so what is kept
as evidence (admin commands and the server's commands to sites, in audit logs) stays signed
(:class:`~flare_async.security._messages.MessageSigning`'s ``signed_channels``).

The receiver needs no state to check one: it checks the carried certificate against the CA
(valid now, naming the sender's identity) and derives the key itself. The sender needs the
receiver's certificate; it learns it from any message it verified from that cell (signed or
MAC'd, both carry their sender's certificate), and uses it for :data:`FRESH` seconds after the
last such message. So a first message to a cell is signed, and the answers and everything after
are MAC'd. A receiver that restarted with another certificate refuses a MAC made for the old one
(``sig.to`` is not its fingerprint) with ``INTEGRITY``; that answer, signed or MAC'd, carries its
new certificate, which the sender learns, so the next message uses the new key.

Both caches are bounded (least recently used out): certificates by their text, peers by cell
name. A cell's entry changes only after a message from that cell verified with a certificate the
CA issued to the identity the cell must speak for, so no peer can grow memory without bound or
put its certificate under another name.

Layer L1: no clock (``now`` is an argument), no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flare_async.errors import IntegrityError
from flare_async.security._signing import (
    CERT,
    FIELDS,
    MAC,
    MAX_CERT_CHARS,
    MAX_FIELDS_CHARS,
    TO,
    SignatureVerifier,
    Signer,
    canonical,
    check_age,
    check_fields,
    fingerprint,
    header_text,
)

SALT = b"flare-async sig.mac v1"
CAPACITY = 4096
"""Peers (and certificates) whose keys are kept; the least recently used leaves first."""
FRESH = 60.0
"""Seconds a peer's certificate is used to MAC to it after the last message verified from it:
a cell that hears nothing from a peer for longer signs again (a one-way flow of events to a
peer that changed its certificate is not lost for longer than this)."""
_encode = partial(msgspec.json.encode, order="sorted")
_MAC_CHARS = 64  # hex of 32 bytes
_FP_CHARS = 64  # hex of 32 bytes


class Peer:
    """A peer's certificate, checked against the CA, and the keys derived with it (each on
    first use: a peer only ever heard from costs no ECDH until it is answered)."""

    __slots__ = (
        "_receive",
        "_send",
        "cert",
        "fingerprint",
        "identity",
        "not_after",
        "not_before",
        "public",
    )

    def __init__(
        self,
        cert: str,
        identity: str,
        fp: str,
        public: ec.EllipticCurvePublicKey,
        not_before: float,
        not_after: float,
    ) -> None:
        self.cert = cert
        self.identity = identity
        self.fingerprint = fp
        self.public = public
        self.not_before = not_before
        self.not_after = not_after
        self._send: hmac.HMAC | None = None
        self._receive: hmac.HMAC | None = None

    def valid(self, now: float) -> bool:
        return self.not_before <= now <= self.not_after

    def sender(self, me: Signer) -> hmac.HMAC:
        """HMAC keyed with ``key(me -> peer)``, to copy (a copy skips the key schedule)."""
        if self._send is None:
            key = _derive(me.agree(self.public), me.name, me.fingerprint, *self._end)
            self._send = hmac.new(key, digestmod=hashlib.sha256)
        return self._send

    def receiver(self, me: Signer) -> hmac.HMAC:
        """HMAC keyed with ``key(peer -> me)``, to copy."""
        if self._receive is None:
            key = _derive(me.agree(self.public), *self._end, me.name, me.fingerprint)
            self._receive = hmac.new(key, digestmod=hashlib.sha256)
        return self._receive

    @property
    def _end(self) -> tuple[str, str]:
        return self.identity, self.fingerprint


def _derive(shared: bytes, sender: str, sender_fp: str, receiver: str, receiver_fp: str) -> bytes:
    """``key(sender -> receiver)`` from their ECDH secret (see the module text)."""
    info = canonical(
        {"from": sender, "from_cert": sender_fp, "to": receiver, "to_cert": receiver_fp}
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=info).derive(shared)


def mac_key(me: Signer, peer_public: ec.EllipticCurvePublicKey, peer: str, peer_fp: str) -> bytes:
    """``key(me -> peer)`` (for tests and other implementations to compare with)."""
    return _derive(me.agree(peer_public), me.name, me.fingerprint, peer, peer_fp)


class SessionKeys:
    """One participant's MAC keys with its peers (see the module text).

    Args:
        signer: this participant's key and certificate.
        verifier: the project's CA, which every peer certificate must come from.
        capacity: peers (and certificates) kept.
        fresh: seconds a peer's certificate is used after the last message verified from it.
    """

    def __init__(
        self,
        signer: Signer,
        verifier: SignatureVerifier,
        *,
        capacity: int = CAPACITY,
        fresh: float = FRESH,
    ) -> None:
        self.signer = signer
        self.verifier = verifier
        self.capacity = capacity
        self.fresh = fresh
        self._certs: OrderedDict[str, Peer] = OrderedDict()
        self._peers: OrderedDict[str, _Heard] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def certificates(self) -> int:
        """Peer certificates kept."""
        return len(self._certs)

    # ------------------------------------------------------------------ peers
    def peer(self, cert: object, identity: str, now: float) -> Peer:
        """The peer whose certificate is ``cert`` (DER, base64: a ``sig.cert``), if the CA
        issued it to ``identity`` and it is valid at ``now``.

        Raises:
            IntegrityError: otherwise, or its key is not on this participant's curve.
        """
        peer = self._certs.get(cert) if isinstance(cert, str) else None
        if peer is None:
            peer = self._new_peer(cert, identity, now)
        else:
            self._certs.move_to_end(cert)  # type: ignore[arg-type]  # a str, as checked
        if peer.identity != identity:
            raise IntegrityError(
                f"a message from {identity} is signed with {peer.identity}'s certificate"
            )
        if not peer.valid(now):
            raise IntegrityError(
                f"{identity}'s certificate is not valid at "
                f"{datetime.fromtimestamp(now, UTC).isoformat()}"
            )
        return peer

    def _new_peer(self, cert: object, identity: str, now: float) -> Peer:
        if not isinstance(cert, str) or len(cert) > MAX_CERT_CHARS:
            raise IntegrityError(f"{identity}'s certificate is missing, not text, or too long")
        try:
            der = base64.b64decode(cert, validate=True)
        except ValueError:
            raise IntegrityError(f"{identity}'s certificate is not base64") from None
        checked, x509_cert = self.verifier.checked_certificate(
            der, identity, datetime.fromtimestamp(now, UTC)
        )
        public = x509_cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
            public.curve, ec.SECP256R1
        ):
            raise IntegrityError(f"{identity}'s certificate holds no key to agree a MAC key with")
        peer = Peer(
            cert,
            checked.name,
            fingerprint(der),
            public,
            x509_cert.not_valid_before_utc.timestamp(),
            x509_cert.not_valid_after_utc.timestamp(),
        )
        if len(self._certs) >= self.capacity:
            self._certs.popitem(last=False)
        self._certs[cert] = peer
        return peer

    def learn(self, cell: str, peer: Peer, now: float) -> None:
        """A message from ``cell`` verified with ``peer``'s certificate at ``now``: MAC to it
        with that certificate from now on (for :attr:`fresh` seconds)."""
        peers = self._peers
        entry = peers.get(cell)
        if entry is not None:
            entry.peer, entry.at = peer, now
            peers.move_to_end(cell)
            return
        if len(peers) >= self.capacity:
            peers.popitem(last=False)
        peers[cell] = _Heard(peer, now)

    def forget(self, cell: str) -> None:
        """Sign to ``cell`` again until it is heard from."""
        self._peers.pop(cell, None)

    def for_sending(self, dst: str, now: float) -> Peer | None:
        """The peer to MAC a message for ``dst`` with, or None (sign it)."""
        entry = self._peers.get(dst)
        if entry is None:
            return None
        peer = entry.peer
        if now - entry.at > self.fresh or not peer.valid(now):
            return None
        return peer

    # ------------------------------------------------------------------ messages
    def mac(self, peer: Peer, fields: Mapping[str, Any]) -> dict[str, str]:
        """The headers that carry ``fields`` MAC'd for ``peer``.

        ``sig.fields`` is JSON with sorted keys and no whitespace, in UTF-8 (msgspec: a fifth of
        the time of ``json.dumps``); the receiver MACs the bytes as received, so they need not
        be byte-canonical.
        """
        data = _encode(fields)
        h = peer.sender(self.signer).copy()
        h.update(data)
        return {
            FIELDS: data.decode(),
            MAC: h.hexdigest(),
            CERT: self.signer.certificate,
            TO: peer.fingerprint,
        }

    def check(
        self,
        headers: Mapping[str, object],
        fields: Mapping[str, Any],
        *,
        identity: str,
        now: float,
        max_age: float,
    ) -> None:
        """Check a MAC'd message whose cell (``fields["cell"]``) speaks for ``identity``:
        its MAC, then that every field in ``fields`` has the value it was MAC'd with and that
        it was made within ``max_age`` seconds of ``now``; then MAC to that cell from now on.

        One flat function: it runs for every message a cell receives.

        Raises:
            IntegrityError: a header missing or malformed, a key derived for another
                certificate of this participant, a certificate the CA did not issue to
                ``identity`` (or not valid now), a MAC that does not match, a field that
                differs (changed on the way), or too old or too new (a replay).
        """
        src = fields["cell"]
        text, tag, to = headers.get(FIELDS), headers.get(MAC), headers.get(TO)
        if (
            type(text) is not str
            or type(tag) is not str
            or type(to) is not str
            or len(text) > MAX_FIELDS_CHARS
            or len(tag) != _MAC_CHARS
        ):
            raise IntegrityError(_malformed(headers, src))
        if to != self.signer.fingerprint:
            raise IntegrityError(
                f"{src} MAC'd for certificate {to[:16]!r}..., but {self.signer.name} holds "
                f"{self.signer.fingerprint[:16]}... (it restarted with another one?): sign "
                "again"
            )
        cert = headers.get(CERT)
        entry = self._peers.get(src)
        peer = entry.peer if entry is not None else None
        # The usual case: the certificate this cell's last message came with (a string compare,
        # not a hash of 700 characters); else the certificate cache, which checks and says why.
        if peer is None or peer.cert != cert or peer.identity != identity or not peer.valid(now):
            peer = self.peer(cert, identity, now)
        data = text.encode()
        h = peer.receiver(self.signer).copy()
        h.update(data)
        if not tag.isascii() or not hmac.compare_digest(h.hexdigest(), tag):
            raise IntegrityError(f"the MAC of {src} does not match what it sent")
        signed = check_fields(data, identity=identity, src=src, expect=fields, how="MAC'd")
        check_age(signed, fields, now, max_age, how="MAC'd")
        self.learn(src, peer, now)


class _Heard:
    """A peer's certificate as the last message verified from it showed it, and when."""

    __slots__ = ("at", "peer")

    def __init__(self, peer: Peer, at: float) -> None:
        self.peer = peer
        self.at = at


def _malformed(headers: Mapping[str, object], src: str) -> str:
    """Why the MAC headers of a message from ``src`` are malformed (the slow path)."""
    for key, most in ((FIELDS, MAX_FIELDS_CHARS), (MAC, _MAC_CHARS), (TO, _FP_CHARS)):
        try:
            header_text(headers, key, most, src)
        except IntegrityError as exc:
            return str(exc)
    return f"a message from {src} carries a malformed sig.mac (not {_MAC_CHARS} hex digits)"


__all__ = ["CAPACITY", "FRESH", "SALT", "Peer", "SessionKeys", "mac_key"]
