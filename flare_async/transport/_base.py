"""The driver interface: how a cell gets links, whatever carries them.

A driver serves one or more URL schemes and offers two operations, ``connect(url)`` and
``listen(url)``. A :class:`Link` moves whole :class:`~flare_async.wire.Frame` objects in order
in both directions. Every driver must pass the conformance suite in
:mod:`flare_async.testing` (ordering, large frames, close vs broken, cancellation mid-send, EOF).

The contract every link keeps:

* ``send`` delivers the whole frame or none of it. If it is cancelled part-way, the driver
  either finishes the frame (shielded) or marks the link broken; a receiver never sees a
  corrupted frame. It raises :class:`~flare_async.errors.FrameTooLarge` *before* sending
  anything when the frame exceeds ``peer_limits``.
* ``receive`` returns frames in the order they were sent. It raises
  :class:`~flare_async.errors.LinkClosed` once the peer closed on purpose (after every frame
  sent before the close was delivered) or when we closed; :class:`~flare_async.errors.LinkBroken`
  when the link broke; :class:`~flare_async.errors.ProtocolError` on a bad frame.
* ``send`` and ``try_send`` may be called by several tasks at once; frames never interleave.
* ``aclose`` is idempotent and never raises for an already closed or broken link.
* ``abort`` breaks the link at once, as a crash would, and never waits: not on the peer, not on
  the network (a link whose peer went silent is given up with it; a graceful close would wait
  for a network that may be cut). After it, every operation fails with ``LinkBroken`` and
  ``aclose`` only releases what is left, without waiting either.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import msgspec

from flare_async.wire import HELLO_LIMITS, Envelope, Frame, Limits, Passing


@dataclass(frozen=True)
class Admission:
    """How a listener treats connections that have not said hello yet (docs/design.md §3).

    Until the cell accepted a link's hello (:meth:`Link.hello_done`), the link reads with
    ``limits`` (a hello-sized frame; a bigger announcement closes it) and a small buffer, at
    most ``max_pending`` such links are open per listener and ``max_pending_per_source`` per
    source address (IP): a connection beyond either cap is closed as soon as it is accepted.
    The links not yet past their hello thus hold at most ``max_pending`` small buffers between
    them. ``timeout`` bounds everything before the hello where the listener runs it (the TLS
    handshake and the HTTP upgrade of ``ws``/``wss``); the cell bounds the rest with the same
    number, its ``handshake_timeout``.

    Attributes:
        refused: connections closed, by reason (``per-listener cap``, ``per-source cap``,
            ``no hello in time``, ``oversize frame before hello``...), shared by the
            listeners given this admission.
    """

    timeout: float = 10.0
    limits: Limits = HELLO_LIMITS
    max_pending: int = 512
    max_pending_per_source: int = 64
    refused: Counter[str] = field(default_factory=Counter, compare=False)


class LinkFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a link knows of its peer (:meth:`Link.extra`)."""

    peer_address: str = ""
    """As :attr:`Link.peer_address`."""
    peer_certificate: bytes | None = None
    """The peer's DER certificate (``tls://`` and ``wss://``; else ``None``)."""
    socket_peer: str | None = None
    """``ws``/``wss``: the TCP peer as ``HOST:PORT`` (the proxy, when the link goes through
    one); ``None`` for the other drivers."""


class LinkStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of a link (:meth:`Link.statistics`); a driver sets those it keeps."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    buffered: int = 0
    """Bytes read and not yet handed out as frames (``tcp``/``tls``)."""
    read_buffer: int = 0
    """Size of the read buffer (``tcp``/``tls``: 16 KiB before the hello, then the limits')."""
    frames_passed: int = 0
    """Frames whose payload passed through unread (``Splicing``)."""
    send_queue_used: int = 0
    """``memory``: frames waiting in the send queue, and its size."""
    send_queue_size: int = 0
    damaged: int = 0
    """``testing.FaultyDriver``: frames it damaged, and dropped."""
    dropped: int = 0


class Link(abc.ABC):
    """One bidirectional frame link between two cells.

    The interface every link has: :meth:`send`, :meth:`try_send`, :meth:`receive`,
    :meth:`aclose`, :meth:`abort`, and the facts :meth:`hello_done`, :meth:`extra`,
    :meth:`statistics`. What only some links can do is a capability of its own, a protocol a
    link class implements or not: :class:`PushDelivery`, :class:`Splicing`.

    A link encodes the header it writes as ``frame.stamp(anyio.current_time)`` at the moment
    it writes it (after any wait for the link), never ``frame.header`` as it was handed over:
    a frame with a deadline (``frame.expires``) carries what is left of it on the wire.

    Attributes:
        local_address: this end's address, as the driver names it.
        peer_address: the other end's address, as the driver names it.
        limits: limits applied to frames we receive.
        peer_limits: limits applied to frames we send (updated after the hello).
    """

    local_address: str
    peer_address: str
    limits: Limits
    peer_limits: Limits

    @abc.abstractmethod
    async def send(self, frame: Frame) -> None:
        """Send one frame; blocks while the link's bounded buffer is full (backpressure).

        Raises:
            FrameTooLarge: the frame exceeds ``peer_limits``; nothing was sent.
            LinkClosed: the link was closed.
            LinkBroken: the link broke.
        """

    def try_send(self, frame: Frame) -> bool:
        """Send one frame only if that needs no waiting; never blocks, never a checkpoint.

        The runtime calls this first on its hot path and falls back to :meth:`send` (under a
        deadline) when it returns ``False``. Drivers without a cheap non-blocking path keep
        this default.

        Raises:
            The same errors as :meth:`send` (a closed link may also just return ``False``:
            the :meth:`send` that follows raises).
        """
        return False

    @abc.abstractmethod
    async def receive(self) -> Frame:
        """Receive the next frame.

        Raises:
            LinkClosed: the link was closed on purpose (by either side).
            LinkBroken: the link broke.
            ProtocolError: the peer sent a malformed or oversize frame.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the link on purpose. Idempotent; frames already sent are still delivered."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Break the link now, as a crash or a cut cable would: no goodbye, no drain, no TLS
        ``close_notify``, no WebSocket closing handshake, nothing that needs the network.

        Never blocks and is not a checkpoint: a cell gives up on a silent link with it, and
        must not wait on the network that went silent. Tasks waiting in :meth:`send` or
        :meth:`receive` wake with ``LinkBroken``, later calls raise it; the peer, if anything
        still reaches it, sees ``LinkBroken`` too. Idempotent; :meth:`aclose` after it returns
        without waiting.
        """

    def hello_done(self) -> None:
        """The cell accepted the peer's hello: lift the handshake phase's limits (see
        :class:`Admission`) and stop counting the link as pending. Optional (a no-op)."""
        return

    def extra(self) -> LinkFacts:
        """What the link knows of its peer (its TLS certificate...)."""
        return LinkFacts(peer_address=getattr(self, "peer_address", ""))

    def statistics(self) -> LinkStatistics:
        """Queue and byte counters of the link."""
        return LinkStatistics()


@runtime_checkable
class PushDelivery(Protocol):
    """A link that can hand frames to a callback as they arrive, without waking the task that
    receives (the raw ``tcp://`` link on asyncio reads in an event-loop callback)."""

    def deliver_to(self, on_frame: Callable[[Frame], bool] | None) -> bool:
        """Hand frames to ``on_frame`` as they arrive (``None``: stop).

        The driver may call ``on_frame(frame)`` right where it reads, for each complete frame
        in order. ``on_frame`` returns ``False`` for a frame it cannot handle without waiting:
        that frame and every later one then go to :meth:`Link.receive` instead, in order, until
        ``receive`` finds nothing queued; only then does the driver call ``on_frame`` again.
        Frames are never reordered and never handed out twice. An exception from ``on_frame``
        ends the link: ``receive`` raises it. ``receive`` still reports the end of the link as
        usual, so the runtime keeps one task waiting in it.

        Returns:
            whether the driver will deliver this way.
        """
        ...


@runtime_checkable
class Splicing(Protocol):
    """A link that lets large frames pass through unread: a relay forwards their payload from
    one such link to another without reading it (``os.splice``, raw ``tcp://`` on asyncio)."""

    @property
    def splices(self) -> bool:
        """Whether frames can pass through this link now (the platform can splice)."""
        ...

    def pass_through(self, decide: Callable[[Envelope, int], bool] | None) -> bool:
        """Offer large incoming frames to ``decide(header, payload_len)`` as their headers
        arrive (``None``: stop); a frame it accepts is received as a
        :class:`~flare_async.wire.Passing` frame whose payload is still in the link. Its
        receiver then either forwards it with another link's :meth:`send_passing`, reads it
        with :meth:`take_passing`, or neither (the next ``receive`` drops the payload).

        Returns:
            whether the link does.
        """
        ...

    async def take_passing(self, passing: Passing) -> Frame:
        """The passing frame just received, with its whole payload read into memory.

        Raises:
            LinkBroken: the link broke before the payload was complete.
        """
        ...

    async def send_passing(self, frame: Frame, passing: Passing, src: Link) -> None:
        """Send ``frame`` (a header and the passing frame's first bytes) followed by the rest
        of ``passing``'s payload, moved from ``src`` (which received it) without reading it.
        Only between links whose ``splices`` is true.

        Raises:
            LinkBroken: ``src`` broke before the payload was complete (nothing was sent on this
                link), or this link broke.
            The errors of :meth:`Link.send`.
        """
        ...


class Listener(abc.ABC):
    """Accepts incoming links on one address.

    Attributes:
        url: the URL actually listened on (for example with the port a ``:0`` bind got).
    """

    url: str

    @abc.abstractmethod
    async def accept(self) -> Link:
        """Wait for the next incoming link.

        Raises:
            LinkClosed: the listener was closed.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop accepting. Idempotent. Links already accepted stay open."""

    def guard(self, admission: Admission) -> bool:
        """Apply ``admission`` to the connections accepted from now on, before their hello.

        Optional: returns whether the driver does (the default: ``False``, it does not).
        """
        return False


class Driver(abc.ABC):
    """A transport: makes links for the URL schemes it serves.

    Attributes:
        schemes: URL schemes this driver serves, e.g. ``("tcp",)``.
    """

    schemes: tuple[str, ...]

    @abc.abstractmethod
    async def connect(self, url: str, *, limits: Limits) -> Link:
        """Open a link to ``url``.

        Raises:
            ConnectError: nothing accepted the connection.
        """

    @abc.abstractmethod
    async def listen(self, url: str, *, limits: Limits) -> Listener:
        """Start listening on ``url``.

        Raises:
            ConnectError: the address cannot be listened on (in use, invalid).
        """
