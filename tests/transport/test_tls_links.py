"""tls:// links as they read and write: frames pushed many to a read, frames larger than a TLS
record, the hostile ends (not TLS at all, a record cut off, a client that never finishes its
handshake), the peer certificate, and no splicing.

The hostile cases run on every backend (``TlsLink`` on trio); the ones about reading and
writing look at the asyncio link (``AsyncioTlsLink``) itself.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from flare_async.errors import LinkBroken, LinkClosed, ProtocolError
from flare_async.transport import PushDelivery, Splicing, TcpDriver, TcpLink
from flare_async.transport._tls import TlsLink
from flare_async.transport._tls_asyncio import _SEAL, AsyncioTlsLink, _plaintext
from flare_async.wire import Connection, Event, Frame, Limits
from tests.transport.test_transport_tcp import tls_pair
from tests.transport.test_transport_ws import Pki, client_context, make_pki, server_context

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _frame(i: int, size: int = 16) -> Frame:
    header = Event(
        id=i, src="a", dst="b", route=["a"], budget=None, headers={}, channel="c", topic="t"
    )
    return Frame(header, (bytes([i % 251]) * size,))


def _asyncio_only(backend: str) -> None:
    if backend != "asyncio":
        pytest.skip("about the asyncio link's reads and writes (trio keeps anyio's TLSStream)")


@asynccontextmanager
async def _server_and_raw_client(pki: Pki) -> AsyncIterator[tuple[TcpLink, socket.socket]]:
    """An accepted tls:// link (its handshake still owed) and the raw socket that dialled it."""
    driver = TcpDriver(server_tls=server_context(pki), client_tls=client_context(pki))
    listener = await driver.listen("tls://127.0.0.1:0", limits=Limits())
    host, port = listener.url.split("://", 1)[1].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    try:
        link = await listener.accept()
        assert isinstance(link, TcpLink)
        try:
            yield link, raw
        finally:
            await link.aclose()
    finally:
        raw.close()
        await listener.aclose()


# ---------------------------------------------------------------- reading and writing
async def test_many_small_frames_are_pushed_from_few_reads(
    anyio_backend_name: str, pki: Pki
) -> None:
    """Frames written back to back arrive in a few large reads, each read decrypting every
    record it holds, and are pushed to the callback in order, none through receive()."""
    _asyncio_only(anyio_backend_name)
    count = 300
    async with tls_pair(pki)() as (a, b):
        assert isinstance(b, AsyncioTlsLink)
        reads = 0
        read_socket = b._read_socket

        def counting() -> bool:
            nonlocal reads
            reads += 1
            return read_socket()

        b._read_socket = counting  # type: ignore[method-assign]
        pushed: list[int] = []
        done = anyio.Event()

        def on_frame(frame: Frame) -> bool:
            pushed.append(frame.header.id)
            if len(pushed) == count:
                done.set()
            return True

        assert b.deliver_to(on_frame)

        async def receive() -> None:
            with pytest.raises(LinkClosed):
                await b.receive()  # wakes only at the end: every frame went to on_frame

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            with anyio.fail_after(10):
                while b._rx_wakeup is None:  # until b's receiver waits: then frames are pushed
                    await checkpoint()
            for i in range(count):  # no checkpoint in between: they pile up in the socket
                if not a.try_send(_frame(i)):
                    await a.send(_frame(i))
            with anyio.fail_after(10):
                await done.wait()
            await a.aclose()
        assert pushed == list(range(count))
        assert reads < count // 10, f"{reads} reads for {count} frames"
        assert b.statistics().frames_received == count


class _CountingSocket(socket.socket):
    """The link's own socket, counting its ``send`` calls."""

    sends = 0

    def send(self, data, *args):  # type: ignore[no-untyped-def, override]
        self.sends += 1
        return super().send(data, *args)


async def test_small_frames_of_one_turn_are_sealed_and_sent_together(
    anyio_backend_name: str, pki: Pki
) -> None:
    """try_send holds small frames for the rest of the loop turn, as the raw link does; they
    leave sealed together in one send, before a large frame sent after them, and a frame held
    at an orderly close goes before the FIN."""
    _asyncio_only(anyio_backend_name)
    async with tls_pair(pki)() as (a, b):
        assert isinstance(a, AsyncioTlsLink)
        counting = _CountingSocket(fileno=a._sock.detach())
        a._sock = counting
        for i in range(40):
            assert a.try_send(_frame(i))
        await a.send(_frame(40, 300_000))  # takes the held frames first
        assert counting.sends <= 3, counting.sends
        for i in range(41):
            with anyio.fail_after(10):
                assert (await b.receive()).header.id == i
        assert a.try_send(_frame(41))
        await a.aclose()
        assert (await b.receive()).header.id == 41
        with pytest.raises(LinkClosed):
            await b.receive()


@pytest.mark.parametrize("size", [17 * 1024, _SEAL + 1, 3 * _SEAL + 12345, 5 << 20])
async def test_a_frame_larger_than_a_record_arrives_whole(
    anyio_backend_name: str, pki: Pki, size: int
) -> None:
    """A payload over many TLS records (and over several sealed slices) in several parts."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    cut = size // 3
    parts = (data[:cut], memoryview(data)[cut : 2 * cut], bytearray(data[2 * cut :]))
    async with tls_pair(pki)() as (a, b):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, Frame(_frame(1).header, parts))
            with anyio.fail_after(20):
                frame = await b.receive()
        assert b"".join(bytes(p) for p in frame.parts) == data
        await b.send(_frame(2))  # and the link goes on, both ways
        assert (await a.receive()).header.id == 2


def test_a_frame_is_sealed_in_slices_of_its_own_memory() -> None:
    """A small frame is one piece (one record); a large one is cut at _SEAL without copying
    its large parts; nothing is lost or reordered."""
    head, small = b"h" * 100, b"s" * 64
    assert [bytes(p) for p in _plaintext([head, small])] == [head + small]
    big = bytes(range(256)) * ((3 * _SEAL) // 256 + 7)
    segments: list[Any] = [head, memoryview(big), b"", small, bytearray(b"t" * 10)]
    pieces = list(_plaintext(segments))
    assert b"".join(bytes(p) for p in pieces) == b"".join(bytes(s) for s in segments)
    assert all(0 < len(p) <= _SEAL for p in pieces)
    assert sum(isinstance(p, memoryview) for p in pieces) >= 2  # slices of `big`, not copies


async def test_a_frame_that_comes_with_the_last_handshake_flight_is_read(pki: Pki) -> None:
    """The client's first frame right behind its Finished, both in one read of the server's
    handshake: the server reads it then, as nothing else will come before it answers."""
    driver = TcpDriver(server_tls=server_context(pki), client_tls=client_context(pki))
    listener = await driver.listen("tls://127.0.0.1:0", limits=Limits())
    try:
        async with anyio.create_task_group() as tg:
            got: list[Frame] = []

            async def serve() -> None:
                link = await listener.accept()
                try:
                    got.append(await link.receive())  # runs the handshake, then reads
                    await link.send(_frame(2))
                    await link.receive()
                except LinkClosed:
                    pass
                finally:
                    await link.aclose()

            tg.start_soon(serve)
            client = await driver.connect(listener.url, limits=Limits())
            try:
                if not client.try_send(_frame(1)):  # no checkpoint since the handshake
                    await client.send(_frame(1))
                with anyio.fail_after(10):
                    assert (await client.receive()).header.id == 2
            finally:
                await client.aclose()
        assert [f.header.id for f in got] == [1]
    finally:
        await listener.aclose()


# ---------------------------------------------------------------- hostile ends
async def test_garbage_instead_of_a_handshake_is_a_protocol_error(pki: Pki) -> None:
    async with _server_and_raw_client(pki) as (server, raw):
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        with anyio.fail_after(10), pytest.raises(ProtocolError, match="TLS handshake failed"):
            await server.receive()
        with pytest.raises(LinkBroken):  # never read again, in clear or otherwise
            await server.receive()
        with pytest.raises(LinkBroken):
            await server.send(_frame(1))


async def test_a_handshake_cut_by_cancellation_breaks_the_link(pki: Pki) -> None:
    """A client that connects and says nothing: the receive that runs the handshake is
    cancelled (the cell's handshake timeout); the link never carries frames afterwards."""
    async with _server_and_raw_client(pki) as (server, raw):
        with anyio.move_on_after(0.2):
            await server.receive()
        with pytest.raises(LinkBroken):
            await server.receive()
        assert not server.try_send(_frame(1))
        with pytest.raises(LinkBroken):
            await server.send(_frame(1))
        raw.setblocking(False)
        with pytest.raises(BlockingIOError):  # the refused frame was not written in clear
            raw.recv(100)
        await server.aclose()
        raw.setblocking(True)
        raw.settimeout(5)
        assert raw.recv(100) == b"", "the client reads the end (a FIN, then the reset)"


def _seal(link: AsyncioTlsLink, frame: Frame) -> bytes:
    """The records ``link`` would write for ``frame``."""
    for seg in Connection().send(frame.header, frame.parts):
        link._tls.write(seg)
    return link._outgoing.read()


@pytest.mark.parametrize("at", ["frame boundary", "middle of a frame"])
async def test_a_peer_that_closes_in_the_middle_of_a_record_breaks_the_link(
    anyio_backend_name: str, pki: Pki, at: str
) -> None:
    """Cut inside a record, the end of the stream is a break even where the record began a
    new frame (OpenSSL reports it like a clean end: the link follows the record boundaries)."""
    _asyncio_only(anyio_backend_name)
    async with tls_pair(pki)() as (a, b):
        assert isinstance(a, AsyncioTlsLink)
        await a.send(_frame(0))
        records = _seal(a, _frame(1, 3000))
        # A record header alone (no byte of the frame decrypted), or some of the record.
        a._sock.sendall(records[:5] if at == "frame boundary" else records[:100])
        a._sock.shutdown(socket.SHUT_WR)  # a FIN, not a reset
        assert (await b.receive()).header.id == 0
        with anyio.fail_after(10), pytest.raises(LinkBroken, match="middle of a TLS record"):
            await b.receive()


async def test_a_record_changed_on_the_way_breaks_the_link(
    anyio_backend_name: str, pki: Pki
) -> None:
    """A verified peer (or a middlebox) whose record fails its authentication tag: the link
    breaks by name; nothing of the record is taken for a frame."""
    _asyncio_only(anyio_backend_name)
    async with tls_pair(pki)() as (a, b):
        assert isinstance(a, AsyncioTlsLink)
        await a.send(_frame(0))
        records = bytearray(_seal(a, _frame(1, 3000)))
        records[40] ^= 0x01  # a ciphertext byte of the record
        a._sock.sendall(records)
        assert (await b.receive()).header.id == 0
        with anyio.fail_after(10), pytest.raises(LinkBroken):
            await b.receive()


async def test_a_record_header_split_across_reads_is_followed(
    anyio_backend_name: str, pki: Pki
) -> None:
    """The link follows the record boundaries itself: a 5-byte record header that arrives in
    two reads, then its body, gives the frame whole."""
    _asyncio_only(anyio_backend_name)
    async with tls_pair(pki)() as (a, b):
        assert isinstance(a, AsyncioTlsLink)
        await a.send(_frame(0))
        assert (await b.receive()).header.id == 0
        records = _seal(a, _frame(1, 3000))
        a._sock.sendall(records[:3])  # part of the header
        for _ in range(20):  # b reads what came (whatever the loop turns take)
            await checkpoint()
        a._sock.sendall(records[3:])
        with anyio.fail_after(10):
            frame = await b.receive()
        assert frame.header.id == 1
        assert bytes(frame.parts[0]) == bytes(_frame(1, 3000).parts[0])


async def test_a_peer_that_closes_between_records_closes_the_link(
    anyio_backend_name: str, pki: Pki
) -> None:
    async with tls_pair(pki)() as (a, b):
        await a.send(_frame(0))
        await a.aclose()
        assert (await b.receive()).header.id == 0
        with anyio.fail_after(10), pytest.raises(LinkClosed):
            await b.receive()


# ---------------------------------------------------------------- facts and capabilities
async def test_each_end_knows_the_peer_certificate(pki: Pki) -> None:
    async with tls_pair(pki)() as (a, b):
        assert a.extra().peer_certificate == pki.server_der
        assert b.extra().peer_certificate == pki.client_der
        stats = a.statistics()
        await a.send(_frame(1))
        await b.receive()
        assert a.statistics().frames_sent == stats.frames_sent + 1


async def test_a_tls_link_pushes_but_never_splices(anyio_backend_name: str, pki: Pki) -> None:
    async with tls_pair(pki)() as (a, _):
        if anyio_backend_name == "asyncio":
            assert type(a) is AsyncioTlsLink
            assert isinstance(a, PushDelivery)
            assert isinstance(a, Splicing)  # the raw link's methods, all refusing
            assert not a.splices
            assert not a.pass_through(lambda header, size: True)
        else:
            assert type(a) is TlsLink
            assert not isinstance(a, PushDelivery | Splicing)
