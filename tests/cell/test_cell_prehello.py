"""Connections that have not said hello (issue 18): capped per listener and per source, bounded
in time on every transport (TLS handshake and HTTP upgrade included), and small in memory."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest

from flare_async import Cell
from flare_async.errors import FrameTooLarge, LinkBroken
from flare_async.transport import Admission, Link, TcpDriver
from flare_async.wire import HELLO_BUFFER, Frame, Limits, encode_head, make_hello

pytestmark = pytest.mark.anyio

BIG = Limits().max_frame


def hostport(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, port = rest.rsplit(":", 1)
    return host, int(port)


async def ended(stream: Any) -> bool:
    """Read until the peer closes (True) or 100 reads came back with data (False)."""
    for _ in range(100):
        try:
            await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            return True
    return False


@pytest.mark.parametrize(
    ("caps", "reason"),
    [
        ({"max_pending": 100, "max_pending_per_source": 3}, "per-source cap"),
        ({"max_pending": 3, "max_pending_per_source": 100}, "per-listener cap"),
    ],
    ids=["per-source", "per-listener"],
)
async def test_connections_beyond_the_cap_are_closed_at_once(
    caps: dict[str, int], reason: str
) -> None:
    admission = Admission(timeout=30, **caps)
    async with Cell(
        "server",
        listen=["tcp://127.0.0.1:0"],
        drivers=[TcpDriver()],
        handshake_timeout=30,
        admission=admission,
        heartbeat=None,
    ) as cell:
        start = anyio.current_time()
        streams = [await anyio.connect_tcp(*hostport(cell.listen_urls[0])) for _ in range(5)]
        for extra in streams[3:]:
            assert await ended(extra)
        assert anyio.current_time() - start < 30  # refused, not timed out
        assert admission.refused[reason] == 2
        for stream in streams:
            await stream.aclose()
        # The three that were let in leave the count as they go: a real child gets in.
        with anyio.fail_after(60):
            async with Cell("server.a", parent=cell.listen_urls[0], drivers=[TcpDriver()]) as a:
                await a.wait_parent()


async def test_a_first_frame_bigger_than_a_hello_closes_the_link_before_it_is_read() -> None:
    async with Cell(
        "server",
        listen=["tcp://127.0.0.1:0"],
        drivers=[TcpDriver()],
        handshake_timeout=30,
        heartbeat=None,
    ) as cell:
        start = anyio.current_time()
        stream = await anyio.connect_tcp(*hostport(cell.listen_urls[0]))
        await stream.send(encode_head(make_hello("server.x", "child", Limits()), BIG, Limits()))
        with anyio.fail_after(20):
            assert await ended(stream)
        assert anyio.current_time() - start < 30  # closed at the prefix, not by the deadline
        assert cell.admission.refused[FrameTooLarge.__name__] == 1
        await stream.aclose()


async def test_an_accepted_link_reads_a_hello_sized_frame_in_a_small_buffer_until_hello() -> None:
    driver = TcpDriver()
    listener = await driver.listen("tcp://127.0.0.1:0", limits=Limits())
    assert listener.guard(Admission())
    try:
        for said_hello in (False, True):
            client = await driver.connect(listener.url, limits=Limits())
            accepted = await listener.accept()
            assert accepted.statistics().read_buffer <= HELLO_BUFFER
            if said_hello:
                accepted.hello_done()
                assert accepted.statistics().read_buffer >= 256 * 1024
            frame = Frame(make_hello("server.x", "child", Limits()), (bytes(1 << 20),))
            async with anyio.create_task_group() as tg:

                async def send(frame: Frame = frame, client: Link = client) -> None:
                    with contextlib.suppress(LinkBroken):
                        await client.send(frame)

                tg.start_soon(send)
                if said_hello:
                    assert (await accepted.receive()).payload_len == 1 << 20
                else:
                    with pytest.raises(FrameTooLarge, match="exceeds 0 B"):
                        await accepted.receive()
                    await accepted.aclose()
            await client.aclose()
            await accepted.aclose()
    finally:
        await listener.aclose()
