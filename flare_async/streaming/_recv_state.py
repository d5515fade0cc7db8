"""The receiving end of one stream as an explicit state machine (see ``_state`` for the rules).

States (:class:`ReceiverState`)::

    OPEN ──accept──> RECEIVING ──the End's size all committed──> COMPLETE
      │                 │  (chunks, resends, resumes, credit)       │
      │                 └──────────┬────────────────────────────────┤
      └──(sender's abort, stall, 4 damaged in a row, local fail)──> FAILED
    OPEN / RECEIVING / COMPLETE ──close (the handler returned)──> CLOSED

* OPEN: the sender's ``StreamOpen`` was admitted and its proposal negotiated (the
  constructor raises ``ProtocolError`` for a proposal that is not a positive size, which the
  hub answers with ``StreamAbort`` ``BAD_REQUEST``); the first ack has not gone out.
* RECEIVING: only the contiguous, verified prefix is held (``committed``); a gap or a chunk
  failing its CRC asks once for everything from ``committed`` again (go-back-N); duplicates
  and chunks after such a request are dropped; credit is what the consumer took + window.
* COMPLETE: the ``StreamEnd`` came and every byte below its size is committed; the consumer
  may still be taking the last chunks, then gets :class:`ReceiverComplete` (checks the digest).
* FAILED / CLOSED: terminal. Later frames are the hub's to answer from its finished streams
  (the ``StreamDone`` or the abort it sent); the machine ignores them.

The consumer's stall timer runs only while it waits with nothing delivered:
:meth:`ReceiverMachine.next_read` starts it, a chunk or the end stops it, and
:meth:`ReceiverMachine.on_tick` fails the stream once it ran ``idle`` seconds
(``StreamStalled``, ``StreamAbort`` ``STREAM_STALLED``).

The transition table is :data:`RECEIVER_TRANSITIONS`. What the cell does for each action
(``flare_async/cell/_stream_in.py``: ``StreamHub`` turns frames into events, ``IncomingStream``
serves the handler; ``StreamStatistics`` counters in brackets):

================================  ========================================================
``Ack(committed, limit, c, w)``   ``StreamAck(resend=False)`` (``StreamHub.ack``): from
                                  ``accept`` (``chunk``/``window`` set), then from
                                  ``on_consumed`` as the handler reads
``AskResend(committed, ...)``     ``StreamAck(resend=True)``: from ``on_open`` (resumes),
                                  ``on_data`` (resends_asked), ``on_end``
``Deliver(offset, size)``         the chunk queued for the handler, which is woken
``ReceiverComplete(size)``        the handler's read checks the digest, then gives ``None``
``StreamWait(deadline)``          the handler's read waits for a chunk or the deadline
``StreamFail(error, status, m)``  the stream fails (the handler's read raises ``error``);
                                  ``StreamAbort(status, m)`` to the sender unless ``status``
                                  is None (its own abort); kept for its probes after a stall
================================  ========================================================

The hub decides the failures that are not the protocol's (a digest mismatch, the handler
failing, the cell stopping) and tells the machine with :meth:`~ReceiverMachine.fail`; the
handler returning is :meth:`~ReceiverMachine.close`. A second ``StreamEnd`` announcing another
size than the first is a protocol error (before this machine the cell took the new size).
"""

from __future__ import annotations

from dataclasses import dataclass

from flare_async.errors import ProtocolError, Status, StreamAborted, StreamCorrupted, StreamStalled
from flare_async.streaming._flow import EndVerdict, ReceiverFlow, Verdict, negotiate
from flare_async.streaming._state import Machine, MachineState, StreamFail, StreamWait, event

MAX_IDLE = 3600.0
"""The longest silence a receiver waits for, whatever idle limit the sender asks."""


def receiver_idle(own: float, asked: float) -> float:
    """Seconds a receiver waits for progress: its own limit, or the sender's if longer (but
    never more than :data:`MAX_IDLE`: a peer must not hold a slot for ever by going silent)."""
    return max(own, min(asked, MAX_IDLE) if asked > 0 else 0.0)


class ReceiverState(MachineState):
    OPEN = "open"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Ack:
    """Send ``StreamAck``: every byte below ``committed`` is held; send below ``limit``.
    ``chunk``/``window``: what was accepted (first ack only, else 0)."""

    committed: int
    limit: int
    chunk: int = 0
    window: int = 0


@dataclass(frozen=True, slots=True)
class AskResend:
    """Send ``StreamAck`` with ``resend``: send everything again from ``committed``."""

    committed: int
    limit: int
    chunk: int = 0
    window: int = 0


@dataclass(frozen=True, slots=True)
class Deliver:
    """The chunk of ``size`` bytes at ``offset`` arrived intact and in order: queue it for the
    consumer (who reports taking it with :meth:`ReceiverMachine.on_consumed`)."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class ReceiverComplete:
    """The consumer took the whole object of ``size`` bytes: check its digest, finish."""

    size: int


ReceiverAction = Ack | AskResend | Deliver | ReceiverComplete | StreamWait | StreamFail
"""Everything :class:`ReceiverMachine` may return."""

_R = ReceiverState  # and module names for the states: an enum's attribute costs ~0.1 us a read
_OPEN, _RECEIVING, _COMPLETE = _R.OPEN, _R.RECEIVING, _R.COMPLETE
_FAILED, _CLOSED = _R.FAILED, _R.CLOSED
_LIVE = (_RECEIVING, _COMPLETE)
_ACCEPT, _RESEND = Verdict.ACCEPT, Verdict.RESEND
_OVER = (_FAILED, _CLOSED)
_PEER = ("on_open", "on_data", "on_end", "on_abort")


def _row(**events: tuple[ReceiverState, ...]) -> dict[str, frozenset[ReceiverState]]:
    return {name: frozenset(states) for name, states in events.items()}


def _terminal(state: ReceiverState) -> dict[str, frozenset[ReceiverState]]:
    names = (*_PEER, "on_consumed", "next_read", "on_tick", "fail", "close")
    return _row(**dict.fromkeys(names, (state,)))


RECEIVER_TRANSITIONS: dict[ReceiverState, dict[str, frozenset[ReceiverState]]] = {
    _R.OPEN: _row(
        accept=(_R.RECEIVING,),
        on_abort=(_R.OPEN, _R.FAILED),
        on_tick=(_R.OPEN,),
        fail=(_R.FAILED,),
        close=(_R.CLOSED,),
    ),
    _R.RECEIVING: _row(
        on_open=(_R.RECEIVING,),
        on_data=(_R.RECEIVING, _R.COMPLETE, _R.FAILED),
        on_end=(_R.RECEIVING, _R.COMPLETE, _R.FAILED),
        on_abort=(_R.RECEIVING, _R.FAILED),
        on_consumed=(_R.RECEIVING,),
        next_read=(_R.RECEIVING,),
        on_tick=(_R.RECEIVING, _R.FAILED),
        fail=(_R.FAILED,),
        close=(_R.CLOSED,),
    ),
    _R.COMPLETE: _row(
        on_open=(_R.COMPLETE,),
        on_data=(_R.COMPLETE, _R.FAILED),
        on_end=(_R.COMPLETE, _R.FAILED),
        on_abort=(_R.COMPLETE, _R.FAILED),
        on_consumed=(_R.COMPLETE,),
        next_read=(_R.COMPLETE,),
        on_tick=(_R.COMPLETE,),
        fail=(_R.FAILED,),
        close=(_R.CLOSED,),
    ),
    _R.FAILED: _terminal(_R.FAILED),
    _R.CLOSED: _terminal(_R.CLOSED),
}
"""``state -> event -> states it may lead to``; an event missing from a row is illegal there."""


class ReceiverMachine(Machine[ReceiverState]):
    """The receiving end of one stream from ``src`` (see the module text).

    Args:
        src: the sending cell (only its aborts end the stream).
        chunk / window: the sender's proposal; ``max_chunk``: the largest chunk this end
            takes (its frame limit). Negotiated here (:func:`~flare_async.streaming.negotiate`).
        idle: seconds the consumer waits with nothing arriving (see :func:`receiver_idle`).
        max_damaged: chunks in a row that may fail their CRC before the stream fails.

    Attributes:
        chunk / window: what was accepted.
        flow: the credit arithmetic and verdicts (``committed``, ``consumed``, ``held``).
        max_chunks: chunks held at most (a peer sending tiny chunks must not turn a byte
            window into a flood of objects).
        queued: chunks delivered and not yet consumed.

    Raises:
        ProtocolError: a proposal that is not a positive size.
    """

    TRANSITIONS = RECEIVER_TRANSITIONS

    def __init__(
        self,
        src: str,
        *,
        chunk: int,
        window: int,
        max_chunk: int,
        idle: float,
        sid: int = 0,
        max_damaged: int = 3,
    ) -> None:
        self.src = src
        self.sid = sid
        self.chunk, self.window = negotiate(chunk, window, max_chunk)
        self.idle = idle
        self.flow = ReceiverFlow(self.window, max_damaged=max_damaged)
        self.max_chunks = self.window // 1024 + 64
        self.queued = 0
        self.state = _OPEN
        self.failure: StreamFail | None = None
        self._waiting_since: float | None = None

    def __repr__(self) -> str:
        return f"<ReceiverMachine stream {self.sid} from {self.src} {self.state.name}>"

    @property
    def committed(self) -> int:
        return self.flow.committed

    @property
    def held(self) -> int:
        """Bytes committed and not yet consumed (never more than the window)."""
        return self.flow.held

    @property
    def deadline(self) -> float | None:
        """When the waiting consumer's stall timer runs out (None: it does not run)."""
        return None if self._waiting_since is None else self._waiting_since + self.idle

    # ------------------------------------------------------------------ the peer
    @event("accept")
    def accept(self) -> tuple[Ack]:
        """The handler is running: grant the first window."""
        self.state = _RECEIVING
        return (Ack(0, self.flow.acked(), self.chunk, self.window),)

    @event("on_open")
    def on_open(self) -> tuple[AskResend, ...]:
        """Another ``StreamOpen`` for this stream (a resume probe, or a duplicate): say
        where we stand."""
        if self.state not in _LIVE:
            return ()
        self.flow.resend_asked = True
        return (AskResend(self.flow.committed, self.flow.acked(), self.chunk, self.window),)

    @event("on_data")
    def on_data(
        self, offset: int, size: int, intact: bool
    ) -> tuple[Deliver | AskResend | StreamFail, ...]:
        """A ``StreamData`` of ``size`` bytes at ``offset``; ``intact``: its CRC matched.

        Raises:
            ProtocolError: past the credit or the announced size, or too many chunks held
                (the machine is then FAILED, ``BAD_REQUEST``).
        """
        if self.state not in _LIVE:
            return ()
        flow = self.flow
        try:
            verdict = flow.on_data(offset, size, intact)
        except ProtocolError as exc:
            self._fail(exc, Status.BAD_REQUEST, str(exc))
            raise
        except StreamCorrupted as exc:
            return (self._fail(exc, Status.STREAM_CORRUPTED, str(exc)),)
        if verdict is _ACCEPT and size:
            if self.queued >= self.max_chunks:
                raise self._broken(
                    f"more than {self.max_chunks} chunks held for stream {self.sid}: "
                    "chunks too small for the window"
                )
            self.queued += 1
            self._waiting_since = None
            if flow.committed == flow.end_size:
                self.state = _COMPLETE
            return (Deliver(offset, size),)
        if verdict is _RESEND:
            return (AskResend(flow.committed, flow.acked()),)
        return ()  # a duplicate, or dropped while a resend is outstanding

    @event("on_end")
    def on_end(self, size: int) -> tuple[AskResend, ...]:
        """A ``StreamEnd`` announcing ``size`` bytes.

        Raises:
            ProtocolError: a size below what arrived, or unlike an earlier end's (FAILED).
        """
        if self.state not in _LIVE:
            return ()
        flow = self.flow
        if flow.end_size is not None and size != flow.end_size:
            raise self._broken(f"stream ended at {size} B, earlier at {flow.end_size} B")
        try:
            verdict = flow.on_end(size)
        except ProtocolError as exc:
            self._fail(exc, Status.BAD_REQUEST, str(exc))
            raise
        if verdict is EndVerdict.RESEND:
            return (AskResend(flow.committed, flow.acked()),)
        if verdict is EndVerdict.COMPLETE:
            self._waiting_since = None
            self.state = _COMPLETE
        return ()

    @event("on_abort")
    def on_abort(self, message: str, src: str) -> tuple[StreamFail, ...]:
        """A ``StreamAbort`` from ``src``: only the sender's ends the stream (a relay's is
        about the sender's path, which the sender resumes)."""
        if src != self.src or self.state in _OVER:
            return ()
        error = StreamAborted(f"{src} aborted the stream: {message}", reported_by=src)
        return (self._fail(error, None, ""),)

    # ------------------------------------------------------------------ the consumer
    @event("on_consumed")
    def on_consumed(self, size: int) -> tuple[Ack, ...]:
        """The consumer took one delivered chunk of ``size`` bytes; an ack when the credit
        grew by a quarter window since the last one."""
        if self.state not in _LIVE:
            return ()
        flow = self.flow
        if self.queued <= 0 or size > flow.committed - flow.consumed:
            raise ProtocolError(f"{self!r}: consumed {size} B, {flow.held} B delivered")
        self.queued -= 1
        self._waiting_since = None
        if flow.on_consumed(size):
            return (Ack(flow.committed, flow.acked()),)
        return ()

    @event("next_read")
    def next_read(self, now: float) -> ReceiverComplete | StreamWait | StreamFail:
        """The consumer took every delivered chunk and wants more: what it gets."""
        if self.state is _FAILED:
            if self.failure is None:  # pragma: no cover - FAILED is only entered by _fail
                raise ProtocolError(f"{self!r}: failed without a failure")
            return self.failure
        if self.state is _CLOSED:
            return StreamFail(StreamAborted("the stream handler returned"), None)
        if self.queued:
            raise ProtocolError(f"{self!r}: {self.queued} chunks wait to be consumed")
        if self.state is _COMPLETE:
            return ReceiverComplete(self.flow.committed)
        if self._waiting_since is None:
            self._waiting_since = now
        return StreamWait(self._waiting_since + self.idle)

    @event("on_tick")
    def on_tick(self, now: float) -> tuple[StreamFail, ...]:
        """The clock moved: a consumer that waited ``idle`` seconds for nothing fails."""
        deadline = self.deadline
        if self.state is not _RECEIVING or deadline is None or now < deadline:
            return ()
        error = StreamStalled(f"nothing arrived from {self.src} for {self.idle} s")
        return (self._fail(error, Status.STREAM_STALLED, "the receiver saw no progress"),)

    @event("fail")
    def fail(
        self, error: BaseException, status: Status | None, message: str = ""
    ) -> tuple[StreamFail, ...]:
        """Give up here (digest mismatch, handler failure, the cell stops): tell the sender
        with ``status`` (None: say nothing)."""
        if self.state in _OVER:
            return ()
        return (self._fail(error, status, message or str(error)),)

    @event("close")
    def close(self) -> None:
        """The handler returned (its ``StreamDone`` goes out): the stream is over here."""
        if self.state is not _FAILED:
            self.state = _CLOSED
        self.queued = 0
        self._waiting_since = None

    def _broken(self, message: str) -> ProtocolError:
        """The peer broke the protocol: FAILED (``BAD_REQUEST``); the error to raise."""
        error = ProtocolError(message)
        self._fail(error, Status.BAD_REQUEST, message)
        return error

    def _fail(self, error: BaseException, status: Status | None, message: str) -> StreamFail:
        self.failure = StreamFail(error, status, message)
        self.state = _FAILED
        self.queued = 0  # the cell drops the queued chunks
        self._waiting_since = None
        return self.failure


__all__ = [
    "MAX_IDLE",
    "RECEIVER_TRANSITIONS",
    "Ack",
    "AskResend",
    "ReceiverComplete",
    "Deliver",
    "ReceiverAction",
    "ReceiverMachine",
    "ReceiverState",
    "receiver_idle",
]
