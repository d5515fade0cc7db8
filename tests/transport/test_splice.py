"""Frames passing through a relay unread (``os.splice``): the sans-IO connection's half, and
real loopback links: forwarded intact, dropped when nobody forwards them, read into memory when
the route cannot splice, and a sender that dies mid-frame never leaves half a frame downstream."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import anyio
import pytest

from flare_async.errors import LinkBroken
from flare_async.testing import driver_pair
from flare_async.transport import Link, TcpDriver, TcpLink
from flare_async.wire import (
    NEED_DATA,
    PASS_FROM,
    Connection,
    Envelope,
    Event,
    Frame,
    Limits,
    Passing,
)


def event(n: int = 1, dst: str = "far") -> Event:
    return Event(
        id=n, src="near", dst=dst, route=["near"], budget=None, headers={}, channel="c", topic="t"
    )


def wire(header: Envelope, payload: bytes) -> bytes:
    return b"".join(bytes(s) for s in Connection().send(header, [payload]))


def pattern(size: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


# ---------------------------------------------------------------- sans-IO
def test_a_large_frame_passes_and_parsing_resumes_after_it() -> None:
    big = pattern(PASS_FROM * 3)
    data = wire(event(1), big) + wire(event(2), b"after")
    conn = Connection()
    offered: list[int] = []

    def decide(h: Envelope, size: int) -> bool:
        offered.append(size)
        return True

    conn.pass_through = decide
    buf = conn.get_buffer()
    first = 5000  # the head and the payload's first bytes arrive together
    head_len = len(data) - len(big) - len(wire(event(2), b"after"))
    buf[: head_len + first] = data[: head_len + first]
    conn.buffer_updated(head_len + first)
    ev = conn.next_event()
    assert isinstance(ev, Passing)
    assert offered == [len(big)]
    assert bytes(ev.parts[0]) == big[:first]
    assert ev.owed == len(big) - first == conn.owed
    assert ev.payload_len == len(big)
    assert conn.passing
    with pytest.raises(RuntimeError, match="passing"):
        conn.get_buffer()
    conn.passed(ev.owed - 10)
    assert conn.next_event() is NEED_DATA
    conn.passed(10)  # the transport moved the rest itself
    assert not conn.passing
    rest = data[head_len + len(big) :]
    conn.receive_data(rest)
    after = conn.next_event()
    assert isinstance(after, Frame)
    assert not isinstance(after, Passing)
    assert bytes(after.parts[0]) == b"after"
    stats = conn.statistics()
    assert stats.frames_received == 2
    assert stats.bytes_received == len(data)


def test_frames_are_offered_only_with_enough_payload_unread_and_may_be_declined() -> None:
    conn = Connection()
    offered: list[int] = []
    conn.pass_through = lambda h, size: offered.append(size) or False
    small = pattern(PASS_FROM - 1)
    big = pattern(PASS_FROM * 2)
    conn.receive_data(wire(event(1), small))
    data = wire(event(2), big)
    conn.receive_data(data[:100])
    conn.receive_data(data[100:])
    frames = [conn.next_event(), conn.next_event()]
    assert offered == [len(big)]  # the small one was never offered
    assert [bytes(f.parts[0]) for f in frames if isinstance(f, Frame)] == [small, big]
    assert not any(isinstance(f, Passing) for f in frames)


def test_passed_beyond_the_payload_is_refused() -> None:
    conn = Connection()
    conn.pass_through = lambda h, size: True
    conn.receive_data(wire(event(1), pattern(PASS_FROM * 2))[:64])
    ev = conn.next_event()
    assert isinstance(ev, Passing)
    with pytest.raises(RuntimeError):
        conn.passed(ev.owed + 1)


def test_eof_while_passing_is_link_broken() -> None:
    conn = Connection()
    conn.pass_through = lambda h, size: True
    conn.receive_data(wire(event(1), pattern(PASS_FROM * 2))[:64])
    assert isinstance(conn.next_event(), Passing)
    with pytest.raises(LinkBroken):
        conn.receive_data(b"")


# ---------------------------------------------------------------- real sockets
@asynccontextmanager
async def relay_links() -> AsyncIterator[tuple[Link, Link, Link, Link]]:
    """``(sender, relay_in, relay_out, receiver)``: two loopback TCP link pairs."""
    async with AsyncExitStack() as stack:
        a, b = await stack.enter_async_context(driver_pair(TcpDriver(), "tcp://127.0.0.1:0")())
        c, d = await stack.enter_async_context(driver_pair(TcpDriver(), "tcp://127.0.0.1:0")())
        yield a, b, c, d


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # splicing is the asyncio read-ahead path's (trio reads into memory)


@pytest.mark.anyio
async def test_a_frame_passes_between_links_unread_and_both_links_go_on() -> None:
    big = pattern(3 << 20, seed=7)
    async with relay_links() as (a, b, c, d):
        assert isinstance(b, TcpLink)
        assert isinstance(c, TcpLink)
        assert b.splices
        assert c.splices
        assert b.pass_through(lambda h, size: True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, Frame(event(1), (big,)))
            got = await b.receive()
            assert isinstance(got, Passing)
            out = event(1, dst="farther")
            await c.send_passing(Frame(out, got.parts), got, b)
        await a.send(Frame(event(2), (b"next",)))
        await c.send(Frame(event(3), (b"after",)))
        first = await d.receive()
        assert first.header == out
        assert bytes(first.parts[0]) == big
        assert bytes((await d.receive()).parts[0]) == b"after"
        nxt = await b.receive()
        assert nxt.header.id == 2
        assert bytes(nxt.parts[0]) == b"next"
        assert b.statistics().frames_passed == 1
        assert b.statistics().bytes_received == a.statistics().bytes_sent


@pytest.mark.anyio
async def test_a_passing_frame_nobody_forwards_is_dropped_and_the_next_one_arrives() -> None:
    async with relay_links() as (a, b, _c, _d):
        b.pass_through(lambda h, size: h.id == 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, Frame(event(1), (pattern(2 << 20),)))
            assert isinstance(await b.receive(), Passing)
        await a.send(Frame(event(2), (pattern(1 << 20, seed=3),)))
        nxt = await b.receive()
        assert nxt.header.id == 2
        assert bytes(nxt.parts[0]) == pattern(1 << 20, seed=3)


@pytest.mark.anyio
async def test_take_passing_reads_the_payload_when_the_next_link_cannot_splice() -> None:
    big = pattern(2 << 20, seed=9)
    async with relay_links() as (a, b, _c, _d):
        b.pass_through(lambda h, size: True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, Frame(event(1), (big,)))
            got = await b.receive()
            assert isinstance(got, Passing)
            whole = await b.take_passing(got)
        assert not isinstance(whole, Passing)
        assert bytes(whole.parts[0]) == big


@pytest.mark.anyio
async def test_a_sender_dying_mid_frame_breaks_its_link_not_the_next_one() -> None:
    driver = TcpDriver()
    listener = await driver.listen("tcp://127.0.0.1:0", limits=Limits())
    port = int(listener.url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port))
    try:
        b = await listener.accept()
        async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (c, d):
            b.pass_through(lambda h, size: True)
            data = wire(event(1), pattern(1 << 20))
            raw.sendall(data[: len(data) // 2])  # half the frame, then the host is gone
            got = await b.receive()
            assert isinstance(got, Passing)
            raw.close()
            with pytest.raises(LinkBroken):
                await c.send_passing(Frame(event(1), got.parts), got, b)
            with pytest.raises(LinkBroken):
                await b.receive()
            # Nothing of the broken frame went out: the next link carries on cleanly.
            await c.send(Frame(event(5), (b"still fine",)))
            nxt = await d.receive()
            assert nxt.header.id == 5
            assert bytes(nxt.parts[0]) == b"still fine"
        await b.aclose()
    finally:
        raw.close()
        await listener.aclose()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return client, accepted


@pytest.mark.anyio
@pytest.mark.parametrize("most", [256, 1])
async def test_a_payload_bigger_than_a_pipe_is_gathered_into_a_chain_of_pipes(most: int) -> None:
    """A pipe holds 1 MiB at most unprivileged, and fewer bytes where the network's pages are
    small: a chunk takes several. Past ``most`` pipes the rest is read into memory."""
    from flare_async.transport import _splice  # noqa: PLC0415 - the relay's own mechanism

    size = 3 << 20
    pool = _splice.PipePool(pipe_size=64 << 10)  # small pipes: several needed on any kernel
    src_in, src_out = tcp_pair()
    dst_in, dst_out = tcp_pair()
    for s in (src_in, src_out, dst_in, dst_out):
        s.setblocking(False)
    data = pattern(size, seed=5)
    moved: list[int] = []
    received = bytearray()

    async def feed() -> None:
        view = memoryview(data)
        while view:
            await anyio.wait_writable(src_in)
            with suppress(BlockingIOError):
                view = view[src_in.send(view) :]

    async def drain(until: int) -> None:
        while len(received) < until:
            await anyio.wait_readable(dst_out)
            with suppress(BlockingIOError):
                received.extend(dst_out.recv(1 << 20))

    chain = _splice.PipeChain(pool, most=most)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            rest = await _splice.gather(
                src_out, chain, size, lambda: anyio.wait_readable(src_out), moved.append
            )
        assert sum(moved) == size
        assert len(chain.pipes) == min(most, len(chain.pipes))
        if most > 1:
            assert rest is None  # every byte went into pipes, none through memory
            assert len(chain.pipes) > 1
            assert chain.held == size
        else:
            assert rest is not None  # one small pipe: the rest came through memory
            assert chain.held + len(rest) == size
        held = chain.held
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, held)
            await _splice.flush(chain, dst_in, lambda: anyio.wait_writable(dst_in))
        assert chain.held == 0
        assert bytes(received) + (bytes(rest) if rest is not None else b"") == data
    finally:
        chain.release()
        for s in (src_in, src_out, dst_in, dst_out):
            s.close()
