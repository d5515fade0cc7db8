"""The sans-IO ends of a stream: credit, verdicts, resends — and a lossy channel between them
that must still deliver every byte exactly once, in order."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flare_async.errors import ProtocolError, StreamCorrupted
from flare_async.streaming import (
    MAX_WINDOW,
    EndVerdict,
    ReceiverFlow,
    SenderFlow,
    Verdict,
    negotiate,
)
from flare_async.streaming._flow import MIN_CHUNK


def test_negotiate_caps_the_chunk_and_keeps_two_chunks_in_the_window() -> None:
    assert negotiate(1 << 20, 16 << 20, 64 << 20) == (1 << 20, 16 << 20)
    assert negotiate(128 << 20, 16 << 20, 64 << 20) == (64 << 20, 128 << 20)
    assert negotiate(1 << 20, 1 << 20, 64 << 20) == (1 << 20, 2 << 20)
    assert negotiate(10, 10, 64 << 20) == (MIN_CHUNK, 2 * MIN_CHUNK)
    assert negotiate(1 << 20, 1 << 40, 64 << 20)[1] == MAX_WINDOW
    with pytest.raises(ProtocolError):
        negotiate(0, 1 << 20, 64 << 20)
    with pytest.raises(ProtocolError):
        negotiate(1 << 20, -1, 64 << 20)


def test_sender_sends_only_within_credit() -> None:
    s = SenderFlow(chunk=100, window=300)
    assert s.credit == 0
    assert not s.started
    s.on_ack(0, 300)
    assert s.started
    assert s.credit == 300
    s.sent(100)
    s.sent(100)
    assert s.credit == 100
    assert not s.on_ack(200, 500)
    assert s.committed == 200
    assert s.credit == 300


def test_sender_rewinds_on_resend_and_rejects_lies() -> None:
    s = SenderFlow(chunk=100, window=300)
    s.on_ack(0, 300)
    s.sent(300)
    assert s.on_ack(100, 400, resend=True)
    assert s.next_offset == 100
    assert s.rewinds == 1
    assert not s.on_ack(50, 350)  # stale: neither committed nor credit go back
    assert s.committed == 100
    assert s.limit == 400
    assert not s.on_ack(250, 400)  # sent before the rewind, arrived after all: move on
    assert s.next_offset == 250
    with pytest.raises(ProtocolError, match="commits"):
        s.on_ack(301, 400)  # never sent
    with pytest.raises(ProtocolError):
        s.rewind(1000)


def test_receiver_accepts_in_order_and_judges_the_rest() -> None:
    r = ReceiverFlow(window=300)
    assert r.on_data(0, 100, True) is Verdict.ACCEPT
    assert r.on_data(0, 100, True) is Verdict.DUPLICATE
    assert r.on_data(200, 100, True) is Verdict.RESEND  # gap: 100..200 missing
    assert r.on_data(200, 100, True) is Verdict.IGNORE  # resend already asked for
    assert r.on_data(100, 100, True) is Verdict.ACCEPT  # the resend arrives
    assert r.committed == 200
    assert r.held == 200
    with pytest.raises(ProtocolError, match="credit"):
        r.on_data(200, 200, True)  # past consumed + window


def test_receiver_asks_again_for_a_damaged_chunk_then_gives_up() -> None:
    r = ReceiverFlow(window=1000, max_damaged=2)
    assert r.on_data(0, 100, False) is Verdict.RESEND
    assert r.on_data(0, 100, False) is Verdict.RESEND
    with pytest.raises(StreamCorrupted):
        r.on_data(0, 100, False)


def test_receiver_end_and_credit() -> None:
    r = ReceiverFlow(window=400)
    r.on_data(0, 100, True)
    assert r.on_end(200) is EndVerdict.RESEND
    assert r.on_end(200) is EndVerdict.WAIT
    with pytest.raises(ProtocolError):
        r.on_end(50)
    r.on_data(100, 100, True)
    assert r.complete
    with pytest.raises(ProtocolError, match="past the size"):
        r.on_data(200, 1, True)
    assert r.on_consumed(100)  # a quarter window of new credit: ack now
    r.acked()
    assert not r.on_consumed(50)
    with pytest.raises(ValueError):
        r.on_consumed(1000)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 5000),
    chunk=st.sampled_from([1, 7, 64, 500]),
    window_chunks=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.1, 0.3]),
    damage=st.sampled_from([0.0, 0.1, 0.2]),
)
def test_a_lossy_damaging_reordering_channel_still_delivers_every_byte_once(
    size: int, chunk: int, window_chunks: int, seed: int, loss: float, damage: float
) -> None:
    """Drive both ends by hand over a channel that drops, damages, duplicates and delays
    chunks and acks; when nothing moves the sender probes (as the cell does on its timer).
    The consumer must end with exactly the object."""
    rng = random.Random(seed)
    data = bytes(rng.getrandbits(8) for _ in range(size))
    window = chunk * window_chunks
    sender = SenderFlow(chunk, window)
    receiver = ReceiverFlow(window, max_damaged=1000)
    out = bytearray()
    held: list[bytes] = []
    to_receiver: list[tuple[int, bytes, bool]] = []
    to_sender: list[tuple[int, int, bool]] = [(0, receiver.acked(), False)]

    def ack(resend: bool) -> None:
        to_sender.append((receiver.committed, receiver.acked(), resend))

    for _step in range(200_000):
        if len(out) == size and receiver.complete:
            break
        # the sender takes acks, then sends what its credit allows
        while to_sender:
            committed, limit, resend = to_sender.pop(0)
            if committed <= sender.next_offset or resend:
                sender.on_ack(committed, max(limit, sender.limit), resend=resend)
        while sender.next_offset < size and sender.credit >= min(chunk, size - sender.next_offset):
            off = sender.next_offset
            piece = data[off : off + chunk]
            sender.sent(len(piece))
            if rng.random() < loss:
                continue
            intact = rng.random() >= damage
            to_receiver.append((off, piece, intact))
            if rng.random() < 0.05:
                to_receiver.append((off, piece, True))  # a duplicate
        if rng.random() < 0.2:
            rng.shuffle(to_receiver)  # delay and reorder
        moved = bool(to_receiver)
        while to_receiver:
            off, piece, intact = to_receiver.pop(0)
            verdict = receiver.on_data(off, len(piece), intact)
            if verdict is Verdict.ACCEPT:
                held.append(piece)
            elif verdict is Verdict.RESEND and rng.random() >= loss:
                ack(resend=True)
        if sender.next_offset == size and size and rng.random() >= loss:
            end = receiver.on_end(size)
            if end is EndVerdict.RESEND:
                ack(resend=True)
        elif size == 0:
            receiver.on_end(0)
        # the consumer reads what is held, granting credit
        while held:
            piece = held.pop(0)
            out += piece
            if receiver.on_consumed(len(piece)) and rng.random() >= loss:
                ack(resend=False)
        if not moved and not to_sender:
            # nothing in flight: the sender's probe; the receiver says where it stands
            receiver.resend_asked = True
            to_sender.append((receiver.committed, receiver.acked(), True))
    assert bytes(out) == data
    assert receiver.complete
