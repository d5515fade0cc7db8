"""The sending end of one stream as an explicit state machine (see ``_state`` for the rules).

States (:class:`SenderState`)::

    IDLE ──start──> OPENING ──first ack──> SENDING ──End sent──> ENDING ──StreamDone──> DONE
                      │ ^                   │   ^ ^                │
       OVERLOADED ────┘ │reopen   path lost │   │ └──ack rewinds───┘ (and a probe: End again)
       from receiver    │                   v   │ ack
                      BUSY                RESUMING ─┘ (probes StreamOpen(resume) until an ack)
    every live state ──(abort, stall, local fail, Unreachable before the first ack)──> FAILED

* OPENING: ``StreamOpen`` sent, no ack yet (chunk and window unsettled); probes re-send
  ``StreamOpen(resume=False)``.
* BUSY: the receiver refused with ``OVERLOADED`` before any ack: open again after
  :class:`SenderBackoff` (the driver adds the jitter), as long as the idle limit allows.
* SENDING: acked and the path works: chunks within the credit, then ``StreamEnd``.
* ENDING: every byte and ``StreamEnd`` sent: wait for ``StreamDone`` (an ack with ``resend``
  goes back to SENDING; a probe forgets the End was sent, so it goes again).
* RESUMING: the path failed after the first ack (a send failed, or a relay's abort with
  ``UNREACHABLE``/``LINK_BROKEN``/``DEADLINE_EXCEEDED``): probe every ``probe`` seconds with
  ``StreamOpen(resume=True)``; the receiver's ack (``resend``, its committed offset) rewinds.
* DONE / FAILED: terminal; later events are ignored (as today: ``error``/``reply`` set).

Timers: a probe is due ``probe`` seconds after the machine last heard or sent anything (the
driver waits on :class:`~flare_async.streaming._state.Wait` and then calls :meth:`on_tick`);
when one is due and the committed offset has not moved for ``idle`` seconds (once everything
is committed, any ack counts), the stream fails with ``StreamStalled`` instead. (Today any
wake-up of the pump restarts the interval, a chunk read from the source included; here only
what the peer says and what goes out do, so a sender out of credit behind a slow source may
probe a little sooner. A probe is harmless: the receiver answers where it stands.)

The transition table is :data:`SENDER_TRANSITIONS`. Actions, and what the cell does for each
today (``flare_async/cell/_stream_out.py``, class ``StreamSender`` unless named):

=========================  ===============================================================
action                     today
=========================  ===============================================================
``SendOpen()``             ``StreamOpen(resume=False)`` from ``_open``: first line of
                           ``run``; again in ``_open_again`` after a refusal (``waits``)
``Probe(resume)``          ``StreamOpen(resume=flow.started)`` from ``_wait`` when the
                           probe interval passed (``probes``; ``_end_sent_at = -1``)
``SendData(offset, size)`` ``StreamData(offset, crc=held.crc)`` + ``log.chunk_at(offset)``
                           in ``run``; ``flow.sent`` once the send returned
``SendEnd(size)``          ``StreamEnd(size=log.end, sha256=digest_result())`` (+ ``seal``
                           trailer) in ``run``; ``_end_sent_at = offset`` once sent
``StreamWait(deadline)``         ``_wait``: a wake-up (``wake``) or ``move_on_after(probe)``
``SenderBackoff(pause)``         ``_open_again``: ``sleep(pause * (0.5 + rng.random()))``
``Rewind(offset)``         ``on_answer``: ``flow.on_ack`` returned True (``rewinds``)
``Committed(offset)``      ``on_answer``: ``log.commit(dst, committed)`` + ``_report``
``SenderDone(received)``         ``on_answer`` with ``StreamDone``: ``reply`` set, ``run`` returns
``StreamFail(error, abort)``     ``fail``/``run`` raising; ``_abort_receiver`` posts
                           ``StreamAbort(STREAM_ABORTED, "the sender gave up: ...")``
                           (``abort`` is None where the receiver itself ended the stream)
=========================  ===============================================================

Flags this replaces: ``flow.started`` (OPENING/BUSY vs later), ``connected`` (RESUMING vs
SENDING/ENDING), ``_busy``/``_busy_tries`` (BUSY, :attr:`SenderMachine.busy_tries`),
``_end_sent_at`` (ENDING, :attr:`SenderMachine.end_sent`), ``last_progress``, ``reply`` and
``error`` (DONE/FAILED), and ``_wait``'s probe timer (``StreamWait`` + ``on_tick``).

One deliberate difference: a ``SendData`` whose send returns after an ack rewound the sender
(the hub takes acks while ``run`` awaits the send) no longer moves ``next_offset`` past the
rewind point (today ``flow.sent`` added its size to the rewound offset, skipping a chunk that
the receiver then asked for again).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from flare_async.errors import (
    ProtocolError,
    Status,
    StreamAborted,
    StreamStalled,
    Unreachable,
    error_for_status,
)
from flare_async.streaming._flow import DEFAULT_CHUNK, DEFAULT_WINDOW, SenderFlow
from flare_async.streaming._state import Machine, StreamFail, StreamWait, event

PATH_TROUBLE = frozenset({Status.UNREACHABLE, Status.LINK_BROKEN, Status.DEADLINE_EXCEEDED})
"""Statuses with which a relay reports it could not pass a frame on: resume, do not fail."""


class SenderState(Enum):
    IDLE = "idle"
    OPENING = "opening"
    BUSY = "busy"
    SENDING = "sending"
    ENDING = "ending"
    RESUMING = "resuming"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SendOpen:
    """Send ``StreamOpen(resume=False)`` (the first open, or again after a refusal)."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Send ``StreamOpen(resume=resume)``: is the path back, where does the receiver stand?"""

    resume: bool


@dataclass(frozen=True, slots=True)
class SendData:
    """Send the chunk of ``size`` bytes at ``offset`` (``StreamData`` with its CRC-32C)."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SendEnd:
    """Send ``StreamEnd`` for an object of ``size`` bytes (with its SHA-256)."""

    size: int


@dataclass(frozen=True, slots=True)
class SenderBackoff:
    """The receiver had no slot: wait about ``pause`` seconds (jittered), then, if the machine
    is still BUSY, send what :meth:`SenderMachine.reopen` returns."""

    pause: float


@dataclass(frozen=True, slots=True)
class Rewind:
    """The receiver asked to go back: sending continues from ``offset``."""

    offset: int


@dataclass(frozen=True, slots=True)
class Committed:
    """The receiver holds every byte below ``offset``: the log may drop them; report progress."""

    offset: int


@dataclass(frozen=True, slots=True)
class SenderDone:
    """The receiver's handler answered (``StreamDone``) after taking ``received`` bytes."""

    received: int


SenderAction = (
    SendOpen
    | Probe
    | SendData
    | SendEnd
    | StreamWait
    | SenderBackoff
    | Rewind
    | Committed
    | SenderDone
    | StreamFail
)
"""Everything :meth:`SenderMachine.next_action` and the events may return."""

_S = SenderState
_LIVE = (_S.OPENING, _S.BUSY, _S.SENDING, _S.ENDING, _S.RESUMING)


def _row(**events: tuple[SenderState, ...]) -> dict[str, frozenset[SenderState]]:
    return {name: frozenset(states) for name, states in events.items()}


def _terminal(state: SenderState) -> dict[str, frozenset[SenderState]]:
    quiet = ("on_ack", "on_done", "on_abort", "on_link_lost", "on_tick", "sent", "fail")
    return _row(**dict.fromkeys((*quiet, "next_action", "source_ended"), (state,)))


SENDER_TRANSITIONS: dict[SenderState, dict[str, frozenset[SenderState]]] = {
    _S.IDLE: _row(start=(_S.OPENING,), source_ended=(_S.IDLE,), fail=(_S.FAILED,)),
    _S.OPENING: _row(
        on_ack=(_S.SENDING, _S.FAILED),
        on_done=(_S.DONE,),
        on_abort=(_S.OPENING, _S.BUSY, _S.FAILED),
        on_link_lost=(_S.OPENING, _S.FAILED),
        on_tick=(_S.OPENING, _S.FAILED),
        sent=(_S.OPENING,),
        next_action=(_S.OPENING,),
        source_ended=(_S.OPENING,),
        fail=(_S.FAILED,),
    ),
    _S.BUSY: _row(
        reopen=(_S.OPENING,),
        on_ack=(_S.SENDING, _S.FAILED),
        on_done=(_S.DONE,),
        on_abort=(_S.BUSY, _S.FAILED),
        on_link_lost=(_S.BUSY, _S.FAILED),
        on_tick=(_S.BUSY,),
        sent=(_S.BUSY,),
        next_action=(_S.BUSY,),
        source_ended=(_S.BUSY,),
        fail=(_S.FAILED,),
    ),
    _S.SENDING: _row(
        on_ack=(_S.SENDING, _S.ENDING, _S.FAILED),
        on_done=(_S.DONE,),
        on_abort=(_S.SENDING, _S.RESUMING, _S.FAILED),
        on_link_lost=(_S.RESUMING,),
        on_tick=(_S.SENDING, _S.FAILED),
        sent=(_S.SENDING, _S.ENDING),
        next_action=(_S.SENDING,),
        source_ended=(_S.SENDING,),
        fail=(_S.FAILED,),
    ),
    _S.ENDING: _row(
        on_ack=(_S.ENDING, _S.SENDING, _S.FAILED),
        on_done=(_S.DONE,),
        on_abort=(_S.ENDING, _S.RESUMING, _S.FAILED),
        on_link_lost=(_S.RESUMING,),
        on_tick=(_S.ENDING, _S.SENDING, _S.FAILED),
        sent=(_S.ENDING,),
        next_action=(_S.ENDING,),
        source_ended=(_S.ENDING,),
        fail=(_S.FAILED,),
    ),
    _S.RESUMING: _row(
        on_ack=(_S.SENDING, _S.ENDING, _S.FAILED),
        on_done=(_S.DONE,),
        on_abort=(_S.RESUMING, _S.FAILED),
        on_link_lost=(_S.RESUMING,),
        on_tick=(_S.RESUMING, _S.FAILED),
        sent=(_S.RESUMING,),
        next_action=(_S.RESUMING,),
        source_ended=(_S.RESUMING,),
        fail=(_S.FAILED,),
    ),
    _S.DONE: _terminal(_S.DONE),
    _S.FAILED: _terminal(_S.FAILED),
}
"""``state -> event -> states it may lead to``; an event missing from a row is illegal there."""


class SenderMachine(Machine[SenderState]):
    """The sending end of one stream to ``dst`` (see the module text).

    Args:
        dst: the receiving cell; ``me``: this cell (they tell the receiver's aborts, and a
            relay's on the path, from anyone else's).
        sid: the stream id (for messages).
        chunk / window: what the sender proposes (the first ack settles them).
        idle: seconds without progress before the stream fails (``StreamStalled``).
        probe: seconds between probes while nothing happens (default ``min(5, idle / 4)``).
        now: the time the stream starts (the idle limit counts from here).

    Attributes:
        flow: the credit arithmetic (``next_offset``, ``committed``, ``limit``, ``credit``).
        size: the object's size once the source ended (:meth:`source_ended`), else None.
        end_sent: ``StreamEnd`` went out since the last probe.
        busy_tries: refusals with ``OVERLOADED`` so far (the backoff grows with them).
        received: bytes the receiver's handler took, once DONE.
    """

    TRANSITIONS = SENDER_TRANSITIONS

    def __init__(
        self,
        dst: str,
        *,
        me: str,
        now: float,
        sid: int = 0,
        chunk: int = DEFAULT_CHUNK,
        window: int = DEFAULT_WINDOW,
        idle: float = 60.0,
        probe: float | None = None,
    ) -> None:
        self.dst = dst
        self.me = me
        self.sid = sid
        self.idle = idle
        self.probe = probe if probe is not None else min(5.0, idle / 4)
        self.flow = SenderFlow(chunk, window)
        self.state = SenderState.IDLE
        self.size: int | None = None
        self.end_sent = False
        self.busy_tries = 0
        self.received: int | None = None
        self.failure: StreamFail | None = None
        self.last_progress = now
        self._quiet_since = now
        self._backoff: SenderBackoff | None = None

    def __repr__(self) -> str:
        return f"<SenderMachine stream {self.sid} to {self.dst} {self.state.name}>"

    @property
    def next_offset(self) -> int:
        return self.flow.next_offset

    @property
    def deadline(self) -> float:
        """When the next probe (or the stall verdict) is due."""
        return self._quiet_since + self.probe

    # ------------------------------------------------------------------ local events
    @event("start")
    def start(self) -> SendOpen:
        """Open the stream."""
        self.state = SenderState.OPENING
        return SendOpen()

    @event("reopen")
    def reopen(self) -> SendOpen:
        """The :class:`SenderBackoff` passed: open again."""
        self._backoff = None
        self.state = SenderState.OPENING
        return SendOpen()

    @event("source_ended")
    def source_ended(self, size: int) -> None:
        """The source is exhausted: the object is ``size`` bytes (the chunk log's end)."""
        if self.state in (SenderState.DONE, SenderState.FAILED):
            return
        if size < self.flow.high or (self.size is not None and size != self.size):
            raise ProtocolError(f"{self!r}: source ended at {size} B after {self.flow.high} B")
        self.size = size

    @event("sent")
    def sent(self, action: SendOpen | Probe | SendData | SendEnd, now: float) -> None:
        """The frame for ``action`` went out (the send returned; other events may have come
        in while it was on its way)."""
        if self.state in (SenderState.DONE, SenderState.FAILED):
            return
        if isinstance(action, SendData | SendEnd) and not self.flow.started:
            raise ProtocolError(f"{self!r}: {action} cannot have been sent before the first ack")
        self._quiet_since = now
        flow = self.flow
        if isinstance(action, SendData):
            if action.offset == flow.next_offset:
                flow.sent(action.size)
            else:  # an ack rewound the sender while this chunk was on its way
                flow.high = max(flow.high, action.offset + action.size)
        elif isinstance(action, SendEnd):
            self.end_sent = True
        if self.state in (SenderState.SENDING, SenderState.ENDING):
            self.state = self._connected()

    @event("fail")
    def fail(self, error: BaseException) -> tuple[StreamFail, ...]:
        """Give up (the source failed, the caller cancelled, the cell stops)."""
        if self.state in (SenderState.DONE, SenderState.FAILED):
            return ()
        return (self._fail(error),)

    # ------------------------------------------------------------------ what the peer says
    @event("on_ack")
    def on_ack(
        self,
        now: float,
        committed: int,
        limit: int,
        *,
        chunk: int = 0,
        window: int = 0,
        resend: bool = False,
    ) -> tuple[Rewind | Committed, ...]:
        """A ``StreamAck``.

        Raises:
            ProtocolError: the ack commits bytes never sent (the machine is then FAILED).
        """
        if self.state in (SenderState.DONE, SenderState.FAILED):
            return ()
        flow = self.flow
        before = flow.committed
        try:
            rewound = flow.on_ack(committed, limit, chunk=chunk, window=window, resend=resend)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        self._quiet_since = now
        self._backoff = None
        out: list[Rewind | Committed] = []
        if rewound:
            out.append(Rewind(flow.next_offset))
        complete = self.size is not None and flow.committed >= self.size
        if flow.committed > before or complete:
            self.last_progress = now  # bytes moved, or the handler is alive
            if flow.committed > before:
                out.append(Committed(flow.committed))
        self.state = self._connected()
        return tuple(out)

    @event("on_done")
    def on_done(self, received: int) -> tuple[SenderDone, ...]:
        """``StreamDone``: the receiver's handler answered."""
        if self.state in (SenderState.DONE, SenderState.FAILED):
            return ()
        self.received = received
        self.state = SenderState.DONE
        return (SenderDone(received),)

    @event("on_abort")
    def on_abort(self, now: float, status: int, message: str, src: str) -> tuple[StreamFail, ...]:
        """A ``StreamAbort`` about this stream from ``src``."""
        if self.state in (SenderState.DONE, SenderState.FAILED):
            return ()
        dst = self.dst
        on_path = dst.startswith(src + ".") or self.me.startswith(src + ".")
        if src != dst and not on_path:
            return ()  # no cell off the path may end our stream
        self._quiet_since = now
        started = self.flow.started
        if src != dst and status in PATH_TROUBLE and started:
            self.state = SenderState.RESUMING  # a relay lost the path: probe until it is back
            return ()
        if src == dst and status == Status.OVERLOADED and not started:
            if now - self.last_progress > self.idle:
                return (self._fail(error_for_status(status, message, src)),)
            self.busy_tries += 1
            self._backoff = SenderBackoff(min(self.probe, 0.02 * 2 ** min(self.busy_tries, 8)))
            self.state = SenderState.BUSY
            return ()
        if status == Status.STREAM_ABORTED:
            return (self._fail(StreamAborted(message, reported_by=src)),)
        return (self._fail(error_for_status(status, message, src)),)

    @event("on_link_lost")
    def on_link_lost(self, error: BaseException, now: float) -> tuple[StreamFail, ...]:
        """A frame could not be sent (``TransportError``, ``Unreachable``,
        ``DeadlineExceeded``): resume, unless there was no route before the first ack."""
        if self.state in (SenderState.DONE, SenderState.FAILED):
            return ()
        self._quiet_since = now
        if not self.flow.started:
            if isinstance(error, Unreachable):
                return (self._fail(error),)  # no route at all at the start: as a request
            return ()
        self.state = SenderState.RESUMING
        return ()

    # ------------------------------------------------------------------ time and work
    @event("on_tick")
    def on_tick(self, now: float) -> tuple[Probe | StreamFail, ...]:
        """The clock reached :attr:`deadline` (or later): probe, or fail if stalled."""
        if self.state not in (
            SenderState.OPENING,
            SenderState.SENDING,
            SenderState.ENDING,
            SenderState.RESUMING,
        ):
            return ()
        if now < self.deadline:
            return ()
        if now - self.last_progress > self.idle:
            error = StreamStalled(
                f"stream {self.sid} to {self.dst} made no progress for {self.idle} s "
                f"({self.flow.committed} B committed)"
            )
            return (self._fail(error),)
        self._quiet_since = now
        self.end_sent = False  # the End may have been lost: send it again after the probe
        if self.state is SenderState.ENDING:
            self.state = SenderState.SENDING
        return (Probe(resume=self.flow.started),)

    @event("next_action")
    def next_action(self, ready: int | None = None) -> SenderAction:
        """What to do now. ``ready``: the size of the chunk held at :attr:`next_offset`
        (None while the source has not brought it yet). Changes nothing."""
        state = self.state
        if state is SenderState.DONE:
            return SenderDone(self.received or 0)
        if state is SenderState.FAILED:
            if self.failure is None:  # pragma: no cover - FAILED is only entered by _fail
                raise ProtocolError(f"{self!r}: failed without a failure")
            return self.failure
        if state is SenderState.BUSY:
            if self._backoff is None:  # pragma: no cover - BUSY is only entered with one
                raise ProtocolError(f"{self!r}: busy without a backoff")
            return self._backoff
        wait = StreamWait(self.deadline)
        if state is not SenderState.SENDING:
            return wait
        flow = self.flow
        offset = flow.next_offset
        if ready is not None:
            if ready <= 0 or (self.size is not None and offset + ready > self.size):
                raise ProtocolError(f"{self!r}: a chunk of {ready} B at {offset} B")
            return SendData(offset, ready) if ready <= flow.credit else wait
        if self.size is None:
            return wait  # for the source to bring the next chunk
        if offset < self.size:
            raise ProtocolError(f"{self!r}: no chunk at {offset} B to send")
        return wait if self.end_sent else SendEnd(self.size)

    # ------------------------------------------------------------------ helpers
    def _connected(self) -> SenderState:
        if self.end_sent and self.size is not None and self.flow.next_offset >= self.size:
            return SenderState.ENDING
        return SenderState.SENDING

    def _fail(self, error: BaseException) -> StreamFail:
        ended_there = (
            isinstance(error, StreamAborted | Unreachable) and error.reported_by == self.dst
        )
        why = f"the sender gave up: {error!r}"[:500]
        self.failure = StreamFail(error, None if ended_there else Status.STREAM_ABORTED, why)
        self.state = SenderState.FAILED
        return self.failure


__all__ = [
    "PATH_TROUBLE",
    "SENDER_TRANSITIONS",
    "SenderBackoff",
    "Committed",
    "SenderDone",
    "Probe",
    "Rewind",
    "SendData",
    "SendEnd",
    "SendOpen",
    "SenderAction",
    "SenderMachine",
    "SenderState",
]
