"""The sans-IO frame connection: send -> bytes -> receive round trips and its edge cases."""

from __future__ import annotations

import array
import hashlib
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flare_async.errors import FrameTooLarge, LinkBroken, ProtocolError
from flare_async.wire import (
    EOF,
    MAGIC,
    NEED_DATA,
    PREFIX,
    PREFIX_SIZE,
    WIRE_VERSION,
    Buffer,
    Bye,
    Connection,
    ConnectionStatistics,
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
    decode_frame,
    decode_header,
    encode_header,
    make_hello,
    payload_size,
)

MiB = 1024 * 1024

ROUTED = {
    "id": 42,
    "src": "server.eu.site-3",
    "dst": "server",
    "route": ["server.eu.site-3", "server.eu"],
    "budget": 12.5,
    "headers": {"trace": "abc", "auth": "t0k3n"},
}
HEADERS: list[Envelope] = [
    Request(**ROUTED, channel="fl", topic="train", codec="numpy"),  # type: ignore[arg-type]
    Event(**ROUTED, channel="fl", topic="metrics"),  # type: ignore[arg-type]
    Reply(**ROUTED, corr=41, codec="torch"),  # type: ignore[arg-type]
    Error(**ROUTED, corr=41, status=2, message="no handler"),  # type: ignore[arg-type]
    Hello("server.eu", 1, 1, "child", ["stream", "zstd"], 64 * 1024, 64 * MiB, 5.0),
    Ping(seq=7),
    Pong(seq=7),
    Bye(reason="shutting down"),
]


def ids(header: object) -> str:
    return type(header).__name__


def frame_bytes(header: Envelope, *parts: Buffer, limits: Limits | None = None) -> bytes:
    """What a sender writes for one frame."""
    return b"".join(bytes(seg) for seg in Connection(limits).send(header, parts))


def drain(conn: Connection) -> list[Frame]:
    """Every complete frame; fails if EOF shows up."""
    out: list[Frame] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        assert isinstance(ev, Frame), ev
        out.append(ev)
    return out


def pump(conn: Connection, data: bytes, chunk: int = 1 << 30) -> None:
    """Feed ``data`` the way a BufferedProtocol transport does (get_buffer/buffer_updated)."""
    view = memoryview(data)
    while view.nbytes:
        buf = conn.get_buffer()
        assert buf.nbytes > 0
        n = min(chunk, buf.nbytes, view.nbytes)
        buf[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]


def payload(frame: Frame) -> bytes:
    assert len(frame.parts) == 1
    return bytes(frame.parts[0])


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("header", HEADERS, ids=ids)
@pytest.mark.parametrize("body", [b"", b"x", b"hello world" * 100], ids=["empty", "1B", "1KB"])
def test_every_header_kind_round_trips(header: Envelope, body: bytes) -> None:
    rx = Connection()
    rx.receive_data(frame_bytes(header, body))
    (frame,) = drain(rx)
    assert type(frame.header) is type(header)
    assert frame.header == header
    assert payload(frame) == body
    assert frame.payload_len == len(body)
    part = frame.parts[0]
    assert isinstance(part, memoryview)
    assert part.readonly
    assert rx.next_event() is NEED_DATA


@pytest.mark.parametrize("header", HEADERS, ids=ids)
def test_every_header_kind_round_trips_through_get_buffer(header: Envelope) -> None:
    rx = Connection()
    pump(rx, frame_bytes(header, b"abc") + frame_bytes(header), chunk=3)
    first, second = drain(rx)
    assert first.header == header
    assert payload(first) == b"abc"
    assert second.header == header
    assert payload(second) == b""


def test_empty_payload_is_an_empty_view() -> None:
    rx = Connection()
    rx.receive_data(frame_bytes(Ping(seq=1)))
    (frame,) = drain(rx)
    assert len(frame.parts) == 1
    assert isinstance(frame.parts[0], memoryview)
    assert frame.parts[0].nbytes == 0
    assert frame.payload_len == 0


def test_prefix_layout() -> None:
    header = encode_header(Ping(seq=1))
    data = frame_bytes(Ping(seq=1), b"abcd")
    assert PREFIX_SIZE == 16
    assert data[:2] == MAGIC
    assert PREFIX.unpack_from(data) == (MAGIC, WIRE_VERSION, 0, len(header), 4)
    assert data[PREFIX_SIZE : PREFIX_SIZE + len(header)] == header
    assert data[PREFIX_SIZE + len(header) :] == b"abcd"


@pytest.mark.parametrize("size", [3 * MiB + 17, 8 * MiB])
@pytest.mark.parametrize("how", ["one-chunk", "socket-chunks", "receive-chunks"])
def test_large_payloads_round_trip(size: int, how: str) -> None:
    body = os.urandom(size)
    data = frame_bytes(HEADERS[0], body) + frame_bytes(Ping(seq=2), b"tail")
    rx = Connection()
    if how == "one-chunk":
        rx.receive_data(data)
    elif how == "socket-chunks":
        pump(rx, data, chunk=65_536 + 3)
    else:
        for i in range(0, len(data), 1_000_003):
            rx.receive_data(data[i : i + 1_000_003])
    big, small = drain(rx)
    assert big.header == HEADERS[0]
    assert big.payload_len == size
    assert hashlib.sha256(big.parts[0]).digest() == hashlib.sha256(body).digest()
    assert small.header == Ping(seq=2)
    assert payload(small) == b"tail"
    assert rx.statistics().buffered == 0


def test_payload_at_exactly_max_frame_is_accepted() -> None:
    limits = Limits(max_header=256, max_frame=1000)
    rx = Connection(limits)
    rx.receive_data(frame_bytes(Ping(seq=1), b"z" * 1000, limits=limits))
    (frame,) = drain(rx)
    assert frame.payload_len == 1000


def test_multi_part_payload_is_passed_by_reference_and_received_joined() -> None:
    meta = b'{"shape":[2,3]}'
    tensor = bytearray(range(24))
    floats = array.array("d", [1.5, -2.0, 3.25])
    parts: list[Buffer] = [meta, tensor, memoryview(floats), memoryview(b"end")[1:]]
    tx = Connection()
    segments = tx.send(HEADERS[2], parts)
    # The head is one segment; the parts follow untouched, by identity (no concatenation).
    assert len(segments) == 1 + len(parts)
    for seg, part in zip(segments[1:], parts, strict=True):
        assert seg is part
    expected = meta + bytes(tensor) + floats.tobytes() + b"nd"
    assert payload_size(parts) == len(expected)
    rx = Connection()
    for seg in segments:
        rx.receive_data(seg)
    (frame,) = drain(rx)
    assert payload(frame) == expected
    assert tx.statistics().bytes_sent == sum(memoryview(s).nbytes for s in segments)


def test_payload_size_counts_bytes_not_items() -> None:
    assert payload_size([]) == 0
    assert payload_size([memoryview(array.array("i", [1, 2, 3]))]) == 12
    assert payload_size([b"ab", bytearray(3), memoryview(array.array("q", [1]))]) == 13
    assert Frame(Ping(seq=1), (b"ab", b"cde")).payload_len == 5
    assert "5 B" in repr(Frame(Ping(seq=1), (b"ab", b"cde")))


def test_receive_data_accepts_any_buffer() -> None:
    data = frame_bytes(Pong(seq=3), b"12345678")
    for buf in (data, bytearray(data), memoryview(data)):
        rx = Connection()
        rx.receive_data(buf)
        assert payload(drain(rx)[0]) == b"12345678"
    # A buffer of wider items is read as its bytes.
    padded = data + b"\0" * (-len(data) % 4)
    rx = Connection()
    rx.receive_data(memoryview(array.array("I", padded)))
    (frame,) = drain(rx)
    assert payload(frame) == b"12345678"


def test_many_frames_back_to_back_in_one_chunk() -> None:
    frames = [
        (Request(i, "a.b", "a", ["a.b"], None, {}, "c", f"t{i}"), os.urandom(i % 50))
        for i in range(2000)
    ]
    data = b"".join(frame_bytes(h, p) for h, p in frames)
    for feed in ("receive", "pump"):
        rx = Connection(staging_size=4096)
        if feed == "receive":
            rx.receive_data(data)
        else:
            pump(rx, data)
        got = drain(rx)
        assert [(f.header, payload(f)) for f in got] == frames
        stats = rx.statistics()
        assert stats.frames_received == 2000
        assert stats.bytes_received == len(data)
        assert stats.buffered == 0


# ---------------------------------------------------------------- splitting (property)

SMALL_FRAMES = [
    (HEADERS[0], b"abc"),
    (Ping(seq=1), b""),
    (HEADERS[3], bytes(range(200))),
    (HEADERS[4], b""),
    (Bye(reason="x"), b"!"),
]
SMALL_STREAM = b"".join(frame_bytes(h, p) for h, p in SMALL_FRAMES)


def _check_small_stream(rx: Connection) -> None:
    got = drain(rx)
    assert [(f.header, payload(f)) for f in got] == SMALL_FRAMES
    assert rx.statistics().buffered == 0
    assert rx.statistics().frames_received == len(SMALL_FRAMES)


@pytest.mark.parametrize("staging_size", [0, 64 * 1024])
def test_stream_split_at_every_byte_boundary(staging_size: int) -> None:
    limits = Limits(max_header=256)
    for cut in range(len(SMALL_STREAM) + 1):
        rx = Connection(limits, staging_size=staging_size)
        if cut:  # b"" would mean EOF
            rx.receive_data(SMALL_STREAM[:cut])
        got = drain(rx)
        if cut < len(SMALL_STREAM):
            rx.receive_data(SMALL_STREAM[cut:])
        got += drain(rx)
        assert [(f.header, payload(f)) for f in got] == SMALL_FRAMES, cut
        assert rx.statistics().buffered == 0
        rx = Connection(limits, staging_size=staging_size)
        pump(rx, SMALL_STREAM[:cut])
        pump(rx, SMALL_STREAM[cut:])
        _check_small_stream(rx)


def test_stream_fed_one_byte_at_a_time() -> None:
    rx = Connection(Limits(max_header=256), staging_size=0)
    for i in range(len(SMALL_STREAM)):
        rx.receive_data(SMALL_STREAM[i : i + 1])
    _check_small_stream(rx)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=30)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    chunks=chunkings(SMALL_STREAM),
    staging_size=st.sampled_from([0, 300, 4096]),
    direct_threshold=st.sampled_from([1, 64, 1 << 20]),
    use_pump=st.booleans(),
)
def test_any_chunking_gives_the_same_frames(
    chunks: list[bytes], staging_size: int, direct_threshold: int, use_pump: bool
) -> None:
    rx = Connection(
        Limits(max_header=256), staging_size=staging_size, direct_threshold=direct_threshold
    )
    for chunk in chunks:
        if use_pump:
            pump(rx, chunk, chunk=7)
        elif chunk:
            rx.receive_data(chunk)
    _check_small_stream(rx)
    rx.receive_data(b"")
    assert rx.next_event() is EOF


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    bodies=st.lists(st.binary(max_size=3000), min_size=1, max_size=8),
    chunk=st.integers(1, 5000),
    staging_size=st.sampled_from([0, 1000, 100_000]),
    direct_threshold=st.sampled_from([1, 100, 64 * 1024]),
)
def test_random_payloads_round_trip(
    bodies: list[bytes], chunk: int, staging_size: int, direct_threshold: int
) -> None:
    limits = Limits(max_header=512, max_frame=4096)
    frames = [(Pong(seq=i), b) for i, b in enumerate(bodies)]
    data = b"".join(frame_bytes(h, p, limits=limits) for h, p in frames)
    rx = Connection(limits, staging_size=staging_size, direct_threshold=direct_threshold)
    pump(rx, data, chunk=chunk)
    assert [(f.header, payload(f)) for f in drain(rx)] == frames
    assert rx.statistics().bytes_received == len(data)


# ---------------------------------------------------------------- direct reads


def test_big_payload_is_read_straight_into_its_own_buffer() -> None:
    size = 3 * MiB
    head = frame_bytes(HEADERS[0], b"\0" * size)[: -size or None]
    rx = Connection(direct_threshold=64 * 1024)
    rx.receive_data(head)
    assert rx.next_event() is NEED_DATA
    assert rx.statistics().buffered == 0  # staging is empty; nothing of the payload yet

    buf = rx.get_buffer()
    assert buf.nbytes == size  # the whole payload, not the staging buffer's size
    assert not buf.readonly
    buf[:MiB] = b"A" * MiB
    rx.buffer_updated(MiB)
    assert rx.statistics().buffered == MiB

    buf2 = rx.get_buffer()
    assert buf2.nbytes == size - MiB
    assert buf2.obj is buf.obj  # the same destination buffer, further along
    buf2[:] = b"B" * (size - MiB)
    rx.buffer_updated(size - MiB)

    (frame,) = drain(rx)
    assert frame.header == HEADERS[0]
    part = frame.parts[0]
    assert isinstance(part, memoryview)
    assert part.obj is buf.obj  # delivered without a copy
    assert part.readonly
    assert bytes(part[:MiB]) == b"A" * MiB
    assert bytes(part[MiB:]) == b"B" * (size - MiB)
    assert rx.statistics().buffered == 0
    assert rx.statistics().frames_received == 1


def test_direct_read_only_when_the_rest_is_big_enough() -> None:
    size = 100_000
    head = frame_bytes(Ping(seq=1), b"\0" * size)[:-size]
    rx = Connection(staging_size=4096, direct_threshold=64 * 1024)
    rx.receive_data(head + b"x" * 50_000)
    # 50,000 B left < threshold: keep using the staging buffer.
    buf = rx.get_buffer()
    # The staging buffer (at least one prefix plus the largest header), not the payload's.
    assert buf.nbytes == PREFIX_SIZE + rx.limits.max_header
    pump(rx, b"y" * 50_000)
    (frame,) = drain(rx)
    assert payload(frame) == b"x" * 50_000 + b"y" * 50_000


def test_no_direct_read_while_staging_holds_bytes() -> None:
    # Header and first payload bytes arrive together: those bytes go from staging into the
    # payload first; the direct buffer starts right after them.
    size = 200_000
    data = frame_bytes(Ping(seq=1), os.urandom(size))
    head_len = len(data) - size
    rx = Connection(direct_threshold=1024)
    rx.receive_data(data[: head_len + 10])
    buf = rx.get_buffer()
    assert buf.nbytes == size - 10
    buf[:] = data[head_len + 10 :]
    rx.buffer_updated(size - 10)
    (frame,) = drain(rx)
    assert payload(frame) == data[head_len:]


def test_direct_read_then_next_frame_uses_staging() -> None:
    size = 128 * 1024
    body = os.urandom(size)
    data = frame_bytes(Ping(seq=1), body) + frame_bytes(Pong(seq=2), b"after")
    rx = Connection(staging_size=1024, direct_threshold=1024)
    pump(rx, data, chunk=10_000)
    first, second = drain(rx)
    assert payload(first) == body
    assert second.header == Pong(seq=2)
    assert payload(second) == b"after"


# ---------------------------------------------------------------- EOF


def test_eof_on_a_fresh_connection() -> None:
    rx = Connection()
    rx.receive_data(b"")
    assert rx.next_event() is EOF
    assert rx.next_event() is EOF


def test_eof_between_frames_follows_the_frames() -> None:
    rx = Connection()
    rx.receive_data(frame_bytes(Ping(seq=1)) + frame_bytes(Ping(seq=2), b"p"))
    rx.receive_data(b"")
    rx.receive_data(b"")  # idempotent
    first = rx.next_event()
    second = rx.next_event()
    assert isinstance(first, Frame)
    assert first.header == Ping(seq=1)
    assert isinstance(second, Frame)
    assert second.header == Ping(seq=2)
    assert rx.next_event() is EOF
    assert rx.next_event() is EOF


def test_data_after_eof_is_a_protocol_error() -> None:
    rx = Connection(peer="p")
    rx.receive_data(b"")
    with pytest.raises(ProtocolError, match="EOF"):
        rx.receive_data(b"x")
    with pytest.raises(ProtocolError):
        rx.get_buffer()
    with pytest.raises(ProtocolError):
        rx.buffer_updated(1)


def test_eof_mid_frame_at_every_cut_is_link_broken() -> None:
    data = frame_bytes(HEADERS[0], b"payload!")
    for cut in range(1, len(data)):
        rx = Connection()
        rx.receive_data(frame_bytes(Ping(seq=0)) + data[:cut])
        with pytest.raises(LinkBroken, match="middle of a frame"):
            rx.receive_data(b"")
        # The complete frame before the cut is still delivered.
        first = rx.next_event()
        assert isinstance(first, Frame)
        assert first.header == Ping(seq=0)
        assert rx.next_event() is NEED_DATA
        with pytest.raises(ProtocolError):
            rx.receive_data(b"")
        with pytest.raises(ProtocolError):
            rx.receive_data(b"more")


def test_eof_during_a_direct_read_is_link_broken() -> None:
    size = 1 * MiB
    head = frame_bytes(Ping(seq=1), b"\0" * size)[:-size]
    rx = Connection(direct_threshold=1024)
    rx.receive_data(head)
    buf = rx.get_buffer()
    buf[:100] = b"x" * 100
    rx.buffer_updated(100)
    with pytest.raises(LinkBroken):
        rx.receive_data(b"")


# ---------------------------------------------------------------- statistics


def test_statistics_counters() -> None:
    tx, rx = Connection(), Connection()
    assert tx.statistics() == ConnectionStatistics(0, 0, 0, 0, 0)
    segs1 = tx.send(HEADERS[0], [b"abc", b"de"])
    segs2 = tx.send(Ping(seq=1))
    wire1 = b"".join(bytes(s) for s in segs1)
    wire2 = b"".join(bytes(s) for s in segs2)
    sent = tx.statistics()
    assert sent.frames_sent == 2
    assert sent.bytes_sent == len(wire1) + len(wire2)
    assert (sent.frames_received, sent.bytes_received, sent.buffered) == (0, 0, 0)

    rx.receive_data(wire1[:10])
    assert rx.statistics() == ConnectionStatistics(0, 0, 10, 0, 10)
    rx.receive_data(wire1[10:-2])  # all but two payload bytes
    stats = rx.statistics()
    assert stats.frames_received == 0
    assert stats.bytes_received == len(wire1) - 2
    assert stats.buffered == 3  # header parsed and consumed; 3 payload bytes held
    rx.receive_data(wire1[-2:] + wire2)
    assert rx.statistics() == ConnectionStatistics(2, 0, len(wire1) + len(wire2), 0, 0)
    assert len(drain(rx)) == 2


def test_send_refuses_frames_beyond_the_peer_limits() -> None:
    tx = Connection()
    tx.peer_limits = Limits(max_header=256, max_frame=100)
    with pytest.raises(FrameTooLarge, match="max_frame"):
        tx.send(Ping(seq=1), [b"x" * 60, b"y" * 41])
    with pytest.raises(FrameTooLarge, match="max_header"):
        tx.send(Bye(reason="r" * 300))
    assert tx.statistics() == ConnectionStatistics(0, 0, 0, 0, 0)  # nothing counted
    segs = tx.send(Ping(seq=1), [b"x" * 100])
    assert tx.statistics().frames_sent == 1
    assert sum(len(s) for s in segs) == tx.statistics().bytes_sent


def test_send_uses_peer_limits_not_ours() -> None:
    tx = Connection(Limits(max_header=256, max_frame=10))
    tx.peer_limits = Limits(max_frame=1000)
    tx.send(Ping(seq=1), [b"x" * 1000])
    assert tx.statistics().frames_sent == 1


# ---------------------------------------------------------------- errors


def test_receive_refuses_frames_beyond_our_limits() -> None:
    limits = Limits(max_header=256, max_frame=100)
    big = frame_bytes(Ping(seq=1), b"x" * 101)
    rx = Connection(limits, peer="site-3")
    with pytest.raises(FrameTooLarge) as info:
        rx.receive_data(big)
    assert info.value.peer == "site-3"
    assert "site-3" in str(info.value)


def test_errors_name_the_peer() -> None:
    rx = Connection(peer="tcp://10.1.2.3:8002")
    with pytest.raises(ProtocolError, match="magic") as info:
        rx.receive_data(b"\x00" * PREFIX_SIZE)
    assert info.value.peer == "tcp://10.1.2.3:8002"
    assert "tcp://10.1.2.3:8002" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00" * PREFIX_SIZE,  # bad magic
        PREFIX.pack(MAGIC, WIRE_VERSION + 1, 0, 10, 0),  # unknown layout version
        PREFIX.pack(MAGIC, WIRE_VERSION, 0, 0, 0),  # empty header
        PREFIX.pack(MAGIC, WIRE_VERSION, 0, 1, 0) + b"\xc1",  # invalid msgpack
        PREFIX.pack(MAGIC, WIRE_VERSION, 0, 1, 0) + b"\x05",  # msgpack int, not a header
    ],
    ids=["magic", "version", "empty-header", "bad-msgpack", "wrong-type"],
)
def test_calls_after_an_error_raise_protocol_error(bad: bytes) -> None:
    rx = Connection()
    rx.receive_data(frame_bytes(Ping(seq=1)))
    with pytest.raises(ProtocolError):
        rx.receive_data(bad)
    # The frame before the bad one was delivered; nothing after it ever is.
    first = rx.next_event()
    assert isinstance(first, Frame)
    assert rx.next_event() is NEED_DATA
    good = frame_bytes(Ping(seq=2))
    with pytest.raises(ProtocolError, match="already failed"):
        rx.receive_data(good)
    with pytest.raises(ProtocolError, match="already failed"):
        rx.get_buffer()
    with pytest.raises(ProtocolError, match="already failed"):
        rx.buffer_updated(len(good))
    with pytest.raises(ProtocolError, match="already failed"):
        rx.receive_data(b"")
    assert rx.next_event() is NEED_DATA


def test_buffer_updated_after_a_failed_buffer_updated() -> None:
    rx = Connection()
    buf = rx.get_buffer()
    buf[:PREFIX_SIZE] = b"\xff" * PREFIX_SIZE
    with pytest.raises(ProtocolError):
        rx.buffer_updated(PREFIX_SIZE)
    with pytest.raises(ProtocolError, match="already failed"):
        rx.buffer_updated(1)


def test_buffer_updated_needs_a_positive_count() -> None:
    rx = Connection()
    rx.get_buffer()
    with pytest.raises(ValueError):
        rx.buffer_updated(0)
    with pytest.raises(ValueError):
        rx.buffer_updated(-5)


def test_route_length_is_checked_on_receive() -> None:
    limits = Limits(max_route=4)
    ok = Event(1, "a", "b", ["h1", "h2", "h3", "h4"], None, {}, "c", "t")
    too_long = Event(1, "a", "b", ["h1", "h2", "h3", "h4", "h5"], None, {}, "c", "t")
    rx = Connection(limits)
    rx.receive_data(frame_bytes(ok))
    assert drain(rx)[0].header == ok
    with pytest.raises(ProtocolError, match="max_route"):
        rx.receive_data(frame_bytes(too_long))


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_budget_is_a_protocol_error(budget: float) -> None:
    req = Request(
        id=1, src="a", dst="a.b", route=["a"], budget=budget, headers={}, channel="c", topic="t"
    )
    with pytest.raises(ProtocolError, match="finite"):
        decode_header(encode_header(req), Limits())


def test_non_finite_hello_heartbeat_is_a_protocol_error() -> None:
    hello = make_hello("a", "child", Limits(), heartbeat=float("inf"))
    with pytest.raises(ProtocolError, match="finite"):
        decode_header(encode_header(hello), Limits())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_announced_payload_costs_memory_only_as_it_arrives() -> None:
    """A peer that announces a huge payload and sends a few bytes commits little memory."""
    limits = Limits(max_frame=1 << 30)
    head = Connection(limits).send(Ping(seq=1), [b""])[0]
    prefix = PREFIX.pack(MAGIC, WIRE_VERSION, 0, len(bytes(head)) - PREFIX_SIZE, 512 << 20)
    conns = []
    before = _rss()
    for _ in range(8):  # 8 x 512 MiB announced = 4 GiB
        conn = Connection(limits)
        conn.receive_data(prefix + bytes(head)[PREFIX_SIZE:] + b"x" * 100)
        conns.append(conn)
    assert _rss() - before < 64 << 20


def test_decode_frame_checks_lengths_against_the_prefix() -> None:
    ping = Ping(seq=3)
    whole = b"".join(bytes(s) for s in Connection().send(ping, [b"abc"]))
    header, start = decode_frame(whole, Limits())
    assert header == ping
    assert whole[start:] == b"abc"
    head = whole[:start]
    assert decode_frame(head, Limits(), payload_size=3) == (ping, start)
    for bad in (whole[:-1], whole + b"x", whole[:10]):
        with pytest.raises(ProtocolError):
            decode_frame(bad, Limits())
    with pytest.raises(ProtocolError):
        decode_frame(head, Limits(), payload_size=4)


def test_hello_limits_refuse_a_big_first_frame_and_widen_keeps_buffered_bytes() -> None:
    from flare_async.wire import HELLO_BUFFER, HELLO_LIMITS, encode_head, make_hello  # noqa: PLC0415

    hello = make_hello("server.x", "child", Limits())
    conn = Connection(HELLO_LIMITS, staging_size=HELLO_BUFFER)
    assert conn.buffer_size <= HELLO_BUFFER
    with pytest.raises(FrameTooLarge, match="exceeds 0 B"):
        conn.receive_data(encode_head(hello, 64 << 20, Limits()))
    conn = Connection(HELLO_LIMITS, staging_size=HELLO_BUFFER)
    second = encode_head(hello, 1 << 20, Limits())
    conn.receive_data(encode_head(hello, 0, Limits()) + second[:10])
    assert isinstance(conn.next_event(), Frame)
    conn.widen(Limits())
    assert conn.buffer_size == 256 * 1024
    conn.receive_data(second[10:] + bytes(1 << 20))
    event = conn.next_event()
    assert isinstance(event, Frame)
    assert event.payload_len == 1 << 20
