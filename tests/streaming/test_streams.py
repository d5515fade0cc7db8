"""Streams between cells: sizes, sources and sinks, integrity, flow control, relays, fan-out,
resume after a dropped link, and the failures each has a name for."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import blake3
import crc32c
import pytest

from flare_async import (
    Cell,
    Context,
    HandlerTable,
    IncomingStream,
    MemoryNetwork,
    Payload,
    system_handlers,
)
from flare_async.cell._sources import ChunkLog, open_source
from flare_async.errors import (
    BadRequest,
    ConfigError,
    NoHandler,
    Overloaded,
    StreamAborted,
    StreamCorrupted,
    Unreachable,
)
from flare_async.streaming import DEFAULT_CHUNK, LARGE_CHUNK, LARGE_FROM, Progress, checksum
from flare_async.testing import FaultyDriver
from flare_async.transport import Driver, TcpDriver
from flare_async.wire import Frame, StreamAbort, StreamData, StreamEnd

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    # Real clocks: file sources, sinks and digests of large chunks use worker threads, which
    # a virtual clock that jumps when every task waits would overtake. The tests that are
    # about time (stalls, probes) live in test_streams_time.py on the virtual clock.
    return str(request.param)


CHUNK = 4096
WINDOW = 4 * CHUNK


def pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return block[:size]


class Sink:
    """What the test receiver saw."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}
        self.calls = 0
        self.got_first = anyio.Event()
        self.release = anyio.Event()
        self.release.set()
        self.headers: dict[str, str] = {}


def receiver_table(sink: Sink, *, hold_after_first: bool = False) -> HandlerTable:
    table = HandlerTable("test streams")

    @table.stream("t", "collect")
    async def collect(ctx: Context, stream: IncomingStream) -> bytes:
        sink.calls += 1
        parts = []
        async for chunk in stream:
            parts.append(bytes(chunk))
            sink.got_first.set()
            if hold_after_first:
                await sink.release.wait()
        sink.data[stream.sid] = b"".join(parts)
        sink.headers = stream.headers
        return f"{stream.received} {stream.sha256}".encode()

    @table.stream("t", "refuse")
    async def refuse(ctx: Context, stream: IncomingStream) -> None:
        raise BadRequest("not this one")

    @table.stream("t", "early")
    async def early(ctx: Context, stream: IncomingStream) -> bytes:
        chunk = await stream.read_chunk()
        return b"enough" if chunk is not None else b"empty"

    @table.request("t", "ping")
    async def ping(ctx: Context, msg: Payload) -> bytes:
        return b"pong"

    return table


@asynccontextmanager
async def chain(
    names: list[str],
    handlers: HandlerTable,
    driver: Driver | None = None,
    *,
    tcp: bool = False,
    **cell_opts: Any,
) -> AsyncIterator[list[Cell]]:
    """Cells each the child of the one before, the last one with ``handlers``: on one memory
    network (or ``driver``), or over loopback TCP with ``tcp``. These tests are about the
    stream protocol: small objects are streamed too, unless ``inline_max`` says otherwise
    (``test_inline.py`` tests the inline path)."""
    cell_opts.setdefault("inline_max", 0)
    net = TcpDriver() if tcp else driver or MemoryNetwork()
    async with AsyncExitStack() as stack:
        cells: list[Cell] = []
        parent: str | None = None
        for i, name in enumerate(names):
            last = i == len(names) - 1
            here = "tcp://127.0.0.1:0" if tcp else f"memory://{name}"
            cell = Cell(
                name,
                listen=[] if last else [here],
                parent=parent,
                drivers=[net],
                handlers=[handlers] if last else [],
                **cell_opts,
            )
            await stack.enter_async_context(cell)
            if parent is not None:
                with anyio.fail_after(10):
                    await cell.wait_parent()
            parent = cell.listen_urls[0] if cell.listen_urls else None
            cells.append(cell)
        yield cells


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 40 * CHUNK])
async def test_round_trip_of_every_size(size: int) -> None:
    sink = Sink()
    data = pattern(size)
    async with chain(["server", "server.e"], receiver_table(sink)) as (server, _):
        seen: list[Progress] = []
        reply = await server.stream(
            "server.e",
            "t",
            "collect",
            data,
            chunk=CHUNK,
            window=WINDOW,
            progress=seen.append,
            headers={"model": "v7"},
        )
    assert sink.headers == {"model": "v7"}
    received, sha = reply.tobytes().decode().split()
    assert int(received) == size
    assert sha == f"crc32c:{crc32c.crc32c(data):08x}"  # the default: combined from the chunks'
    assert list(sink.data.values()) == [data]
    dones = [p.done for p in seen]
    assert dones == sorted(dones)
    assert not size or dones[-1] == size
    assert all(p.total == size for p in seen)


async def test_sources_buffers_file_and_async_iterable(tmp_path: Path) -> None:
    sink = Sink()
    data = pattern(10 * CHUNK + 3, seed=1)
    path = tmp_path / "object.bin"
    path.write_bytes(data)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    sources: list[Any] = [
        [data[:5000], memoryview(data)[5000:], b""],
        path,
        str(path),
        pieces(),
        bytearray(data),
    ]
    async with chain(["server", "server.e"], receiver_table(sink)) as (server, _):
        for source in sources:
            await server.stream("server.e", "t", "collect", source, chunk=CHUNK, window=WINDOW)
    assert list(sink.data.values()) == [data] * len(sources)


async def test_save_writes_the_file_atomically_and_only_when_verified(tmp_path: Path) -> None:
    table = HandlerTable()
    target = tmp_path / "model.bin"

    @table.stream("t", "save")
    async def save(ctx: Context, stream: IncomingStream) -> bytes:
        return str(await stream.save(target)).encode()

    data = pattern(7 * CHUNK + 11, seed=2)
    async with chain(["server", "server.e"], table) as (server, _):
        reply = await server.stream("server.e", "t", "save", data, chunk=CHUNK, window=WINDOW)
        assert reply.tobytes() == str(len(data)).encode()
        assert target.read_bytes() == data
        assert not (tmp_path / "model.bin.part").exists()
        # A wrong announced digest: the receiver refuses the object, no file appears.
        target.unlink()
        with pytest.raises(StreamCorrupted, match="does not match its digest"):
            await server.stream(
                "server.e", "t", "save", data, chunk=CHUNK, window=WINDOW, sha256="00" * 32
            )
    assert not target.exists()
    assert not (tmp_path / "model.bin.part").exists()


async def test_offsets_past_4_gib_from_a_generated_source(anyio_backend_name: str) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("4 GiB through the memory transport once is enough")
    block = pattern(4 << 20, seed=3)
    size = (1 << 32) + (3 << 20) + 5  # past the 32-bit boundary, with a ragged end
    table = HandlerTable()
    seen = {"n": 0, "offsets_past_4gib": 0}

    @table.stream("t", "count")
    async def count(ctx: Context, stream: IncomingStream) -> bytes:
        async for chunk in stream:
            if seen["n"] >= 1 << 32:
                seen["offsets_past_4gib"] += 1
            seen["n"] += chunk.nbytes
        return str(stream.received).encode()

    async def generated() -> AsyncIterator[memoryview]:
        left = size
        view = memoryview(block)
        while left:
            n = min(left, len(block))
            yield view[:n]
            left -= n

    async with chain(["server", "server.e"], table) as (server, _):
        reply = await server.stream(
            "server.e",
            "t",
            "count",
            generated(),
            size=size,
            digest=False,
            chunk=4 << 20,
            window=32 << 20,
        )
    assert int(reply.tobytes()) == size
    assert seen["offsets_past_4gib"] >= 1


async def test_a_damaged_chunk_is_detected_and_sent_again() -> None:
    damaged: list[int] = []

    def third_data_frame(frame: Frame) -> bool:
        h = frame.header
        if isinstance(h, StreamData) and h.offset == 2 * CHUNK and not damaged:
            damaged.append(h.offset)
            return True
        return False

    sink = Sink()
    data = pattern(6 * CHUNK, seed=4)
    driver = FaultyDriver(MemoryNetwork(), corrupt=third_data_frame)
    async with chain(["server", "server.e"], receiver_table(sink), driver) as (server, edge):
        await server.stream("server.e", "t", "collect", data, chunk=CHUNK, window=WINDOW)
        assert edge.statistics().streams.damaged_chunks == 1
        assert server.statistics().streams.rewinds >= 1
    assert damaged == [2 * CHUNK]
    assert list(sink.data.values()) == [data]


async def test_a_chunk_damaged_every_time_fails_the_stream_by_name() -> None:
    def always(frame: Frame) -> bool:
        return isinstance(frame.header, StreamData) and frame.header.offset == CHUNK

    driver = FaultyDriver(MemoryNetwork(), corrupt=always)
    async with chain(["server", "server.e"], receiver_table(Sink()), driver) as (server, _):
        with pytest.raises(StreamCorrupted, match="failed its check"):
            await server.stream(
                "server.e", "t", "collect", pattern(4 * CHUNK), chunk=CHUNK, window=WINDOW
            )
        # The link and the cells are fine: the next stream goes through.
        driver.corrupt = lambda frame: False
        await server.stream("server.e", "t", "collect", b"after", chunk=CHUNK, window=WINDOW)


async def test_a_receiver_that_stops_reading_holds_the_sender_within_the_window() -> None:
    sink = Sink()
    sink.release = anyio.Event()
    data = pattern(64 * CHUNK, seed=5)
    async with (
        chain(["server", "server.e"], receiver_table(sink, hold_after_first=True)) as (
            server,
            edge,
        ),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(
            lambda: server.stream("server.e", "t", "collect", data, chunk=CHUNK, window=WINDOW)
        )
        await sink.got_first.wait()
        await anyio.wait_all_tasks_blocked()
        (sender,) = server._streams.outgoing.values()
        (incoming,) = edge._streams.incoming.values()
        # The consumer took one chunk: the sender may be at most a window beyond it.
        assert sender.machine.next_offset <= CHUNK + WINDOW
        assert incoming._machine.held <= WINDOW
        assert sender.log.held <= WINDOW
        sink.release.set()
    assert list(sink.data.values()) == [data]


async def test_three_hops_through_two_relays() -> None:
    sink = Sink()
    data = pattern(9 * CHUNK + 1, seed=6)
    names = ["server", "server.r1", "server.r1.r2", "server.r1.r2.e"]
    async with chain(names, receiver_table(sink)) as cells:
        await cells[0].stream(names[-1], "t", "collect", data, chunk=CHUNK, window=WINDOW)
        assert cells[1].statistics().forwarded > 0
        assert cells[2].statistics().forwarded > 0
    assert list(sink.data.values()) == [data]


async def test_a_small_request_passes_a_stream_that_fills_the_link() -> None:
    sink = Sink()
    sink.release = anyio.Event()
    data = pattern(256 * CHUNK, seed=7)
    done = anyio.Event()
    async with (
        chain(["server", "server.e"], receiver_table(sink, hold_after_first=True)) as (
            server,
            _,
        ),
        anyio.create_task_group() as tg,
    ):

        async def send() -> None:
            await server.stream("server.e", "t", "collect", data, chunk=CHUNK, window=WINDOW)
            done.set()

        tg.start_soon(send)
        await sink.got_first.wait()
        reply = await server.request("server.e", "t", "ping", b"", timeout=5)
        assert reply.tobytes() == b"pong"
        assert not done.is_set()  # the request did not wait for the stream
        sink.release.set()


async def test_refusals_have_names() -> None:
    async with chain(["server", "server.e"], receiver_table(Sink()), max_streams=1) as (
        server,
        edge,
    ):
        with pytest.raises(NoHandler):
            await server.stream("server.e", "t", "nothing-here", b"x")
        with pytest.raises(BadRequest, match="not this one"):
            await server.stream("server.e", "t", "refuse", b"x")
        with pytest.raises(Unreachable):
            await server.stream("server.nobody", "t", "collect", b"x")
        with pytest.raises(Unreachable):  # decided by server.e, on the way: fails at once
            await server.stream("server.e.nobody", "t", "collect", b"x")
        assert (
            await server.stream(
                "server.e", "t", "early", pattern(50 * CHUNK), chunk=CHUNK, window=WINDOW
            )
        ).tobytes() == b"enough"
        # One stream at a time on this receiver: a second one finds no slot, asks again a
        # little later (backpressure), and goes through once the first is done.
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: server.stream(
                    "server.e", "t", "collect", pattern(8 * CHUNK), chunk=CHUNK, window=WINDOW
                )
            )
            while not edge._streams.incoming:
                await anyio.lowlevel.checkpoint()
            second = await server.stream("server.e", "t", "collect", b"second")
        assert second.tobytes().startswith(b"6 ")
        assert server.statistics().streams.waits >= 1


async def test_a_stream_that_never_gets_a_slot_fails_overloaded_after_its_idle_limit() -> None:
    sink = Sink()
    sink.release = anyio.Event()  # the first stream holds the only slot
    async with (
        chain(
            ["server", "server.e"], receiver_table(sink, hold_after_first=True), max_streams=1
        ) as (server, _edge),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(
            lambda: server.stream(
                "server.e", "t", "collect", pattern(8 * CHUNK), chunk=CHUNK, window=WINDOW
            )
        )
        await sink.got_first.wait()
        with pytest.raises(Overloaded, match="receives 1 streams already"):
            await server.stream("server.e", "t", "collect", b"second", idle=1.0)
        assert server.statistics().streams.waits >= 2
        sink.release.set()


async def test_fan_out_through_a_relay_crosses_the_upstream_link_once() -> None:
    net = MemoryNetwork()
    sinks = [Sink() for _ in range(4)]
    data = pattern(20 * CHUNK, seed=8)
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            Cell("server", listen=["memory://server"], drivers=[net], inline_max=0)
        )
        relay = await stack.enter_async_context(
            Cell(
                "server.r",
                listen=["memory://r"],
                parent="memory://server",
                drivers=[net],
                handlers=[system_handlers()],
            )
        )
        await relay.wait_parent()
        for i, sink in enumerate(sinks):
            cell = await stack.enter_async_context(
                Cell(
                    f"server.r.e{i}",
                    parent="memory://r",
                    drivers=[net],
                    handlers=[receiver_table(sink)],
                )
            )
            await cell.wait_parent()
        (link,) = [p.link for p in server._router.children.values()]
        before = link.statistics().bytes_sent
        results = await server.stream_many(
            [f"server.r.e{i}" for i in range(4)],
            "t",
            "collect",
            data,
            chunk=CHUNK,
            window=WINDOW,
        )
        upstream = link.statistics().bytes_sent - before
        direct = await server.stream_many(
            ["server.r.e0", "server.r.e1"],
            "t",
            "collect",
            data,
            chunk=CHUNK,
            window=WINDOW,
            via_relays=False,
        )
    assert all(isinstance(r, Payload) for r in results.values()), results
    sha = f"crc32c:{crc32c.crc32c(data):08x}"  # passed on by the relay, checked at the ends
    for r in results.values():
        assert isinstance(r, Payload)
        assert r.tobytes().decode() == f"{len(data)} {sha}"
    assert len(data) <= upstream < 1.2 * len(data)  # once, not four times
    assert all(next(iter(s.data.values())) == data for s in sinks)
    assert all(isinstance(r, Payload) for r in direct.values())


async def test_fan_out_reports_each_failed_target_without_failing_the_others() -> None:
    sink = Sink()
    async with chain(["server", "server.e"], receiver_table(sink)) as (server, _):
        results = await server.stream_many(
            ["server.e", "server.gone"],
            "t",
            "collect",
            pattern(3 * CHUNK),
            chunk=CHUNK,
            window=WINDOW,
        )
    assert isinstance(results["server.e"], Payload)
    assert isinstance(results["server.gone"], Unreachable)


async def test_a_handler_that_starts_reading_late_still_verifies_the_digest() -> None:
    table = HandlerTable()

    @table.stream("t", "late")
    async def late(ctx: Context, stream: IncomingStream) -> bytes:
        await anyio.sleep(0.05)  # every chunk is already held when it starts reading
        return (await stream.read_all()).tobytes()[:4]

    data = pattern(3 * CHUNK, seed=12)
    async with chain(["server", "server.e"], table) as (server, _):
        reply = await server.stream("server.e", "t", "late", data, chunk=CHUNK, window=WINDOW)
    assert reply.tobytes() == data[:4]


async def test_a_failing_progress_callback_fails_neither_the_stream_nor_the_cell() -> None:
    def broken(p: Progress) -> None:
        raise RuntimeError("bar broke")

    sink = Sink()
    data = pattern(6 * CHUNK, seed=13)
    async with chain(["server", "server.e"], receiver_table(sink)) as (server, _):
        await server.stream(
            "server.e", "t", "collect", data, chunk=CHUNK, window=WINDOW, progress=broken
        )
        assert (await server.request("server.e", "t", "ping", b"")).tobytes() == b"pong"
    assert list(sink.data.values()) == [data]


@pytest.mark.parametrize("size", [0, 5 * CHUNK])
async def test_a_lost_end_is_sent_again(size: int) -> None:
    lost: list[int] = []

    def first_end(frame: Frame) -> bool:
        if isinstance(frame.header, StreamEnd) and not lost:
            lost.append(1)
            return True
        return False

    sink = Sink()
    driver = FaultyDriver(MemoryNetwork(), drop=first_end)
    async with chain(["server", "server.e"], receiver_table(sink), driver) as (server, _):
        with anyio.fail_after(30):
            await server.stream(
                "server.e", "t", "collect", pattern(size), chunk=CHUNK, window=WINDOW, probe=0.2
            )
    assert lost == [1]
    assert list(sink.data.values()) == [pattern(size)]


async def test_a_sender_that_gives_up_tells_the_receiver_at_once() -> None:
    seen: list[BaseException] = []
    ended = anyio.Event()
    table = HandlerTable()

    @table.stream("t", "slow")
    async def slow(ctx: Context, stream: IncomingStream) -> None:
        try:
            await stream.read_chunk()
            await anyio.sleep(0.2)
            async for _ in stream:
                pass
        except StreamAborted as exc:
            seen.append(exc)
        finally:
            ended.set()

    async with chain(["server", "server.e"], table) as (server, edge):
        with anyio.move_on_after(0.05):
            await server.stream(
                "server.e", "t", "slow", pattern(64 * CHUNK), chunk=CHUNK, window=WINDOW
            )
        with anyio.fail_after(5):  # not the 60 s idle limit
            await ended.wait()
        assert seen
        assert not edge._streams.incoming


async def test_a_cell_off_the_path_cannot_abort_a_stream() -> None:
    sink = Sink()
    sink.release = anyio.Event()
    data = pattern(16 * CHUNK, seed=14)
    net = MemoryNetwork()
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            Cell("server", listen=["memory://server"], drivers=[net], inline_max=0)
        )
        edge = await stack.enter_async_context(
            Cell(
                "server.a",
                parent="memory://server",
                drivers=[net],
                handlers=[receiver_table(sink, hold_after_first=True)],
            )
        )
        rogue = await stack.enter_async_context(
            Cell("server.b", parent="memory://server", drivers=[net])
        )
        await edge.wait_parent()
        await rogue.wait_parent()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: server.stream("server.a", "t", "collect", data, chunk=CHUNK, window=WINDOW)
            )
            await sink.got_first.wait()
            (sid,) = server._streams.outgoing
            spoof = StreamAbort(
                id=1,
                src="server.b",
                dst="server",
                route=["server.b"],
                budget=None,
                headers={},
                sid=sid,
                status=11,
                message="spoofed",
                sender="server",
            )
            await rogue._router.send(Frame(spoof))
            await anyio.wait_all_tasks_blocked()
            assert server._streams.outgoing[sid].error is None
            sink.release.set()
    assert list(sink.data.values()) == [data]


async def test_an_abort_about_another_senders_stream_leaves_this_one_alone() -> None:
    """A cell reporting trouble with a stream of another sender (``sender`` not its own name)
    under the sid of a stream it sends itself must not make the receiver drop that stream
    unfailed (its handler would wait out the idle limit): found writing docs/wire.md."""
    sink = Sink()
    sink.release = anyio.Event()
    data = pattern(16 * CHUNK, seed=15)
    async with (
        chain(["server", "server.a"], receiver_table(sink, hold_after_first=True)) as (
            server,
            edge,
        ),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(
            lambda: server.stream("server.a", "t", "collect", data, chunk=CHUNK, window=WINDOW)
        )
        await sink.got_first.wait()
        (sid,) = server._streams.outgoing
        other = StreamAbort(
            id=1,
            src="server",
            dst="server.a",
            route=["server"],
            budget=None,
            headers={},
            sid=sid,
            status=11,
            message="about someone else's stream",
            sender="server.other",
        )
        await server._router.send(Frame(other))
        await anyio.wait_all_tasks_blocked()
        assert ("server", sid) in edge._streams.incoming
        sink.release.set()
    assert list(sink.data.values()) == [data]


async def test_a_fan_out_target_that_fails_first_does_not_drop_the_others_chunks() -> None:
    # The unreachable target comes first: its sender fails and leaves before the other's runs.
    sink = Sink()
    data = pattern(6 * CHUNK, seed=21)
    async with chain(["server", "server.e"], receiver_table(sink)) as (server, _):
        results = await server.stream_many(
            ["server.gone", "server.e"], "t", "collect", data, chunk=CHUNK, window=WINDOW
        )
    assert isinstance(results["server.gone"], Unreachable)
    assert isinstance(results["server.e"], Payload)
    assert list(sink.data.values()) == [data]


async def test_read_joined_gives_the_object_as_one_buffer() -> None:
    table = HandlerTable()
    seen: list[tuple[int, bytes]] = []

    @table.stream("t", "joined")
    async def joined(ctx: Context, stream: IncomingStream) -> bytes:
        buf = await stream.read_joined()
        seen.append((len(buf), bytes(buf)))
        return b"ok"

    data = pattern(5 * CHUNK + 7, seed=22)
    async with chain(["server", "server.e"], table) as (server, _):
        await server.stream("server.e", "t", "joined", data, chunk=CHUNK, window=WINDOW)
        await server.stream("server.e", "t", "joined", b"", chunk=CHUNK, window=WINDOW)
    assert seen == [(len(data), data), (0, b"")]


async def test_a_seal_travels_in_the_end_message_over_the_digest() -> None:
    table = HandlerTable()
    seen: list[tuple[dict[str, str], str]] = []

    @table.stream("t", "sealed")
    async def sealed(ctx: Context, stream: IncomingStream) -> bytes:
        await stream.read_all()
        seen.append((stream.trailer, stream.sha256))
        return b"ok"

    data = pattern(3 * CHUNK + 5, seed=23)
    async with chain(["server", "server.r", "server.r.e"], table) as (server, *_):
        await server.stream(
            "server.r.e",
            "t",
            "sealed",
            data,
            chunk=CHUNK,
            window=WINDOW,
            digest=False,  # a seal needs the digest: it is computed anyway
            seal=lambda dst, sha: {"sig": f"{dst}:{sha}"},
        )
    ((trailer, sha),) = seen
    assert sha == f"blake3:{blake3.blake3(data).hexdigest()}"  # signed: cryptographic
    assert trailer == {"sig": f"server.r.e:{sha}"}  # through a relay, untouched


async def test_a_large_object_goes_in_large_chunks_unless_the_caller_chooses(
    tmp_path: Path,
) -> None:
    chunks: dict[int, int] = {}
    table = HandlerTable()

    @table.stream("t", "size")
    async def size(ctx: Context, stream: IncomingStream) -> bytes:
        chunks[stream.sid] = stream.chunk
        n = 0
        async for part in stream:
            assert part.nbytes <= stream.chunk
            n += part.nbytes
        return str(n).encode()

    large = bytes(LARGE_FROM)  # zero pages: no memory touched until read
    path = tmp_path / "large.bin"
    with path.open("wb") as f:
        f.truncate(LARGE_FROM)  # sparse
    async with chain(["server", "server.e"], table) as (server, _):
        picked = await server.stream("server.e", "t", "size", large, digest=False)
        small = await server.stream("server.e", "t", "size", large[: 1 << 20], digest=False)
        narrow = await server.stream("server.e", "t", "size", large, window=8 << 20, digest=False)
        chosen = await server.stream("server.e", "t", "size", large, chunk=CHUNK, digest=False)
        filed = await server.stream("server.e", "t", "size", path, digest=False)
        with pytest.raises(ConfigError):
            await server.stream("server.e", "t", "size", large, chunk=0)
    assert [int(r.tobytes()) for r in (picked, small, narrow, chosen, filed)] == [
        LARGE_FROM,
        1 << 20,
        LARGE_FROM,
        LARGE_FROM,
        LARGE_FROM,
    ]
    # A file keeps 1 MiB chunks: it is usually saved as one, where 4 MiB chunks ran slower.
    assert list(chunks.values()) == [
        LARGE_CHUNK,
        DEFAULT_CHUNK,
        DEFAULT_CHUNK,
        CHUNK,
        DEFAULT_CHUNK,
    ]


async def test_a_file_is_read_several_chunks_a_trip_each_with_its_crc(tmp_path: Path) -> None:
    data = pattern(10 * CHUNK + 3, seed=4)
    path = tmp_path / "object.bin"
    path.write_bytes(data)
    log = ChunkLog(open_source(path), CHUNK, 3 * CHUNK, None)
    log.join("a")
    try:
        assert await log.fill()
        assert log.end == 3 * CHUNK  # as much as the window has room for, in one trip
        seen = b""
        while True:
            for offset in range(log.start, log.end, CHUNK):
                held = log.chunk_at(offset)
                assert held is not None
                assert held.crc == checksum(held.data)  # computed with the read
                seen += bytes(held.data)
            log.commit("a", log.end)
            if not await log.fill():
                break
        assert log.eof
        assert seen == data
    finally:
        await log.aclose()


def test_a_digest_queue_holds_about_8_mib_whatever_the_chunk() -> None:
    from flare_async.cell._sources import HashDigest  # noqa: PLC0415

    assert HashDigest.for_chunks(1 << 20)._queue.size == 8
    assert HashDigest.for_chunks(LARGE_CHUNK)._queue.size == 2
    assert HashDigest.for_chunks(64 << 20)._queue.size == 2  # at least one hashed, one queued
    assert HashDigest.for_chunks(CHUNK)._queue.size == (8 << 20) // CHUNK
