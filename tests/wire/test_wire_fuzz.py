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
from flare_async.streaming import MAX_WINDOW, negotiate
from flare_async.streaming._flow import MIN_CHUNK
from flare_async.transport import _ws_admit
from flare_async.wire import (
    EOF,
    HELLO_LIMITS,
    MAGIC,
    NEED_DATA,
    PREFIX,
    PREFIX_SIZE,
    ROUTED_KINDS,
    STREAM_KINDS,
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
    StreamOpen,
    check_hello,
    decode_frame,
    decode_header,
    encode_header,
    make_hello,
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


@pytest.mark.slow  # 11,000 hostile frames from Hypothesis
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


# ---------------------------------------------------------------- hello, stream frames, WebSocket
# (the Hypothesis side of benchmarks/fuzz.py: the same targets, deterministic and short)

ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
TYPED = {
    "int": st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, -1, 1, 2**63 - 1]),
    "float": st.floats() | st.sampled_from([0.0, -1.0, 5.0]),
    "str": st.text(max_size=20) | st.sampled_from(["server.eu", "server.eu.site-1", "a.b"]),
    "list": st.lists(st.text(max_size=8), max_size=4),
    "dict": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
    "bool": st.booleans(),
    "opt": st.none() | st.floats(),
}
ROUTED_FIELDS = ["int", "str", "str", "list", "opt", "dict"]
HELLO_FIELDS = ["str", "int", "int", "str", "list", "int", "int", "float"]
STREAM_FIELDS = {
    20: ["str", "str", "int", "int", "str", "str", "int", "int", "bool", "bool", "float"],
    21: ["int", "int", "int"],
    22: ["int", "int", "int", "int", "bool"],
    23: ["int", "int", "str"],
    24: ["int", "int", "str", "str"],
    25: ["int", "str", "int", "str"],
}


@st.composite
def header_fields(draw: st.DrawFn, tag: int, fields: list[str]) -> bytes:
    """A msgpack header ``[tag, ...]`` whose fields are mostly of their type, else of any type,
    with the last ones possibly left out."""
    values = [
        draw(TYPED[f] | ANY_VALUE if draw(st.integers(0, 3)) == 0 else TYPED[f]) for f in fields
    ]
    values = values[: len(values) - draw(st.integers(0, 2))]
    return msgspec.msgpack.encode([tag, *values])


LOCAL_HELLOS = {
    "child": make_hello("server.eu", "parent", Limits()),
    "parent": make_hello("server.eu.site-1", "child", Limits()),
    "peer": make_hello("client.x", "peer", Limits()),
}


@settings(FUZZ, max_examples=300)
@given(raw=header_fields(10, HELLO_FIELDS), framed=st.booleans())
def test_hello_of_any_field_values_only_raises_protocol_error(raw: bytes, framed: bool) -> None:
    try:
        if framed:  # as a WebSocket message: the whole frame in one buffer
            header, _ = decode_frame(
                PREFIX.pack(MAGIC, WIRE_VERSION, 0, len(raw), 0) + raw, HELLO_LIMITS
            )
        else:
            header = decode_header(raw, HELLO_LIMITS)
    except ProtocolError:
        return
    assert isinstance(header, Hello)
    for expect, local in LOCAL_HELLOS.items():
        try:
            session = check_hello(local, header, expect=expect)  # type: ignore[arg-type]
        except ProtocolError:
            continue
        assert math.isfinite(session.peer_heartbeat)
        assert session.peer_heartbeat >= 0
        assert session.version >= 1


@settings(FUZZ, max_examples=300)
@given(data=st.data(), tag=st.integers(20, 25))
def test_stream_headers_of_any_field_values_only_raise_protocol_error(
    data: st.DataObject, tag: int
) -> None:
    raw = data.draw(header_fields(tag, ROUTED_FIELDS + STREAM_FIELDS[tag]))
    try:
        h = decode_header(raw, Limits())
    except ProtocolError:
        return
    assert isinstance(h, STREAM_KINDS)
    assert type(h).__struct_config__.tag == tag
    assert len(h.route) <= Limits().max_route
    assert h.budget is None or math.isfinite(h.budget)
    if isinstance(h, StreamOpen):  # what the receiving cell does with a proposal
        try:
            chunk, window = negotiate(h.chunk, h.window, Limits().max_frame)
        except ProtocolError:
            assert h.chunk <= 0 or h.window <= 0
        else:
            assert MIN_CHUNK <= chunk <= Limits().max_frame
            assert 2 * chunk <= window <= max(MAX_WINDOW, 2 * chunk)


_FIELD = {
    int: st.integers(-(2**63), 2**64 - 1),
    str: st.text(max_size=12),
    bool: st.booleans(),
    float: st.floats(allow_nan=False, allow_infinity=False),
}


def _stream_envelope(kind: type[msgspec.Struct]) -> st.SearchStrategy[Envelope]:
    hints = typing.get_type_hints(kind)
    own = {f: _FIELD[hints[f]] for f in kind.__struct_fields__ if hints[f] in _FIELD}
    strategy: st.SearchStrategy[typing.Any] = st.builds(
        kind,
        **{
            **own,
            "id": st.integers(0, 2**64 - 1),
            "src": st.sampled_from(NAMES),
            "dst": st.sampled_from(NAMES),
            "route": st.lists(st.sampled_from(NAMES), max_size=LIMITS.max_route),
            "budget": st.none() | st.floats(0, 1e9),
            "headers": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
        },
    )
    return strategy


STREAM_ENVELOPES = st.one_of(*(_stream_envelope(kind) for kind in STREAM_KINDS))


@settings(FUZZ, max_examples=150)
@given(
    envs=st.lists(STREAM_ENVELOPES, min_size=1, max_size=4),
    payload=st.binary(max_size=300),
    chunk=st.integers(1, 64),
    cut=st.integers(0, 2000),
)
def test_stream_frames_round_trip_and_truncation_is_never_a_frame(
    envs: list[Envelope], payload: bytes, chunk: int, cut: int
) -> None:
    frames = [frame(encode_header(env), payload) for env in envs]
    wire = b"".join(frames)
    conn = Connection(LIMITS)
    got = feed(conn, wire, chunk, use_pump=chunk % 2 == 0)
    assert [f.header for f in got] == envs
    assert all(bytes(f.parts[0]) == payload for f in got)
    # Cut anywhere: only the whole frames come out; an EOF mid-frame is LinkBroken, never a frame.
    conn = Connection(LIMITS)
    part = wire[: min(cut, len(wire))]
    got = feed(conn, part, chunk, use_pump=False)
    assert [f.header for f in got] == envs[: len(got)]
    boundaries = {sum(map(len, frames[:k])) for k in range(len(frames) + 1)}
    if len(part) in boundaries:
        conn.receive_data(b"")
        assert conn.next_event() is EOF
    else:
        with pytest.raises(LinkBroken):
            conn.receive_data(b"")


class _Reader:
    """Stands in for aiohttp's WebSocket reader: records what the check fed it."""

    def __init__(self) -> None:
        self.fed = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.fed += data
        return False, b""

    def feed_eof(self) -> None:
        pass


def _ws_reference(buf: bytes, limit: int | None) -> tuple[int, bytes] | None:
    """Where a frame-header check must refuse ``buf`` (offset of the frame, the stand-in frame),
    read plainly from RFC 6455 §5.2; None if it must pass it all."""
    i, message = 0, 0
    while i + 2 <= len(buf):
        first, second = buf[i], buf[i + 1]
        extra = {126: 2, 127: 8}.get(second & 0x7F, 0)
        size = 2 + extra + (4 if second & 0x80 else 0)
        if i + size > len(buf):
            return None
        length = int.from_bytes(buf[i + 2 : i + 2 + extra], "big") if extra else second & 0x7F
        if not second & 0x80:
            return i, _ws_admit._UNMASKED
        if limit is not None and first & 0x0F <= 2:
            message += length
            if message > limit:
                return i, _ws_admit._TOO_BIG
            if first & 0x80:
                message = 0
        i += size + length
    return None


@st.composite
def ws_frames(draw: st.DrawFn) -> bytes:
    """WebSocket frames, mostly masked and short, each with its payload (or garbage)."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 5)) == 0:
            out += draw(st.binary(max_size=12))
            continue
        first = draw(st.sampled_from([0x00, 0x01, 0x02, 0x80, 0x81, 0x82, 0x88, 0x89, 0x8A]))
        masked = draw(st.integers(0, 7)) != 0
        length = draw(st.integers(0, 40) | st.sampled_from([125, 126, 200, 70_000]))
        form = draw(st.sampled_from(["short", "16", "64"]) if length < 126 else st.just("long"))
        if form == "short":
            head = bytes([first, length | masked << 7])
        elif form == "16" or (form == "long" and length < 65536):
            head = bytes([first, 126 | masked << 7]) + length.to_bytes(2, "big")
        else:
            head = bytes([first, 127 | masked << 7]) + length.to_bytes(8, "big")
        out += head + (b"mask" if masked else b"") + bytes(min(length, 300))
    return bytes(out)


@settings(FUZZ, max_examples=300)
@given(
    buf=ws_frames() | st.binary(max_size=64),
    limit=st.none() | st.integers(0, 200),
    cuts=st.lists(st.integers(1, 16), min_size=1, max_size=8),
)
def test_ws_frame_check_agrees_with_a_plain_reading(
    buf: bytes, limit: int | None, cuts: list[int]
) -> None:
    reader = _Reader()
    admitted = typing.cast(typing.Any, type("Admitted", (), {"violation": None}))()
    admitted.max_message = limit
    check = _ws_admit._FrameCheck(reader, admitted)
    pos = 0
    i = 0
    while pos < len(buf):  # split at arbitrary points: the check never raises
        take = cuts[i % len(cuts)]
        check.feed_data(buf[pos : pos + take])
        pos += take
        i += 1
        assert len(check._held) < 14  # at most one frame header held back
    want = _ws_reference(buf, limit)
    if want is None:
        assert admitted.violation is None
        assert bytes(reader.fed) + check._held == buf  # every byte passed on, in order, once
    else:
        at, refusal = want
        assert admitted.violation is not None
        assert bytes(reader.fed).startswith(buf[:at] + refusal)
