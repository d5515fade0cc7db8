"""A message between two cells on one verified mutual-TLS link goes unsigned: the link already
authenticates its origin and protects its bytes. Anything that crosses a relay, or rides the
audited job channel, is still signed or MAC'd, and an unsigned message that did not come from
its origin itself is refused. Real kits, real certificates, real TLS on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from flare_async import Cell, Context, HandlerTable, Payload
from flare_async.cell import system_handlers
from flare_async.cli._kit import cell_from_kit, kit_drivers, kit_verifier
from flare_async.errors import IntegrityError
from flare_async.security import MessageSigning, SignatureVerifier, Signer, load_kit, provision
from flare_async.testing import FaultyDriver
from flare_async.transport import MemoryNetwork
from flare_async.wire import Frame, Request

pytestmark = pytest.mark.anyio

SERVER, RELAY = "server", "server.r"
DIRECT, BEHIND = "server.a", "server.r.b"
SIG = ("sig.value", "sig.mac")


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ports = []
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    root = tmp_path_factory.mktemp("vouch")
    (root / "project.toml").write_text(
        "\n".join(
            [
                'project = "vouch"',
                'org = "test.invalid"',
                "[server]",
                f'listen = ["tls://127.0.0.1:{ports[0]}"]',
                "[[relays]]",
                f'name = "{RELAY}"',
                f'parent = "tls://127.0.0.1:{ports[0]}"',
                f'listen = ["tls://127.0.0.1:{ports[1]}"]',
                "[[clients]]",
                f'name = "{DIRECT}"',
                f'parent = "tls://127.0.0.1:{ports[0]}"',
                "[[clients]]",
                f'name = "{BEHIND}"',
                f'parent = "tls://127.0.0.1:{ports[1]}"',
            ]
        )
        + "\n"
    )
    provision(root / "project.toml", root / "kits", now=datetime.now(UTC))
    return root / "kits"


def recording_table(seen: list[tuple[str, str, bool]]) -> HandlerTable:
    table = HandlerTable()

    @table.request("t", "echo")
    async def echo(ctx: Context, msg: Payload) -> bytes:
        seen.append((ctx.src, "t", any(k in ctx.headers for k in SIG)))
        return msg.tobytes()

    @table.request("job", "ping")
    async def ping(ctx: Context, msg: Payload) -> bytes:
        seen.append((ctx.src, "job", any(k in ctx.headers for k in SIG)))
        return b"pong"

    return table


@asynccontextmanager
async def tree(
    kits: Path, relay_rewrite: Any = None, *, vouch: bool = True
) -> AsyncIterator[dict[str, Cell]]:
    seen: list[tuple[str, str, bool]] = []
    now = datetime.now(UTC)
    cells: dict[str, Cell] = {}
    async with AsyncExitStack() as stack:
        for name in (SERVER, RELAY, DIRECT, BEHIND):
            kit = load_kit(kits / name, now=now)
            if name == RELAY and relay_rewrite is not None:
                cell = Cell(  # the relay from its kit, with a hostile hand on what it forwards
                    kit.name,
                    listen=list(kit.listen),
                    parent=kit.parent,
                    drivers=[FaultyDriver(d, rewrite=relay_rewrite) for d in kit_drivers(kit)],
                    handlers=[system_handlers()],
                    verify_peer=kit_verifier(kit),
                )
            else:
                cell = cell_from_kit(kit, handlers=[recording_table(seen)], heartbeat=None)
                assert isinstance(cell.signing, MessageSigning)
                cell.signing.link_vouches = vouch
            cell.on_link = None
            await stack.enter_async_context(cell)
            if name != SERVER:
                with anyio.fail_after(20):
                    await cell.wait_parent()
            cells[name] = cell
        cells["seen"] = seen  # type: ignore[assignment]
        yield cells


async def test_only_a_direct_link_carries_messages_unsigned(kits: Path) -> None:
    async with tree(kits) as cells:
        server, direct = cells[SERVER], cells[DIRECT]
        seen: list[tuple[str, str, bool]] = cells["seen"]  # type: ignore[assignment]
        assert (await server.request(DIRECT, "t", "echo", b"1")).tobytes() == b"1"
        assert (await direct.request(SERVER, "t", "echo", b"2")).tobytes() == b"2"
        assert (await server.request(BEHIND, "t", "echo", b"3")).tobytes() == b"3"
        assert (await server.request(DIRECT, "job", "ping", b"")).tobytes() == b"pong"
        assert (await direct.request(BEHIND, "t", "echo", b"4")).tobytes() == b"4"
        assert seen == [
            (SERVER, "t", False),  # one verified link: unsigned
            (DIRECT, "t", False),
            (SERVER, "t", True),  # through the relay: signed (MAC'd once keys are known)
            (SERVER, "job", True),  # the audited channel: always signed
            (DIRECT, "t", True),  # up and down through the server: signed
        ]
        assert server.statistics().bad_signatures == 0
        assert direct.statistics().bad_signatures == 0


async def test_a_relay_that_strips_a_signature_gets_the_message_refused(kits: Path) -> None:
    """An unsigned message that comes over a verified link from a cell that is not its
    origin (a relay passing it on, stripped) is refused: only the origin's own link vouches."""
    strip = {"on": False}

    def rewrite(frame: Frame) -> Frame:
        h = frame.header
        if strip["on"] and isinstance(h, Request) and h.dst == BEHIND:
            headers = {k: v for k, v in h.headers.items() if not k.startswith("sig.")}
            return Frame(msgspec.structs.replace(h, headers=headers), frame.parts, frame.expires)
        return frame

    async with tree(kits, relay_rewrite=rewrite) as cells:
        server, behind = cells[SERVER], cells[BEHIND]
        assert (await server.request(BEHIND, "t", "echo", b"ok")).tobytes() == b"ok"
        strip["on"] = True
        with pytest.raises(IntegrityError):
            await server.request(BEHIND, "t", "echo", b"stripped")
        assert behind.statistics().bad_signatures == 1


async def test_a_verifier_on_a_link_without_certificates_vouches_for_nothing(kits: Path) -> None:
    """A ``verify_peer`` that checks something else (here: nothing) over links that carry no
    certificate (memory, plain tcp) does not make messages go unsigned: only mutual TLS
    authenticates the origin."""
    seen: list[tuple[str, str, bool]] = []
    now = datetime.now(UTC)

    def signing(name: str) -> MessageSigning:
        kit = load_kit(kits / name, now=now)
        return MessageSigning(Signer(kit), SignatureVerifier.from_kit(kit))

    def anyone(link: Any, session: Any) -> None:
        return None

    net = MemoryNetwork()
    server = Cell(
        SERVER, listen=["memory://s"], drivers=[net], signing=signing(SERVER), verify_peer=anyone
    )
    site = Cell(
        DIRECT,
        parent="memory://s",
        drivers=[net],
        handlers=[recording_table(seen)],
        signing=signing(DIRECT),
        verify_peer=anyone,
    )
    async with server, site:
        await site.wait_parent()
        for i in range(3):
            assert (await server.request(DIRECT, "t", "echo", b"%d" % i)).tobytes() == b"%d" % i
    assert seen == [(SERVER, "t", True)] * 3  # signed, then MAC'd: never bare


async def test_a_signing_that_does_not_leave_messages_to_the_link_signs_them(kits: Path) -> None:
    """``MessageSigning(link_vouches=False)``: the direct link's messages are signed (then
    MAC'd) too, both ways."""
    async with tree(kits, vouch=False) as cells:
        server, direct = cells[SERVER], cells[DIRECT]
        seen: list[tuple[str, str, bool]] = cells["seen"]  # type: ignore[assignment]
        assert (await server.request(DIRECT, "t", "echo", b"1")).tobytes() == b"1"
        assert (await direct.request(SERVER, "t", "echo", b"2")).tobytes() == b"2"
        assert seen == [(SERVER, "t", True), (DIRECT, "t", True)]


def test_a_frame_sealed_again_for_the_link_loses_its_old_signature(kits: Path) -> None:
    """Sealing is idempotent in what it leaves: a frame sealed once (a signature) and then
    left to the link carries no stale ``sig.*`` header a receiver would check."""
    from flare_async.cell._signing import seal  # noqa: PLC0415

    kit = load_kit(kits / SERVER, now=datetime.now(UTC))
    signing = MessageSigning(Signer(kit), SignatureVerifier.from_kit(kit))
    header = Request(
        id=1,
        src=SERVER,
        dst=DIRECT,
        route=[SERVER],
        budget=None,
        headers={"a": "b"},
        channel="t",
        topic="echo",
    )
    frame = Frame(header, (b"x",))
    seal(signing, frame)
    assert "sig.value" in header.headers
    seal(signing, frame, bare=True)
    assert header.headers == {"a": "b"}
