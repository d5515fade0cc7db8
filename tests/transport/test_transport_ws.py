"""The WebSocket driver: the conformance suite over ws:// and wss://, plus what is specific to it.

aiohttp runs on asyncio only, so every test here does too: on plain asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flare_async.errors import (
    ConfigError,
    ConnectError,
    FrameTooLarge,
    LinkBroken,
    LinkClosed,
    ProtocolError,
)
from flare_async.testing import (
    CONFORMANCE_CHECKS,
    LinkPairFactory,
    check_large_frames,
    check_ordering,
    driver_pair,
    run_check,
)
from flare_async.transport import DriverRegistry, Link, WebSocketDriver
from flare_async.transport._ws_link import WebSocketLink
from flare_async.wire import MAGIC, PREFIX, WIRE_VERSION, Event, Frame, Limits, encode_head

pytestmark = pytest.mark.anyio

URL = "ws://127.0.0.1:0/flare"


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        # The runtime runs on uvloop where it can; its socket wrappers differ from asyncio's.
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param


def pair_factory(
    driver: WebSocketDriver,
    url: str = URL,
    *,
    limits: Limits | None = None,
    connector: WebSocketDriver | None = None,
    server_first: bool = False,
) -> LinkPairFactory:
    """Connected ``(a, b)`` pairs; ``a`` is the connecting end unless ``server_first``."""
    return driver_pair(driver, url, limits=limits, connector=connector, server_first=server_first)


@asynccontextmanager
async def listening(driver: WebSocketDriver, url: str = URL, limits: Limits | None = None):
    listener = await driver.listen(url, limits=limits or Limits())
    try:
        yield listener
    finally:
        await listener.aclose()


async def closed(*links: Link) -> None:
    for link in links:
        await link.aclose()
    for link in links:
        assert isinstance(link, WebSocketLink)
        await link.wait_closed()


async def abort(link: Link) -> None:
    assert isinstance(link, WebSocketLink)
    link.abort()


def _frame(seq: int, payload: bytes = b"") -> Frame:
    header = Event(
        id=seq, src="a", dst="b", route=["a"], budget=None, headers={}, channel="c", topic="t"
    )
    return Frame(header, (payload,) if payload else ())


def _seq(frame: Frame) -> int:
    assert isinstance(frame.header, Event)
    return frame.header.id


def _body(frame: Frame) -> bytes:
    return b"".join(bytes(p) for p in frame.parts)


# ---------------------------------------------------------------------- conformance (ws://)
@pytest.mark.parametrize("server_first", [False, True], ids=["client-first", "server-first"])
@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check, server_first: bool) -> None:
    await run_check(check, pair_factory(WebSocketDriver(), server_first=server_first), abort)


async def test_concurrent_senders_never_interleave() -> None:
    senders, count = 4, 40
    async with pair_factory(WebSocketDriver())() as (a, b):

        async def send_all(k: int) -> None:
            for i in range(count):
                size = 100_000 if i % 3 == 0 else i  # large ones make senders wait on the socket
                await a.send(_frame(k * 1000 + i, bytes([k]) * size))

        seen = dict.fromkeys(range(senders), 0)
        async with anyio.create_task_group() as tg:
            for k in range(senders):
                tg.start_soon(send_all, k)
            for _ in range(senders * count):
                frame = await b.receive()
                k, i = divmod(_seq(frame), 1000)
                assert i == seen[k], f"sender {k}: frame {i} arrived where {seen[k]} was due"
                size = 100_000 if i % 3 == 0 else i
                assert _body(frame) == bytes([k]) * size
                seen[k] += 1


@pytest.mark.parametrize("server_first", [False, True], ids=["client-first", "server-first"])
async def test_a_send_cancelled_on_backpressure_leaves_later_sends_working(
    server_first: bool,
) -> None:
    """aiohttp's drain future is shared; a cancelled send must not cancel it for the next."""
    big = 256 * 1024
    async with pair_factory(WebSocketDriver(), server_first=server_first)() as (a, b):
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await a.send(_frame(sent, bytes(big)))
                sent += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        expected = 0
        async with anyio.create_task_group() as tg:
            # Large again, so it has to wait for the transport to drain too.
            tg.start_soon(a.send, _frame(1_000_000, bytes(big)))
            while _seq(frame := await b.receive()) != 1_000_000:
                assert _seq(frame) == expected
                expected += 1
        assert expected == sent + 1  # the cancelled frame was delivered, whole
        await a.send(_frame(2_000_000, bytes(big)))
        assert _seq(await b.receive()) == 2_000_000


async def test_addresses_and_extra_without_tls() -> None:
    async with pair_factory(WebSocketDriver())() as (client, server):
        assert client.extra().peer_certificate is None
        assert server.extra().peer_certificate is None
        assert client.local_address.startswith("ws://127.0.0.1:")
        assert server.peer_address == client.local_address
        assert server.extra().peer_address == server.peer_address
        assert server.extra().socket_peer == client.local_address.removeprefix("ws://")
        assert client.peer_address == server.local_address
        assert client.extra().socket_peer == server.local_address.split("/")[2]


# ---------------------------------------------------------------------- wss:// with mutual TLS
@dataclass
class Pki:
    ca_pem: str
    server_chain: tuple[Path, Path]
    client_chain: tuple[Path, Path]
    rogue_chain: tuple[Path, Path]
    """A client certificate issued by another CA."""
    server_der: bytes
    client_der: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    is_ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if not is_ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_chain(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(directory: Path) -> Pki:
    """A test CA, a server and a client certificate from it, and a rogue one from another."""
    ca_key, rogue_ca_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("test root", ca_key, None, ca_key)
    rogue_ca = _certificate("rogue root", rogue_ca_key, None, rogue_ca_key)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    server = _certificate("server", keys[0], ca, ca_key, server=True)
    client = _certificate("server.site-1", keys[1], ca, ca_key)
    rogue = _certificate("server.site-1", keys[2], rogue_ca, rogue_ca_key)
    return Pki(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM).decode(),
        server_chain=_write_chain(directory, "server", server, keys[0]),
        client_chain=_write_chain(directory, "client", client, keys[1]),
        rogue_chain=_write_chain(directory, "rogue", rogue, keys[2]),
        server_der=server.public_bytes(serialization.Encoding.DER),
        client_der=client.public_bytes(serialization.Encoding.DER),
    )


def server_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=pki.ca_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(*pki.server_chain)
    return ctx


def client_context(pki: Pki, chain: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pki.ca_pem)
    ctx.load_cert_chain(*(chain or pki.client_chain))
    return ctx


def tls_driver(pki: Pki, **kwargs) -> WebSocketDriver:
    return WebSocketDriver(server_ssl=server_context(pki), client_ssl=client_context(pki), **kwargs)


WSS_URL = "wss://127.0.0.1:0/flare"


@pytest.mark.parametrize("check", [check_ordering, check_large_frames], ids=lambda c: c.__name__)
async def test_wss_conformance(check, pki: Pki) -> None:
    await check(pair_factory(tls_driver(pki), WSS_URL))


async def test_wss_peer_certificates(pki: Pki) -> None:
    async with pair_factory(tls_driver(pki), WSS_URL)() as (client, server):
        assert client.extra().peer_certificate == pki.server_der
        assert server.extra().peer_certificate == pki.client_der
        assert client.peer_address.startswith("wss://127.0.0.1:")
        await client.send(_frame(1, b"over tls"))
        assert _body(await server.receive()) == b"over tls"


async def test_wss_refuses_a_client_certificate_from_another_ca(pki: Pki) -> None:
    server_driver = WebSocketDriver(server_ssl=server_context(pki))
    rogue = WebSocketDriver(client_ssl=client_context(pki, pki.rogue_chain))
    good = WebSocketDriver(client_ssl=client_context(pki))
    async with listening(server_driver, WSS_URL) as listener:
        with pytest.raises(ConnectError):
            await rogue.connect(listener.url, limits=Limits())
        client = await good.connect(listener.url, limits=Limits())
        server = await listener.accept()
        assert server.extra().peer_certificate == pki.client_der
        await client.send(_frame(7, b"still serving"))
        frame = await server.receive()
        assert _seq(frame) == 7
        await closed(client, server)


async def test_wss_needs_its_contexts(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="server_ssl"):
        await WebSocketDriver(client_ssl=client_context(pki)).listen(WSS_URL, limits=Limits())
    with pytest.raises(ConfigError, match="client_ssl"):
        await WebSocketDriver(server_ssl=server_context(pki)).connect(
            "wss://127.0.0.1:1/flare", limits=Limits()
        )


@asynccontextmanager
async def connect_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A minimal HTTP proxy that only tunnels (``CONNECT``), as corporate proxies do for TLS."""
    requests: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode()
        requests.append(line)
        method, target, _ = line.split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.close()
        await asyncio.gather(*tasks)


async def test_wss_through_a_connect_proxy(pki: Pki) -> None:
    async with connect_proxy() as (proxy, requests):
        connector = WebSocketDriver(client_ssl=client_context(pki), proxy=proxy)
        make_pair = pair_factory(tls_driver(pki), WSS_URL, connector=connector)
        async with make_pair() as (client, server):
            await client.send(_frame(1, b"through the proxy"))
            assert _body(await server.receive()) == b"through the proxy"
            await server.send(_frame(2, b"and back"))
            assert _body(await client.receive()) == b"and back"
            assert client.extra().peer_certificate == pki.server_der
            assert client.extra().socket_peer == proxy.split("//")[1]
            port = server.local_address.split(":")[2].split("/")[0]
            assert requests == [f"CONNECT 127.0.0.1:{port} HTTP/1.1"]


# ---------------------------------------------------------------------- connecting and listening
async def test_connect_to_a_closed_port_is_refused() -> None:
    driver = WebSocketDriver()
    async with listening(driver) as listener:
        url = listener.url
    with pytest.raises(ConnectError, match="cannot connect"):
        await driver.connect(url, limits=Limits())


async def test_plain_http_is_not_upgraded() -> None:
    async with listening(WebSocketDriver()) as listener:
        http = listener.url.replace("ws://", "http://")
        async with aiohttp.ClientSession() as session:
            async with session.get(http) as response:
                assert response.status == 426
                assert response.headers["Upgrade"] == "websocket"
            async with session.get(http.replace("/flare", "/other")) as response:
                assert response.status == 404
        with pytest.raises(ConnectError, match="HTTP 404"):
            await WebSocketDriver().connect(
                listener.url.replace("/flare", "/other"), limits=Limits()
            )


async def test_port_zero_and_default_path() -> None:
    driver = WebSocketDriver(path="/fabric")
    async with listening(driver, "ws://127.0.0.1:0") as listener:
        assert listener.url.startswith("ws://127.0.0.1:")
        assert listener.url.endswith("/fabric")
        assert ":0/" not in listener.url
        port = listener.url.split(":")[2].split("/")[0]
        # A URL without a path reaches the driver's default path too.
        client = await driver.connect(f"ws://127.0.0.1:{port}", limits=Limits())
        server = await listener.accept()
        await closed(client, server)


async def test_listening_on_a_used_port_fails() -> None:
    driver = WebSocketDriver()
    async with listening(driver) as listener:
        with pytest.raises(ConnectError, match="cannot listen"):
            await driver.listen(listener.url, limits=Limits())


async def test_closed_listener_keeps_accepted_links() -> None:
    driver = WebSocketDriver()
    listener = await driver.listen(URL, limits=Limits())
    client = await driver.connect(listener.url, limits=Limits())
    server = await listener.accept()
    await listener.aclose()
    await listener.aclose()  # idempotent
    with pytest.raises(LinkClosed):
        await listener.accept()
    with pytest.raises(ConnectError):
        await driver.connect(listener.url, limits=Limits())
    await client.send(_frame(1, b"ping"))
    assert _body(await server.receive()) == b"ping"
    await server.send(_frame(2, b"pong"))
    assert _body(await client.receive()) == b"pong"
    await closed(client, server)


async def test_full_backlog_refuses_and_unaccepted_links_break_on_close() -> None:
    driver = WebSocketDriver(max_queue=1)
    listener = await driver.listen(URL, limits=Limits())
    waiting = await driver.connect(listener.url, limits=Limits())
    with pytest.raises(ConnectError, match="HTTP 503"):
        await driver.connect(listener.url, limits=Limits())
    await listener.aclose()
    with pytest.raises(LinkBroken, match="1013"):
        await waiting.receive()
    await closed(waiting)


async def test_missed_heartbeat_breaks_the_link() -> None:
    driver = WebSocketDriver(heartbeat=0.05)
    async with (
        listening(driver) as listener,
        aiohttp.ClientSession() as session,
        # A peer that never reads never answers pings.
        session.ws_connect(listener.url, autoping=False),
    ):
        link = await listener.accept()
        with pytest.raises(LinkBroken, match="PONG"):
            await link.receive()
        await closed(link)


async def test_closing_handshake_is_bounded_when_the_peer_stops_reading() -> None:
    driver = WebSocketDriver(close_timeout=0.2)
    async with (
        listening(driver) as listener,
        aiohttp.ClientSession() as session,
        session.ws_connect(listener.url) as raw,  # never reads
    ):
        link = await listener.accept()
        assert isinstance(link, WebSocketLink)

        async def flood() -> None:
            while True:
                await link.send(_frame(1, bytes(256 * 1024)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await anyio.wait_all_tasks_blocked()  # our close frame could not be written now
            tg.cancel_scope.cancel()
        await link.aclose()
        with anyio.fail_after(5):
            await link.wait_closed()  # the connection was cut after close_timeout
        with pytest.raises(LinkClosed):
            await link.receive()
        while (await raw.receive()).type is aiohttp.WSMsgType.BINARY:
            pass  # what was written before the cut arrives; then the connection ends


async def test_abort_breaks_both_ends() -> None:
    async with pair_factory(WebSocketDriver(), server_first=True)() as (server, client):
        assert isinstance(server, WebSocketLink)
        server.abort()
        with pytest.raises(LinkBroken):
            await client.receive()
        with pytest.raises(LinkBroken):
            await server.receive()
        with pytest.raises(LinkBroken):
            await server.send(_frame(1))
        with anyio.fail_after(5):
            await server.wait_closed()


def test_trio_is_refused() -> None:
    async def main() -> None:
        driver = WebSocketDriver()
        with pytest.raises(ConfigError, match="ws:// needs the asyncio backend"):
            await driver.listen(URL, limits=Limits())
        with pytest.raises(ConfigError, match="ws:// needs the asyncio backend"):
            await driver.connect("ws://127.0.0.1:1/flare", limits=Limits())

    anyio.run(main, backend="trio")


async def test_bad_urls_and_settings() -> None:
    driver = WebSocketDriver()
    for url in ("tcp://127.0.0.1:1", "ws:///flare", "ws://127.0.0.1:99999/flare"):
        with pytest.raises(ConfigError):
            await driver.connect(url, limits=Limits())
        with pytest.raises(ConfigError):
            await driver.listen(url, limits=Limits())
    for settings in ({"max_queue": 0}, {"path": "flare"}, {"heartbeat": 0}, {"close_timeout": 0}):
        with pytest.raises(ConfigError):
            WebSocketDriver(**settings)
    registry = DriverRegistry([driver])
    assert registry.for_url("ws://example.org/flare") is driver
    assert registry.for_url("wss://example.org/flare") is driver


# ---------------------------------------------------------------------- a peer breaking the rules
SMALL = Limits(max_header=256, max_frame=1024)


def _head(payload_len: int) -> bytes:
    return encode_head(_frame(1).header, payload_len, Limits())


@pytest.mark.parametrize(
    ("message", "error", "code"),
    [
        pytest.param(
            PREFIX.pack(MAGIC, WIRE_VERSION, 0, 10, 2**40) + bytes(10),
            FrameTooLarge,
            1009,
            id="oversize-announced",
        ),
        pytest.param(bytes(2000), FrameTooLarge, 1009, id="message-over-max-msg-size"),
        pytest.param("hello", ProtocolError, 1003, id="text-message"),
        pytest.param(b"\xfa\x5c", ProtocolError, 1002, id="shorter-than-prefix"),
        pytest.param(b"\x00" * 16 + b"x", ProtocolError, 1002, id="bad-magic"),
        pytest.param(
            PREFIX.pack(MAGIC, WIRE_VERSION, 0, 3, 0) + b"\xc1\xc1\xc1",
            ProtocolError,
            1002,
            id="malformed-header",
        ),
        pytest.param(_head(10) + bytes(5), ProtocolError, 1002, id="payload-cut-short"),
        pytest.param(_head(10) + bytes(15), ProtocolError, 1002, id="payload-too-long"),
    ],
)
async def test_bad_messages_are_protocol_errors(message, error, code) -> None:
    async with (
        listening(WebSocketDriver(), limits=SMALL) as listener,
        aiohttp.ClientSession() as session,
        session.ws_connect(listener.url) as raw,
    ):
        link = await listener.accept()
        if isinstance(message, str):
            await raw.send_str(message)
        else:
            await raw.send_bytes(message)
        answers: list[aiohttp.WSMessage] = []

        async def read_close() -> None:
            answers.append(await raw.receive())  # answers the close frame (autoclose)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_close)
            with pytest.raises(error) as info:
                await link.receive()
        assert info.value.peer == link.peer_address
        assert answers[0].type is aiohttp.WSMsgType.CLOSE
        assert answers[0].data == code
        with pytest.raises(LinkClosed):
            await link.receive()
        with pytest.raises(LinkClosed):
            await link.send(_frame(2))
        await closed(link)


async def test_good_raw_message_is_a_frame() -> None:
    """The wire format is exactly prefix + header + payload in one binary message."""
    async with (
        listening(WebSocketDriver()) as listener,
        aiohttp.ClientSession() as session,
        session.ws_connect(listener.url) as raw,
    ):
        link = await listener.accept()
        await raw.send_bytes(_head(4) + b"abcd")
        frame = await link.receive()
        assert _seq(frame) == 1
        assert frame.parts[0] == b"abcd"
        assert isinstance(frame.parts[0], memoryview)
        assert frame.parts[0].readonly
        await link.send(_frame(5, b"xyz"))
        sent = await raw.receive_bytes()
        assert sent == encode_head(_frame(5).header, 3, Limits()) + b"xyz"
        assert struct.unpack_from(">I", sent, 4)[0] == len(sent) - 16 - 3
        await link.aclose()
        await raw.close()  # answers our close frame, so the handshake ends at once
        await closed(link)
