"""Streams over real loopback sockets: file to file, offsets past 4 GiB from a sparse file,
a request beside a stream that fills the link, three hops, and a connection killed mid-stream."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from flare_async import Context, HandlerTable, IncomingStream, Payload
from flare_async.transport import TcpLink
from tests.streaming.test_streams import chain, pattern

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the runtime's production loop; trio runs the memory-transport tests


def table_for(tmp: Path, state: dict[str, Any]) -> HandlerTable:
    table = HandlerTable()

    @table.stream("t", "save")
    async def save(ctx: Context, stream: IncomingStream) -> bytes:
        path = tmp / f"in-{stream.sid}.bin"
        n = await stream.save(path)
        state["path"] = path
        return str(n).encode()

    @table.stream("t", "count")
    async def count(ctx: Context, stream: IncomingStream) -> bytes:
        n = 0
        async for chunk in stream:
            n += chunk.nbytes
            state.setdefault("first", anyio.Event()).set()
            if "hold" in state:
                await state["hold"].wait()
            if "drop_at" in state and n >= state["drop_at"] and not state.get("dropped"):
                state["dropped"] = True
                assert ctx.cell._router.parent is not None
                link = ctx.cell._router.parent.link
                assert isinstance(link, TcpLink)
                link.abort()  # a reset, as a crashed host or a cut cable would give
        return str(n).encode()

    @table.request("t", "ping")
    async def ping(ctx: Context, msg: Payload) -> bytes:
        return b"pong"

    return table


async def test_file_to_file(tmp_path: Path) -> None:
    state: dict[str, Any] = {}
    src = tmp_path / "model.bin"
    data = pattern(5 * (1 << 20) + 123, seed=21)
    src.write_bytes(data)
    async with chain(["server", "server.e"], table_for(tmp_path, state), tcp=True) as (server, _):
        reply = await server.stream("server.e", "t", "save", src)
    assert int(reply.tobytes()) == len(data)
    assert state["path"].read_bytes() == data


@pytest.mark.slow  # streams a 4 GiB sparse file over loopback
async def test_a_sparse_file_past_4_gib(tmp_path: Path) -> None:
    state: dict[str, Any] = {}
    src = tmp_path / "sparse.bin"
    size = (1 << 32) + 4097
    with src.open("wb") as f:
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail!")  # the last chunk carries real bytes past the 32-bit boundary
    async with chain(["server", "server.e"], table_for(tmp_path, state), tcp=True) as (server, _):
        reply = await server.stream(
            "server.e", "t", "count", src, digest=False, chunk=4 << 20, window=32 << 20
        )
    assert int(reply.tobytes()) == size
    os.unlink(src)


async def test_a_request_is_answered_while_a_stream_fills_the_same_link(tmp_path: Path) -> None:
    state: dict[str, Any] = {"hold": anyio.Event()}
    data = pattern(64 << 20, seed=22)
    async with (
        chain(["server", "server.e"], table_for(tmp_path, state), tcp=True) as (server, _),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: server.stream("server.e", "t", "count", data, digest=False))
        await state.setdefault("first", anyio.Event()).wait()
        state["hold"].set()  # the stream now runs flat out on the one link
        reply = await server.request("server.e", "t", "ping", b"", timeout=5)
        assert reply.tobytes() == b"pong"
        (sender,) = server._streams.outgoing.values()
        assert sender.reply is None  # answered while the stream was still going


async def test_three_hops_over_tcp(tmp_path: Path) -> None:
    state: dict[str, Any] = {}
    data = pattern(3 * (1 << 20) + 7, seed=23)
    names = ["server", "server.r1", "server.r1.r2", "server.r1.r2.e"]
    async with chain(names, table_for(tmp_path, state), tcp=True) as cells:
        reply = await cells[0].stream(names[-1], "t", "save", data, chunk=256 << 10)
        # Both relays passed the chunks on unread (os.splice), from their parent's link.
        for relay in cells[1:3]:
            assert relay._router.parent is not None
            assert relay._router.parent.link.statistics().frames_passed >= 10
    assert int(reply.tobytes()) == len(data)
    assert state["path"].read_bytes() == data


async def test_a_relay_link_killed_mid_stream_resumes(tmp_path: Path) -> None:
    """The relay's link to the receiver drops while chunks pass through it unread."""
    state: dict[str, Any] = {"drop_at": 6 << 20}
    data = pattern(24 << 20, seed=25)
    names = ["server", "server.r", "server.r.e"]
    async with chain(names, table_for(tmp_path, state), tcp=True) as (server, relay, edge):
        with anyio.fail_after(30):
            reply = await server.stream(
                "server.r.e", "t", "count", data, chunk=512 << 10, probe=0.2, idle=20
            )
        assert int(reply.tobytes()) == len(data)
        assert state["dropped"]
        assert edge.statistics().streams.resumes >= 1
        assert relay._router.parent is not None
        assert relay._router.parent.link.statistics().frames_passed >= 1


async def test_a_connection_killed_mid_stream_resumes(tmp_path: Path) -> None:
    state: dict[str, Any] = {"drop_at": 8 << 20}
    data = pattern(32 << 20, seed=24)
    async with chain(["server", "server.e"], table_for(tmp_path, state), tcp=True) as (
        server,
        edge,
    ):
        with anyio.fail_after(30):
            reply = await server.stream(
                "server.e", "t", "count", data, chunk=256 << 10, probe=0.2, idle=20
            )
        assert int(reply.tobytes()) == len(data)
        assert state["dropped"]
        assert edge.statistics().streams.resumes >= 1
