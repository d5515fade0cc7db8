"""The tcp:// driver: the conformance suite over real loopback sockets, and its failure modes."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from flare_async.errors import ConfigError, ConnectError, LinkBroken, LinkClosed, ProtocolError
from flare_async.testing import CONFORMANCE_CHECKS, driver_pair, run_check
from flare_async.transport import Link, TcpDriver, TcpLink
from flare_async.transport._tcp_asyncio import AsyncioTcpLink
from flare_async.transport._tcp_trio import TrioTcpLink
from flare_async.transport._tls import TlsLink
from flare_async.transport._tls_asyncio import AsyncioTlsLink
from flare_async.wire import Connection, Event, Frame, Limits
from tests.transport.test_transport_ws import client_context, make_pki, server_context

pytestmark = pytest.mark.anyio


async def abort(link: Link) -> None:
    assert isinstance(link, TcpLink)
    link.abort()


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check) -> None:
    await run_check(check, driver_pair(TcpDriver(), "tcp://127.0.0.1:0"), abort)


@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_pair(pki: Any) -> Any:
    """Connected tls:// pairs: the accepting side handshakes as it accepts (a cell does it
    with its first read; the suite's checks may start with a send)."""
    driver = TcpDriver(server_tls=server_context(pki), client_tls=client_context(pki))

    @asynccontextmanager
    async def make_pair() -> AsyncIterator[tuple[Link, Link]]:
        listener = await driver.listen("tls://127.0.0.1:0", limits=Limits())
        accepted: list[TcpLink] = []

        async def accept() -> None:
            link = await listener.accept()
            assert isinstance(link, (TlsLink, AsyncioTlsLink))
            await link._ensure_tls()
            accepted.append(link)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(accept)
                client = await driver.connect(listener.url, limits=Limits())
            try:
                yield client, accepted[0]
            finally:
                await client.aclose()
                await accepted[0].aclose()
        finally:
            await listener.aclose()

    return make_pair


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
async def test_tls_conformance(check, tls_pki: Any) -> None:
    """The same suite over tls:// (mutual TLS; a relay's links to the server are these)."""
    await run_check(check, tls_pair(tls_pki), abort)


async def test_listener_reports_its_real_port_and_refuses_when_closed() -> None:
    driver = TcpDriver()
    listener = await driver.listen("tcp://127.0.0.1:0", limits=Limits())
    port = int(listener.url.rsplit(":", 1)[1])
    assert port > 0
    await listener.aclose()
    with pytest.raises(ConnectError, match="refused"):
        await driver.connect(f"tcp://127.0.0.1:{port}", limits=Limits())


async def test_garbage_bytes_are_a_protocol_error() -> None:
    driver = TcpDriver()
    listener = await driver.listen("tcp://127.0.0.1:0", limits=Limits())
    port = int(listener.url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port))
    try:
        server = await listener.accept()
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ProtocolError, match="magic"):
            await server.receive()
        await server.aclose()
    finally:
        raw.close()
        await listener.aclose()


async def test_peer_vanishing_mid_frame_is_link_broken() -> None:
    driver = TcpDriver()
    listener = await driver.listen("tcp://127.0.0.1:0", limits=Limits())
    port = int(listener.url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port))
    server = await listener.accept()
    head = Connection().send(
        Event(id=1, src="a", dst="b", route=["a"], budget=None, headers={}, channel="c", topic="t"),
        [bytes(1000)],
    )
    raw.sendall(bytes(head[0]) + bytes(500))  # half the payload, then gone
    raw.close()
    with pytest.raises(LinkBroken):
        await server.receive()
    await server.aclose()
    await listener.aclose()


async def test_bad_urls() -> None:
    driver = TcpDriver()
    with pytest.raises(ConfigError):
        await driver.connect("tcp://127.0.0.1", limits=Limits())
    with pytest.raises(ConfigError):
        await driver.listen("memory://x", limits=Limits())
    with pytest.raises(ConfigError, match="TLS context"):
        await driver.listen("tls://127.0.0.1:0", limits=Limits())


async def test_frames_are_counted_once_whichever_send_path_takes_them() -> None:
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        header = Event(
            id=1, src="a", dst="b", route=["a"], budget=None, headers={}, channel="c", topic="t"
        )
        fast = 0
        for size in (10, 10, 8000, 10, 8000):  # big ones fall back from try_send to send
            frame = Frame(header, (bytes(size),))
            if a.try_send(frame):
                fast += 1
            else:
                await a.send(frame)
            await b.receive()
        assert fast >= 1
        assert a.statistics().frames_sent == 5
        assert b.statistics().frames_received == 5


def _numbered(i: int, size: int = 3000) -> Frame:
    header = Event(
        id=i, src="a", dst="b", route=["a"], budget=None, headers={}, channel="c", topic="t"
    )
    return Frame(header, (bytes([i % 251]) * size,))


class _ShortWriteSocket(socket.socket):
    """The link's own socket, whose next ``sendmsg`` hands the kernel only 100 bytes, as a
    kernel with a nearly full send buffer does (when that happens cannot be arranged)."""

    short_next = True

    def sendmsg(self, buffers, *args):  # type: ignore[no-untyped-def, override]
        if self.short_next:
            self.short_next = False
            return self.send(b"".join(bytes(b) for b in buffers)[:100])
        return super().sendmsg(buffers, *args)


def _short_writes(link: Link) -> None:
    assert isinstance(link, TcpLink)
    link._sock = _ShortWriteSocket(fileno=link._sock.detach())


class _FailingSocket(_ShortWriteSocket):
    """100 bytes of a frame go out, then the socket fails (a reset under the write)."""

    def sendmsg(self, buffers, *args):  # type: ignore[no-untyped-def]
        if self.short_next:
            return super().sendmsg(buffers, *args)
        raise ConnectionResetError(104, "Connection reset by peer")


async def test_a_frame_cut_by_a_failing_socket_says_so_not_cancellation() -> None:
    """The first reason a link records is the one it keeps: a frame cut short because the
    socket failed must not be recorded as cut by cancellation (review)."""
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, _):
        assert isinstance(a, TcpLink)
        a._sock = _FailingSocket(fileno=a._sock.detach())
        with pytest.raises(LinkBroken, match="send failed") as caught:
            await a.send(_numbered(0, size=100_000))  # too big for try_send: send() writes it
        assert "cancellation" not in str(caught.value)


async def test_try_send_finishes_a_partly_written_frame_before_any_other(
    anyio_backend_name: str,
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("on trio try_send writes only into an empty send queue, never in part")
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        _short_writes(a)
        assert a.try_send(_numbered(0))
        assert isinstance(a, AsyncioTcpLink)
        await checkpoint()  # the loop writes what try_send held this turn
        assert a._tail is not None  # 100 bytes went out; the rest waits for the writer callback
        assert not a.try_send(_numbered(1)), "a frame slipped in behind a partly written one"
        await a.send(_numbered(1))  # waits for the lock the tail holds, then follows it
        for i in (0, 1):
            frame = await b.receive()
            assert frame.header.id == i
            assert bytes(frame.parts[0]) == bytes([i % 251]) * 3000
        assert a._tail is None
        assert not a._send_lock.locked()
        assert a.statistics().frames_sent == 2


async def test_closing_with_a_partly_written_frame_breaks_the_link_for_the_peer(
    anyio_backend_name: str,
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("on trio try_send writes only into an empty send queue, never in part")
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        assert a.try_send(_numbered(0))
        await checkpoint()  # written whole
        _short_writes(a)
        assert a.try_send(_numbered(1))
        await a.aclose()  # writes it in part: the writer callback never gets to finish it
        assert (await b.receive()).header.id == 0
        with pytest.raises(LinkBroken):  # the cut frame is never taken for a whole one
            await b.receive()


async def test_small_frames_of_one_turn_go_out_in_one_write_in_order(
    anyio_backend_name: str,
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("the trio link writes each frame at once")
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        assert isinstance(a, AsyncioTcpLink)
        calls: list[int] = []
        sock = a._sock

        class Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(sock, name)

            def sendmsg(self, buffers: list[Any]) -> int:
                calls.append(len(buffers))
                return sock.sendmsg(buffers)

        a._sock = Counting()  # type: ignore[assignment]
        for i in range(40):
            assert a.try_send(_numbered(i, size=50))
        assert calls == [1]  # the turn's first frame at once; the rest held to the turn's end
        big = _numbered(40, size=8000)  # too big for try_send: send() writes the held ones first
        await a.send(big)
        assert calls == [1, 39 + 2]  # the 39 held (a buffer each), then its head and payload
        for i in range(41):
            assert (await b.receive()).header.id == i
        await checkpoint()  # a new turn
        for i in range(41, 45):
            assert a.try_send(_numbered(i, size=50))
        await checkpoint()
        assert calls[2:] == [1, 3]
        for i in range(41, 45):
            assert (await b.receive()).header.id == i
        assert a.statistics().frames_sent == 45


async def test_a_turn_holds_at_most_512_frames_or_256_kib(
    anyio_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held frames of one turn are written as soon as they reach ``_OUT_FRAMES`` (512;
    ``IOV_MAX`` is 1024) or ``_OUT_MAX`` bytes, not only when the turn ends."""
    if anyio_backend_name != "asyncio":
        pytest.skip("the trio link writes each frame at once")
    from flare_async.transport import _tcp_asyncio  # noqa: PLC0415

    assert (_tcp_asyncio._OUT_FRAMES, _tcp_asyncio._OUT_MAX) == (512, 256 * 1024)
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        assert isinstance(a, AsyncioTcpLink)
        calls: list[int] = []
        sock = a._sock

        class Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(sock, name)

            def sendmsg(self, buffers: list[Any]) -> int:
                calls.append(len(buffers))
                return sock.sendmsg(buffers)

        a._sock = Counting()  # type: ignore[assignment]
        for i in range(600):
            assert a.try_send(_numbered(i, size=10))
        await checkpoint()
        # the first at once, 512 held then written, the next at once, 86 at the turn's end
        assert calls == [1, 512, 1, 86]
        for i in range(600):
            assert (await b.receive()).header.id == i
        calls.clear()
        monkeypatch.setattr(_tcp_asyncio, "_OUT_MAX", 1000)  # bytes bound the turn too
        await checkpoint()
        for i in range(600, 610):
            assert a.try_send(_numbered(i, size=300))
        await checkpoint()
        # frames of ~360 bytes: the first at once, then three held reach 1,000 bytes, twice
        assert calls == [1, 3, 1, 3, 1, 1]
        for i in range(600, 610):
            assert (await b.receive()).header.id == i


async def test_a_frame_held_at_close_goes_before_the_end_and_is_lost_on_an_abort(
    anyio_backend_name: str,
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("the trio link writes each frame at once")
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        assert isinstance(a, AsyncioTcpLink)
        assert a.try_send(_numbered(0, size=10))  # written at once
        assert a.try_send(_numbered(1, size=10))  # held to the end of the turn
        assert a._out
        await a.aclose()  # the held frame (a Bye, say) is written before the FIN
        assert [(await b.receive()).header.id for _ in range(2)] == [0, 1]
        with pytest.raises(LinkClosed):
            await b.receive()
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        assert isinstance(a, AsyncioTcpLink)
        assert a.try_send(_numbered(2, size=10))
        assert a.try_send(_numbered(3, size=10))
        assert a._out
        a.abort()  # a crash: what was not written is gone
        seen: list[int] = []

        async def read_all() -> None:
            while True:
                seen.append((await b.receive()).header.id)

        with pytest.raises(LinkBroken):
            await read_all()
        assert 3 not in seen


async def test_each_link_is_made_as_the_class_of_its_backend_and_scheme(
    anyio_backend_name: str, tls_pki: Any
) -> None:
    """The class chosen when a link is made decides its I/O: the driver's links, and a
    ``TcpLink(sock, ...)`` made of a socket pair (a job's worker channel), are the raw link of
    the running backend; tls:// links are its TLS link."""
    raw = AsyncioTcpLink if anyio_backend_name == "asyncio" else TrioTcpLink
    tls = AsyncioTlsLink if anyio_backend_name == "asyncio" else TlsLink
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        assert type(a) is raw
        assert type(b) is raw
    async with tls_pair(tls_pki)() as (a, b):
        assert type(a) is tls
        assert type(b) is tls
    left, right = socket.socketpair()
    left.setblocking(False)
    link = TcpLink(left, Limits(), local_address="pipe:a", peer_address="pipe:b")
    try:
        assert type(link) is raw
        right.sendall(bytes(Connection().send(_numbered(7).header, [b"x"])[0]) + b"x")
        with anyio.fail_after(5):
            frame = await link.receive()
        assert frame.header.id == 7
    finally:
        await link.aclose()
        right.close()
