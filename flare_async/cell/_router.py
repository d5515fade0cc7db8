"""The router of a cell: it owns the peers, the pending requests, the deadline timer, message
ids and the cell's task group, and routes every frame.

Every message that arrives is either for this cell (dispatched to a handler, the stream hub,
or resolving a request) or forwarded one hop on, by the routing rule, with its payload
untouched. Failures are answered to the origin at once with an ``Error`` frame: unknown
destinations, routing loops, exhausted hop budgets, expired deadlines, missing handlers, full
queues.

Sending has one rule, "next hop, or deliver here", with two policies: :meth:`Router.send`
waits for room on the link (until the frame's deadline), :meth:`Router.post` never waits
(small frames nobody waits for: error reports, stream acks). The handler workers and the
stream hub reach the router only through :class:`~flare_async.cell._port.Port`; the link
upkeep (``_upkeep.py``) feeds it the frames each link reads.

(About 600 lines, past the house's 500: inbound, forwarding and outbound routing share one
state — the peers and the requests in flight over them — and splitting them would put that
state behind yet another interface. What could leave without it went: the link upkeep
(``_upkeep.py``), the backlogs of full links (``_backlog.py``), the calls (``_calls.py``).)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

import anyio
import msgspec
from anyio.abc import TaskGroup

from flare_async import _logging
from flare_async.cell._backlog import DEFAULT_BACKLOG, Backlogs
from flare_async.cell._deadlines import DeadlineTimer, Expirable
from flare_async.cell._dispatch import Job, Workers
from flare_async.cell._handlers import AnyHandler, Dispatch, Kind
from flare_async.cell._inline import INLINE_HEADER, inline_handler, read_info
from flare_async.cell._links import DISPLACED, Displaced, Forwarded, Peer
from flare_async.cell._payload import Payload
from flare_async.cell._rpc import PendingTable, Waiter
from flare_async.cell._signing import MessageSigner, came_unsigned, goes_unsigned
from flare_async.cell._signing import check as check_signature
from flare_async.cell._signing import seal as seal_message
from flare_async.cell._stream_in import StreamHandler, StreamHub, stream_origin
from flare_async.errors import (
    BadRequest,
    CellClosed,
    DeadlineExceeded,
    IntegrityError,
    LinkClosed,
    ProtocolError,
    Status,
    TransportError,
    Unreachable,
    error_for_status,
)
from flare_async.routing import LOCAL, PARENT, check_route, next_hop
from flare_async.transport import Link
from flare_async.wire import (
    ROUTED_KINDS,
    STREAM_KINDS,
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

_ROUTED: Final = ROUTED_KINDS
_SHARED_RNG = random.Random()
_TO_RECEIVER: Final = (StreamOpen, StreamData, StreamEnd)
_CALLS: Final = (Request, Event)
_ANSWERS: Final = (Reply, Error)
_FORWARD_ERRORS: Final = (DeadlineExceeded, Unreachable, TransportError, ProtocolError)
"""What a relay reports to the origin when it cannot pass a frame on."""
MAX_ANSWER_TASKS: Final = 1024
"""Most tasks waiting to send error reports at once; beyond, reports are dropped and counted."""


def _no_clock() -> float:
    raise CellClosed("the cell has not started")


class Router:
    """Routes the frames of one cell (see the module text).

    Args:
        name: the cell's name.
        limits: its wire limits.
        signing: signs what the cell originates and checks what is addressed to it.
        accept: ``(origin, channel, topic) -> bool``, the cell's policy for its handlers.
        on_link: called with ``(peer, role, up)`` when a link comes up or goes down.
        seed: seed of the jitter generator.
        dead_after: how long a link may stay silent; also the longest a send waits for room
            on a link (60 s when it is infinite), whatever the deadline.
        backlog_limit: bytes of payload forwarded to one peer that may wait for its link
            (then the reader waits: backpressure); a full link never holds up other links
            below that. All peers' backlogs together hold at most 16 times as much.
    """

    def __init__(
        self,
        name: str,
        limits: Limits,
        *,
        signing: MessageSigner | None,
        accept: Callable[[str, str, str], bool] | None,
        on_link: Callable[[str, str, bool], None] | None,
        seed: int | None,
        dead_after: float,
        backlog_limit: int = DEFAULT_BACKLOG,
    ) -> None:
        self.name = name
        self.limits = limits
        self.signing = signing
        self.accept = accept
        self.on_link = on_link
        self.dead_after = dead_after
        self.send_cap = dead_after if math.isfinite(dead_after) else 60.0
        self.log: Any = _logging.get_logger(cell=name)
        self.clock: Callable[[], float] = _no_clock
        """The event loop's clock, bound at start (``backend_clock``)."""
        self.timer = DeadlineTimer(self._now)
        # A generator each only where a seed asks for reproducible jitter: the state is 2.5 KB,
        # and 100,000 simulated sites take no seed.
        self.rng = _SHARED_RNG if seed is None else random.Random(seed)
        # Ids start at random: a late answer from before a restart, or a guessed id, must not
        # match a new request.
        self._ids = itertools.count(secrets.randbits(48))
        self.pending = PendingTable()
        self.children: dict[str, Peer] = {}
        self.parent: Peer | None = None
        self.parent_changed: anyio.Event | None = None
        self.tg: TaskGroup | None = None
        self.running = False
        self.dispatch: Dispatch | None = None
        self.workers: Workers | None = None
        self.streams: StreamHub | None = None
        self.forwarded = 0
        self.errors_returned = 0
        self.undeliverable = 0
        self.bad_signatures = 0
        self.answer_tasks = 0
        self.backlogs = Backlogs(
            name, self._now, self.spawn, self._send_via, self._backlog_failed, backlog_limit
        )

    def attach(self, workers: Workers, streams: StreamHub) -> None:
        """Where messages for this cell go: calls to the workers, stream frames to the hub."""
        self.workers = workers
        self.streams = streams

    def start(self, tg: TaskGroup, clock: Callable[[], float], dispatch: Dispatch) -> None:
        """Run in ``tg`` (the cell's task group) on ``clock``, with the frozen handlers."""
        self.tg = tg
        self.clock = clock
        self.dispatch = dispatch
        self.running = True
        tg.start_soon(self.timer.run, name=f"{self.name} deadlines")

    def stop(self) -> None:
        """Shutting down: fail every waiting request and every stream; start nothing more."""
        self.running = False
        for waiter in self.pending.all():
            waiter.fail(CellClosed(f"cell {self.name} is shutting down"))
        if self.streams is not None:
            self.streams.close()

    def set_parent(self, peer: Peer) -> None:
        self.parent = peer
        self.notify(peer, True)
        if self.parent_changed is not None:  # made by a waiter (600 B a cell otherwise)
            self.parent_changed.set()
            self.parent_changed = None

    # ------------------------------------------------------------------ the port
    def _now(self) -> float:
        return self.clock()

    def next_id(self) -> int:
        return next(self._ids)

    def random(self) -> float:
        return self.rng.random()

    def spawn(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str | None = None
    ) -> bool:
        if self.tg is None or not self.running:
            return False
        self.tg.start_soon(fn, *args, name=name)
        return True

    def expire_at(self, deadline: float, item: Expirable) -> None:
        self.timer.add(deadline, item)

    def seal(self, frame: Frame) -> Frame:
        """Sign (or MAC) a message this cell originates, unless it goes straight to a peer
        whose verified link vouches for it (``LINK_VOUCHES``)."""
        signing = self.signing
        if signing is not None:
            h = frame.header
            parent = self.parent
            dst = getattr(h, "dst", "")
            peer = parent if parent is not None and parent.name == dst else self.children.get(dst)
            seal_message(signing, frame, bare=goes_unsigned(signing, h, peer))
        return frame

    def admit(
        self, kind: Kind, src: str, channel: str, topic: str
    ) -> AnyHandler | tuple[Status, str]:
        if self.dispatch is None:  # not started: nothing is mounted yet
            return Status.NO_HANDLER, "no handlers yet"
        return self.dispatch.admit(kind, src, channel, topic, accept=self.accept, me=self.name)

    def _admit_inline(self, h: Request) -> AnyHandler | tuple[Status, str]:
        """A small object sent whole in one request (``_inline``): admitted as a stream, by
        its origin, and run by the stream handler."""
        try:
            info = read_info(h)
        except BadRequest as exc:
            return Status.BAD_REQUEST, str(exc)
        origin = stream_origin(self.name, h.src, info.headers)
        fn = self.admit(Kind.STREAM, origin, h.channel, h.topic)
        if isinstance(fn, tuple):
            return fn
        hub = self.streams
        assert hub is not None
        hub.counters["inline_received"] += 1
        return inline_handler(
            cast(StreamHandler, fn),
            h,
            info,
            origin,
            required=(h.channel, h.topic) in hub.digest_always,
            idle=hub.idle,
            clock=self.clock,
        )

    # ------------------------------------------------------------------ peers
    def peers(self) -> list[Peer]:
        return [*self.children.values(), *([self.parent] if self.parent else [])]

    def next_peer(self, dst: str) -> Peer | None:
        """The peer a frame to ``dst`` leaves on, ``None`` for this cell.

        Raises:
            Unreachable: no route from here.
        """
        hop = next_hop(self.name, dst, self.children, self.parent is not None)
        if hop == LOCAL:
            return None
        if hop == PARENT:
            assert self.parent is not None
            return self.parent
        return self.children[hop]

    def notify(self, peer: Peer, up: bool) -> None:
        if self.on_link is not None:
            try:
                self.on_link(peer.name, peer.role, up)
            except Exception as exc:  # an observer's failure must not take the link down
                self.log.error(  # noqa: TRY400 - structlog, exc_info given
                    "on_link callback failed", peer=peer.name, exc_info=exc
                )

    def drop_peer(self, peer: Peer, error: TransportError) -> None:
        """Forget a peer whose link ended; fail what waits on it, tell the origins of requests
        forwarded over it."""
        if self.parent is peer:
            self.parent = None
            self.notify(peer, False)
        elif self.children.get(peer.name) is peer:
            del self.children[peer.name]
            self.notify(peer, False)
        for waiter in self.pending.via(peer):
            waiter.fail(type(error)(f"link to {peer.name} went down: {error}"))
        inflight, peer.inflight = peer.inflight, {}
        self.backlogs.discard(peer, error)
        for fwd in inflight.values():
            self.answer_error_to(
                fwd.src,
                fwd.id,
                Status.LINK_BROKEN,
                f"link from {self.name} to {peer.name} went down: {error}",
            )

    # ------------------------------------------------------------------ inbound
    def on_frame_now(self, peer: Peer, frame: Frame) -> bool:
        """Handle a frame for this cell straight from the link's read callback (see
        ``Link.deliver_to``): replies, errors, requests and events addressed here never
        wait. Anything else (forwarding, pings, goodbyes, a frame that breaks the rules)
        is declined and goes through :meth:`on_frame` in the serving task."""
        h = frame.header
        if not isinstance(h, _ROUTED) or h.dst != self.name or not self._src_fits(peer, h.src):
            return False
        peer.last_rx = self.clock()
        if isinstance(h, _ANSWERS) and peer.inflight:
            peer.inflight.pop((h.dst, h.corr), None)
        self.deliver(frame, peer)
        return True

    async def on_frame(self, peer: Peer, frame: Frame) -> None:
        """Handle one frame read from ``peer``'s link.

        Raises:
            ProtocolError: the peer broke the rules (the link closes).
            LinkClosed / Displaced: the peer said goodbye.
        """
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
                self.deliver(frame, peer)
            else:
                await self._forward(frame, peer)
        elif isinstance(h, Ping):
            # Never waits: a link that does not drain must not stop its own reader. One pong at
            # most waits for room per link; pings meanwhile go unanswered (that one will do).
            pong = Frame(Pong(seq=h.seq))
            if not peer.link.try_send(pong) and not peer.ponging:
                peer.ponging = self.spawn(self._pong, peer, pong)
        elif isinstance(h, Bye):
            cls = Displaced if h.reason.startswith(DISPLACED) else LinkClosed
            peer.orderly = True
            raise cls(f"{peer.name} said goodbye: {h.reason}")
        elif isinstance(h, Pong):
            pass
        else:
            raise ProtocolError(f"unexpected {type(h).__name__} on an open link", peer=peer.name)

    async def _pong(self, peer: Peer, pong: Frame) -> None:
        try:
            await peer.send_within(pong, self.send_cap)
        finally:
            peer.ponging = False

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

    def deliver(self, frame: Frame, via: Peer | None = None) -> None:
        """A frame addressed to this cell (``via``: the peer it came from, None from this
        cell): to the stream hub, a waiting request, or a handler."""
        h = frame.header
        if isinstance(h, STREAM_KINDS):
            assert self.streams is not None
            self.streams.on_frame(frame)
            return
        if (
            self.signing is not None
            and isinstance(h, _ROUTED)
            and h.src != self.name
            and not came_unsigned(self.signing, h, via)
        ):
            bad = check_signature(self.signing, frame)
            if bad is not None:
                self._refuse_unsigned(frame, bad)
                return
        if isinstance(h, Reply):
            waiter = self.pending.get(h.corr)
            if waiter is not None and waiter.dst == h.src:
                waiter.resolve(Payload.received(frame.parts, h.codec, h.headers))
            return
        if isinstance(h, Error):
            waiter = self.pending.get(h.corr)
            if waiter is not None and self._may_report(h.src, waiter):
                waiter.fail(error_for_status(h.status, h.message, h.src))
            else:
                self.log.info(
                    "error report for a message no longer waited on",
                    reported_by=h.src,
                    status=h.status,
                    message=h.message,
                )
            return
        assert isinstance(h, _CALLS)
        deadline = self.clock() + h.budget if h.budget is not None else math.inf
        if h.budget is not None and h.budget <= 0:
            self.answer_error(h, Status.DEADLINE_EXCEEDED, "deadline passed before delivery")
            return
        if isinstance(h, Request):
            fn = (
                self._admit_inline(h)
                if INLINE_HEADER in h.headers
                else self.admit(Kind.REQUEST, h.src, h.channel, h.topic)
            )
        else:
            fn = self.admit(Kind.EVENT, h.src, h.channel, h.topic)
        if isinstance(fn, tuple):
            self.answer_error(h, *fn)
            return
        payload = Payload.received(frame.parts, h.codec, h.headers)
        assert self.workers is not None
        if not self.workers.submit(Job(h, payload, fn, deadline)):
            self.answer_error(h, Status.OVERLOADED, f"{self.name} handler queue is full")

    def may_pass(self, peer: Peer, h: Envelope, size: int) -> bool:
        """Whether a large frame arriving from ``peer`` may pass through unread: it is on its
        way to another cell whose link splices (``Splicing.pass_through``). Called by the parser;
        never raises."""
        if not isinstance(h, _ROUTED) or h.dst == self.name:
            return False
        try:
            hop = self.next_peer(h.dst)
        except Exception:
            return False
        if hop is None or hop is peer or hop.backlog:
            return False
        return hop.splicing is not None and hop.splicing.splices

    def _refuse_unsigned(self, frame: Frame, why: IntegrityError) -> None:
        """A message whose signature failed: a request is answered with the error, an answer
        fails the request it claims to answer (a relay could as well have dropped it)."""
        h = frame.header
        assert isinstance(h, _ROUTED)
        self.bad_signatures += 1
        self.log.warning(
            "message refused: bad signature", kind=type(h).__name__, src=h.src, reason=str(why)
        )
        if isinstance(h, Request):
            self.answer_error(h, Status.INTEGRITY, str(why))
        elif isinstance(h, _ANSWERS):
            waiter = self.pending.get(h.corr)
            if waiter is not None and waiter.dst == h.src:
                waiter.fail(why)

    # ------------------------------------------------------------------ forwarding
    async def _forward(self, frame: Frame, came: Peer) -> None:
        """Pass a frame one hop on. It never waits behind another link's frames: when the next
        hop's link is full it joins that link's backlog (sent in order by a task of its own)
        and the reader goes on; only a backlog past its limits (``Backlogs``) makes it wait,
        until the frame's deadline."""
        h = frame.header
        assert isinstance(h, _ROUTED)
        fwd = None
        try:
            check_route(self.name, h.route, self.limits.max_route)
            if h.budget is not None and h.budget <= 0:
                self.answer_error(h, Status.DEADLINE_EXCEEDED, f"deadline passed at {self.name}")
                return
            hop = self.next_peer(h.dst)
            assert hop is not None  # not LOCAL: we only forward what is not ours
            # The deadline on this cell's clock; the link stamps what is left of it as it
            # writes the header, so time spent waiting here counts.
            out = msgspec.structs.replace(h, route=[*h.route, self.name])
            deadline = math.inf if h.budget is None else self.clock() + h.budget
            expires = None if h.budget is None else deadline
            passing = frame if isinstance(frame, Passing) else None
            splicing = hop.splicing
            if passing is not None and (hop.backlog or splicing is None or not splicing.splices):
                # The route changed, or frames wait for that link: read the payload here.
                assert came.splicing is not None  # only a splicing link passes frames
                frame, passing = await came.splicing.take_passing(passing), None
            if isinstance(h, Request):
                # Recorded before sending: the answer may come back before the send returns.
                fwd = Forwarded(h.src, h.id, hop.inflight)
                hop.inflight[(h.src, h.id)] = fwd
            sent = Frame(out, frame.parts, expires)
            if passing is not None:
                await self._send_via(hop, sent, deadline, passing, came.link)
            elif hop.backlog or not hop.link.try_send(sent):
                await self.backlogs.put(hop, sent, deadline)
            self.forwarded += 1
            if fwd is not None and deadline != math.inf:
                self.timer.add(deadline, fwd)
        except _FORWARD_ERRORS as exc:
            # A request whose link went down meanwhile was reported by drop_peer already.
            live = fwd is None or fwd.live
            if fwd is not None:
                fwd.expire()
            if live:
                self._forward_failed(h, exc)
        except BaseException:
            if fwd is not None:
                fwd.expire()
            raise

    def _forward_failed(self, h: Routed, exc: Exception) -> None:
        """Tell the origin why its frame could not be passed on (one of ``_FORWARD_ERRORS``)."""
        if isinstance(exc, DeadlineExceeded):
            self.answer_error(h, Status.DEADLINE_EXCEEDED, f"deadline passed at {self.name}")
        elif isinstance(exc, Unreachable):
            self.answer_error(h, Status.UNREACHABLE, str(exc))
        else:
            self.answer_error(h, Status.LINK_BROKEN, f"{self.name} could not forward: {exc}")

    def _backlog_failed(self, hop: Peer, frame: Frame, exc: Exception) -> None:
        """A frame from ``hop``'s backlog could not be sent: its origin hears of it once (a
        request's from here or from ``drop_peer``, whichever comes first; one whose deadline
        passed is not reported: its caller's own deadline has passed too)."""
        h = frame.header
        assert isinstance(h, _ROUTED)
        if not isinstance(h, Request) or hop.inflight.pop((h.src, h.id), None) is not None:
            self._forward_failed(h, exc)

    # ------------------------------------------------------------------ error reports
    def answer_error(self, h: Routed, status: Status, message: str) -> None:
        """Tell the origin its message failed here; errors about replies/errors are dropped.
        A stream's sender hears of it as a stream abort from this cell, and resumes later."""
        if isinstance(h, _TO_RECEIVER):
            assert self.streams is not None
            self.streams.trouble(h, status, message)
            return
        if not isinstance(h, _CALLS):
            self.undeliverable += 1
            self.log.info(
                "dropping undeliverable answer",
                kind=type(h).__name__,
                src=h.src,
                dst=h.dst,
                reason=message,
            )
            return
        self.answer_error_to(h.src, h.id, status, message)

    def answer_error_to(self, dst: str, corr: int, status: Status, message: str) -> None:
        """Report a failure to ``dst`` about its message ``corr``, without waiting (``post``)."""
        self.errors_returned += 1
        err = originate(
            Error,
            next(self._ids),
            self.name,
            dst,
            corr=corr,
            status=int(status),
            message=message,
        )
        self.post(self.seal(Frame(err)))

    # ------------------------------------------------------------------ outbound
    def post(self, frame: Frame) -> None:
        """Send a small frame that nobody waits for (error reports, stream acks): at once when
        the link has room, otherwise in a task, of which at most ``MAX_ANSWER_TASKS`` run at
        once (a peer that stops reading must not make the cell pile up tasks). Failures are
        counted and logged, never raised."""
        h = frame.header
        assert isinstance(h, _ROUTED)
        try:
            hop = self.next_peer(h.dst)
            if hop is None:
                self.deliver(frame)
                return
            if hop.link.try_send(frame):
                return
        except (Unreachable, TransportError, ProtocolError) as exc:
            self.undeliverable += 1
            self.log.info("report could not be sent", dst=h.dst, error=str(exc))
            return
        if self.answer_tasks >= MAX_ANSWER_TASKS or not self.spawn(self._answer_task, frame):
            self.undeliverable += 1
            return
        self.answer_tasks += 1

    async def _answer_task(self, frame: Frame) -> None:
        try:
            await self.answer(frame)
        finally:
            self.answer_tasks -= 1

    async def send(
        self, frame: Frame, deadline: float = math.inf, waiter: Waiter | None = None
    ) -> None:
        """Route a frame this cell originates and send it, waiting for room until ``deadline``.
        A request's ``waiter`` learns the link it leaves on before the send, so a link that
        drops meanwhile fails it at once.

        Raises:
            Unreachable / TransportError / ProtocolError / DeadlineExceeded: it was not sent.
        """
        h = frame.header
        assert isinstance(h, _ROUTED)
        hop = self.next_peer(h.dst)
        if waiter is not None:
            waiter.via = hop
        if hop is None:
            self.deliver(frame)
        else:
            await self._send_via(hop, frame, deadline)

    async def answer(self, frame: Frame) -> None:
        """Route a reply or error back to its origin (until its deadline); failures are
        counted and logged, never raised."""
        try:
            await self.send(frame, math.inf if frame.expires is None else frame.expires)
        except (Unreachable, TransportError, ProtocolError, DeadlineExceeded) as exc:
            self.undeliverable += 1
            h = frame.header
            assert isinstance(h, _ROUTED)
            self.log.info("answer could not be sent", dst=h.dst, error=str(exc))

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
        deadline = min(deadline, self.clock() + self.send_cap)
        with anyio.CancelScope(deadline=deadline) as scope:
            if passing is None:
                await link.send(frame)
            else:
                assert src is not None
                assert peer.splicing is not None
                await peer.splicing.send_passing(frame, passing, src)
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"link to {peer.name} stayed full until the deadline")

    async def say_bye(self, peer: Peer, reason: str) -> None:
        """Tell a peer goodbye and close its link (1 s at most)."""
        peer.orderly = True
        with anyio.move_on_after(1, shield=True):
            with contextlib.suppress(TransportError, ProtocolError):
                await peer.send(Frame(Bye(reason=reason)))
            await peer.link.aclose()


__all__ = ["MAX_ANSWER_TASKS", "Router"]
