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
* DONE / FAILED: terminal; later events are ignored.

Timers: a probe is due ``probe`` seconds after the machine last heard or sent anything (past
a ``StreamWait``'s deadline the driver calls :meth:`on_tick`); when one is due and the committed
offset did not move for ``idle`` seconds (once all is committed, any ack counts), the stream
fails with ``StreamStalled`` instead (failed).

The table is :data:`SENDER_TRANSITIONS`. ``StreamSender`` (``cell/_stream_out.py``) loops over
:meth:`SenderMachine.next_action` and does (``StreamStatistics`` counters in brackets):

==========================  ==============================================================
``SendOpen()``              ``StreamOpen(resume=False)`` (after a backoff: waits)
``Probe(resume)``           ``StreamOpen(resume=resume)`` (probes)
``SendData(offset, size)``  ``StreamData(offset, crc)`` with the chunk log's chunk
``SendEnd(size)``           ``StreamEnd(size, sha256)`` (with the ``seal`` trailer)
``StreamWait(deadline)``    wait for a wake-up (an answer, the chunk log) or the deadline
``SenderBackoff(pause)``    sleep ``pause * (0.5 + random)``; then ``reopen`` if still BUSY
``Rewind(offset)``          count it (rewinds)
``Committed(offset)``       ``ChunkLog.commit`` (drops what every destination holds), progress
``SenderDone(received)``    ``reply`` from the ``StreamDone``; ``run`` returns
``StreamFail(e, abort, m)`` ``StreamAbort(abort, m)`` (none if ``abort`` is None), raise ``e``
==========================  ==============================================================

After each send it calls :meth:`~SenderMachine.sent`, or :meth:`~SenderMachine.on_link_lost`
where the path failed; its own errors (the source, a cancellation) go to ``fail``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flare_async.errors import (
    ProtocolError,
    Status,
    StreamAborted,
    StreamStalled,
    Unreachable,
    error_for_status,
)
from flare_async.streaming._flow import DEFAULT_CHUNK, DEFAULT_WINDOW, SenderFlow
from flare_async.streaming._state import Machine, MachineState, StreamFail, StreamWait, event

PATH_TROUBLE = frozenset({Status.UNREACHABLE, Status.LINK_BROKEN, Status.DEADLINE_EXCEEDED})
"""Statuses with which a relay reports it could not pass a frame on: resume, do not fail."""


class SenderState(MachineState):
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


Sends = SendOpen | Probe | SendData | SendEnd
"""The actions that send a frame (the cell reports each with :meth:`SenderMachine.sent`)."""
SenderAction = Sends | StreamWait | SenderBackoff | Rewind | Committed | SenderDone | StreamFail
"""Everything :meth:`SenderMachine.next_action` and the events may return."""
_DATA_OR_END = (SendData, SendEnd)
_S = SenderState  # and module names for the states: an enum's attribute costs ~0.1 us a read
_IDLE, _OPENING, _BUSY, _SENDING = _S.IDLE, _S.OPENING, _S.BUSY, _S.SENDING
_ENDING, _RESUMING, _DONE, _FAILED = _S.ENDING, _S.RESUMING, _S.DONE, _S.FAILED
_OVER = (_DONE, _FAILED)


def _row(**events: tuple[SenderState, ...]) -> dict[str, frozenset[SenderState]]:
    return {name: frozenset(states) for name, states in events.items()}


def _terminal(state: SenderState) -> dict[str, frozenset[SenderState]]:
    names = ("on_ack", "on_done", "on_abort", "on_link_lost", "on_tick", "sent", "fail")
    return _row(**dict.fromkeys((*names, "next_action", "source_ended"), (state,)))


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
        self.state = _IDLE
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
        self.state = _OPENING
        return SendOpen()

    @event("reopen")
    def reopen(self) -> SendOpen:
        """The :class:`SenderBackoff` passed: open again."""
        self._backoff = None
        self.state = _OPENING
        return SendOpen()

    @event("source_ended")
    def source_ended(self, size: int) -> None:
        """The source is exhausted: the object is ``size`` bytes (the chunk log's end)."""
        if self.state in _OVER:
            return
        if size < self.flow.high or (self.size is not None and size != self.size):
            raise ProtocolError(f"{self!r}: source ended at {size} B after {self.flow.high} B")
        self.size = size

    @event("sent")
    def sent(self, action: Sends, now: float) -> None:
        """The frame for ``action`` went out (the send returned; other events may have come
        in while it was on its way)."""
        state = self.state
        if state in _OVER:
            return
        flow = self.flow
        if isinstance(action, _DATA_OR_END) and not flow.started:
            raise ProtocolError(f"{self!r}: {action} cannot have been sent before the first ack")
        self._quiet_since = now
        if type(action) is SendData:
            if action.offset == flow.next_offset:
                flow.sent(action.size)
            else:  # an ack rewound the sender while this chunk was on its way: stay there
                flow.high = max(flow.high, action.offset + action.size)
        elif type(action) is SendEnd:
            self.end_sent = True
        if self.end_sent and (state is _SENDING or state is _ENDING):
            self.state = self._connected()  # (without the End sent, SENDING stays SENDING)

    @event("fail")
    def fail(self, error: BaseException) -> tuple[StreamFail, ...]:
        """Give up (the source failed, the caller cancelled, the cell stops)."""
        if self.state in _OVER:
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
        if self.state in _OVER:
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
        moved = flow.committed > before
        if moved or (self.size is not None and flow.committed >= self.size):
            self.last_progress = now  # bytes moved, or the handler is alive
        self.state = self._connected()
        if rewound:
            rewind = Rewind(flow.next_offset)
            return (rewind, Committed(flow.committed)) if moved else (rewind,)
        return (Committed(flow.committed),) if moved else ()

    @event("on_done")
    def on_done(self, received: int) -> tuple[SenderDone, ...]:
        """``StreamDone``: the receiver's handler answered."""
        if self.state in _OVER:
            return ()
        self.received = received
        self.state = _DONE
        return (SenderDone(received),)

    @event("on_abort")
    def on_abort(self, now: float, status: int, message: str, src: str) -> tuple[StreamFail, ...]:
        """A ``StreamAbort`` about this stream from ``src``."""
        if self.state in _OVER:
            return ()
        dst = self.dst
        on_path = dst.startswith(src + ".") or self.me.startswith(src + ".")
        if src != dst and not on_path:
            return ()  # no cell off the path may end our stream
        self._quiet_since = now
        started = self.flow.started
        if src != dst and status in PATH_TROUBLE and started:
            self.state = _RESUMING  # a relay lost the path: probe until it is back
            return ()
        if src == dst and status == Status.OVERLOADED and not started:
            if now - self.last_progress > self.idle:
                return (self._fail(error_for_status(status, message, src)),)
            self.busy_tries += 1
            self._backoff = SenderBackoff(min(self.probe, 0.02 * 2 ** min(self.busy_tries, 8)))
            self.state = _BUSY
            return ()
        if status == Status.STREAM_ABORTED:
            return (self._fail(StreamAborted(message, reported_by=src)),)
        return (self._fail(error_for_status(status, message, src)),)

    @event("on_link_lost")
    def on_link_lost(self, error: BaseException, now: float) -> tuple[StreamFail, ...]:
        """A frame could not be sent (``TransportError``, ``Unreachable``,
        ``DeadlineExceeded``): resume, unless there was no route before the first ack."""
        if self.state in _OVER:
            return ()
        self._quiet_since = now
        if not self.flow.started:
            if isinstance(error, Unreachable):
                return (self._fail(error),)  # no route at all at the start: as a request
            return ()
        self.state = _RESUMING
        return ()

    # ------------------------------------------------------------------ time and work
    @event("on_tick")
    def on_tick(self, now: float) -> tuple[Probe | StreamFail, ...]:
        """The clock reached :attr:`deadline` (or later): probe, or fail if stalled."""
        if self.state not in (_OPENING, _SENDING, _ENDING, _RESUMING):
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
        if self.state is _ENDING:
            self.state = _SENDING
        return (Probe(resume=self.flow.started),)

    @event("next_action")
    def next_action(self, ready: int | None = None) -> SenderAction:
        """What to do now. ``ready``: the size of the chunk held at :attr:`next_offset`
        (None while the source has not brought it yet). Changes nothing."""
        state = self.state
        if state is _DONE:
            return SenderDone(self.received or 0)
        if state is _FAILED:
            if self.failure is None:  # pragma: no cover - FAILED is only entered by _fail
                raise ProtocolError(f"{self!r}: failed without a failure")
            return self.failure
        if state is _BUSY:
            if self._backoff is None:  # pragma: no cover - BUSY is only entered with one
                raise ProtocolError(f"{self!r}: busy without a backoff")
            return self._backoff
        if state is not _SENDING:
            return StreamWait(self.deadline)
        flow = self.flow
        offset = flow.next_offset
        size = self.size
        if ready is not None:
            if ready <= 0 or (size is not None and offset + ready > size):
                raise ProtocolError(f"{self!r}: a chunk of {ready} B at {offset} B")
            if offset + ready <= flow.limit:  # within the credit
                return SendData(offset, ready)
        elif size is not None:
            if offset < size:
                raise ProtocolError(f"{self!r}: no chunk at {offset} B to send")
            if not self.end_sent:
                return SendEnd(size)
        return StreamWait(self.deadline)  # for credit, the source's next chunk, or an answer

    # ------------------------------------------------------------------ helpers
    def _connected(self) -> SenderState:
        if self.end_sent and self.size is not None and self.flow.next_offset >= self.size:
            return _ENDING
        return _SENDING

    def _fail(self, error: BaseException) -> StreamFail:
        ended_there = (
            isinstance(error, StreamAborted | Unreachable) and error.reported_by == self.dst
        )
        why = "the sender gave up" + (f": {error!r}" if isinstance(error, Exception) else "")
        self.failure = StreamFail(error, None if ended_there else Status.STREAM_ABORTED, why[:500])
        self.state = _FAILED
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
