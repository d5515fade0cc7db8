"""ws:// and wss:// connections that have not said hello (issue 18, defects 5-7): one deadline
from the TCP accept to the hello (TLS handshake and HTTP upgrade included), the caps per listener
and per source, a hello-sized first message, and no unmasked client frame."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import aiohttp
import anyio
import pytest
from anyio.streams.tls import TLSStream

from flare_async import Cell
from flare_async.errors import FrameTooLarge, LinkBroken, ProtocolError
from flare_async.transport import Admission, Link, WebSocketDriver
from flare_async.wire import Frame, Limits, encode_head, make_hello
from tests.cell.test_cell_prehello import ended, hostport
from tests.transport.test_transport_ws import client_context, make_pki, server_context

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

UPGRADE = (
    b"GET /flare HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _ws_cell(**kwargs: Any) -> Cell:
    return Cell(
        "server",
        listen=["ws://127.0.0.1:0/flare"],
        drivers=[WebSocketDriver()],
        heartbeat=None,
        **kwargs,
    )


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /flare HTTP/1.1\r\nHost: x\r\nUpgrade: webso", UPGRADE],
    ids=["nothing", "half-headers", "upgraded-no-hello"],
)
async def test_ws_connection_stalled_before_its_hello_is_closed_at_the_deadline(
    sent: bytes,
) -> None:
    async with _ws_cell(handshake_timeout=0.5) as cell:
        start = anyio.current_time()
        stream = await anyio.connect_tcp(*hostport(cell.listen_urls[0]))
        if sent:
            await stream.send(sent)
        with anyio.fail_after(10):
            assert await ended(stream)
        assert anyio.current_time() - start < 5
        assert sum(cell.admission.refused.values()) == 1
        await stream.aclose()


@pytest.mark.parametrize(
    ("caps", "reason"),
    [
        ({"max_pending": 100, "max_pending_per_source": 2}, "per-source cap"),
        ({"max_pending": 2, "max_pending_per_source": 100}, "per-listener cap"),
    ],
    ids=["per-source", "per-listener"],
)
async def test_ws_connections_beyond_the_cap_are_closed_at_once(
    caps: dict[str, int], reason: str
) -> None:
    admission = Admission(timeout=30, **caps)
    async with _ws_cell(handshake_timeout=30, admission=admission) as cell:
        start = anyio.current_time()
        streams = [await anyio.connect_tcp(*hostport(cell.listen_urls[0])) for _ in range(4)]
        with anyio.fail_after(10):
            for extra in streams[2:]:
                assert await ended(extra)
        assert anyio.current_time() - start < 30  # refused, not timed out
        assert admission.refused[reason] == 2
        for stream in streams:
            await stream.aclose()
        # The two let in leave the count as they go: a real child gets in.
        with anyio.fail_after(60):
            async with Cell(
                "server.a", parent=cell.listen_urls[0], drivers=[WebSocketDriver()]
            ) as child:
                await child.wait_parent()


async def test_ws_first_message_bigger_than_a_hello_is_refused_with_1009() -> None:
    async with (
        _ws_cell(handshake_timeout=30) as cell,
        aiohttp.ClientSession() as session,
        session.ws_connect(cell.listen_urls[0], max_msg_size=0) as raw,
    ):
        head = encode_head(make_hello("server.x", "child", Limits()), 1 << 20, Limits())
        await raw.send_bytes(head + bytes(1 << 20))
        with anyio.fail_after(10):
            msg = await raw.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1009
        assert cell.admission.refused[FrameTooLarge.__name__] == 1


def _masked(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    assert len(payload) < 126
    key = os.urandom(4) if mask else b""
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
    return bytes([(0x80 if fin else 0) | opcode, (0x80 if mask else 0) | len(payload)]) + key + body


async def _upgraded(url: str) -> Any:
    stream = await anyio.connect_tcp(*hostport(url))
    await stream.send(UPGRADE)
    answer = b""
    with anyio.fail_after(10):
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive()
    assert answer.startswith(b"HTTP/1.1 101")
    return stream, answer.split(b"\r\n\r\n", 1)[1]


async def _close_code(stream: Any, data: bytes) -> int | None:
    """The code of the server's close frame (``None``: the connection ended without one)."""
    with anyio.fail_after(10):
        while len(data) < 4:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                return None
    assert data[0] == 0x88
    return int.from_bytes(data[2:4])


async def test_ws_fragmented_first_message_bigger_than_a_hello_is_refused_with_1009() -> None:
    async with _ws_cell(handshake_timeout=30) as cell:
        stream, rest = await _upgraded(cell.listen_urls[0])
        # 165 fragments of 100 B, split over reads at odd places: 16,500 B > a hello (and
        # nothing after the last one, which a close would answer with a reset)
        data = _masked(0x2, bytes(100), fin=False) + b"".join(
            _masked(0x0, bytes(100), fin=False) for _ in range(164)
        )
        for i in range(0, len(data), 777):
            with contextlib.suppress(anyio.BrokenResourceError, ConnectionError):
                await stream.send(data[i : i + 777])
        assert await _close_code(stream, rest) == 1009
        await stream.aclose()


@pytest.mark.parametrize("said_hello", [False, True], ids=["before-hello", "after-hello"])
async def test_ws_unmasked_client_frame_is_refused_with_1002(said_hello: bool) -> None:
    driver = WebSocketDriver()
    listener = await driver.listen("ws://127.0.0.1:0/flare", limits=Limits())
    assert listener.guard(Admission(timeout=30))
    try:
        stream, rest = await _upgraded(listener.url)
        accepted = await listener.accept()
        if said_hello:
            accepted.hello_done()
        # a masked ping passes, the unmasked frame after it (split over two reads) does not
        await stream.send(_masked(0x9, b"hi") + _masked(0x2, b"x" * 10, mask=False)[:1])
        await stream.send(_masked(0x2, b"x" * 10, mask=False)[1:])
        with anyio.fail_after(10), pytest.raises(ProtocolError, match="unmasked"):
            await accepted.receive()
        await accepted.aclose()
        reply = rest
        with anyio.fail_after(10):
            while len(reply) < 2 or reply[0] == 0x8A:  # skip the pong
                if len(reply) >= 2 and reply[0] == 0x8A:
                    reply = reply[2 + reply[1] :]
                    continue
                reply += await stream.receive()
        assert await _close_code(stream, reply) == 1002
        await stream.aclose()
    finally:
        await listener.aclose()


async def test_ws_big_messages_pass_once_hello_is_done() -> None:
    driver = WebSocketDriver()
    listener = await driver.listen("ws://127.0.0.1:0/flare", limits=Limits())
    assert listener.guard(Admission(timeout=30))
    try:
        for said_hello in (False, True):
            client = await driver.connect(listener.url, limits=Limits())
            accepted = await listener.accept()
            if said_hello:
                accepted.hello_done()
            frame = Frame(make_hello("server.x", "child", Limits()), (bytes(1 << 20),))
            async with anyio.create_task_group() as tg:

                async def send(frame: Frame = frame, client: Link = client) -> None:
                    with contextlib.suppress(LinkBroken):
                        await client.send(frame)

                tg.start_soon(send)
                if said_hello:
                    assert (await accepted.receive()).payload_len == 1 << 20
                else:
                    with pytest.raises(FrameTooLarge, match="bigger than a hello"):
                        await accepted.receive()
            await client.aclose()
            await accepted.aclose()
    finally:
        await listener.aclose()


async def test_wss_tls_session_with_unfinished_headers_is_closed_at_the_deadline(
    tmp_path: Any,
) -> None:
    pki = make_pki(tmp_path)
    async with Cell(
        "server",
        listen=["wss://127.0.0.1:0/flare"],
        drivers=[WebSocketDriver(server_ssl=server_context(pki))],
        heartbeat=None,
        handshake_timeout=0.5,
    ) as cell:
        for finish_tls in (False, True):
            start = anyio.current_time()
            raw = await anyio.connect_tcp(*hostport(cell.listen_urls[0]))
            stream: Any = raw
            if finish_tls:
                stream = await TLSStream.wrap(
                    raw,
                    hostname="localhost",
                    ssl_context=client_context(pki),
                    standard_compatible=False,
                )
                await stream.send(b"GET /flare HTTP/1.1\r\nHost: x\r\n")
            with anyio.fail_after(10):
                assert await ended(stream)
            assert anyio.current_time() - start < 5
            await stream.aclose()
