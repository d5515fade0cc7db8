"""Hostile input for the sans-IO connection (ARCHITECTURE §3, "Bad input").

Random and mutated frames are fed to :class:`~flare_async.wire.Connection`. Whatever the bytes,
the only exception that may escape is :class:`~flare_async.errors.ProtocolError` (or
``LinkBroken`` after an EOF we fed), feeding always terminates, and the bytes held for
incomplete frames stay within the limits. An oversize frame is refused from its prefix alone.
"""

from __future__ import annotations

import contextlib
import math
import random
import tracemalloc
import typing
from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flare_async.errors import FrameTooLarge, LinkBroken, ProtocolError
from flare_async.wire import (
    EOF,
    MAGIC,
    NEED_DATA,
    PREFIX,
    PREFIX_SIZE,
    ROUTED_KINDS,
    WIRE_VERSION,
    Bye,
    Connection,
    Envelope,
    Error,
    Event,
    Frame,
    Hello,
    Limits,
    Ping,
    Pong,
    Reply,
    Request,
    encode_header,
)

LIMITS = Limits(max_header=1024, max_frame=64 * 1024, max_route=8)
BOUND = PREFIX_SIZE + LIMITS.max_header + LIMITS.max_frame
"""Most bytes a connection may hold for frames not yet complete."""

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------- building frames

NAMES = ["server", "server.eu", "server.eu.site-3", "a", "", "x" * 40, "ü.ñ", "\x00"]
TEXTS = ["", "c", "topic", "ü" * 5, "x" * 30, "\ud7ff"]


def make_envelope(rng: random.Random) -> Envelope:
    """A valid header of a random kind with random field values (route within limits)."""

    def name() -> str:
        return rng.choice(NAMES)

    def text() -> str:
        return rng.choice(TEXTS)

    def integer() -> int:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.getrandbits(32)])

    kind = rng.randrange(8)
    if kind < 4:
        routed = {
            "id": integer(),
            "src": name(),
            "dst": name(),
            "route": [name() for _ in range(rng.randrange(LIMITS.max_route + 1))],
            "budget": rng.choice([None, 0.0, 1.5, -3.0, 1e300]),  # finite: others are refused
            "headers": {text(): text() for _ in range(rng.randrange(3))},
        }
        if kind == 0:
            return Request(**routed, channel=text(), topic=text(), codec=text())  # type: ignore[arg-type]
        if kind == 1:
            return Event(**routed, channel=text(), topic=text())  # type: ignore[arg-type]
        if kind == 2:
            return Reply(**routed, corr=integer(), codec=text())  # type: ignore[arg-type]
        return Error(**routed, corr=integer(), status=integer(), message=text())  # type: ignore[arg-type]
    if kind == 4:
        return Hello(
            name(), integer(), integer(), text(), [text()], integer(), integer(), rng.random()
        )
    if kind == 5:
        return Ping(seq=integer())
    if kind == 6:
        return Pong(seq=integer())
    return Bye(reason=text())


def frame(
    header: bytes, payload: bytes, *, hlen: int | None = None, plen: int | None = None
) -> bytes:
    prefix = PREFIX.pack(
        MAGIC,
        WIRE_VERSION,
        0,
        len(header) if hlen is None else hlen,
        len(payload) if plen is None else plen,
    )
    return prefix + header + payload


def make_valid(rng: random.Random) -> tuple[Envelope, bytes, bytes]:
    """``(header, payload, frame bytes)`` of a frame every connection must accept."""
    env = make_envelope(rng)
    size = rng.choice([0, 0, 1, rng.randrange(100), rng.randrange(LIMITS.max_frame + 1)])
    body = rng.randbytes(size)
    return env, body, frame(encode_header(env), body)


def random_msgpack(rng: random.Random, depth: int = 0) -> object:
    """A random msgpack-encodable value (the wrong shape for a header, mostly)."""
    kind = rng.randrange(10 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([0, -1, 2**64 - 1, -(2**63), rng.getrandbits(16)])
    if kind == 1:
        return rng.choice([None, True, False, math.nan, -0.0, 1e308])
    if kind == 2:
        return rng.choice(["", "x", "ü", "\ud7ff" * 3])
    if kind == 3:
        return rng.randbytes(rng.randrange(8))
    if kind == 4:
        return msgspec.msgpack.Ext(rng.randrange(-128, 128), rng.randbytes(rng.randrange(6)))
    if kind == 5:
        return rng.choice([1, 2, 3, 4, 10, 11, 12, 13])  # a tag alone
    if kind in (6, 7):
        items = [random_msgpack(rng, depth + 1) for _ in range(rng.randrange(12))]
        if rng.random() < 0.7:
            items.insert(0, rng.choice([1, 2, 3, 4, 10, 11, 12, 13, 0, 14, 255, -1]))
        return items
    if kind == 8:
        return {str(rng.randrange(5)): random_msgpack(rng, depth + 1) for _ in range(3)}
    return {rng.randrange(5): random_msgpack(rng, depth + 1)}


# ---------------------------------------------------------------- mutations

MUTATIONS = (
    "flip",
    "truncate",
    "insert",
    "delete",
    "overwrite",
    "prefix",
    "garbage_header",
    "wrong_type",
    "tag_with_wrong_fields",
    "deep_nesting",
    "long_route",
    "huge",
    "random",
)
MUST_FAIL = {"long_route", "huge"}
"""Mutations that no connection may accept."""


def mutate(kind: str, rng: random.Random) -> bytes:
    """One hostile frame built from a valid one by the named mutation."""
    _, body, data = make_valid(rng)
    n = len(data)
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            # Flips in the prefix and header are the interesting ones.
            pos = rng.randrange(min(n, 64)) if rng.random() < 0.8 else rng.randrange(n)
            out[pos] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "truncate":
        return data[: rng.randrange(n)]
    if kind == "insert":
        pos = rng.randrange(n + 1)
        return data[:pos] + rng.randbytes(rng.randrange(1, 20)) + data[pos:]
    if kind == "delete":
        pos = rng.randrange(n)
        return data[:pos] + data[pos + rng.randrange(1, 20) :]
    if kind == "overwrite":
        pos = rng.randrange(n)
        junk = rng.randbytes(rng.randrange(1, 20))
        return data[:pos] + junk + data[pos + len(junk) :]
    if kind == "prefix":
        prefix = PREFIX.pack(
            rng.choice([MAGIC, MAGIC, rng.randbytes(2), MAGIC[::-1]]),
            rng.choice([WIRE_VERSION, WIRE_VERSION, 0, 2, 255]),
            rng.randrange(256),
            rng.choice([0, 1, rng.randrange(LIMITS.max_header + 2), rng.getrandbits(32)]),
            rng.choice([0, len(body), rng.randrange(LIMITS.max_frame + 2), rng.getrandbits(64)]),
        )
        return prefix + data[PREFIX_SIZE:]
    if kind == "garbage_header":
        garbage = rng.randbytes(rng.randrange(1, 80))
        return frame(garbage, body)
    if kind == "wrong_type":
        return frame(msgspec.msgpack.encode(random_msgpack(rng))[: LIMITS.max_header], body)
    if kind == "tag_with_wrong_fields":
        tag = rng.choice([1, 2, 3, 4, 10, 11, 12, 13])
        fields = [random_msgpack(rng, 3) for _ in range(rng.randrange(12))]
        return frame(msgspec.msgpack.encode([tag, *fields])[: LIMITS.max_header], body)
    if kind == "deep_nesting":
        depth = rng.randrange(1, LIMITS.max_header - 1)
        opener = rng.choice([b"\x91", b"\x81\x00"])  # array of 1 / map of 1 with key 0
        return frame((opener * depth)[: LIMITS.max_header - 1] + b"\x00", body)
    if kind == "long_route":
        hops = rng.randrange(LIMITS.max_route + 1, LIMITS.max_route + 60)
        env = Event(1, "a", "b", ["h"] * hops, None, {}, "c", "t")
        return frame(encode_header(env), body)
    if kind == "huge":
        hlen = rng.choice([rng.randrange(1, 64), rng.randrange(LIMITS.max_header + 1, 2**32)])
        if hlen <= LIMITS.max_header or rng.random() < 0.5:
            plen = rng.choice([LIMITS.max_frame + 1, 2**62, 2**64 - 1, rng.getrandbits(64)])
            plen = max(plen, LIMITS.max_frame + 1)
        else:
            plen = rng.randrange(100)
        return PREFIX.pack(MAGIC, WIRE_VERSION, 0, hlen, plen) + rng.randbytes(rng.randrange(64))
    assert kind == "random"
    return rng.randbytes(rng.randrange(1, 200))


# ---------------------------------------------------------------- feeding


@dataclass
class Case:
    """One hostile stream: valid frames, then a mutated one, then more valid frames."""

    seed: int
    mutation: str
    lead: int
    tail: int
    chunk: int
    staging_size: int
    direct_threshold: int
    use_pump: bool
    eof: bool


cases = st.builds(
    Case,
    seed=st.integers(0, 2**32 - 1),
    mutation=st.sampled_from(MUTATIONS),
    lead=st.integers(0, 2),
    tail=st.integers(0, 2),
    chunk=st.sampled_from([1, 7, 16, 100, 4096, 70_000, 1 << 30]),
    staging_size=st.sampled_from([0, 3000, 256 * 1024]),
    direct_threshold=st.sampled_from([1, 1024, 64 * 1024]),
    use_pump=st.booleans(),
    eof=st.booleans(),
)


def feed(
    conn: Connection, data: bytes, chunk: int, use_pump: bool, frames: list[Frame] | None = None
) -> list[Frame]:
    """Feed ``data`` in chunks, checking the bound on held bytes after every step.

    Completed frames are appended to ``frames`` (also returned). Lets ProtocolError propagate.
    """
    frames = [] if frames is None else frames
    view = memoryview(data)
    steps = 0
    while view.nbytes:
        steps += 1
        assert steps <= len(data) + 1  # every step makes progress: no hang
        if use_pump:
            buf = conn.get_buffer()
            assert buf.nbytes > 0
            n = min(chunk, buf.nbytes, view.nbytes)
            buf[:n] = view[:n]
            view = view[n:]
            conn.buffer_updated(n)
        else:
            n = min(chunk, view.nbytes)
            piece, view = view[:n], view[n:]
            conn.receive_data(piece)
        assert conn.statistics().buffered <= BOUND
        while (ev := conn.next_event()) is not NEED_DATA:
            assert isinstance(ev, Frame)
            frames.append(ev)
    return frames


def check_frame(f: Frame) -> None:
    """Whatever got through is a well-formed frame within the limits."""
    assert isinstance(f.header, typing.get_args(Envelope))
    if isinstance(f.header, ROUTED_KINDS):
        assert len(f.header.route) <= LIMITS.max_route
    assert len(f.parts) == 1
    assert f.payload_len <= LIMITS.max_frame


def run_case(case: Case) -> int:
    """Feed one case; return the number of frames it fed."""
    rng = random.Random(case.seed)
    lead = [make_valid(rng) for _ in range(case.lead)]
    hostile = mutate(case.mutation, rng)
    tail = [make_valid(rng) for _ in range(case.tail)]
    stream = b"".join(d for *_, d in lead) + hostile + b"".join(d for *_, d in tail)
    conn = Connection(
        LIMITS,
        peer="fuzz",
        staging_size=case.staging_size,
        direct_threshold=case.direct_threshold,
    )
    frames: list[Frame] = []
    failed: ProtocolError | None = None
    # Small chunks split prefixes and headers every which way; a big payload needs no more
    # than a few dozen steps to cover its paths (and keeps the test fast).
    chunk = max(case.chunk, len(stream) // 32)
    try:
        feed(conn, stream, chunk, case.use_pump, frames)
    except ProtocolError as exc:
        failed = exc
    # Anything else (LinkBroken without an EOF, IndexError, MemoryError, ...) fails the test.

    if failed is not None:
        assert failed.peer == "fuzz"
        while (ev := conn.next_event()) is not NEED_DATA:
            assert isinstance(ev, Frame)
            frames.append(ev)
        # A failed connection stays failed.
        with pytest.raises(ProtocolError):
            conn.receive_data(b"\x00")
        with pytest.raises(ProtocolError):
            conn.get_buffer()
    elif case.eof:
        try:
            conn.receive_data(b"")
        except LinkBroken:
            pass  # the stream ended inside a frame; we did feed the EOF
        else:
            assert conn.next_event() is EOF
    assert case.mutation not in MUST_FAIL or failed is not None, case

    for f in frames:
        check_frame(f)
    # The valid frames before the hostile one always arrive intact and in order.
    for (env, body, _), f in zip(lead, frames, strict=False):
        assert f.header == env
        assert bytes(f.parts[0]) == body
    assert len(frames) >= len(lead)
    return len(lead) + 1 + len(tail)


CASES_PER_EXAMPLE = 10
EXAMPLES = 1100


def test_hostile_frames_only_raise_protocol_error() -> None:
    hostile = 0
    fed = 0

    # No shrinking: every Case is self-contained (seeded), and the failing one is attached to
    # the error, so a failure reproduces with ``run_case(<that Case>)`` at once.
    @settings(FUZZ, max_examples=EXAMPLES, phases=[Phase.explicit, Phase.generate])
    @given(st.lists(cases, min_size=CASES_PER_EXAMPLE, max_size=CASES_PER_EXAMPLE))
    def run(batch: list[Case]) -> None:
        nonlocal hostile, fed
        for case in batch:
            try:
                fed += run_case(case)
            except BaseException as exc:
                exc.add_note(f"failing case: {case!r}")
                raise
            hostile += 1

    run()
    # The requirement: 10,000+ random and mutated frames. Counted, not assumed.
    assert hostile >= 10_000, hostile
    assert fed > hostile


@settings(FUZZ, max_examples=300)
@given(data=st.binary(min_size=1, max_size=300), chunk=st.integers(1, 64), eof=st.booleans())
def test_random_bytes_only_raise_protocol_error(data: bytes, chunk: int, eof: bool) -> None:
    conn = Connection(LIMITS, staging_size=0)
    try:
        for f in feed(conn, data, chunk, use_pump=chunk % 2 == 0):
            check_frame(f)
        if eof:
            try:
                conn.receive_data(b"")
            except LinkBroken:
                return
            assert conn.next_event() is EOF
    except ProtocolError:
        with pytest.raises(ProtocolError):
            conn.receive_data(b"x")


@settings(FUZZ, max_examples=300)
@given(
    magic=st.binary(min_size=2, max_size=2),
    version=st.integers(0, 255),
    flags=st.integers(0, 255),
    hlen=st.integers(0, 2**32 - 1),
    plen=st.integers(0, 2**64 - 1),
    rest=st.binary(max_size=64),
)
def test_random_prefix_values(
    magic: bytes, version: int, flags: int, hlen: int, plen: int, rest: bytes
) -> None:
    conn = Connection(LIMITS)
    prefix = PREFIX.pack(magic, version, flags, hlen, plen)
    good_layout = magic == MAGIC and version == WIRE_VERSION
    try:
        conn.receive_data(prefix)
    except FrameTooLarge:
        assert good_layout
        assert hlen > LIMITS.max_header or plen > LIMITS.max_frame
        return
    except ProtocolError:
        assert not good_layout or hlen == 0
        return
    # An acceptable prefix: checked against every rule, nothing allocated yet.
    assert good_layout
    assert 0 < hlen <= LIMITS.max_header
    assert plen <= LIMITS.max_frame
    assert conn.statistics().buffered == 0
    with contextlib.suppress(ProtocolError):
        feed(conn, rest, 16, use_pump=False)
    assert conn.statistics().buffered <= BOUND


# ---------------------------------------------------------------- oversize, from the prefix alone


@pytest.mark.parametrize(
    ("hlen", "plen"),
    [
        (10, LIMITS.max_frame + 1),
        (10, 2**62),
        (10, 2**64 - 1),
        (LIMITS.max_header + 1, 0),
        (2**32 - 1, 0),
        (2**32 - 1, 2**64 - 1),
    ],
)
@pytest.mark.parametrize("how", ["receive", "pump", "bytewise"])
def test_oversize_frame_is_refused_from_its_prefix(hlen: int, plen: int, how: str) -> None:
    prefix = PREFIX.pack(MAGIC, WIRE_VERSION, 0, hlen, plen)
    conn = Connection(LIMITS, peer="big")
    if how == "bytewise":
        for i in range(PREFIX_SIZE - 1):
            conn.receive_data(prefix[i : i + 1])
            assert conn.next_event() is NEED_DATA
        with pytest.raises(FrameTooLarge) as info:
            conn.receive_data(prefix[-1:])
    elif how == "pump":
        buf = conn.get_buffer()
        buf[:PREFIX_SIZE] = prefix
        with pytest.raises(FrameTooLarge) as info:
            conn.buffer_updated(PREFIX_SIZE)
    else:
        with pytest.raises(FrameTooLarge) as info:
            conn.receive_data(prefix)
    # Refused with 16 bytes in hand: not one byte of header or payload was needed.
    assert conn.statistics().bytes_received == PREFIX_SIZE
    assert info.value.peer == "big"
    assert "exceeds" in str(info.value)
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x00")


def test_oversize_header_is_named_before_payload() -> None:
    conn = Connection(LIMITS)
    with pytest.raises(FrameTooLarge, match="header"):
        conn.receive_data(PREFIX.pack(MAGIC, WIRE_VERSION, 0, LIMITS.max_header + 1, 2**63))


def test_limits_at_the_edge_are_accepted() -> None:
    conn = Connection(LIMITS)
    conn.receive_data(PREFIX.pack(MAGIC, WIRE_VERSION, 0, LIMITS.max_header, LIMITS.max_frame))
    assert conn.next_event() is NEED_DATA  # waiting for the header: nothing refused


def _peak_while(fn: object) -> int:
    assert callable(fn)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("limits", [LIMITS, Limits()], ids=["small", "default"])
@pytest.mark.parametrize("plen", [2**62, 2**63, 2**64 - 1])
def test_announced_huge_payload_allocates_nothing_big(limits: Limits, plen: int) -> None:
    header = encode_header(Ping(seq=1))
    data = PREFIX.pack(MAGIC, WIRE_VERSION, 0, len(header), plen) + header + b"x" * 100
    conn = Connection(limits)  # its fixed staging buffer is allocated here, outside the trace

    def attack() -> None:
        with pytest.raises(FrameTooLarge):
            conn.receive_data(data)

    assert _peak_while(attack) < 64 * 1024


def test_hostile_stream_allocates_within_the_limits() -> None:
    # Under tracemalloc: a connection fed the fuzz corpus never holds more than one frame's
    # worth of buffers at a time (plus small objects), whatever the prefixes announce.
    rng = random.Random(1234)
    corpus = [mutate(rng.choice(MUTATIONS), rng) for _ in range(300)]

    def attack() -> None:
        for data in corpus:
            conn = Connection(LIMITS, staging_size=0)
            with contextlib.suppress(ProtocolError):
                feed(conn, data, 4096, use_pump=True)

    peak = _peak_while(attack)
    staging = PREFIX_SIZE + LIMITS.max_header
    assert peak < 2 * (staging + LIMITS.max_frame) + 256 * 1024
