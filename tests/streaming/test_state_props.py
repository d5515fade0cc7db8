"""A sender machine and a receiver machine driven against each other, with no I/O, through a
simulated channel that loses, duplicates, reorders and damages frames and whose link drops
(and comes back, or not). The object must arrive whole and in order, the receiver must never
hold more than its window, and every run must end within a bound of steps.

The harness drives the machines the way the cell would (``Run``: the sender's pump and
read-ahead, the receiver's hub and consumer), with the hub's memory of finished streams
(a probe after the end is answered with the ``StreamDone`` or the abort again)."""

from __future__ import annotations

import random
import zlib
from collections import deque
from dataclasses import dataclass, field

from hypothesis import event, given, settings
from hypothesis import strategies as st

from flare_async.errors import LinkBroken, Status, StreamStalled
from flare_async.streaming._recv_state import (
    Ack,
    AskResend,
    Deliver,
    ReceiverAction,
    ReceiverComplete,
    ReceiverMachine,
    ReceiverState,
)
from flare_async.streaming._send_state import (
    Committed,
    Probe,
    Rewind,
    SendData,
    SendEnd,
    SenderMachine,
    SenderState,
    SendOpen,
)
from flare_async.streaming._state import StreamFail, StreamWait

SENDER, RECEIVER, RELAY = "server.s", "server.r", "server"
DT = 0.25
"""Simulated seconds per step."""
PROBE = 1.0
IDLE = 30.0
MAX_STEPS = 2000
"""Every run ends within this many steps (a run that needs more is a hang). Runs through the
worst channel here take up to ~250."""


# ---------------------------------------------------------------------- frames, in short
@dataclass(frozen=True)
class Open:
    resume: bool


@dataclass(frozen=True)
class Data:
    offset: int
    payload: bytes
    crc: int


@dataclass(frozen=True)
class End:
    size: int


@dataclass(frozen=True)
class SenderAbort:
    message: str


@dataclass(frozen=True)
class AckFrame:
    committed: int
    limit: int
    chunk: int
    window: int
    resend: bool


@dataclass(frozen=True)
class DoneFrame:
    received: int


@dataclass(frozen=True)
class AbortFrame:
    status: int
    message: str
    src: str


Frame = Open | Data | End | SenderAbort | AckFrame | DoneFrame | AbortFrame


@dataclass
class Channel:
    """Both directions of the path, and what it does to frames."""

    rng: random.Random
    loss: float
    dup: float
    reorder: float
    damage: float
    to_receiver: list[Frame] = field(default_factory=list)
    to_sender: list[Frame] = field(default_factory=list)
    up: bool = True
    damaged_at: dict[int, int] = field(default_factory=dict)

    def send(self, queue: list[Frame], frame: Frame) -> bool:
        """False when the link is down (the sender's send fails; a receiver's post is lost)."""
        if not self.up:
            return False
        if self.rng.random() < self.loss:
            return True  # lost on the way, after the send returned
        damaged = False
        # at most 3 damaged copies of one chunk: the 4th in a row would fail the stream
        if (
            isinstance(frame, Data)
            and frame.payload
            and self.rng.random() < self.damage
            and self.damaged_at.get(frame.offset, 0) < 3
        ):
            self.damaged_at[frame.offset] = self.damaged_at.get(frame.offset, 0) + 1
            payload = bytearray(frame.payload)
            payload[self.rng.randrange(len(payload))] ^= 0xFF
            frame = Data(frame.offset, bytes(payload), frame.crc)
            damaged = True
        queue.append(frame)
        if not damaged and self.rng.random() < self.dup:  # (a damaged copy would count too)
            queue.append(frame)
        return True

    def take(self, queue: list[Frame]) -> list[Frame]:
        if self.rng.random() < self.reorder:
            self.rng.shuffle(queue)
        out = queue[:]
        queue.clear()
        return out

    def drop(self) -> None:
        """The link breaks: what was in flight is lost."""
        self.up = False
        self.to_receiver.clear()
        self.to_sender.clear()


class Run:
    """One stream between two cells, stepping a simulated clock by :data:`DT`."""

    def __init__(
        self, rng: random.Random, data: bytes, chunk: int, window: int, channel: Channel
    ) -> None:
        self.rng = rng
        self.data = data
        self.chunk = chunk
        self.now = 0.0
        self.ch = channel
        self.sender = SenderMachine(
            RECEIVER, me=SENDER, now=0.0, sid=7, chunk=chunk, window=window, idle=IDLE, probe=PROBE
        )
        self.receiver: ReceiverMachine | None = None
        self.finished: Frame | None = None  # what the hub answers late frames with
        self.log_start = 0
        self.log_end = 0
        self.queue: deque[bytes] = deque()
        self.out = bytearray()
        self.max_held = 0
        self.rewinds = 0
        self.consume_rate = rng.choice([0.2, 0.6, 1.0])

    def start(self) -> None:
        self.transmit(self.sender.start())

    # -------------------------------------------------------------- the sending cell
    def read_ahead(self) -> None:
        """The chunk log reads the source while it holds less than the window."""
        window = self.sender.flow.window
        if self.log_end < len(self.data) and self.log_end - self.log_start < window:
            self.log_end = min(len(self.data), self.log_end + self.chunk)
        if self.log_end == len(self.data):
            self.sender.source_ended(self.log_end)

    def ready(self) -> int | None:
        off = self.sender.next_offset
        if off >= self.log_end:
            return None
        assert off >= self.log_start, "a chunk the log dropped"
        assert off % self.chunk == 0, "resends start at chunk boundaries"
        return min(self.chunk, len(self.data) - off)

    def transmit(self, action: SendOpen | Probe | SendData | SendEnd) -> None:
        frame: Frame
        if isinstance(action, SendOpen | Probe):
            frame = Open(isinstance(action, Probe) and action.resume)
        elif isinstance(action, SendData):
            piece = self.data[action.offset : action.offset + action.size]
            frame = Data(action.offset, piece, zlib.crc32(piece))
        else:
            frame = End(action.size)
        if self.ch.send(self.ch.to_receiver, frame):
            self.sender.sent(action, self.now)
        else:
            self.sender.on_link_lost(LinkBroken("down"), self.now)

    def sender_failed(self, fail: StreamFail) -> None:
        if fail.abort is not None:
            self.ch.send(self.ch.to_receiver, SenderAbort(fail.message))

    def pump_sender(self) -> None:
        s = self.sender
        for _ in range(64):
            self.read_ahead()
            action = s.next_action(self.ready())
            if isinstance(action, SendData | SendEnd):
                self.transmit(action)
            elif isinstance(action, StreamWait):
                if action.deadline is None or self.now < action.deadline:
                    return
                for tick in s.on_tick(self.now):
                    if isinstance(tick, Probe):
                        self.transmit(tick)
                    else:
                        self.sender_failed(tick)
            else:
                return  # SenderDone or StreamFail: the sender's run is over
        raise AssertionError("the sender did not settle")

    def sender_frames(self) -> None:
        s = self.sender
        for f in self.ch.take(self.ch.to_sender):
            if isinstance(f, AckFrame):
                acts = s.on_ack(
                    self.now, f.committed, f.limit, chunk=f.chunk, window=f.window, resend=f.resend
                )
                for act in acts:
                    if isinstance(act, Committed):
                        self.log_start = max(self.log_start, act.offset)
                    elif isinstance(act, Rewind):
                        self.rewinds += 1
            elif isinstance(f, DoneFrame):
                s.on_done(f.received)
            elif isinstance(f, AbortFrame):
                for fail in s.on_abort(self.now, f.status, f.message, f.src):
                    self.sender_failed(fail)

    # -------------------------------------------------------------- the receiving cell
    def post(self, frame: Frame) -> None:
        self.ch.send(self.ch.to_sender, frame)

    def act(self, actions: tuple[ReceiverAction, ...]) -> None:
        for a in actions:
            if isinstance(a, Ack):
                self.post(AckFrame(a.committed, a.limit, a.chunk, a.window, False))
            elif isinstance(a, AskResend):
                self.post(AckFrame(a.committed, a.limit, a.chunk, a.window, True))
            elif isinstance(a, StreamFail):
                if a.abort is not None:
                    self.finished = AbortFrame(int(a.abort), a.message, RECEIVER)
                    self.post(self.finished)
            else:
                raise AssertionError(a)

    def hub(self) -> None:
        unknown = AbortFrame(int(Status.STREAM_ABORTED), "unknown stream", RECEIVER)
        for f in self.ch.take(self.ch.to_receiver):
            r = self.receiver
            if isinstance(f, Open) and r is None:
                if f.resume:
                    self.post(unknown)
                    continue
                r = self.receiver = ReceiverMachine(
                    SENDER,
                    chunk=self.chunk,
                    window=self.sender.flow.window,
                    max_chunk=1 << 20,
                    idle=IDLE,
                    sid=7,
                )
                self.act(r.accept())
            elif r is None:
                if isinstance(f, Data):
                    self.post(unknown)
            elif r.state in (ReceiverState.FAILED, ReceiverState.CLOSED):
                if isinstance(f, Open) and self.finished is not None:
                    self.post(self.finished)  # the answer was lost: send it again
            elif isinstance(f, Open):
                self.act(r.on_open())
            elif isinstance(f, Data):
                for a in r.on_data(f.offset, len(f.payload), zlib.crc32(f.payload) == f.crc):
                    if isinstance(a, Deliver):
                        assert a.offset == len(self.out) + sum(map(len, self.queue))
                        self.queue.append(f.payload)
                    else:
                        self.act((a,))
            elif isinstance(f, End):
                self.act(r.on_end(f.size))
            elif isinstance(f, SenderAbort):
                r.on_abort(f.message, SENDER)

    def consumer(self) -> None:
        r = self.receiver
        if r is None or r.state in (ReceiverState.FAILED, ReceiverState.CLOSED):
            return
        while self.queue and self.rng.random() < self.consume_rate:
            piece = self.queue.popleft()
            self.out += piece
            self.act(r.on_consumed(len(piece)))
        if self.queue:
            return
        step = r.next_read(self.now)
        if isinstance(step, ReceiverComplete):
            assert step.size == len(self.out)
            r.close()  # the handler returns: its StreamDone goes out (and is kept)
            self.finished = DoneFrame(len(self.out))
            self.post(self.finished)
        elif (
            isinstance(step, StreamWait) and step.deadline is not None and self.now >= step.deadline
        ):
            self.act(r.on_tick(self.now))

    # -------------------------------------------------------------- the whole
    def over(self) -> bool:
        r = self.receiver
        sender_over = self.sender.state in (SenderState.DONE, SenderState.FAILED)
        receiver_over = r is None or r.state in (ReceiverState.FAILED, ReceiverState.CLOSED)
        return sender_over and receiver_over

    def step(self) -> None:
        self.sender_frames()
        self.pump_sender()
        self.hub()
        self.consumer()
        r = self.receiver
        if r is not None:
            assert r.held <= r.window, "the receiver holds more than its window"
            if r.state is ReceiverState.RECEIVING:
                assert r.held == sum(map(len, self.queue))
            self.max_held = max(self.max_held, r.held)
        self.now += DT


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    chunks=st.integers(0, 24),
    tail=st.integers(0, 4095),
    chunk=st.sampled_from([4096, 5000, 8192]),
    window_chunks=st.integers(2, 6),
    loss=st.sampled_from([0.0, 0.05, 0.2]),
    dup=st.sampled_from([0.0, 0.1]),
    reorder=st.sampled_from([0.0, 0.3]),
    damage=st.sampled_from([0.0, 0.1, 0.3]),
    drops=st.lists(st.tuples(st.integers(0, 150), st.integers(1, 40)), max_size=3),
)
def test_the_object_arrives_whole_through_a_bad_channel(
    seed: int,
    chunks: int,
    tail: int,
    chunk: int,
    window_chunks: int,
    loss: float,
    dup: float,
    reorder: float,
    damage: float,
    drops: list[tuple[int, int]],
) -> None:
    """Loss, duplicates, reordering, damaged chunks and link drops (each shorter than the idle
    limit, some announced by a relay's abort): both ends finish, with exactly the object."""
    rng = random.Random(seed)
    data = rng.randbytes(chunks * chunk + (tail if chunks else min(tail, 100)))
    run = Run(rng, data, chunk, chunk * window_chunks, Channel(rng, loss, dup, reorder, damage))
    down_until = -1
    starts = dict(drops)
    resumed = False
    run.start()
    steps = 0
    while not run.over():
        steps += 1
        assert steps < MAX_STEPS, f"no end after {steps} steps: {run.sender!r} {run.receiver!r}"
        if steps in starts and run.ch.up:
            run.ch.drop()
            down_until = steps + starts[steps]
            # a relay saw it and tells the sender (before the first ack that fails the
            # stream, as no route fails a request: test_state covers it)
            if run.sender.flow.started and rng.random() < 0.5:
                run.sender.on_abort(run.now, int(Status.LINK_BROKEN), "link broke", RELAY)
        elif steps == down_until:
            run.ch.up = True
        resumed = resumed or run.sender.state is SenderState.RESUMING
        run.step()
    event(f"rewound: {run.rewinds > 0}, resumed: {resumed}, chunks: {min(chunks, 10)}+")
    assert run.sender.state is SenderState.DONE, run.sender.failure
    assert run.receiver is not None
    assert run.receiver.state is ReceiverState.CLOSED
    assert bytes(run.out) == data
    assert run.sender.received == len(data)
    assert run.max_held <= run.receiver.window


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    chunks=st.integers(1, 12),
    window_chunks=st.integers(2, 4),
    at=st.integers(0, 60),
    loss=st.sampled_from([0.0, 0.1]),
)
def test_a_link_that_never_comes_back_fails_both_ends(
    seed: int, chunks: int, window_chunks: int, at: int, loss: float
) -> None:
    """The link drops for good at step ``at``: the sender ends FAILED (stalled) and so does
    the receiver, unless it already had everything (then its handler returned); nobody
    hangs."""
    rng = random.Random(seed)
    chunk = 4096
    data = rng.randbytes(chunks * chunk)
    run = Run(rng, data, chunk, chunk * window_chunks, Channel(rng, loss, 0.0, 0.0, 0.0))
    run.start()
    steps = 0
    while not run.over():
        steps += 1
        assert steps < MAX_STEPS, f"hung: {run.sender!r} {run.receiver!r}"
        if steps == at:
            run.ch.drop()
        run.step()
    sender, receiver = run.sender, run.receiver
    event(f"ends: {sender.state.name}, {receiver.state.name if receiver else None}")
    if sender.state is SenderState.DONE:  # everything made it before the drop
        assert bytes(run.out) == data
        return
    assert sender.state is SenderState.FAILED
    assert sender.failure is not None
    assert isinstance(sender.failure.error, StreamStalled)
    assert steps * DT <= 2 * IDLE + 2 * PROBE
    if receiver is None:  # the open never got there
        return
    if receiver.state is ReceiverState.CLOSED:  # it had everything; its answer was lost
        assert bytes(run.out) == data
        return
    assert receiver.state is ReceiverState.FAILED
    assert receiver.failure is not None
    assert isinstance(receiver.failure.error, StreamStalled)
    assert receiver.failure.abort is Status.STREAM_STALLED
    assert bytes(run.out) == data[: len(run.out)]
