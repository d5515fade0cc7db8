"""The frame header: one msgspec Struct per message kind, in a tagged union.

Encoding is msgpack with ``array_like`` structs (compact, fast) and small integer tags, so a
header is a msgpack array ``[tag, field, field, ...]``.

Evolution rules (see msgspec's schema-evolution guide):

* Fields of :class:`Routed` and :class:`Hello`'s first version are frozen forever. A new field
  is appended at the *end* of one kind, with a default; old peers ignore trailing fields they do
  not know, and new peers fill the default when an old peer leaves it out.
* ``headers`` is the open-ended extension map for optional features.
* A new message kind gets a new tag and is only sent to peers that advertised the matching
  capability in their :class:`Hello` (or speak a protocol version that includes it).
* Tags 1-9 are routed messages, 10-19 link control, 20-29 are reserved for streaming.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec


class Routed(msgspec.Struct, array_like=True, omit_defaults=False):
    """Fields shared by every message that is routed between cells.

    Attributes:
        id: message id, unique per origin cell while the message can be alive.
        src: origin cell name.
        dst: destination cell name.
        route: the cells this message went through, origin first; each hop appends itself.
        budget: seconds left until the deadline when this hop sent it (``None``: no deadline).
            Relative, so clocks of different machines never need to agree.
        headers: extension map (trace ids, auth tokens, ...).
    """

    id: int
    src: str
    dst: str
    route: list[str]
    budget: float | None
    headers: dict[str, str]


R = TypeVar("R", bound=Routed)


def originate(
    kind: type[R],
    id: int,
    src: str,
    dst: str,
    *,
    budget: float | None = None,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> R:
    """A new message's header as its origin writes it: ``route`` starts with ``src``; no
    deadline and no extension headers unless given. Relays never make headers: they copy and
    extend what they received."""
    return kind(
        id=id,
        src=src,
        dst=dst,
        route=[src],
        budget=budget,
        headers={} if headers is None else headers,
        **fields,
    )


class Request(Routed, tag=1):
    """A call that expects exactly one :class:`Reply` or :class:`Error`."""

    channel: str
    topic: str
    codec: str = ""


class Event(Routed, tag=2):
    """A one-way message; no reply is sent (a failed delivery may come back as :class:`Error`)."""

    channel: str
    topic: str
    codec: str = ""


class Reply(Routed, tag=3):
    """The successful answer to the :class:`Request` whose id is ``corr``."""

    corr: int
    codec: str = ""


class Error(Routed, tag=4):
    """A failure answer to the message whose id is ``corr``; ``status`` is an ``errors.Status``."""

    corr: int
    status: int
    message: str


class Hello(msgspec.Struct, array_like=True, tag=10):
    """First frame each way on a new link.

    Attributes:
        name: the sender's cell name.
        version: highest protocol version the sender speaks.
        min_version: lowest protocol version the sender speaks.
        role: what the sender is to the receiver: ``"child"`` (connector below the acceptor),
            ``"peer"`` (direct link between cells of different branches) or ``"parent"``
            (the acceptor answering a child).
        capabilities: feature names the sender supports (codecs, streaming, ...).
        max_header: largest header the sender accepts, in bytes.
        max_frame: largest payload the sender accepts, in bytes.
        heartbeat: the interval in seconds at which the sender pings an idle link (0: never).
    """

    name: str
    version: int
    min_version: int
    role: str
    capabilities: list[str]
    max_header: int
    max_frame: int
    heartbeat: float = 0.0


class Ping(msgspec.Struct, array_like=True, tag=11):
    """Liveness probe on an idle link; answered by :class:`Pong` with the same ``seq``."""

    seq: int


class Pong(msgspec.Struct, array_like=True, tag=12):
    """Answer to :class:`Ping`."""

    seq: int


class Bye(msgspec.Struct, array_like=True, tag=13):
    """Orderly goodbye: the sender is closing the link on purpose, with a reason."""

    reason: str


# ---------------------------------------------------------------------------- streaming
# A stream moves one object of any size from its origin (the sender) to a destination cell
# as chunks under credit-based flow control (docs/streaming.md). Every stream message is
# routed like a request, so relays forward it chunk by chunk without knowing streams. The
# stream is named by its origin and ``sid``.


class StreamOpen(Routed, tag=20):
    """Sender -> receiver: open (or, with ``resume``, re-open after a drop) stream ``sid``.

    Attributes:
        size: the object's size in bytes, or -1 when not known in advance.
        sha256: the whole object's digest in text form (``"<algorithm>:<hex>"``; a bare
            64-digit hex is SHA-256) when known in advance ("" otherwise: it then comes with
            :class:`StreamEnd`). Named for the one algorithm there was at first.
        chunk: the chunk size the sender proposes (the receiver may lower it).
        window: the flow-control window the sender proposes, in bytes (may be lowered).
        resume: a re-open of a stream the receiver may still hold: it answers with its
            committed offset, and the sender continues from there.
        digest: the sender computes the whole-object digest; the receiver checks against it.
        idle: seconds without progress after which the sender gives up (the receiver waits
            at least as long for a resume).
        digest_alg: the digest's algorithm: ``crc32c`` (combined from the chunks' CRCs),
            ``blake3`` or ``sha256`` (the default, for senders from before it was named).
    """

    channel: str
    topic: str
    sid: int
    size: int
    codec: str
    sha256: str
    chunk: int
    window: int
    resume: bool = False
    digest: bool = True
    idle: float = 60.0
    digest_alg: str = "sha256"


class StreamData(Routed, tag=21):
    """Sender -> receiver: the bytes at ``offset`` (the payload), with their CRC-32C."""

    sid: int
    offset: int
    crc: int


class StreamAck(Routed, tag=22):
    """Receiver -> sender: flow control and progress.

    Attributes:
        committed: every byte below this offset arrived intact and is held by the receiver.
        limit: the sender may send bytes below this offset (credit).
        chunk / window: what the receiver accepted (set in the first ack; 0 later).
        resend: bytes were lost or corrupt: send again from ``committed``.
    """

    sid: int
    committed: int
    limit: int
    chunk: int = 0
    window: int = 0
    resend: bool = False


class StreamEnd(Routed, tag=23):
    """Sender -> receiver: every byte was sent; the object is ``size`` bytes, of digest
    ``sha256`` (text form, as in :class:`StreamOpen`; "" when none was computed)."""

    sid: int
    size: int
    sha256: str


class StreamAbort(Routed, tag=24):
    """The stream ends in failure (``status`` is an ``errors.Status``); ``sender`` names the
    stream's sending cell (with ``sid``, the stream). Sent by either end, or by a relay that
    could not pass a sender's message on (the sender then resumes once the path is back)."""

    sid: int
    status: int
    message: str
    sender: str


class StreamDone(Routed, tag=25):
    """Receiver -> sender: the receiving handler finished; its reply is the payload.

    Attributes:
        sha256: the digest of the bytes the receiver took, text form ("" if the handler
            stopped early or none was computed).
        received: bytes the receiver took.
    """

    sid: int
    sha256: str
    received: int
    codec: str = ""


StreamMessage = StreamOpen | StreamData | StreamAck | StreamEnd | StreamAbort | StreamDone
STREAM_KINDS = (StreamOpen, StreamData, StreamAck, StreamEnd, StreamAbort, StreamDone)

Envelope = (
    Request
    | Event
    | Reply
    | Error
    | Hello
    | Ping
    | Pong
    | Bye
    | StreamOpen
    | StreamData
    | StreamAck
    | StreamEnd
    | StreamAbort
    | StreamDone
)
"""Every header that can appear in a frame."""

ROUTED_KINDS = (Request, Event, Reply, Error, *STREAM_KINDS)
