"""Who may register as a site with the server's job service: only cells provisioned as sites.

Cells in this process over ``memory://``, signing with kits provisioned for the test (a real CA):
the role a cell registers with is the one its certificate names, never what it says."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from flare_async import Cell
from flare_async.cell import system_handlers
from flare_async.errors import BadRequest, Unauthorized
from flare_async.fl._jobs import CHANNEL, JobManager, JobStore
from flare_async.security import (
    AuditLog,
    MessageSigning,
    SignatureVerifier,
    Signer,
    admin_cell_name,
    load_kit,
    verify_audit,
)
from flare_async.transport import MemoryNetwork
from tests.security.test_signatures import RELAY, SITES, kits

pytestmark = pytest.mark.anyio
ADMIN = admin_cell_name("server", "alice@example.org")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_relay_cannot_register_as_a_site(tmp_path: Path) -> None:
    folder = kits(tmp_path)
    ca = SignatureVerifier.from_kit(load_kit(folder / "server"))

    def signing(name: str) -> MessageSigning:
        return MessageSigning(Signer(load_kit(folder / name)), ca)

    net = MemoryNetwork()
    server = Cell("server", listen=["memory://server"], drivers=[net], signing=signing("server"))
    audit = AuditLog(tmp_path / "jobs" / "audit.jsonl")
    manager = JobManager(
        server, tmp_path / "jobs", admin_of=lambda src: None, verifier=ca, audit=audit
    )
    server.mount(manager.handlers())
    relay = Cell(
        RELAY,
        listen=[f"memory://{RELAY}"],
        parent="memory://server",
        drivers=[net],
        handlers=[system_handlers()],
        signing=signing(RELAY),
    )
    site = Cell(SITES[0], parent=f"memory://{RELAY}", drivers=[net], signing=signing(SITES[0]))
    async with server, relay, site:
        await site.wait_parent()
        with pytest.raises(Unauthorized, match=f"{RELAY} is a relay, not a site"):
            await relay.request("server", CHANNEL, "register", b"")
        reply = await site.request("server", CHANNEL, "register", b"")
        assert reply.tobytes() == b"registered"
        with pytest.raises(Unauthorized, match=f"{RELAY} is a relay, not a site"):
            await relay.request("server", CHANNEL, "register", b"")
    assert manager.sites == {SITES[0]}
    assert JobStore(tmp_path / "jobs").known_sites() == [SITES[0]]
    text = (tmp_path / "jobs" / "audit.jsonl").read_text().splitlines()
    assert verify_audit(text).ok
    assert sum(f'"src": "{RELAY}"' in line and '"refused"' in line for line in text) == 2


async def test_without_certificates_a_cell_with_sites_below_it_is_no_site(tmp_path: Path) -> None:
    """Unsigned (in-process, no kits) the role cannot be proven; a cell that sites are
    registered below is at least known to relay for them, and an admin session is no site."""
    net = MemoryNetwork()
    server = Cell("server", listen=["memory://server"], drivers=[net])
    admins = {ADMIN: "alice@example.org"}
    manager = JobManager(server, tmp_path / "jobs", admin_of=admins.get)
    server.mount(manager.handlers())
    relay = Cell(RELAY, listen=[f"memory://{RELAY}"], parent="memory://server", drivers=[net])
    site = Cell(SITES[0], parent=f"memory://{RELAY}", drivers=[net])
    admin = Cell(ADMIN, parent="memory://server", drivers=[net])
    async with server, relay, site, admin:
        await site.wait_parent()
        await admin.wait_parent()
        await site.request("server", CHANNEL, "register", b"")
        with pytest.raises(Unauthorized, match=f"sites are registered below {RELAY}"):
            await relay.request("server", CHANNEL, "register", b"")
        with pytest.raises(BadRequest, match="an admin session is not a site"):
            await admin.request("server", CHANNEL, "register", b"")
        await anyio.lowlevel.checkpoint()
    assert manager.sites == {SITES[0]}
    assert JobStore(tmp_path / "jobs").known_sites() == [SITES[0]]
