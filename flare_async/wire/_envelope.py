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


Envelope = Request | Event | Reply | Error | Hello | Ping | Pong | Bye
"""Every header that can appear in a frame."""

ROUTED_KINDS = (Request, Event, Reply, Error)
