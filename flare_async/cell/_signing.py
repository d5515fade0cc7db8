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
from flare_async.security._messages import payload_digest
from flare_async.security._signing import SIGNATURE_HEADERS
from flare_async.wire import Buffer, Error, Event, Frame, Reply, Request, Routed

SIGNED_KINDS = (Request, Event, Reply, Error)
_CALLS = (Request, Event)
_BARE_META = hashlib.sha256(b'[{},""]').hexdigest()
"""The ``meta`` of a message without application headers and with the raw codec."""


class MessageSigner(Protocol):
    """Signs messages a cell originates and checks those addressed to it
    (``security.MessageSigning``); ``fields`` come from :func:`fields_of`."""

    def sign(self, fields: Mapping[str, Any]) -> Mapping[str, str]: ...

    def verify(self, headers: Mapping[str, str], fields: Mapping[str, Any]) -> None: ...


def _meta(h: Request | Event | Reply | Error) -> str:
    """SHA-256 of what else a handler acts on: the application headers (the signature's or
    MAC's own excepted, exactly those five: any other header, ``sig.`` or not, is covered) and
    the codec; a relay that re-addresses a message by a header is caught."""
    codec = getattr(h, "codec", "")
    if not codec and SIGNATURE_HEADERS.issuperset(h.headers):
        return _BARE_META  # the common case, without building a dict and its JSON
    headers = {k: v for k, v in h.headers.items() if k not in SIGNATURE_HEADERS}
    text = json.dumps([headers, codec], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def fields_of(frame: Frame) -> dict[str, Any]:
    """What is signed of a request, event, reply or error (``security.message_fields``, built
    here directly: this runs twice per message)."""
    h = frame.header
    assert isinstance(h, SIGNED_KINDS)
    parts: Sequence[Buffer] = frame.parts
    fields: dict[str, Any] = {"cell": h.src, "dst": h.dst}
    if isinstance(h, _CALLS):
        fields["kind"] = "request" if type(h) is Request else "event"
        fields["topic"] = f"{h.channel}/{h.topic}"
    elif isinstance(h, Reply):
        fields["kind"], fields["topic"], fields["corr"] = "reply", "reply", h.corr
    else:
        assert isinstance(h, Error)
        fields["kind"], fields["topic"], fields["corr"] = "error", f"error/{h.status}", h.corr
        parts = (h.message.encode(),)
    if len(parts) == 1:
        fields["sha256"] = hashlib.sha256(parts[0]).hexdigest()
    else:
        fields["sha256"] = payload_digest(parts)
    fields["meta"] = _meta(h)
    return fields


def seal(signing: MessageSigner, frame: Frame, *, bare: bool = False) -> None:
    """Add the signature headers to a message this cell originates (in place); ``bare``: none
    (the link vouches, see :func:`goes_unsigned`). Headers of an earlier seal go either way."""
    h = frame.header
    if isinstance(h, SIGNED_KINDS):
        headers = h.headers
        if not SIGNATURE_HEADERS.isdisjoint(headers):  # sealed before: a MAC now, a signature then
            for key in SIGNATURE_HEADERS:
                headers.pop(key, None)
        if not bare:
            headers.update(signing.sign(fields_of(frame)))


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


class LinkPeer(Protocol):
    """What the checks below need of a peer (``cell._links.Peer``)."""

    @property
    def name(self) -> str: ...

    @property
    def verified(self) -> bool: ...

    @property
    def vouches(self) -> bool: ...


def vouching(signing: MessageSigner | None) -> bool:
    """Whether this cell's signing leaves messages to the link where it can
    (``MessageSigning(link_vouches=)``; a signer that does not say never does)."""
    return signing is not None and getattr(signing, "link_vouches", False) is True


def _audited(signing: MessageSigner, h: object) -> bool:
    """A request or event on a channel the signing always signs (``MessageSigning.audited``:
    the job channel; every channel for a signing that does not say)."""
    audited = getattr(signing, "audited", None)
    return isinstance(h, _CALLS) and (audited is None or audited(h.channel))


def goes_unsigned(signing: MessageSigner, h: object, peer: LinkPeer | None) -> bool:
    """Whether a message this cell originates goes without a signature or MAC: its
    destination is ``peer`` itself, whose verified link vouches for it (``LINK_VOUCHES``),
    this cell's signing allows it, and it is not on an audited channel."""
    return peer is not None and peer.vouches and vouching(signing) and not _audited(signing, h)


def came_unsigned(signing: MessageSigner, h: Routed, via: LinkPeer | None) -> bool:
    """Whether a message addressed to this cell is taken without a signature: it carries none
    and came from its origin itself over a verified link (this cell then said
    ``LINK_VOUCHES`` in its hello), not on an audited channel. Anything else is checked."""
    return (
        via is not None
        and via.verified
        and vouching(signing)
        and via.name == h.src
        and SIGNATURE_HEADERS.isdisjoint(h.headers)
        and not _audited(signing, h)
    )
