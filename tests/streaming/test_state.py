"""The stream protocol's state machines, transition by transition: every event each state
allows (and where it leads), every event it refuses, and the behaviour behind each."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from flare_async.errors import (
    LinkBroken,
    NoHandler,
    Overloaded,
    ProtocolError,
    Status,
    StreamAborted,
    StreamCorrupted,
    StreamStalled,
    Unreachable,
)
from flare_async.streaming._recv_state import (
    MAX_IDLE,
    RECEIVER_TRANSITIONS,
    Ack,
    AskResend,
    Deliver,
    ReceiverComplete,
    ReceiverMachine,
    ReceiverState,
    receiver_idle,
)
from flare_async.streaming._send_state import (
    SENDER_TRANSITIONS,
    Committed,
    Probe,
    Rewind,
    SendData,
    SendEnd,
    SenderBackoff,
    SenderDone,
    SenderMachine,
    SenderState,
    SendOpen,
)
from flare_async.streaming._state import Machine, StreamFail, StreamWait, event, events_of

DST, ME, RELAY, STRANGER = "server.r", "server.s", "server", "other.x"
S = SenderState
R = ReceiverState
C = 4096
W = 4 * C


def state_of(m: SenderMachine | ReceiverMachine) -> SenderState | ReceiverState:
    """The machine's state, read afresh (the type checker would keep an earlier narrowing)."""
    return m.state


def call_allowed(call: Callable[[Any], Any], m: Any) -> None:
    """Call an event the state allows: the table must not refuse it. With these stock
    arguments it may still be a broken peer's (or a driver's) mistake, which the behaviour
    tests below cover; either way the machine must end in a state the table lists."""
    refused = ""
    try:
        call(m)
    except ProtocolError as exc:
        refused = str(exc)
    assert "is not allowed in state" not in refused
    assert "transition table" not in refused


# ---------------------------------------------------------------------- sender, by state
def idle() -> SenderMachine:
    return SenderMachine(DST, me=ME, now=0.0, sid=1, chunk=100, window=300, idle=10, probe=1)


def opening() -> SenderMachine:
    m = idle()
    m.sent(m.start(), 0.0)
    return m


def busy() -> SenderMachine:
    m = opening()
    m.on_abort(0.1, Status.OVERLOADED, "full", DST)
    return m


def sending() -> SenderMachine:
    m = opening()
    m.on_ack(0.1, 0, 300, chunk=100, window=300)
    return m


def ending() -> SenderMachine:
    m = sending()
    m.source_ended(200)
    for _ in range(3):
        action = m.next_action(100 if m.next_offset < 200 else None)
        assert isinstance(action, SendData | SendEnd)
        m.sent(action, 0.2)
    return m


def resuming() -> SenderMachine:
    m = sending()
    m.on_link_lost(LinkBroken("reset"), 0.2)
    return m


def done() -> SenderMachine:
    m = sending()
    m.on_done(0)
    return m


def failed() -> SenderMachine:
    m = sending()
    m.fail(RuntimeError("gave up"))
    return m


SENDER_IN: dict[SenderState, Callable[[], SenderMachine]] = {
    S.IDLE: idle,
    S.OPENING: opening,
    S.BUSY: busy,
    S.SENDING: sending,
    S.ENDING: ending,
    S.RESUMING: resuming,
    S.DONE: done,
    S.FAILED: failed,
}

SENDER_CALLS: dict[str, Callable[[SenderMachine], Any]] = {
    "start": lambda m: m.start(),
    "reopen": lambda m: m.reopen(),
    "source_ended": lambda m: m.source_ended(m.flow.high),
    "sent": lambda m: m.sent(SendOpen(), 0.5),
    "fail": lambda m: m.fail(RuntimeError("x")),
    "on_ack": lambda m: m.on_ack(0.5, 0, 300),
    "on_done": lambda m: m.on_done(0),
    "on_abort": lambda m: m.on_abort(0.5, Status.STREAM_ABORTED, "bye", DST),
    "on_link_lost": lambda m: m.on_link_lost(LinkBroken("x"), 0.5),
    "on_tick": lambda m: m.on_tick(100.0),
    "next_action": lambda m: m.next_action(),
}


def test_the_sender_helpers_reach_their_states_and_every_event_is_callable() -> None:
    assert set(SENDER_IN) == set(SenderState) == set(SENDER_TRANSITIONS)
    assert set(SENDER_CALLS) == events_of(SENDER_TRANSITIONS)
    for state, make in SENDER_IN.items():
        assert make().state is state


@pytest.mark.parametrize("state", list(SenderState))
def test_sender_refuses_what_its_state_does_not_allow(state: SenderState) -> None:
    for name in sorted(events_of(SENDER_TRANSITIONS) - set(SENDER_TRANSITIONS[state])):
        m = SENDER_IN[state]()
        with pytest.raises(ProtocolError, match=f"{name} is not allowed in state {state.name}"):
            SENDER_CALLS[name](m)
        assert m.state is state, name


@pytest.mark.parametrize("state", list(SenderState))
def test_sender_takes_what_its_state_allows_and_goes_where_the_table_says(
    state: SenderState,
) -> None:
    for name, allowed in SENDER_TRANSITIONS[state].items():
        m = SENDER_IN[state]()
        call_allowed(SENDER_CALLS[name], m)
        assert m.state in allowed, (name, m.state)


# ---------------------------------------------------------------------- sender, behaviour
def test_a_stream_from_open_to_done() -> None:
    m = idle()
    assert m.start() == SendOpen()
    m.sent(SendOpen(), 0.0)
    assert m.next_action() == StreamWait(1.0)  # the first probe is due a probe interval later
    assert m.on_ack(0.1, 0, 200, chunk=100, window=200) == ()
    assert state_of(m) is S.SENDING
    assert m.flow.window == 200
    assert m.next_action() == StreamWait(1.1)  # the source has brought nothing yet
    assert m.next_action(100) == SendData(0, 100)
    m.sent(SendData(0, 100), 0.2)
    m.sent(SendData(100, 100), 0.2)
    assert m.next_action(50) == StreamWait(1.2)  # no credit left
    assert m.on_ack(0.3, 100, 300) == (Committed(100),)
    assert m.next_action(50) == SendData(200, 50)
    m.sent(SendData(200, 50), 0.4)
    m.source_ended(250)
    assert m.next_action() == SendEnd(250)
    m.sent(SendEnd(250), 0.4)
    assert state_of(m) is S.ENDING
    assert m.next_action() == StreamWait(1.4)
    assert m.on_ack(0.5, 250, 350) == (Committed(250),)
    assert state_of(m) is S.ENDING
    assert m.on_done(250) == (SenderDone(250),)
    assert state_of(m) is S.DONE
    assert m.next_action() == SenderDone(250)
    assert m.on_ack(0.6, 250, 400) == ()  # late answers change nothing
    assert m.fail(RuntimeError("late")) == ()


def test_a_resend_request_rewinds_and_stale_acks_do_not() -> None:
    m = sending()
    for _ in range(3):
        m.sent(m.next_action(100), 0.2)  # type: ignore[arg-type]
    assert m.on_ack(0.3, 100, 400, resend=True) == (Rewind(100), Committed(100))
    assert m.next_action(100) == SendData(100, 100)
    assert m.on_ack(0.3, 50, 350) == ()  # stale: neither committed nor credit go back
    assert m.flow.limit == 400
    with pytest.raises(ProtocolError, match="commits"):
        m.on_ack(0.4, 301, 400)  # never sent
    assert state_of(m) is S.FAILED
    assert m.failure is not None
    assert m.failure.abort is Status.STREAM_ABORTED
    assert m.next_action() is m.failure


def test_a_send_that_returns_after_a_rewind_does_not_skip_a_chunk() -> None:
    m = sending()
    m.sent(m.next_action(100), 0.2)  # type: ignore[arg-type]
    m.sent(m.next_action(100), 0.2)  # type: ignore[arg-type]
    pending = m.next_action(100)
    assert pending == SendData(200, 100)
    assert m.on_ack(0.3, 100, 400, resend=True)[0] == Rewind(100)  # while it was on its way
    m.sent(pending, 0.3)
    assert m.next_offset == 100
    assert m.flow.high == 300
    assert m.next_action(100) == SendData(100, 100)


def test_probes_and_the_idle_limit() -> None:
    m = opening()
    assert m.on_tick(0.5) == ()  # not due yet
    assert m.on_tick(1.0) == (Probe(resume=False),)  # before the first ack: open again
    assert m.deadline == 2.0
    m = sending()
    assert m.on_tick(5.0) == (Probe(resume=True),)
    (fail,) = m.on_tick(10.5)  # idle (10 s) without progress since the start
    assert isinstance(fail, StreamFail)
    assert isinstance(fail.error, StreamStalled)
    assert fail.abort is Status.STREAM_ABORTED
    assert fail.message.startswith("the sender gave up: StreamStalled(")
    assert state_of(m) is S.FAILED


def test_once_everything_is_committed_any_ack_is_life() -> None:
    m = ending()
    m.on_ack(1.0, 200, 500)
    assert m.last_progress == 1.0
    m.on_ack(9.0, 200, 500)  # nothing new, but the receiver is there
    assert m.last_progress == 9.0
    assert m.on_tick(15.0) == (Probe(resume=True),)


def test_a_probe_while_ending_sends_the_end_again() -> None:
    m = ending()
    assert m.next_action() == StreamWait(1.2)
    assert m.on_tick(1.2) == (Probe(resume=True),)
    assert state_of(m) is S.SENDING
    assert m.next_action() == SendEnd(200)


def test_a_rewind_after_the_end_resends_data_but_not_the_end() -> None:
    m = ending()
    assert m.on_ack(0.3, 100, 400, resend=True) == (Rewind(100), Committed(100))
    assert state_of(m) is S.SENDING
    action = m.next_action(100)
    assert action == SendData(100, 100)
    m.sent(action, 0.4)
    assert state_of(m) is S.ENDING  # the receiver has the End: it completes on its own
    assert m.next_action() == StreamWait(1.4)


def test_a_lost_path_resumes_and_no_route_at_the_start_fails() -> None:
    m = opening()
    assert m.on_link_lost(LinkBroken("reset"), 0.1) == ()
    assert state_of(m) is S.OPENING  # probes open again
    (fail,) = m.on_link_lost(Unreachable("no route"), 0.2)
    assert isinstance(fail.error, Unreachable)
    assert fail.abort is Status.STREAM_ABORTED  # reported by nobody: the receiver is told
    m = resuming()
    assert m.next_action(100) == StreamWait(1.2)  # nothing goes out but probes
    assert m.on_link_lost(Unreachable("still no route"), 0.3) == ()  # started: keep trying
    assert m.on_tick(1.3) == (Probe(resume=True),)
    m.sent(Probe(resume=True), 1.3)
    assert m.on_ack(1.4, 0, 300, chunk=100, window=300, resend=True) == ()
    assert state_of(m) is S.SENDING
    assert m.next_action(100) == SendData(0, 100)


def test_aborts_by_who_sends_them() -> None:
    m = sending()
    assert m.on_abort(0.2, Status.STREAM_ABORTED, "not yours", STRANGER) == ()
    assert state_of(m) is S.SENDING  # only the receiver or a cell on the path counts
    assert m.on_abort(0.2, Status.LINK_BROKEN, "link broke", RELAY) == ()
    assert state_of(m) is S.RESUMING
    assert m.on_abort(0.2, Status.UNREACHABLE, "still", RELAY) == ()
    assert state_of(m) is S.RESUMING
    (fail,) = m.on_abort(0.3, Status.STREAM_ABORTED, "handler gone", DST)
    assert isinstance(fail.error, StreamAborted)
    assert fail.error.reported_by == DST
    assert fail.abort is None  # the receiver ended it: nothing to tell it
    m = opening()
    (fail,) = m.on_abort(0.2, Status.UNREACHABLE, "no route", RELAY)  # before the first ack
    assert isinstance(fail.error, Unreachable)
    m = sending()
    (fail,) = m.on_abort(0.2, Status.NO_HANDLER, "nothing there", DST)
    assert isinstance(fail.error, NoHandler)
    assert fail.abort is Status.STREAM_ABORTED  # as today: told, harmlessly


def test_a_full_receiver_is_asked_again_with_a_growing_pause() -> None:
    m = opening()
    assert m.on_abort(0.1, Status.OVERLOADED, "full", DST) == ()
    assert state_of(m) is S.BUSY
    assert m.next_action() == SenderBackoff(0.04)
    assert m.on_tick(50.0) == ()  # the backoff is the driver's to wait, not a probe
    assert m.reopen() == SendOpen()
    assert state_of(m) is S.OPENING
    m.on_abort(0.2, Status.OVERLOADED, "full", DST)
    assert m.next_action() == SenderBackoff(0.08)
    for _ in range(8):
        m.on_abort(0.3, Status.OVERLOADED, "full", DST)
    assert m.next_action() == SenderBackoff(1.0)  # capped by the probe interval
    assert m.on_ack(0.4, 0, 300) == ()  # an answer after all: no reopen
    assert state_of(m) is S.SENDING
    m = busy()
    (fail,) = m.on_abort(10.5, Status.OVERLOADED, "full", DST)  # past the idle limit
    assert isinstance(fail.error, Overloaded)
    m = sending()
    (fail,) = m.on_abort(0.2, Status.OVERLOADED, "full", DST)  # after the start: a failure
    assert isinstance(fail.error, Overloaded)


def test_sender_refuses_what_a_driver_cannot_mean() -> None:
    m = sending()
    with pytest.raises(ProtocolError, match="a chunk of 0 B"):
        m.next_action(0)
    m.source_ended(150)
    m.sent(SendData(0, 100), 0.2)
    with pytest.raises(ProtocolError, match="a chunk of 100 B at 100 B"):
        m.next_action(100)
    with pytest.raises(ProtocolError, match="no chunk at 100 B"):
        m.next_action(None)
    with pytest.raises(ProtocolError, match="source ended"):
        m.source_ended(160)
    with pytest.raises(ProtocolError, match="before the first ack"):
        opening().sent(SendData(0, 100), 0.1)
    assert state_of(m) is S.SENDING


def test_local_failure_and_what_the_receiver_is_told() -> None:
    m = idle()
    (fail,) = m.fail(RuntimeError("the source broke"))
    assert fail.abort is Status.STREAM_ABORTED
    assert fail.message == "the sender gave up: RuntimeError('the source broke')"
    (fail,) = sending().fail(KeyboardInterrupt())  # a cancellation: no reason worth telling
    assert fail.abort is Status.STREAM_ABORTED
    assert fail.message == "the sender gave up"
    m = sending()
    (fail,) = m.fail(StreamAborted("bye", reported_by=DST))
    assert fail.abort is None
    assert m.fail(RuntimeError("again")) == ()
    assert m.failure is fail


def test_an_event_keeps_its_methods_signature_and_refuses_what_it_cannot_write() -> None:
    for name in ("on_ack", "next_action", "sent"):
        wrapped = getattr(SenderMachine, name)
        assert inspect.signature(wrapped) == inspect.signature(wrapped.__wrapped__)
    m = sending()
    assert m.on_ack(now=2.0, committed=0, limit=W, resend=False) == ()
    with pytest.raises(TypeError, match="variadic positional"):

        @event("anything")
        def varargs(self: Machine[Any], *parts: int) -> None: ...


# ---------------------------------------------------------------------- receiver, by state
def r_open(**kw: Any) -> ReceiverMachine:
    return ReceiverMachine(ME, chunk=C, window=W, max_chunk=1 << 20, idle=10.0, sid=1, **kw)


def r_receiving() -> ReceiverMachine:
    m = r_open()
    m.accept()
    return m


def r_complete() -> ReceiverMachine:
    m = r_receiving()
    m.on_data(0, C, True)
    m.on_end(C)
    return m


def r_failed() -> ReceiverMachine:
    m = r_receiving()
    m.on_abort("bye", ME)
    return m


def r_closed() -> ReceiverMachine:
    m = r_complete()
    m.close()
    return m


RECEIVER_IN: dict[ReceiverState, Callable[[], ReceiverMachine]] = {
    R.OPEN: r_open,
    R.RECEIVING: r_receiving,
    R.COMPLETE: r_complete,
    R.FAILED: r_failed,
    R.CLOSED: r_closed,
}

RECEIVER_CALLS: dict[str, Callable[[ReceiverMachine], Any]] = {
    "accept": lambda m: m.accept(),
    "on_open": lambda m: m.on_open(),
    "on_data": lambda m: m.on_data(m.committed, C, True),
    "on_end": lambda m: m.on_end(m.committed),
    "on_abort": lambda m: m.on_abort("bye", ME),
    "on_consumed": lambda m: m.on_consumed(C),
    "next_read": lambda m: m.next_read(0.5),
    "on_tick": lambda m: m.on_tick(100.0),
    "fail": lambda m: m.fail(RuntimeError("x"), Status.INTERNAL),
    "close": lambda m: m.close(),
}


def test_the_receiver_helpers_reach_their_states_and_every_event_is_callable() -> None:
    assert set(RECEIVER_IN) == set(ReceiverState) == set(RECEIVER_TRANSITIONS)
    assert set(RECEIVER_CALLS) == events_of(RECEIVER_TRANSITIONS)
    for state, make in RECEIVER_IN.items():
        assert make().state is state


@pytest.mark.parametrize("state", list(ReceiverState))
def test_receiver_refuses_what_its_state_does_not_allow(state: ReceiverState) -> None:
    for name in sorted(events_of(RECEIVER_TRANSITIONS) - set(RECEIVER_TRANSITIONS[state])):
        m = RECEIVER_IN[state]()
        with pytest.raises(ProtocolError, match=f"{name} is not allowed in state {state.name}"):
            RECEIVER_CALLS[name](m)
        assert state_of(m) is state, name


@pytest.mark.parametrize("state", list(ReceiverState))
def test_receiver_takes_what_its_state_allows_and_goes_where_the_table_says(
    state: ReceiverState,
) -> None:
    for name, allowed in RECEIVER_TRANSITIONS[state].items():
        m = RECEIVER_IN[state]()
        call_allowed(RECEIVER_CALLS[name], m)
        assert m.state in allowed, (name, m.state)


# ---------------------------------------------------------------------- receiver, behaviour
def test_open_negotiates_and_grants_the_first_window() -> None:
    m = ReceiverMachine(ME, chunk=10, window=10, max_chunk=1 << 20, idle=5.0)
    assert (m.chunk, m.window) == (4096, 8192)
    assert m.max_chunks == 8192 // 1024 + 64
    assert m.accept() == (Ack(0, 8192, 4096, 8192),)
    assert state_of(m) is R.RECEIVING
    with pytest.raises(ProtocolError):
        ReceiverMachine(ME, chunk=0, window=W, max_chunk=1 << 20, idle=5.0)


def test_chunks_in_order_duplicates_gaps_and_the_resend() -> None:
    m = r_receiving()
    assert m.on_data(0, C, True) == (Deliver(0, C),)
    assert m.on_data(0, C, True) == ()  # a duplicate
    assert m.on_data(2 * C, C, True) == (AskResend(C, W),)  # a gap: ask once
    assert m.on_data(3 * C, C, True) == ()  # dropped until the resend comes
    assert m.on_data(C, C, True) == (Deliver(C, C),)
    assert m.committed == 2 * C
    assert m.queued == 2


def test_damaged_chunks_are_asked_again_then_fail_the_stream() -> None:
    m = r_receiving()
    for _ in range(3):
        assert m.on_data(0, C, False) == (AskResend(0, W),)
    (fail,) = m.on_data(0, C, False)
    assert isinstance(fail, StreamFail)
    assert isinstance(fail.error, StreamCorrupted)
    assert fail.abort is Status.STREAM_CORRUPTED
    assert state_of(m) is R.FAILED
    assert m.on_data(0, C, True) == ()  # over: the hub answers late frames


def test_a_peer_past_the_credit_or_the_size_breaks_the_protocol() -> None:
    m = r_receiving()
    with pytest.raises(ProtocolError, match="credit"):
        m.on_data(W, C, True)
    assert state_of(m) is R.FAILED
    assert m.failure is not None
    assert m.failure.abort is Status.BAD_REQUEST
    m = r_complete()
    with pytest.raises(ProtocolError, match="past the size"):
        m.on_data(C, 1, True)
    m = r_receiving()
    m.on_data(0, C, True)
    with pytest.raises(ProtocolError, match="after"):
        m.on_end(C - 1)
    m = r_receiving()
    m.on_end(2 * C)
    with pytest.raises(ProtocolError, match="earlier at"):
        m.on_end(3 * C)


def test_too_many_tiny_chunks_break_the_protocol() -> None:
    m = r_receiving()
    for i in range(m.max_chunks):
        m.on_data(i, 1, True)
    with pytest.raises(ProtocolError, match="chunks too small"):
        m.on_data(m.max_chunks, 1, True)
    assert state_of(m) is R.FAILED


def test_the_end_completes_or_asks_for_what_is_missing() -> None:
    m = r_receiving()
    m.on_data(0, C, True)
    assert m.on_end(2 * C) == (AskResend(C, W),)
    assert m.on_end(2 * C) == ()  # asked already: wait for it
    assert state_of(m) is R.RECEIVING
    assert m.on_data(C, C, True) == (Deliver(C, C),)
    assert state_of(m) is R.COMPLETE
    assert m.on_data(C, C, True) == ()  # a late duplicate
    assert m.on_end(2 * C) == ()
    m = r_receiving()
    m.on_data(0, C, True)
    assert m.on_end(C) == ()
    assert state_of(m) is R.COMPLETE


def test_the_consumer_grants_credit_and_finds_the_end() -> None:
    m = r_receiving()
    m.on_data(0, C, True)
    m.on_data(C, C, True)
    with pytest.raises(ProtocolError, match="wait to be consumed"):
        m.next_read(0.0)
    assert m.on_consumed(C) == (Ack(2 * C, W + C),)  # a quarter window more credit
    assert m.on_consumed(C // 2) == ()
    with pytest.raises(ProtocolError, match="consumed"):
        m.on_consumed(C)  # one chunk was delivered, two are taken
    assert state_of(m) is R.RECEIVING
    m.on_end(2 * C)
    assert state_of(m) is R.COMPLETE
    assert m.next_read(0.0) == ReceiverComplete(2 * C)
    m.close()
    assert state_of(m) is R.CLOSED
    later = m.next_read(0.1)
    assert isinstance(later, StreamFail)
    assert isinstance(later.error, StreamAborted)


def test_a_waiting_consumer_stalls_after_the_idle_limit() -> None:
    m = r_receiving()
    assert m.on_tick(100.0) == ()  # nobody waits: no timer
    assert m.next_read(1.0) == StreamWait(11.0)
    assert m.next_read(5.0) == StreamWait(11.0)  # the same wait
    assert m.on_tick(10.9) == ()
    m.on_data(0, C, True)  # a chunk stops the timer
    assert m.deadline is None
    m.on_consumed(C)
    assert m.next_read(12.0) == StreamWait(22.0)
    (fail,) = m.on_tick(22.0)
    assert isinstance(fail.error, StreamStalled)
    assert (fail.abort, fail.message) == (Status.STREAM_STALLED, "the receiver saw no progress")
    assert m.next_read(23.0) is m.failure


def test_a_resume_says_where_the_receiver_stands() -> None:
    m = r_receiving()
    m.on_data(0, C, True)
    assert m.on_open() == (AskResend(C, W, C, W),)
    assert m.on_data(2 * C, C, True) == ()  # a resend is outstanding: gaps are quiet
    assert m.on_data(C, C, True) == (Deliver(C, C),)
    assert r_complete().on_open() == (AskResend(C, W, C, W),)
    assert r_closed().on_open() == ()


def test_aborts_and_local_failures() -> None:
    m = r_receiving()
    assert m.on_abort("lost my path", RELAY) == ()  # a relay's: the sender resumes
    (fail,) = m.on_abort("gave up", ME)
    assert isinstance(fail.error, StreamAborted)
    assert fail.error.reported_by == ME
    assert fail.abort is None
    m = r_complete()
    (fail,) = m.fail(StreamCorrupted("sha mismatch"), Status.STREAM_CORRUPTED)
    assert (fail.abort, fail.message) == (Status.STREAM_CORRUPTED, "sha mismatch")
    assert m.fail(RuntimeError("again"), Status.INTERNAL) == ()
    m = r_open()
    m.close()
    assert state_of(m) is R.CLOSED
    assert m.on_data(0, C, True) == ()


def test_the_receiver_waits_for_the_sender_idle_up_to_an_hour() -> None:
    assert receiver_idle(60.0, 5.0) == 60.0
    assert receiver_idle(60.0, 600.0) == 600.0
    assert receiver_idle(60.0, 1e9) == MAX_IDLE
    assert receiver_idle(60.0, 0.0) == 60.0
