"""The Cell: the one kind of participant. Server, relay and edge differ only in handlers and URLs.

A thin façade over the parts it composes, each owning one thing:

* :class:`~flare_async.cell._router.Router` — peers, pending requests, the deadline timer,
  ids, the task group; routes every frame (here, a hop on, or an error to the origin);
* :class:`~flare_async.cell._upkeep.LinkKeeper` — listeners, the parent link, a reader per
  link, the heartbeat;
* :class:`~flare_async.cell._dispatch.Workers` — the handler pool (bounded queue);
* :class:`~flare_async.cell._stream_in.StreamHub` — every stream, in and out.

The workers and the hub reach the router only through its narrow port
(:class:`~flare_async.cell._port.Port`); the outbound API comes from two mixins,
``_calls.py`` (request, event, broadcast) and ``_stream_api.py`` (streams). No threads.

Reading a link never waits for a handler: a request that finds the handler queue full is
answered :class:`~flare_async.errors.Overloaded` right away, so replies on the same link keep
flowing and a slow handler cannot deadlock a call chain.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import sniffio

from flare_async.cell._api import CellStatistics
from flare_async.cell._calls import BroadcastResults, CallsMixin, Outcome
from flare_async.cell._dispatch import Workers
from flare_async.cell._handlers import Dispatch, HandlerTable
from flare_async.cell._inline import INLINE_MAX
from flare_async.cell._links import LINK_VOUCHES, Backoff, HelloFactory, PeerVerifier
from flare_async.cell._payload import Payload
from flare_async.cell._router import Router
from flare_async.cell._signing import MessageSigner
from flare_async.cell._signing import vouching as signing_vouches
from flare_async.cell._stream_api import StreamingMixin
from flare_async.cell._stream_in import StreamHub
from flare_async.cell._system import routing_handlers as _routing_handlers
from flare_async.cell._upkeep import LinkKeeper
from flare_async.codecs import CodecRegistry
from flare_async.errors import ConfigError
from flare_async.routing import validate_name
from flare_async.transport import Admission, Driver, DriverRegistry
from flare_async.wire import Limits


def backend_clock() -> Callable[[], float]:
    """The running event loop's clock, bound once (``anyio.current_time`` looks the backend up
    on every call, which shows on the hot path). Trio's clock honours ``MockClock``."""
    if sniffio.current_async_library() == "trio":
        import trio  # noqa: PLC0415 - only when running on trio

        return trio.current_time
    return asyncio.get_running_loop().time


class Cell(CallsMixin, StreamingMixin):
    """A participant of the fabric.

    Args:
        name: this cell's place in the tree, e.g. ``server.eu.site-3``.
        listen: URLs to accept links on (children and peers connect here).
        parent: URL of the parent cell to connect to (``None`` for a root).
        peers: URLs of peer cells (of other branches: another site) to keep direct links
            to; a message for a peer (or a cell below it) takes its link instead of going up
            the tree (swarm and cyclic training pass models site to site over them).
        handlers: handler tables to mount (frozen at start).
        routing_handlers: also serve what the fabric's routing features need of every cell
            (``sys/fanout``: a relay's part of :meth:`stream_many`); a handler in
            ``handlers`` for the same kind, channel and topic (or its channel's ``*``) wins.
            ``False``: only ``handlers``.
        drivers: transports, e.g. a shared :class:`~flare_async.MemoryNetwork`. A scheme of
            ``listen`` or ``parent`` that none of them serves gets its built-in driver:
            ``tcp://``/``tls://`` a :class:`~flare_async.transport.TcpDriver`, ``ws://``/
            ``wss://`` a :class:`~flare_async.transport.WebSocketDriver`, with the contexts
            below; any other scheme (``memory://`` too: it needs its network) must be served
            here, else :class:`~flare_async.errors.UnsupportedScheme`, naming what exists.
        server_tls: the TLS context the built-in drivers listen on ``tls://`` and ``wss://``
            with (mutual TLS: require client certificates; ``security.server_context(kit)``).
        client_tls: the TLS context they dial ``tls://`` and ``wss://`` with
            (``security.client_context(kit)``).
        limits: wire limits (max header, max frame, max route).
        default_timeout: deadline of a request when the caller gives none (``None``: none).
        max_concurrency: most handlers running at once.
        idle_workers: handler tasks kept waiting while there is no work (default
            ``max_concurrency``: the pool never shrinks, and a burst finds its tasks ready).
            ``0``: an idle cell holds none, and a request starts one (a simulation's 100,000
            sites each answer one task a round).
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
        inline_max: objects in memory of at most this many bytes that this cell streams go
            whole in one request instead (:meth:`stream`'s ``inline``; ``0``: never). Default:
            64 KiB (:data:`INLINE_MAX`), and ``0`` for a cell with ``signing``: its streams
            keep the end-to-end signatures of the FL layer as they are, and a relay that cannot
            tell an admin session's identity (only the server maps it) would refuse its
            signed requests. The attribute of that name may be changed while the cell runs.

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
        peers: Sequence[str] = (),
        handlers: Iterable[HandlerTable] = (),
        drivers: Iterable[Driver] = (),
        limits: Limits | None = None,
        default_timeout: float | None = 30.0,
        max_concurrency: int = 256,
        idle_workers: int | None = None,
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
        inline_max: int | None = None,
        codecs: CodecRegistry | None = None,
        signing: MessageSigner | None = None,
        admission: Admission | None = None,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
        routing_handlers: bool = True,
    ) -> None:
        self.name = validate_name(name)
        self.limits = limits or Limits()
        self.default_timeout = default_timeout
        if heartbeat is not None and heartbeat <= 0:
            raise ConfigError("heartbeat must be a positive number of seconds or None")
        if parent is not None and "." not in self.name:
            raise ConfigError(f"{self.name!r} is a root name and cannot have a parent")
        self.heartbeat = heartbeat
        self.dead_after = dead_after or (3 * heartbeat if heartbeat else math.inf)
        self.admission = admission or Admission(timeout=handshake_timeout)
        registry = DriverRegistry.for_cell(
            drivers,
            listen=listen,
            dial=((parent,) if parent is not None else ()) + tuple(peers),
            server_tls=server_tls,
            client_tls=client_tls,
        )
        self.codecs = codecs or CodecRegistry()
        """The codecs this cell encodes and decodes; advertised in its hello."""
        self._tables = list(handlers)
        self._routing_handlers = routing_handlers
        self._router = router = Router(
            self.name,
            self.limits,
            signing=signing,
            accept=accept,
            on_link=on_link,
            seed=seed,
            dead_after=self.dead_after,
        )
        self._log = router.log
        self._workers = Workers(router, self, max_concurrency, queue_size, idle_workers)
        if inline_max is None:
            inline_max = INLINE_MAX if signing is None else 0
        if inline_max < 0:
            raise ConfigError("inline_max must not be negative")
        self.inline_max = inline_max
        self._streams = StreamHub(router, self, max_incoming=max_streams, idle=stream_idle)
        router.attach(self._workers, self._streams)
        vouching = frozenset({LINK_VOUCHES}) if verify_peer is not None else frozenset()
        hello = HelloFactory(
            self.name,
            self.limits,
            self.codecs.capabilities(),
            heartbeat or 0.0,
            extra=lambda: vouching if signing_vouches(self._router.signing) else frozenset(),
        )
        self._links = LinkKeeper(
            router,
            registry,
            hello,
            listen=listen,
            parent=parent,
            peers=peers,
            handshake_timeout=handshake_timeout,
            admission=self.admission,
            backoff=backoff or Backoff(),
            verify_peer=verify_peer,
            heartbeat=heartbeat,
        )
        self.listen_urls = self._links.listen_urls
        """URLs actually listened on, available once the cell has started."""

    # ------------------------------------------------------------------ lifecycle
    def mount(self, table: HandlerTable) -> None:
        """Add a handler table before the cell starts.

        Raises:
            ConfigError: the cell already started (tables are frozen then).
        """
        if self._router.dispatch is not None:
            raise ConfigError("handler tables are frozen once the cell has started")
        self._tables.append(table)

    async def __aenter__(self) -> Self:
        if self._router.dispatch is not None:
            raise ConfigError("a Cell can be started only once")
        defaults = [_routing_handlers()] if self._routing_handlers else []
        dispatch = Dispatch(self._tables, defaults)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._router.start(tg, backend_clock(), dispatch)
        try:
            await self._links.start(tg)
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
        router = self._router
        router.stop()
        tg, router.tg = router.tg, None
        assert tg is not None
        await self._links.close()
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)

    def _spawn(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str | None = None
    ) -> bool:
        """Start a task in the cell's group; False (nothing started) once shutting down."""
        return self._router.spawn(fn, *args, name=name)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self._router.running

    @property
    def parent_name(self) -> str | None:
        """The connected parent's name, or ``None`` while not connected."""
        parent = self._router.parent
        return parent.name if parent else None

    @property
    def children(self) -> list[str]:
        """Names of the cells connected below (and peers)."""
        return sorted(self._router.children)

    @property
    def signing(self) -> MessageSigner | None:
        """What signs the messages this cell originates and checks those addressed to it."""
        return self._router.signing

    @signing.setter
    def signing(self, value: MessageSigner | None) -> None:
        self._router.signing = value

    @property
    def on_link(self) -> Callable[[str, str, bool], None] | None:
        """Called with ``(peer, role, up)`` when a link comes up or goes down."""
        return self._router.on_link

    @on_link.setter
    def on_link(self, value: Callable[[str, str, bool], None] | None) -> None:
        self._router.on_link = value

    @property
    def drivers(self) -> DriverRegistry:
        """The transports this cell listens and connects with."""
        return self._links.drivers

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
        router = self._router
        peer = router.parent if router.parent and router.parent.name == name else None
        peer = peer or router.children.get(name)
        if peer is None:
            return frozenset()
        caps = peer.session.capabilities
        return frozenset(c.removeprefix("codec:") for c in caps if c.startswith("codec:"))

    async def wait_parent(self) -> None:
        """Wait until the link to the parent is up (returns at once if it is)."""
        self._check_running()
        router = self._router
        while router.parent is None:
            if router.parent_changed is None:
                router.parent_changed = anyio.Event()
            await router.parent_changed.wait()

    def statistics(self) -> CellStatistics:
        router, w = self._router, self._workers
        return CellStatistics(
            name=self.name,
            children=len(router.children),
            has_parent=router.parent is not None,
            pending_requests=len(router.pending),
            handlers_busy=w.busy,
            handler_queue_size=w.queue_size,
            workers=w.count,
            handled=w.handled,
            forwarded=router.forwarded,
            rejected_overloaded=w.rejected,
            errors_returned=router.errors_returned,
            undeliverable=router.undeliverable,
            bad_signatures=router.bad_signatures,
            backlog=router.backlogs.frames,
            streams=self._streams.statistics(),
        )


__all__ = ["BroadcastResults", "Cell", "CellStatistics", "Outcome", "backend_clock"]
