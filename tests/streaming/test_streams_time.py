"""Streams and time, on trio's virtual clock: resume after a dropped link (direct and behind a
relay), and the stalls that fail a stream by name on either end."""

from __future__ import annotations

from typing import Any

import anyio
import blake3
import crc32c
import pytest
from trio.testing import MockClock

from flare_async import Cell, Context, HandlerTable, IncomingStream
from flare_async.errors import StreamStalled
from tests.streaming.test_streams import CHUNK, WINDOW, chain, pattern

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def dropping_table(state: dict[str, Any], drop_at: int) -> HandlerTable:
    """Collects the stream; once ``drop_at`` bytes arrived, breaks the receiver's link to its
    parent once, as a network fault would (the receiver then dials again by itself)."""
    table = HandlerTable()

    @table.stream("t", "collect")
    async def collect(ctx: Context, stream: IncomingStream) -> bytes:
        state["calls"] = state.get("calls", 0) + 1
        got = bytearray()
        async for chunk in stream:
            got += chunk
            if len(got) >= drop_at and not state.get("dropped"):
                state["dropped"] = True
                cell: Cell = ctx.cell
                assert cell._router.parent is not None
                cell._router.parent.link.abort()  # type: ignore[attr-defined]
        state["data"] = bytes(got)
        return stream.sha256.encode()

    return table


@pytest.mark.parametrize("digest", ["crc32c", "blake3"])
@pytest.mark.parametrize("names", [["server", "server.e"], ["server", "server.r", "server.r.e"]])
async def test_a_dropped_link_mid_stream_is_survived_by_resuming(
    names: list[str], digest: str
) -> None:
    state: dict[str, Any] = {}
    data = pattern(40 * CHUNK, seed=11)
    expected = {
        "crc32c": f"crc32c:{crc32c.crc32c(data):08x}",  # chunks resent: still the object's CRC
        "blake3": f"blake3:{blake3.blake3(data).hexdigest()}",
    }[digest]
    async with chain(names, dropping_table(state, 10 * CHUNK)) as cells:
        server, edge = cells[0], cells[-1]
        reply = await server.stream(
            names[-1],
            "t",
            "collect",
            data,
            chunk=CHUNK,
            window=WINDOW,
            idle=60,
            probe=1,
            digest=digest,
        )
        assert reply.tobytes().decode() == expected
        assert state["dropped"]
        assert state["calls"] == 1
        assert state["data"] == data
        assert server.statistics().streams.probes >= 1
        assert edge.statistics().streams.resumes >= 1


async def test_a_receiver_that_never_reads_again_stalls_the_sender_by_name() -> None:
    table = HandlerTable()

    @table.stream("t", "stuck")
    async def stuck(ctx: Context, stream: IncomingStream) -> None:
        await stream.read_chunk()
        await anyio.sleep_forever()

    async with chain(["server", "server.e"], table) as (server, _):
        start = anyio.current_time()
        with pytest.raises(StreamStalled, match="no progress for 30"):
            await server.stream(
                "server.e",
                "t",
                "stuck",
                pattern(64 * CHUNK),
                chunk=CHUNK,
                window=WINDOW,
                idle=30,
            )
        assert 30 <= anyio.current_time() - start <= 30 + 2 * 5  # idle, plus a probe or two


async def test_a_sender_that_stops_sending_stalls_the_receiver_by_name() -> None:
    seen: list[BaseException] = []
    stalled = anyio.Event()
    table = HandlerTable()

    @table.stream("t", "wait")
    async def wait(ctx: Context, stream: IncomingStream) -> None:
        try:
            async for _ in stream:
                pass
        except StreamStalled as exc:
            seen.append(exc)
            stalled.set()
            raise

    async def trickle() -> Any:
        yield b"first"
        await anyio.sleep_forever()

    async with (
        chain(["server", "server.e"], table, stream_idle=20) as (server, _),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: server.stream("server.e", "t", "wait", trickle(), idle=20))
        await stalled.wait()
        tg.cancel_scope.cancel()
    assert "nothing arrived from server" in str(seen[0])
