"""Every request, event, reply and error signed by the cell that sends it, and checked by the
cell it is for (``Cell(signing=MessageSigning(...))``), so that no relay between them can forge,
change, re-address or (beyond :data:`MAX_AGE`) replay one.

A cell signs what it originates, never what it forwards. The signed fields (in the ``sig.*``
headers of :mod:`flare_async.security._signing`):

- ``src``: the identity of the certificate (a cell's name; for an admin session, the admin's
  name, which the server maps from the session's cell name) and ``cell``: the sending cell;
- ``dst``, ``kind`` (``request``, ``event``, ``reply``, ``error``), ``topic``
  (``channel/topic``; ``reply``; ``error/STATUS``) and, for answers, ``corr``: the id of the
  request answered, so an answer cannot be moved to another request;
- ``sha256``: of the payload (of the message text for an error), and ``meta``: of the
  application headers and the codec (what a handler also acts on, e.g. which job a request
  is for);
- ``at``: when it was signed (seconds since the epoch): a receiver refuses what was signed more
  than ``max_age`` seconds away from its own clock.

Within ``max_age`` a relay may still replay a message as it was (the same request twice): the
protocols above keep their commands idempotent (a job start names its job and attempt).

Once a cell has verified a message from a peer, it authenticates what it sends that peer with a
session MAC over the same fields instead of a signature (:mod:`flare_async.security._sessions`:
a few µs instead of 84 µs to make and 161 µs to check). A MAC convinces only its receiver, so
requests and events on the channels in ``signed_channels`` (:data:`AUDITED_CHANNELS`: the job
service's, whose commands are kept in audit logs with their signatures) are always signed, and
the receiver refuses them MAC'd; :func:`check_command` never takes a MAC for a signature.

Stream frames are not signed here: a stream's integrity is its SHA-256, which the FL layer signs
end to end (``seal``); a relay that forges a stream's acknowledgements or abort can only stall it,
as dropping it would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from flare_async.errors import IntegrityError
from flare_async.security._sessions import FRESH, SessionKeys
from flare_async.security._signing import (
    CERT,
    MAC,
    VALUE,
    SignatureVerifier,
    Signer,
    check_age,
)

MAX_AGE = 300.0
"""Seconds a signed message stays acceptable after it was signed (either way: clock skew)."""
MAC_SCHEME = "hmac-sha256"
"""The signed field ``mac`` of a cell that takes session MACs: only to a peer that said so (in a
signature it verified, or by MAC'ing itself) does a cell MAC, so a peer that predates them (and
ignores the extra field, as receivers must) keeps getting signatures."""
AUDITED_CHANNELS = frozenset({"job"})
"""Channels whose requests and events are always signed, never MAC'd: the job service's
(``flare_async.fl``'s ``CHANNEL``), whose commands (an admin's to the server, the server's to a
site) are checked again by the service and kept in its audit log with their signature."""

Buffer = bytes | bytearray | memoryview


def payload_digest(parts: Sequence[Buffer]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def message_fields(
    *,
    cell: str,
    dst: str,
    kind: str,
    topic: str,
    corr: int | None,
    digest: str,
    meta: str | None = None,
) -> dict[str, Any]:
    """What is signed of one message, but ``src`` (the signing identity) and ``at`` (the
    time), which :class:`MessageSigning` adds."""
    fields: dict[str, Any] = {
        "cell": cell,
        "dst": dst,
        "kind": kind,
        "topic": topic,
        "sha256": digest,
    }
    if corr is not None:
        fields["corr"] = corr
    if meta is not None:
        fields["meta"] = meta
    return fields


def verify_message(
    verifier: SignatureVerifier,
    headers: Mapping[str, str],
    expect: dict[str, Any],
    *,
    now: datetime,
    max_age: float = MAX_AGE,
) -> str:
    """Check a message signed over ``expect`` (see :func:`message_fields`) and recently;
    returns its signature (for an audit log).

    Raises:
        IntegrityError: unsigned, signed by another identity, a field that differs (changed on
            the way), or signed more than ``max_age`` seconds from ``now`` (a replay).
    """
    identity = expect["src"]
    if MAC in headers:
        raise IntegrityError(
            f"{expect.get('topic')} from {expect.get('cell')} carries a session MAC, which only "
            "its receiver can check: it needs a signature"
        )
    signed = verifier.verify(
        headers, src=identity, expect={k: v for k, v in expect.items() if k != "src"}, now=now
    )
    check_age(signed, expect, now.timestamp(), max_age)
    return headers.get(VALUE, "")


def check_command(
    verifier: SignatureVerifier,
    headers: Mapping[str, str],
    *,
    src: str,
    cell: str,
    dst: str,
    command: str,
    body: bytes,
    now: datetime,
    max_age: float = MAX_AGE,
) -> str:
    """Check that the request ``command`` (``channel/topic``) with ``body`` from ``cell``
    (speaking for identity ``src``) to ``dst`` was signed by it (see :class:`MessageSigning`);
    returns the signature, which job services keep in their audit logs.

    Raises:
        IntegrityError: see :func:`verify_message`.
    """
    expect = message_fields(
        cell=cell,
        dst=dst,
        kind="request",
        topic=command,
        corr=None,
        digest=hashlib.sha256(body).hexdigest(),
    )
    return verify_message(verifier, headers, {"src": src, **expect}, now=now, max_age=max_age)


class MessageSigning:
    """A cell's signing of the messages it sends and checking of those it receives
    (``Cell(signing=)``).

    To a peer it has verified a message from within ``fresh`` seconds, a cell sends session
    MACs instead of signatures (but for ``signed_channels``); it checks both.

    Args:
        signer: this participant's key and certificate (its kit).
        verifier: the project's CA.
        identity_of: the certificate identity a cell name must sign with (default: the name
            itself; the server maps admin sessions to their admins).
        max_age: seconds a message stays acceptable (replays later than that are refused).
        clock: seconds since the epoch.
        on_refused: called with ``(identity, cell, topic, reason)`` for every message refused
            (a job service writes it to its audit log).
        session_macs: MAC to peers whose certificate this cell learned (False: sign every
            message, and refuse MAC'd ones).
        signed_channels: channels whose requests and events are always signed, and refused
            MAC'd (default :data:`AUDITED_CHANNELS`).
        fresh: seconds a peer's certificate is used for MACs after the last message verified
            from it.
        link_vouches: see :attr:`link_vouches`.
    """

    def __init__(
        self,
        signer: Signer,
        verifier: SignatureVerifier,
        *,
        identity_of: Callable[[str], str] | None = None,
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.time,
        on_refused: Callable[[str, str, str, str], None] | None = None,
        session_macs: bool = True,
        signed_channels: Collection[str] = AUDITED_CHANNELS,
        fresh: float = FRESH,
        link_vouches: bool = True,
    ) -> None:
        self.link_vouches = link_vouches
        """Leave messages between two cells on one verified mutual-TLS link unsigned, and take
        them so (``docs/wire.md`` §8.5); False: sign (or MAC) those too, and refuse them bare."""
        self.on_refused = on_refused
        self.signer = signer
        self.verifier = verifier
        self.identity_of = identity_of or (lambda cell: cell)
        self.max_age = max_age
        self.clock = clock
        self.signed_channels = frozenset(signed_channels)
        self.sessions: SessionKeys | None = (
            SessionKeys(signer, verifier, fresh=fresh)
            if session_macs and getattr(signer, "agrees", False)
            else None
        )

    def audited(self, channel: str) -> bool:
        """Whether requests and events on ``channel`` are always signed (one of
        :attr:`signed_channels`): never MAC'd, never left to the link (``cell._signing``)."""
        return channel in self.signed_channels

    def must_sign(self, fields: Mapping[str, Any]) -> bool:
        """Whether a message needs a signature rather than a MAC: a request or event on an
        audited channel."""
        return fields["kind"] in ("request", "event") and self.audited(
            fields["topic"].partition("/")[0]
        )

    def sign(self, fields: Mapping[str, Any]) -> dict[str, str]:
        """The signature (or MAC) headers of a message this cell sends (``fields``: see
        :func:`message_fields`)."""
        now = self.clock()
        sessions = self.sessions
        if sessions is None:
            return self.signer.sign({**fields, "src": self.signer.name, "at": round(now, 3)})
        signed = {**fields, "src": self.signer.name, "at": round(now, 3), "mac": MAC_SCHEME}
        if not self.must_sign(fields):
            peer = sessions.for_sending(fields["dst"], now)
            if peer is not None:
                return sessions.mac(peer, signed)
        return self.signer.sign(signed)

    def verify(self, headers: Mapping[str, str], fields: Mapping[str, Any]) -> None:
        """Check a message addressed to this cell; learn its sender's certificate (to MAC to
        it) once it holds.

        Raises:
            IntegrityError: the message is not signed or MAC'd by its cell's identity as it
                arrived, or is MAC'd where it must be signed.
        """
        cell = fields["cell"]
        identity = self.identity_of(cell)
        now = self.clock()
        try:
            if MAC in headers:
                self._verify_mac(headers, fields, cell, identity, now)
            else:
                when = datetime.fromtimestamp(now, UTC)
                signed = self.verifier.verify(headers, src=identity, expect=fields, now=when)
                check_age(signed, fields, now, self.max_age)
                if self.sessions is not None:
                    if signed.get("mac") == MAC_SCHEME:
                        self._learn(cell, headers.get(CERT), identity, now)
                    else:  # it does not (or no longer) take MACs: sign to it
                        self.sessions.forget(cell)
        except IntegrityError as exc:
            if self.on_refused is not None:
                self.on_refused(identity, cell, fields["topic"], str(exc))
            raise

    def _verify_mac(
        self,
        headers: Mapping[str, str],
        fields: Mapping[str, Any],
        cell: str,
        identity: str,
        now: float,
    ) -> None:
        sessions = self.sessions
        if VALUE in headers:
            raise IntegrityError(f"a message from {cell} carries both a signature and a MAC")
        if sessions is None:
            raise IntegrityError(f"{cell} sent a MAC, but {self.signer.name} takes signatures only")
        if self.must_sign(fields):
            raise IntegrityError(
                f"{fields['topic']} from {cell} is MAC'd, but its channel is audited: it must be "
                "signed"
            )
        sessions.check(headers, fields, identity=identity, now=now, max_age=self.max_age)

    def _learn(self, cell: str, cert: object, identity: str, now: float) -> None:
        assert self.sessions is not None
        try:
            peer = self.sessions.peer(cert, identity, now)
        except IntegrityError:
            return  # a key this cell cannot agree with: keep signing to it
        self.sessions.learn(cell, peer, now)


__all__ = [
    "AUDITED_CHANNELS",
    "MAC_SCHEME",
    "MAX_AGE",
    "MessageSigning",
    "check_command",
    "message_fields",
    "payload_digest",
    "verify_message",
]
