"""The Cell: the one kind of participant. Server, relay and edge differ only in handlers and URLs.

A cell owns one anyio task group: a task per listener (accepting links), a task per link
(reading frames), a task keeping the link to the parent up, and a pool of handler workers
that grows on demand up to ``max_concurrency``. No threads.

Every message that arrives is either for this cell (dispatched to a handler or resolving a
request) or forwarded one hop on, by the routing rule, with its payload untouched. Failures
are answered to the origin at once with an ``Error`` frame: unknown destinations, routing
loops, exhausted hop budgets, expired deadlines, missing handlers, full queues.

Reading a link never waits for a handler: a request that finds the handler queue full is
answered :class:`~flare_async.errors.Overloaded` right away, so replies on the same link keep
flowing and a slow handler cannot deadlock a call chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

import anyio
import msgspec
import sniffio
from anyio.abc import TaskGroup, TaskStatus

from flare_async import _logging
from flare_async.cell._deadlines import DeadlineTimer
from flare_async.cell._dispatch import Job, Workers
from flare_async.cell._handlers import Dispatch, HandlerTable, Kind
from flare_async.cell._links import (
    Backoff,
    Forwarded,
    HelloFactory,
    Peer,
    PeerVerifier,
    handshake_acceptor,
    handshake_connector,
)
from flare_async.cell._payload import Payload, as_payload
from flare_async.cell._rpc import PendingTable, Waiter
from flare_async.cell._signing import MessageSigner
from flare_async.cell._signing import check as check_signature
from flare_async.cell._signing import seal as seal_message
from flare_async.cell._stream_api import StreamingMixin
from flare_async.cell._stream_in import StreamHub
from flare_async.codecs import CodecRegistry
from flare_async.errors import (
    CellClosed,
    ConfigError,
    DeadlineExceeded,
    FlareError,
    IntegrityError,
    LinkBroken,
    LinkClosed,
    ProtocolError,
    Status,
    TransportError,
    Unreachable,
    error_for_status,
)
from flare_async.routing import LOCAL, PARENT, check_route, next_hop, validate_name
from flare_async.transport import Admission, Driver, DriverRegistry, Link, Listener
from flare_async.wire import (
    ROUTED_KINDS,
    STREAM_KINDS,
    Buffer,
    Bye,
    Envelope,
    Error,
    Event,
    Frame,
    Limits,
    Passing,
    Ping,
    Pong,
    Reply,
    Request,
    Routed,
    StreamData,
    StreamEnd,
    StreamOpen,
    originate,
)

_DEFAULT: Final = object()
DISPLACED: Final = "displaced"
"""Start of the bye reason sent to a link replaced by a newer one from the same name."""


class _Displaced(LinkClosed):
    """Our parent replaced this link with a newer one claiming our name."""


_ROUTED: Final = ROUTED_KINDS
_TO_RECEIVER: Final = (StreamOpen, StreamData, StreamEnd)
_CALLS: Final = (Request, Event)
_ANSWERS: Final = (Reply, Error)
_MAX_ANSWER_TASKS: Final = 1024


def _no_clock() -> float:
    raise CellClosed("the cell has not started")


def backend_clock() -> Callable[[], float]:
    """The running event loop's clock, bound once (``anyio.current_time`` looks the backend up
    on every call, which shows on the hot path). Trio's clock honours ``MockClock``."""
    if sniffio.current_async_library() == "trio":
        import trio  # noqa: PLC0415 - only when running on trio

        return trio.current_time
    return asyncio.get_running_loop().time


Outcome = Payload | FlareError


class CellStatistics(msgspec.Struct, frozen=True):
    """A snapshot of a cell's queues and counters (see :meth:`Cell.statistics`)."""

    name: str
    children: int
    has_parent: bool
    pending_requests: int
    handlers_busy: int
    handler_queue_size: int
    workers: int
    handled: int
    forwarded: int
    rejected_overloaded: int
    errors_returned: int
    undeliverable: int
    bad_signatures: int = 0
    """Messages refused because their signature failed (``Cell(signing=)``)."""
    streams: dict[str, int] = msgspec.field(default_factory=dict)
    """Stream counters: ``receiving`` / ``sending`` now, ``received`` / ``sent`` in all,
    ``damaged_chunks`` (failed their CRC), ``resends_asked``, ``resumes`` (a sender's probe
    answered here), ``rewinds`` / ``probes`` (as a sender), ``failed``."""


class BroadcastResults(dict[str, Outcome]):
    """Per-target outcomes of :meth:`Cell.broadcast`: a reply payload or the error, per name."""

    @property
    def replies(self) -> dict[str, Payload]:
        return {k: v for k, v in self.items() if isinstance(v, Payload)}

    @property
    def errors(self) -> dict[str, FlareError]:
        return {k: v for k, v in self.items() if isinstance(v, FlareError)}


class Cell(StreamingMixin):
    """A participant of the fabric.

    Args:
        name: this cell's place in the tree, e.g. ``server.eu.site-3``.
        listen: URLs to accept links on (children and peers connect here).
        parent: URL of the parent cell to connect to (``None`` for a root).
        handlers: handler tables to mount (frozen at start).
        drivers: transports, e.g. a shared :class:`~flare_async.MemoryNetwork`.
        limits: wire limits (max header, max frame, max route).
        default_timeout: deadline of a request when the caller gives none (``None``: none).
        max_concurrency: most handlers running at once.
        queue_size: requests waiting for a handler before new ones are refused as overloaded.
        handshake_timeout: how long a new link may take to say hello (with a TLS handshake
            and an HTTP upgrade before it, where the transport has those).
        admission: how listeners treat connections before their hello (caps per listener and
            per source address, the hello-phase limits); default ``Admission`` with
            ``handshake_timeout``. Its ``refused`` counts the connections closed before a hello.
        backoff: reconnect policy for the parent link.
        heartbeat: ping a link quiet for this many seconds (``None``: never).
        dead_after: drop a link quiet for this long (default: 3 heartbeats).
        verify_peer: called for every handshaken link before it is used; raising
            ``IdentityError`` refuses it (with mTLS: the certificate must match the claim).
        on_link: called with ``(peer name, role, up)`` whenever a link comes up or goes down
            (role is what the peer is to this cell: ``parent``, ``child`` or ``peer``).
        accept: ``(origin, channel, topic) -> bool``: whether a request, event or stream from
            that origin may reach this cell's handlers (a site's policy); refused ones get
            ``Unauthorized``. ``None``: everything with a handler is accepted.
        seed: seed of the jitter generator (for reproducible simulations).
        signing: signs every request, event, reply and error this cell originates, and checks
            the signature of every one addressed to it (``security.MessageSigning`` with the
            cell's kit); one that fails is refused with ``IntegrityError`` (answered to a
            request, logged otherwise). ``None``: nothing signed or checked.

    Use as an async context manager; the cell runs until the block exits::

        async with Cell("server", listen=["memory://server"], drivers=[net]) as cell:
            reply = await cell.request("server.site-1", "admin", "ping", b"hi")
    """

    def __init__(
        self,
        name: str,
        *,
        listen: Sequence[str] = (),
        parent: str | None = None,
        handlers: Iterable[HandlerTable] = (),
        drivers: Iterable[Driver] = (),
        limits: Limits | None = None,
        default_timeout: float | None = 30.0,
        max_concurrency: int = 256,
        queue_size: int = 1024,
        handshake_timeout: float = 10.0,
        backoff: Backoff | None = None,
        heartbeat: float | None = 15.0,
        dead_after: float | None = None,
        verify_peer: PeerVerifier | None = None,
        on_link: Callable[[str, str, bool], None] | None = None,
        accept: Callable[[str, str, str], bool] | None = None,
        seed: int | None = None,
        max_streams: int = 64,
        stream_idle: float = 60.0,
        codecs: CodecRegistry | None = None,
        signing: MessageSigner | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.name = validate_name(name)
        self.signing = signing
        self._bad_signatures = 0
        self.limits = limits or Limits()
        self.default_timeout = default_timeout
        self.handshake_timeout = handshake_timeout
        self.admission = admission or Admission(timeout=handshake_timeout)
        self.backoff = backoff or Backoff()
        self.verify_peer = verify_peer
        self.on_link = on_link
        self.accept = accept
        if heartbeat is not None and heartbeat <= 0:
            raise ConfigError("heartbeat must be a positive number of seconds or None")
        self.heartbeat = heartbeat
        self.dead_after = dead_after or (3 * heartbeat if heartbeat else math.inf)
        self._send_cap = self.dead_after if math.isfinite(self.dead_after) else 60.0
        self._answer_tasks = 0
        self.drivers = DriverRegistry(drivers)
        self._listen = list(listen)
        self._parent_url = parent
        if parent is not None and "." not in self.name:
            raise ConfigError(f"{self.name!r} is a root name and cannot have a parent")
        self._tables = list(handlers)
        self._dispatch: Dispatch | None = None
        self._workers = Workers(self, max_concurrency, queue_size)
        self.codecs = codecs or CodecRegistry()
        """The codecs this cell encodes and decodes; advertised in its hello."""
        self._hello = HelloFactory(
            self.name, self.limits, self.codecs.capabilities(), heartbeat or 0.0
        )
        self._rng = random.Random(seed)
        # Ids start at random: a late answer from before a restart, or a guessed id, must not
        # match a new request.
        self._ids = itertools.count(secrets.randbits(48))
        self._pending = PendingTable()
        self._children: dict[str, Peer] = {}
        self._parent: Peer | None = None
        self._parent_changed: anyio.Event | None = None
        self._listeners: list[Listener] = []
        self._tg: TaskGroup | None = None
        self._clock: Callable[[], float] = _no_clock
        self._timer = DeadlineTimer(self._now)
        self._running = False
        self._log = _logging.get_logger(cell=self.name)
        self._forwarded = 0
        self._errors_returned = 0
        self._undeliverable = 0
        self._streams = StreamHub(self, max_incoming=max_streams, idle=stream_idle)
        self.listen_urls: list[str] = []
        """URLs actually listened on, available once the cell has started."""

    # ------------------------------------------------------------------ lifecycle
    def mount(self, table: HandlerTable) -> None:
        """Add a handler table before the cell starts.

        Raises:
            ConfigError: the cell already started (tables are frozen then).
        """
        if self._dispatch is not None:
            raise ConfigError("handler tables are frozen once the cell has started")
        self._tables.append(table)

    async def __aenter__(self) -> Self:
        if self._dispatch is not None:
            raise ConfigError("a Cell can be started only once")
        self._dispatch = Dispatch(self._tables)
        self._parent_changed = anyio.Event()
        self._clock = backend_clock()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._running = True
        try:
            tg.start_soon(self._timer.run, name=f"{self.name} deadlines")
            if self.heartbeat:
                tg.start_soon(self._heartbeat_loop, self.heartbeat, name=f"{self.name} heartbeat")
            for url in self._listen:
                listener = await self.drivers.for_url(url).listen(url, limits=self.limits)
                listener.guard(self.admission)
                self._listeners.append(listener)
                self.listen_urls.append(listener.url)
                tg.start_soon(self._accept_loop, listener, name=f"{self.name} accept {url}")
            if self._parent_url is not None:
                await tg.start(self._parent_loop, self._parent_url, name=f"{self.name} parent")
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop everything the cell runs. An exception from the ``async with`` body is left to
        propagate as it is (never wrapped in an exception group); only a failure of the cell's
        own tasks, which would be a bug, surfaces from here."""
        self._running = False
        for waiter in self._pending.all():
            waiter.fail(CellClosed(f"cell {self.name} is shutting down"))
        self._streams.close()
        tg, self._tg = self._tg, None
        assert tg is not None
        with anyio.CancelScope(shield=True):
            for listener in self._listeners:
                await listener.aclose()
            async with anyio.create_task_group() as byes:  # at once: 1 s at most in all
                for peer in self._peers():
                    byes.start_soon(self._say_bye, peer, "cell shutting down")
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)

    async def _say_bye(self, peer: Peer, reason: str) -> None:
        peer.orderly = True
        with anyio.move_on_after(1, shield=True):
            with contextlib.suppress(TransportError, ProtocolError):
                await peer.send(Frame(Bye(reason=reason)))
            await peer.link.aclose()

    def _peers(self) -> list[Peer]:
        return [*self._children.values(), *([self._parent] if self._parent else [])]

    def _now(self) -> float:
        return self._clock()

    @property
    def running(self) -> bool:
        return self._running

    @property
    def parent_name(self) -> str | None:
        """The connected parent's name, or ``None`` while not connected."""
        return self._parent.name if self._parent else None

    @property
    def children(self) -> list[str]:
        """Names of the cells connected below (and peers)."""
        return sorted(self._children)

    def encode(self, obj: Any, codec: str | None = None, *, channel: str | None = None) -> Payload:
        """A payload of ``obj`` encoded with one of this cell's codecs (buffers not copied
        where the codec can avoid it): ``codec`` if given, else the one configured for
        ``channel`` (``CodecRegistry(per_channel=...)``), else ``tensors``.

        Raises:
            DecodeError: no such codec here. CodecError: ``obj`` cannot be encoded by it.
        """
        name = codec or self.codecs.choose(channel)
        return Payload(self.codecs.get(name).encode(obj), codec=name)

    def decode(self, payload: Payload) -> Any:
        """The object a payload carries, decoded with the codec it names.

        Raises:
            DecodeError: an unknown codec, or bytes that do not decode.
        """
        return self.codecs.get(payload.codec).decode(payload.parts)

    def peer_codecs(self, name: str) -> frozenset[str]:
        """The codecs a directly linked cell and this one both speak (from the hellos)."""
        peer = self._parent if self._parent and self._parent.name == name else None
        peer = peer or self._children.get(name)
        if peer is None:
            return frozenset()
        caps = peer.session.capabilities
        return frozenset(c.removeprefix("codec:") for c in caps if c.startswith("codec:"))

    async def wait_parent(self) -> None:
        """Wait until the link to the parent is up (returns at once if it is)."""
        self._check_running()
        while self._parent is None:
            assert self._parent_changed is not None
            await self._parent_changed.wait()

    def statistics(self) -> CellStatistics:
        w = self._workers
        return CellStatistics(
            name=self.name,
            children=len(self._children),
            has_parent=self._parent is not None,
            pending_requests=len(self._pending),
            handlers_busy=w.busy,
            handler_queue_size=w.queue_size,
            workers=w.count,
            handled=w.handled,
            forwarded=self._forwarded,
            rejected_overloaded=w.rejected,
            errors_returned=self._errors_returned,
            undeliverable=self._undeliverable,
            bad_signatures=self._bad_signatures,
            streams=self._streams.statistics(),
        )

    def _spawn(self, fn: Any, *args: Any, name: str | None = None) -> bool:
        """Start a task in the cell's group; False (nothing started) once shutting down."""
        if self._tg is None or not self._running:
            return False
        self._tg.start_soon(fn, *args, name=name)
        return True

    # ------------------------------------------------------------------ links
    async def _accept_loop(self, listener: Listener) -> None:
        while True:
            try:
                link = await listener.accept()
            except LinkClosed:
                return
            self._spawn(self._accept_one, link, name=f"{self.name} link {link.peer_address}")

    async def _accept_one(self, link: Link) -> None:
        try:
            with anyio.fail_after(self.handshake_timeout):
                session = await handshake_acceptor(link, self.name, self._hello, self.verify_peer)
        except (ProtocolError, TransportError, TimeoutError) as exc:
            late = isinstance(exc, TimeoutError)
            reason = "no hello in time" if late else str(exc)
            self.admission.refused["no hello in time" if late else type(exc).__name__] += 1
            self._log.warning("link refused", peer=link.peer_address, reason=reason)
            with anyio.CancelScope(shield=True):
                await link.aclose()
            return
        peer = Peer(link, session, self._clock())
        old = self._children.get(peer.name)
        if old is not None:
            # Last one wins: a reconnecting cell's old link is usually half-dead. If it is not
            # (two live cells claim one name), the displaced one is told so and stops retrying.
            self._log.warning("replacing link of reconnected cell", peer=peer.name)
            self._drop_peer(old, LinkClosed(f"{peer.name} reconnected on a new link"))
            await self._say_bye(old, f"{DISPLACED}: {peer.name} connected again on a new link")
        self._children[peer.name] = peer
        self._notify(peer, True)
        await self._serve(peer)

    async def _parent_loop(self, url: str, *, task_status: TaskStatus[None]) -> None:
        attempt = 0
        started = False
        driver = self.drivers.for_url(url)
        while True:
            try:
                link = await driver.connect(url, limits=self.limits)
                try:
                    with anyio.fail_after(self.handshake_timeout):
                        session = await handshake_connector(
                            link, self._hello("child"), self.verify_peer
                        )
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await link.aclose()
                    raise
            except (ProtocolError, TransportError, TimeoutError) as exc:
                delay = self.backoff.delay(attempt, self._rng)
                attempt += 1
                self._log.warning("cannot reach parent", url=url, error=str(exc), retry_in=delay)
                if not started:
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
                continue
            up_since = self._clock()
            peer = Peer(link, session, up_since)
            self._parent = peer
            self._notify(peer, True)
            assert self._parent_changed is not None
            self._parent_changed.set()
            self._parent_changed = anyio.Event()
            if not started:
                started = True
                task_status.started()
            ended = await self._serve(peer)
            if not self._running:
                return
            if isinstance(ended, _Displaced):
                self._log.error(
                    "displaced by another cell with our name; not reconnecting",
                    parent=url,
                    reason=str(ended),
                )
                return
            if self._clock() - up_since >= self.backoff.maximum:
                attempt = 0  # it was a good link: try again at once
            else:
                # A link that drops right after its hello must not make us redial in a tight
                # loop: keep backing off until a link stays up.
                delay = self.backoff.delay(attempt, self._rng)
                attempt += 1
                await anyio.sleep(delay)

    async def _serve(self, peer: Peer) -> TransportError:
        """Read frames from one link until it ends; then forget the peer.

        Returns:
            why the link ended.
        """
        error: TransportError = LinkClosed(f"link to {peer.name} closed")
        clock = self._clock
        peer.link.deliver_to(functools.partial(self._on_frame_now, peer))
        peer.link.pass_through(functools.partial(self._may_pass, peer))
        try:
            with peer.serving:  # cancelled by _give_up only, which says why in peer.dead
                while True:
                    frame = await peer.link.receive()
                    peer.last_rx = clock()
                    await self._on_frame(peer, frame)
        except LinkClosed as exc:
            # A link is closed on purpose only with a goodbye (either way); a connection that
            # just ends (a killed process, a crashed host) broke.
            if peer.orderly:
                error = exc
            else:
                error = LinkBroken(f"{peer.name} went away without a goodbye: {exc}")
                if peer.dead is None:
                    self._log.warning("link broke", peer=peer.name, error=str(error))
        except LinkBroken as exc:
            error = exc
            if peer.dead is None:
                self._log.warning("link broke", peer=peer.name, error=str(exc))
        except ProtocolError as exc:
            error = LinkBroken(f"protocol error from {peer.name}: {exc}")
            if peer.dead is None:
                self._log.warning("protocol error, closing link", peer=peer.name, error=str(exc))
        finally:
            if peer.dead is not None:
                # Given up (and aborted) by the heartbeat: what the link said since is moot.
                error = LinkBroken(peer.dead)
            peer.link.deliver_to(None)
            peer.link.pass_through(None)
            self._drop_peer(peer, error)
            with anyio.CancelScope(shield=True):
                await peer.link.aclose()  # after an abort: only releases what is left
        return error

    def _notify(self, peer: Peer, up: bool) -> None:
        if self.on_link is not None:
            try:
                self.on_link(peer.name, peer.role, up)
            except Exception as exc:  # an observer's failure must not take the link down
                self._log.error("on_link callback failed", peer=peer.name, exc_info=exc)

    def _drop_peer(self, peer: Peer, error: TransportError) -> None:
        if self._parent is peer:
            self._parent = None
            self._notify(peer, False)
        elif self._children.get(peer.name) is peer:
            del self._children[peer.name]
            self._notify(peer, False)
        for waiter in self._pending.via(peer):
            waiter.fail(type(error)(f"link to {peer.name} went down: {error}"))
        inflight, peer.inflight = peer.inflight, {}
        for fwd in inflight.values():
            self._answer_error_to(
                fwd.src,
                fwd.id,
                Status.LINK_BROKEN,
                f"link from {self.name} to {peer.name} went down: {error}",
            )

    async def _heartbeat_loop(self, interval: float) -> None:
        """Ping links that have been quiet for ``interval``; drop those quiet past
        ``dead_after``. Liveness is the link's: handlers run in workers, so long local work
        never stops a cell from answering pings."""
        seq = 0
        while True:
            await anyio.sleep(interval)
            now = self._clock()
            for peer in self._peers():
                quiet = now - peer.last_rx
                if quiet >= self.dead_after:
                    self._log.warning(
                        "peer unresponsive, dropping link", peer=peer.name, quiet=quiet
                    )
                    self._give_up(peer, f"no frame from {peer.name} for {quiet:.1f} s")
                elif quiet >= interval:
                    seq += 1
                    with contextlib.suppress(TransportError, ProtocolError):
                        ping = Frame(Ping(seq=seq))
                        if not peer.link.try_send(ping):
                            self._spawn(self._send_within, peer, ping, interval)

    def _give_up(self, peer: Peer, why: str) -> None:
        """Drop a link that went silent, now, whatever the network does.

        The link is aborted, not closed: a goodbye, a drain, a TLS ``close_notify`` or a
        WebSocket closing handshake would each wait for the network that went silent (an
        accepted ``ws://`` link woke its reader only once its close frame was written, after
        the driver's ``close_timeout``). The peer is forgotten and every request waiting on the
        link fails with ``LinkBroken`` here, not when its reader notices; the reader is
        cancelled, so a parent link's loop starts reconnecting at once. Never blocks: the
        heartbeat goes on to the other links.
        """
        peer.dead = why
        peer.link.abort()
        self._drop_peer(peer, LinkBroken(why))
        peer.serving.cancel()

    async def _pong(self, peer: Peer, pong: Frame) -> None:
        try:
            await self._send_within(peer, pong, self.dead_after)
        finally:
            peer.ponging = False

    @staticmethod
    async def _send_within(peer: Peer, frame: Frame, within: float) -> None:
        """Send a link-control frame if the link takes it within ``within``; else forget it."""
        with anyio.move_on_after(within), contextlib.suppress(TransportError, ProtocolError):
            await peer.link.send(frame)

    # ------------------------------------------------------------------ inbound
    def _on_frame_now(self, peer: Peer, frame: Frame) -> bool:
        """Handle a frame for this cell straight from the link's read callback (see
        ``Link.deliver_to``): replies, errors, requests and events addressed here never
        wait. Anything else (forwarding, pings, goodbyes, a frame that breaks the rules)
        is declined and goes through :meth:`_on_frame` in the serving task."""
        h = frame.header
        if not isinstance(h, _ROUTED) or h.dst != self.name or not self._src_fits(peer, h.src):
            return False
        peer.last_rx = self._clock()
        if isinstance(h, _ANSWERS) and peer.inflight:
            peer.inflight.pop((h.dst, h.corr), None)
        self._deliver(frame)
        return True

    async def _on_frame(self, peer: Peer, frame: Frame) -> None:
        h = frame.header
        if isinstance(h, _ROUTED):
            if not self._src_fits(peer, h.src):
                raise ProtocolError(
                    f"{peer.name} sent a message from {h.src!r}, which cannot come that way",
                    peer=peer.name,
                )
            if isinstance(h, _ANSWERS) and peer.inflight:
                peer.inflight.pop((h.dst, h.corr), None)
            if h.dst == self.name:
                self._deliver(frame)
            else:
                await self._forward(frame, peer.link)
        elif isinstance(h, Ping):
            # Never waits: a link that does not drain must not stop its own reader. One pong at
            # most waits for room per link; pings meanwhile go unanswered (that one will do).
            pong = Frame(Pong(seq=h.seq))
            if not peer.link.try_send(pong) and not peer.ponging:
                peer.ponging = self._spawn(self._pong, peer, pong)
        elif isinstance(h, Bye):
            cls = _Displaced if h.reason.startswith(DISPLACED) else LinkClosed
            peer.orderly = True
            raise cls(f"{peer.name} said goodbye: {h.reason}")
        elif isinstance(h, Pong):
            pass
        else:
            raise ProtocolError(f"unexpected {type(h).__name__} on an open link", peer=peer.name)

    def _may_report(self, src: str, waiter: Waiter) -> bool:
        """Only cells on the request's path may fail it: the destination, the relays between
        (every one is an ancestor of this cell or of the destination), or the first hop."""
        dst = waiter.dst
        return (
            src == dst
            or dst.startswith(src + ".")
            or self.name.startswith(src + ".")
            or (isinstance(waiter.via, Peer) and waiter.via.name == src)
        )

    def _src_fits(self, peer: Peer, src: str) -> bool:
        """Whether a message from ``src`` may arrive over ``peer``'s link.

        From a child, only its own subtree speaks; from the parent or a peer, anyone but our own
        subtree. With mTLS binding each link to a name, no cell can pose as another this way.
        """
        if peer.role == "child":
            return src == peer.name or src.startswith(peer.name + ".")
        me = self.name
        return src != me and not src.startswith(me + ".")

    def _deliver(self, frame: Frame) -> None:
        h = frame.header
        if isinstance(h, STREAM_KINDS):
            self._streams.on_frame(frame)
            return
        if self.signing is not None and isinstance(h, _ROUTED) and h.src != self.name:
            bad = check_signature(self.signing, frame)
            if bad is not None:
                self._refuse_unsigned(frame, bad)
                return
        if isinstance(h, Reply):
            waiter = self._pending.get(h.corr)
            if waiter is not None and waiter.dst == h.src:
                waiter.resolve(Payload.received(frame.parts, h.codec, h.headers))
            return
        if isinstance(h, Error):
            waiter = self._pending.get(h.corr)
            if waiter is not None and self._may_report(h.src, waiter):
                waiter.fail(error_for_status(h.status, h.message, h.src))
            else:
                self._log.info(
                    "error report for a message no longer waited on",
                    reported_by=h.src,
                    status=h.status,
                    message=h.message,
                )
            return
        assert isinstance(h, _CALLS)
        deadline = self._clock() + h.budget if h.budget is not None else math.inf
        if h.budget is not None and h.budget <= 0:
            self._answer_error(h, Status.DEADLINE_EXCEEDED, "deadline passed before delivery")
            return
        assert self._dispatch is not None
        kind = Kind.REQUEST if isinstance(h, Request) else Kind.EVENT
        fn = self._dispatch.admit(kind, h.src, h.channel, h.topic, accept=self.accept, me=self.name)
        if isinstance(fn, tuple):
            self._answer_error(h, *fn)
            return
        payload = Payload.received(frame.parts, h.codec, h.headers)
        if not self._workers.submit(Job(h, payload, fn, deadline)):
            self._answer_error(h, Status.OVERLOADED, f"{self.name} handler queue is full")

    def _may_pass(self, peer: Peer, h: Envelope, size: int) -> bool:
        """Whether a large frame arriving from ``peer`` may pass through unread: it is on its
        way to another cell whose link splices (``Link.pass_through``). Called by the parser;
        never raises."""
        if not isinstance(h, _ROUTED) or h.dst == self.name:
            return False
        try:
            hop = self._next_peer(h.dst)
        except Exception:
            return False
        return hop is not None and hop is not peer and hop.link.splices

    def _refuse_unsigned(self, frame: Frame, why: IntegrityError) -> None:
        """A message whose signature failed: a request is answered with the error, an answer
        fails the request it claims to answer (a relay could as well have dropped it)."""
        h = frame.header
        assert isinstance(h, _ROUTED)
        self._bad_signatures += 1
        self._log.warning(
            "message refused: bad signature", kind=type(h).__name__, src=h.src, reason=str(why)
        )
        if isinstance(h, Request):
            self._answer_error(h, Status.INTEGRITY, str(why))
        elif isinstance(h, _ANSWERS):
            waiter = self._pending.get(h.corr)
            if waiter is not None and waiter.dst == h.src:
                waiter.fail(why)

    def _seal(self, frame: Frame) -> Frame:
        if self.signing is not None:
            seal_message(self.signing, frame)
        return frame

    async def _forward(self, frame: Frame, src: Link) -> None:
        h = frame.header
        assert isinstance(h, _ROUTED)
        try:
            check_route(self.name, h.route, self.limits.max_route)
            if h.budget is not None and h.budget <= 0:
                self._answer_error(h, Status.DEADLINE_EXCEEDED, f"deadline passed at {self.name}")
                return
            hop = self._next_peer(h.dst)
            assert hop is not None  # not LOCAL: we only forward what is not ours
            # The deadline on this cell's clock; the link stamps what is left of it as it
            # writes the header, so time spent waiting for it here counts.
            out = msgspec.structs.replace(h, route=[*h.route, self.name])
            deadline = math.inf if h.budget is None else self._clock() + h.budget
            expires = None if h.budget is None else deadline
            passing = frame if isinstance(frame, Passing) else None
            if passing is not None and not hop.link.splices:  # the route changed meanwhile
                frame, passing = await src.take_passing(passing), None
            fwd = None
            if isinstance(h, Request):
                # Recorded before sending: the answer may come back before the send returns.
                fwd = Forwarded(h.src, h.id, hop.inflight)
                hop.inflight[(h.src, h.id)] = fwd
            try:
                await self._send_via(hop, Frame(out, frame.parts, expires), deadline, passing, src)
            except BaseException:
                if fwd is not None:
                    fwd.expire()
                raise
            self._forwarded += 1
            if fwd is not None and deadline != math.inf:
                self._timer.add(deadline, fwd)
        except DeadlineExceeded:
            self._answer_error(h, Status.DEADLINE_EXCEEDED, f"deadline passed at {self.name}")
        except Unreachable as exc:
            self._answer_error(h, Status.UNREACHABLE, str(exc))
        except (TransportError, ProtocolError) as exc:
            self._answer_error(h, Status.LINK_BROKEN, f"{self.name} could not forward: {exc}")

    def _next_peer(self, dst: str) -> Peer | None:
        hop = next_hop(self.name, dst, self._children, self._parent is not None)
        if hop == LOCAL:
            return None
        if hop == PARENT:
            assert self._parent is not None
            return self._parent
        return self._children[hop]

    def _answer_error(self, h: Routed, status: Status, message: str) -> None:
        """Tell the origin its message failed here; errors about replies/errors are dropped.
        A stream's sender hears of it as a stream abort from this cell, and resumes later."""
        if isinstance(h, _TO_RECEIVER):
            self._streams.trouble(h, status, message)
            return
        if not isinstance(h, _CALLS):
            self._undeliverable += 1
            self._log.info(
                "dropping undeliverable answer",
                kind=type(h).__name__,
                src=h.src,
                dst=h.dst,
                reason=message,
            )
            return
        self._answer_error_to(h.src, h.id, status, message)

    def _answer_error_to(
        self, dst: str, corr: int, status: Status, message: str, budget: float | None = None
    ) -> None:
        """Send an error report without waiting when the link has room; otherwise in a task,
        of which at most ``_MAX_ANSWER_TASKS`` run at once (a peer that stops reading must not
        make the cell pile up tasks: beyond that, reports are dropped and counted)."""
        self._errors_returned += 1
        err = originate(
            Error,
            next(self._ids),
            self.name,
            dst,
            budget=budget,
            corr=corr,
            status=int(status),
            message=message,
        )
        self._post(self._seal(Frame(err)))

    def _post(self, frame: Frame) -> None:
        """Send a small frame that nobody waits for (error reports, stream acks): at once when
        the link has room, otherwise in a task, of which at most ``_MAX_ANSWER_TASKS`` run at
        once. Failures are counted and logged, never raised."""
        h = frame.header
        assert isinstance(h, _ROUTED)
        try:
            hop = self._next_peer(h.dst)
            if hop is None:
                self._deliver(frame)
                return
            if hop.link.try_send(frame):
                return
        except (Unreachable, TransportError, ProtocolError) as exc:
            self._undeliverable += 1
            self._log.info("report could not be sent", dst=h.dst, error=str(exc))
            return
        if self._answer_tasks >= _MAX_ANSWER_TASKS or not self._spawn(self._answer_task, frame):
            self._undeliverable += 1
            return
        self._answer_tasks += 1

    async def _answer_task(self, frame: Frame) -> None:
        try:
            await self._send_answer(frame)
        finally:
            self._answer_tasks -= 1

    async def _send_to(self, dst: str, frame: Frame) -> None:
        """Route a frame this cell originates to ``dst`` and send it, waiting for room (at most
        as long as a silent link is given to live).

        Raises:
            Unreachable / TransportError / DeadlineExceeded: it could not be sent.
        """
        hop = self._next_peer(dst)
        if hop is None:
            self._deliver(frame)
        else:
            await self._send_via(hop, frame, math.inf)

    async def _send_answer(self, frame: Frame) -> None:
        """Route a reply or error back to its origin; failures are logged, never raised."""
        h = frame.header
        assert isinstance(h, _ROUTED)
        try:
            hop = self._next_peer(h.dst)
            if hop is None:
                self._deliver(frame)
            else:
                deadline = math.inf if h.budget is None else self._clock() + h.budget
                await self._send_via(hop, frame, deadline)
        except (Unreachable, TransportError, ProtocolError, DeadlineExceeded) as exc:
            self._undeliverable += 1
            self._log.info("answer could not be sent", dst=h.dst, error=str(exc))

    # ------------------------------------------------------------------ outbound
    def _check_running(self) -> None:
        if not self._running:
            raise CellClosed(f"cell {self.name} is not running")

    async def _send_via(
        self,
        peer: Peer,
        frame: Frame,
        deadline: float,
        passing: Passing | None = None,
        src: Link | None = None,
    ) -> None:
        """Send on one link without waiting if it has room, else wait until ``deadline``.
        With ``passing``, the rest of the payload comes from ``src`` unread (``send_passing``).

        Raises:
            DeadlineExceeded: the link stayed full until the deadline.
        """
        link = peer.link
        if passing is None and link.try_send(frame):
            return
        # Even a message without a deadline waits for room at most as long as a silent link is
        # given to live: a link that takes nothing for that long is as good as dead.
        deadline = min(deadline, self._clock() + self._send_cap)
        with anyio.CancelScope(deadline=deadline) as scope:
            if passing is None:
                await link.send(frame)
            else:
                assert src is not None
                await link.send_passing(frame, passing, src)
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"link to {peer.name} stayed full until the deadline")

    async def _send_out(self, frame: Frame, deadline: float, waiter: Waiter | None = None) -> None:
        """Send a frame this cell originates. A request's waiter learns the link it leaves on
        before the send, so a link that drops meanwhile fails it at once."""
        h = frame.header
        assert isinstance(h, _CALLS)
        hop = self._next_peer(h.dst)
        if waiter is not None:
            waiter.via = hop
        if hop is None:
            self._deliver(frame)
        else:
            await self._send_via(hop, frame, deadline)

    def _timeout(self, timeout: float | object | None) -> float | None:
        value = self.default_timeout if timeout is _DEFAULT else timeout
        if value is not None and not isinstance(value, int | float):
            raise ConfigError(f"timeout must be a number of seconds or None, not {value!r}")
        return value

    async def request(
        self,
        dst: str,
        channel: str,
        topic: str,
        payload: Payload | Buffer | None = None,
        *,
        timeout: float | Any | None = _DEFAULT,
        headers: Mapping[str, str] | None = None,
    ) -> Payload:
        """Send a request and wait for its reply.

        Args:
            dst: destination cell name.
            channel / topic: what to address at the destination.
            payload: the request body.
            timeout: seconds until the deadline, which travels with the message and is enforced
                at every hop and at the handler; ``None`` for none. Defaults to the cell's.
            headers: extension headers (override the payload's).

        Returns:
            The reply payload.

        Raises:
            Unreachable: no route to ``dst`` (reported at once, by this or a relaying cell).
            DeadlineExceeded: no reply before the deadline.
            RemoteError: the destination answered with an error (``NoHandler``,
                ``InternalError``, ``BadRequest``, ``Overloaded``...).
            TransportError: the link the request left on closed or broke before the reply.
            CellClosed: this cell is not running.
            InvalidName: ``dst`` is not a valid cell name.

        Cancelling the caller abandons the request; a reply arriving later is dropped.
        """
        self._check_running()
        validate_name(dst)
        body = as_payload(payload)
        budget = self._timeout(timeout)
        if budget is not None and budget <= 0:
            raise DeadlineExceeded(f"request to {dst} has no time left (timeout {budget})")
        msg_id = next(self._ids)
        hdrs = dict(headers) if headers is not None else dict(body.headers)
        header = originate(
            Request,
            msg_id,
            self.name,
            dst,
            budget=budget,
            headers=hdrs,
            channel=channel,
            topic=topic,
            codec=body.codec,
        )
        waiter = Waiter(dst, f"{channel}/{topic}")
        self._pending.add(msg_id, waiter)
        try:
            if budget is None:
                deadline = math.inf
            else:
                deadline = self._clock() + budget
                self._timer.add(deadline, waiter)
            frame = Frame(header, body.parts, None if budget is None else deadline)
            await self._send_out(self._seal(frame), deadline, waiter)
            await waiter.done.wait()
        finally:
            self._pending.pop(msg_id)
            waiter.done.set()  # an abandoned waiter is no longer live for the timer
        # The deadline timer may hold the waiter until its deadline: keep no payload alive.
        reply, waiter.reply = waiter.reply, None
        if reply is not None:
            return reply
        assert waiter.error is not None
        raise waiter.error

    async def send_event(
        self,
        dst: str,
        channel: str,
        topic: str,
        payload: Payload | Buffer | None = None,
        *,
        timeout: float | Any | None = _DEFAULT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a one-way event. Returns once the first hop has taken it.

        A failure further on (no route, no handler, overloaded) comes back as an error report
        that this cell logs; events are at-most-once.

        Raises:
            Unreachable: no route from this cell.
            TransportError: the first hop's link failed.
            CellClosed: this cell is not running.
            InvalidName: ``dst`` is not a valid cell name.
        """
        self._check_running()
        validate_name(dst)
        body = as_payload(payload)
        budget = self._timeout(timeout)
        hdrs = dict(headers) if headers is not None else dict(body.headers)
        header = originate(
            Event,
            next(self._ids),
            self.name,
            dst,
            budget=budget,
            headers=hdrs,
            channel=channel,
            topic=topic,
            codec=body.codec,
        )
        deadline = math.inf if budget is None else self._clock() + budget
        frame = Frame(header, body.parts, None if budget is None else deadline)
        await self._send_out(self._seal(frame), deadline)

    async def broadcast(
        self,
        dsts: Iterable[str],
        channel: str,
        topic: str,
        payload: Payload | Buffer | None = None,
        *,
        timeout: float | Any | None = _DEFAULT,
        headers: Mapping[str, str] | None = None,
    ) -> BroadcastResults:
        """Send one request to many cells at once and collect every outcome.

        The payload buffers are shared by all the requests (encoded once). A target that fails
        is a result, not an exception for all: each name maps to its reply :class:`Payload`
        or to the :class:`~flare_async.errors.FlareError` it ended with.
        """
        self._check_running()
        body = as_payload(payload)
        results = BroadcastResults.fromkeys(dsts)

        async def one(dst: str) -> None:
            try:
                results[dst] = await self.request(
                    dst, channel, topic, body, timeout=timeout, headers=headers
                )
            except FlareError as exc:
                results[dst] = exc

        async with anyio.create_task_group() as tg:
            for dst in results:
                tg.start_soon(one, dst)
        return results  # type: ignore[return-value]
