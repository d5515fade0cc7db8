"""The cell's side of message signatures (``Cell(signing=)``): what of each request, event,
reply and error is signed, and where. The cryptography lives in the security layer
(``flare_async.security.MessageSigning``); the fabric only sees this protocol."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Protocol

from flare_async.errors import IntegrityError
from flare_async.wire import Buffer, Error, Event, Frame, Reply, Request

SIGNED_KINDS = (Request, Event, Reply, Error)


class MessageSigner(Protocol):
    """Signs messages a cell originates and checks those addressed to it."""

    def sign(
        self,
        kind: str,
        cell: str,
        dst: str,
        topic: str,
        corr: int | None,
        meta: str,
        parts: Sequence[Buffer],
    ) -> Mapping[str, str]: ...

    def verify(
        self,
        headers: Mapping[str, str],
        kind: str,
        cell: str,
        dst: str,
        topic: str,
        corr: int | None,
        meta: str,
        parts: Sequence[Buffer],
    ) -> None: ...


def _meta(h: Request | Event | Reply | Error) -> str:
    """SHA-256 of what else a handler acts on: the application headers (the signature's own
    excepted) and the codec; a relay that re-addresses a message by a header is caught."""
    headers = {k: v for k, v in h.headers.items() if not k.startswith("sig.")}
    text = json.dumps([headers, getattr(h, "codec", "")], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _view(frame: Frame) -> tuple[str, str, int | None, Sequence[Buffer]]:
    """``kind, topic, corr, payload`` of a signed kind of message."""
    h = frame.header
    if isinstance(h, Request):
        return "request", f"{h.channel}/{h.topic}", None, frame.parts
    if isinstance(h, Event):
        return "event", f"{h.channel}/{h.topic}", None, frame.parts
    if isinstance(h, Reply):
        return "reply", "reply", h.corr, frame.parts
    assert isinstance(h, Error)
    return "error", f"error/{h.status}", h.corr, (h.message.encode(),)


def seal(signing: MessageSigner, frame: Frame) -> None:
    """Add the signature headers to a message this cell originates (in place)."""
    h = frame.header
    if isinstance(h, SIGNED_KINDS):
        kind, topic, corr, parts = _view(frame)
        h.headers.update(signing.sign(kind, h.src, h.dst, topic, corr, _meta(h), parts))


def check(signing: MessageSigner, frame: Frame) -> IntegrityError | None:
    """Why a message addressed to this cell fails its signature, or None."""
    h = frame.header
    if not isinstance(h, SIGNED_KINDS):
        return None
    kind, topic, corr, parts = _view(frame)
    try:
        signing.verify(h.headers, kind, h.src, h.dst, topic, corr, _meta(h), parts)
    except IntegrityError as exc:
        return exc
    return None
