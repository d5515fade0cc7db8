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
Stream frames are not signed here: a stream's integrity is its SHA-256, which the FL layer signs
end to end (``seal``); a relay that forges a stream's acknowledgements or abort can only stall it,
as dropping it would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from flare_async.errors import IntegrityError
from flare_async.security._signing import VALUE, SignatureVerifier, Signer

MAX_AGE = 300.0
"""Seconds a signed message stays acceptable after it was signed (either way: clock skew)."""

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
    signed = verifier.verify(
        headers, src=identity, expect={k: v for k, v in expect.items() if k != "src"}, now=now
    )
    at = signed.get("at")
    if not isinstance(at, int | float) or abs(now.timestamp() - at) > max_age:
        raise IntegrityError(
            f"{expect.get('topic')} from {expect.get('cell')} was signed at {at!r:.40}, not "
            f"within {max_age:g} s of now: a replay, or a clock far off"
        )
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

    Args:
        signer: this participant's key and certificate (its kit).
        verifier: the project's CA.
        identity_of: the certificate identity a cell name must sign with (default: the name
            itself; the server maps admin sessions to their admins).
        max_age: seconds a message stays acceptable (replays later than that are refused).
        clock: seconds since the epoch.
        on_refused: called with ``(identity, cell, topic, reason)`` for every message refused
            (a job service writes it to its audit log).
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
    ) -> None:
        self.on_refused = on_refused
        self.signer = signer
        self.verifier = verifier
        self.identity_of = identity_of or (lambda cell: cell)
        self.max_age = max_age
        self.clock = clock

    def sign(self, fields: Mapping[str, Any]) -> dict[str, str]:
        """The signature headers of a message this cell sends (``fields``: see
        :func:`message_fields`)."""
        return self.signer.sign({**fields, "src": self.signer.name, "at": round(self.clock(), 3)})

    def verify(self, headers: Mapping[str, str], fields: Mapping[str, Any]) -> None:
        """Raises:
        IntegrityError: the message is not signed by its cell's identity as it arrived.
        """
        expect = {**fields, "src": self.identity_of(fields["cell"])}
        now = datetime.fromtimestamp(self.clock(), UTC)
        try:
            verify_message(self.verifier, headers, expect, now=now, max_age=self.max_age)
        except IntegrityError as exc:
            if self.on_refused is not None:
                self.on_refused(expect["src"], fields["cell"], fields["topic"], str(exc))
            raise


__all__ = [
    "MAX_AGE",
    "MessageSigning",
    "check_command",
    "message_fields",
    "payload_digest",
    "verify_message",
]
