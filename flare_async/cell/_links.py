"""Per-link state of a cell and the hello handshake over a :class:`~flare_async.transport.Link`."""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import anyio

from flare_async._concurrency import SignalLike
from flare_async.errors import LinkBroken, LinkClosed, ProtocolError, TransportError
from flare_async.transport import Link, PushDelivery, Splicing
from flare_async.wire import Bye, Frame, Hello, Limits, Role, Session, check_hello, make_hello

DISPLACED: Final = "displaced"
"""Start of the bye reason sent to a link replaced by a newer one from the same name."""


class Displaced(LinkClosed):
    """Our parent replaced this link with a newer one claiming our name."""


class Forwarded:
    """A request this cell forwarded over a link and whose answer has not come back yet.

    If the link drops first, the origin is told at once (``LinkBroken``) instead of waiting for
    its deadline. Entries leave when the answer passes back or the deadline passes.
    """

    __slots__ = ("id", "inflight", "src")

    def __init__(self, src: str, msg_id: int, inflight: dict[tuple[str, int], Forwarded]) -> None:
        self.src = src
        self.id = msg_id
        self.inflight = inflight

    @property
    def live(self) -> bool:
        return self.inflight.get((self.src, self.id)) is self

    def expire(self) -> None:
        if self.live:
            del self.inflight[(self.src, self.id)]


LINK_VOUCHES = "sig:link"
"""Hello capability of a cell with message signing whose links are verified (mutual TLS and a
``verify_peer``): it takes a request, event, reply or error **unsigned** from the cell at the
other end of such a link when that cell is the message's origin (``src``). Mutual TLS already
authenticates the origin and protects the bytes end to end there: there is no relay in between.
Requests and events on the signing's audited channels (the job channel) stay signed. It
rests on the ``verify_peer`` tying the name in the peer's hello to its certificate, as
``kit_verifier`` does; a verifier that checks only the CA must not be used with signing, or
the signing must say ``link_vouches=False``."""


NO_BACKLOG: deque[tuple[Frame, float, int]] = deque(maxlen=0)
"""The backlog of a link that never filled (never appended to: a full link's peer gets a deque
of its own first). An empty deque is 600 B, and a relay of 1,000 sites has 1,000 links."""


class Peer:
    """A live, handshaken link to one neighbouring cell.

    Attributes:
        last_rx: when a frame last arrived (the cell's clock); liveness is the link's.
        inflight: requests forwarded through this link, awaiting their answers.
        dead: why the heartbeat gave up on the link, if it did.
        serving: the scope of the task reading the link; cancelled when the link is given up,
            so that task ends whatever the transport is waiting for.
    """

    __slots__ = (
        "backlog",
        "backlog_bytes",
        "dead",
        "draining",
        "inflight",
        "last_rx",
        "link",
        "name",
        "orderly",
        "ponging",
        "push",
        "role",
        "room",
        "serving",
        "session",
        "splicing",
        "verified",
        "vouches",
    )

    def __init__(self, link: Link, session: Session, now: float, *, verified: bool = False) -> None:
        self.link = link
        self.verified = verified and bool(link.extra().peer_certificate)
        """The peer's certificate was checked against its name at the handshake (``verified``:
        a ``verify_peer`` passed) and the link carries one (mutual TLS): a message from the
        peer itself needs no signature (see :data:`LINK_VOUCHES`). A verifier on a link
        without a certificate (plain tcp, memory) vouches for nothing."""
        self.vouches = self.verified and LINK_VOUCHES in session.capabilities
        """Messages from this cell to the peer itself go unsigned: the link is verified and the
        peer said (in its hello) that it takes such messages."""
        # A link's optional capabilities, found once (a protocol check is slow per frame).
        self.push = link if isinstance(link, PushDelivery) else None
        self.splicing = link if isinstance(link, Splicing) else None
        self.session = session
        self.name = session.peer
        self.role = session.role
        self.last_rx = now
        self.inflight: dict[tuple[str, int], Forwarded] = {}
        self.dead: str | None = None
        self.serving = anyio.CancelScope()
        self.ponging = False
        """A pong waits for room on the link (see ``Cell._on_frame``)."""
        self.orderly = False
        """A goodbye was said on the link (by either side): its end is a close, not a break."""
        self.backlog: deque[tuple[Frame, float, int]] = NO_BACKLOG  # made on first use
        """Frames forwarded to this peer while its link was full, with their deadlines and
        payload sizes, in order; a task of the router sends them (see ``Router._forward``)."""
        self.backlog_bytes = 0
        self.draining = False
        self.room: SignalLike | None = None
        """Set when the backlog shrinks, for a forward waiting for room in it."""

    async def send(self, frame: Frame) -> None:
        await self.link.send(frame)

    async def send_within(self, frame: Frame, within: float) -> None:
        """Send a link-control frame if the link takes it within ``within``; else forget it."""
        with anyio.move_on_after(within), contextlib.suppress(TransportError, ProtocolError):
            await self.link.send(frame)

    def __repr__(self) -> str:
        return f"<Peer {self.role} {self.name} via {self.link.peer_address}>"


async def _receive_hello(link: Link) -> Hello | object:
    frame = await link.receive()
    header = frame.header
    if isinstance(header, Bye):
        raise LinkClosed(f"peer refused the link: {header.reason}")
    return header


async def handshake_connector(
    link: Link, local: Hello, verify: PeerVerifier | None = None
) -> Session:
    """Run the hello exchange as the side that connected.

    Raises:
        ProtocolError: the peer's answer is not an acceptable hello (also VersionMismatch and
            IdentityError).
        TransportError: the link failed during the exchange.
    """
    await link.send(Frame(local))
    expect: Role = "parent" if local.role == "child" else "peer"
    session = check_hello(local, await _receive_hello(link), expect=expect)
    if verify is not None:
        verify(link, session)
    link.peer_limits = session.peer_limits
    return session


PeerVerifier = Callable[[Link, Session], None]
"""Checks who is on the other end of a handshaken link (e.g. its certificate against its
claimed name and role); raises :class:`~flare_async.errors.IdentityError` to refuse it."""


async def handshake_acceptor(
    link: Link, name: str, make: HelloFactory, verify: PeerVerifier | None = None
) -> Session:
    """Run the hello exchange as the side that accepted; refuse with a ``Bye`` and a reason.

    Raises:
        ProtocolError: the peer's hello is not acceptable (the peer was told why).
        TransportError: the link failed during the exchange.
    """
    remote = await _receive_hello(link)
    role: Role = "child"
    if isinstance(remote, Hello) and remote.role == "peer":
        role = "peer"
    local = make("parent" if role == "child" else "peer")
    try:
        session = check_hello(local, remote, expect=role)
        if verify is not None:
            verify(link, session)
    except ProtocolError as exc:
        with anyio.move_on_after(1, shield=True):
            with contextlib.suppress(LinkClosed, LinkBroken):
                await link.send(Frame(Bye(reason=str(exc))))
        raise
    link.peer_limits = session.peer_limits
    # Before our hello goes out: the peer may send anything once it has it.
    link.hello_done()
    await link.send(Frame(local))
    return session


class HelloFactory:
    """Builds this cell's hello for a given role."""

    def __init__(
        self,
        name: str,
        limits: Limits,
        capabilities: frozenset[str],
        heartbeat: float,
        extra: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.capabilities = capabilities
        self.heartbeat = heartbeat
        self.extra = extra
        """Capabilities that depend on the cell's state at each handshake (:data:`LINK_VOUCHES`)."""

    def __call__(self, role: Role) -> Hello:
        caps = self.capabilities if self.extra is None else self.capabilities | self.extra()
        return make_hello(self.name, role, self.limits, caps, self.heartbeat)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter for reconnecting to a parent.

    Attributes:
        initial: delay ceiling after the first failure, in seconds.
        maximum: the cap on any delay.
        factor: growth per failed attempt.
    """

    initial: float = 0.1
    maximum: float = 10.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return rng.uniform(ceiling / 2, ceiling)
