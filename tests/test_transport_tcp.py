"""The tcp:// driver: the conformance suite over real loopback sockets, and its failure modes."""

from __future__ import annotations

import socket

import pytest

from flare_async.errors import ConfigError, ConnectError, LinkBroken, ProtocolError
from flare_async.testing import CONFORMANCE_CHECKS, driver_pair, run_check
from flare_async.transport import Link, TcpDriver, TcpLink
from flare_async.wire import Connection, Event, Frame, Limits

pytestmark = pytest.mark.anyio


async def abort(link: Link) -> None:
    assert isinstance(link, TcpLink)
    link.abort()


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check) -> None:
    await run_check(check, driver_pair(TcpDriver(), "tcp://127.0.0.1:0"), abort)


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
        assert a.statistics()["frames_sent"] == 5
        assert b.statistics()["frames_received"] == 5
