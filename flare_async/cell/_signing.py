"""The cell's side of message signatures (``Cell(signing=)``): what of each request, event,
reply and error is signed, and where. The cryptography lives in the security layer
(``flare_async.security.MessageSigning``); the fabric builds the fields and sees only this
protocol."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from flare_async.errors import IntegrityError
from flare_async.security._messages import message_fields, payload_digest
from flare_async.security._signing import CERT, FIELDS, VALUE
from flare_async.wire import Buffer, Error, Event, Frame, Reply, Request

SIGNED_KINDS = (Request, Event, Reply, Error)
SIGNATURE_HEADERS = frozenset({FIELDS, VALUE, CERT})
"""The signature's own headers: the only ones its ``meta`` leaves out."""


class MessageSigner(Protocol):
    """Signs messages a cell originates and checks those addressed to it
    (``security.MessageSigning``); ``fields`` come from :func:`fields_of`."""

    def sign(self, fields: Mapping[str, Any]) -> Mapping[str, str]: ...

    def verify(self, headers: Mapping[str, str], fields: Mapping[str, Any]) -> None: ...


def _meta(h: Request | Event | Reply | Error) -> str:
    """SHA-256 of what else a handler acts on: the application headers (the signature's own
    excepted, exactly those three: any other header, ``sig.`` or not, is covered) and the
    codec; a relay that re-addresses a message by a header is caught."""
    headers = {k: v for k, v in h.headers.items() if k not in SIGNATURE_HEADERS}
    text = json.dumps([headers, getattr(h, "codec", "")], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def fields_of(frame: Frame) -> dict[str, Any]:
    """What is signed of a request, event, reply or error (``security.message_fields``)."""
    h = frame.header
    parts: Sequence[Buffer] = frame.parts
    corr: int | None = None
    if isinstance(h, Request | Event):
        kind, topic = type(h).__name__.lower(), f"{h.channel}/{h.topic}"
    elif isinstance(h, Reply):
        kind, topic, corr = "reply", "reply", h.corr
    else:
        assert isinstance(h, Error)
        kind, topic, corr = "error", f"error/{h.status}", h.corr
        parts = (h.message.encode(),)
    return message_fields(
        cell=h.src,
        dst=h.dst,
        kind=kind,
        topic=topic,
        corr=corr,
        digest=payload_digest(parts),
        meta=_meta(h),
    )


def seal(signing: MessageSigner, frame: Frame) -> None:
    """Add the signature headers to a message this cell originates (in place)."""
    h = frame.header
    if isinstance(h, SIGNED_KINDS):
        h.headers.update(signing.sign(fields_of(frame)))


def check(signing: MessageSigner, frame: Frame) -> IntegrityError | None:
    """Why a message addressed to this cell fails its signature, or None."""
    h = frame.header
    if not isinstance(h, SIGNED_KINDS):
        return None
    try:
        signing.verify(h.headers, fields_of(frame))
    except IntegrityError as exc:
        return exc
    return None
