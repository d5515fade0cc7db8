"""The deployed roles are built in one place (``flare_async.cli.RoleCell``), which both
``flare-async run`` and the repo's ``cells/`` use: a server with its job service, a relay with its
aggregator, a site with its job runner under its policy, over real kits (mutual TLS, signed
messages), all in this process."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from cells import edge, relay, server
from flare_async import Context, HandlerTable, Payload, errors
from flare_async.fl import JobManager, RelayAggregator, SiteJobs, SitePolicy
from flare_async.security import Kit, provision
from flare_async.testing import free_ports

SITE = "server.r.s1"
CELLS = Path(__file__).resolve().parents[2] / "cells"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real sockets and TLS: no virtual clock


@pytest.fixture
def kits(tmp_path: Path) -> dict[str, Kit]:
    """A server, a relay below it and a site below the relay, provisioned for real; the site's
    policy accepts ``data/*`` from the server only."""
    p_server, p_relay = free_ports(2)
    spec = tmp_path / "project.toml"
    spec.write_text(f"""
project = "roles"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:{p_server}"]
[[relays]]
name = "server.r"
parent = "tls://127.0.0.1:{p_server}"
listen = ["tls://127.0.0.1:{p_relay}"]
[[clients]]
name = "{SITE}"
parent = "tls://127.0.0.1:{p_relay}"
""")
    found = {k.name: k for k in provision(spec, tmp_path / "kits", now=datetime.now(UTC))}
    Path(found[SITE].cert).with_name("policy.toml").write_text('[accept]\n"data/*" = ["server"]\n')
    return found


def data_handlers() -> HandlerTable:
    table = HandlerTable("data")

    @table.request("data", "x")
    async def x(ctx: Context, msg: Payload) -> bytes:
        return b"x"

    return table


@pytest.mark.anyio
async def test_each_role_composes_its_part_in_jobs(kits: dict[str, Kit], tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    registered = anyio.Event()

    def on_event(event: str, **fields: Any) -> None:
        events.append((event, fields))
        if event == "site-registered":
            registered.set()

    root = server.from_kit(kits["server"], jobs=tmp_path / "server", on_event=on_event)
    middle = relay.from_kit(kits["server.r"], jobs=tmp_path / "relay")
    site = edge.from_kit(kits[SITE], jobs=tmp_path / "site", handlers=[data_handlers()])
    assert isinstance(root.manager, JobManager)
    assert (root.relay, root.site) == (None, None)
    assert isinstance(middle.relay, RelayAggregator)
    assert (middle.manager, middle.site) == (None, None)
    assert isinstance(site.site, SiteJobs)
    assert isinstance(site.policy, SitePolicy)
    assert (site.manager, site.relay) == (None, None)
    with anyio.fail_after(30):
        async with root, middle, site:
            # The site registers with the server's job service through the relay, its
            # request signed with its key and checked against the project CA.
            await registered.wait()
            assert ("site-registered", {"site": SITE}) in events
            # The site's policy decides what its cell accepts; a refusal is audited.
            reply = await root.cell.request(SITE, "data", "x", b"", timeout=10)
            assert reply.tobytes() == b"x"
            with pytest.raises(errors.Unauthorized):
                await middle.cell.request(SITE, "data", "x", b"", timeout=10)
    lines = (tmp_path / "site" / "audit.jsonl").read_text().splitlines()
    audit = [json.loads(line) for line in lines]
    assert any(r.get("event") == "refused" and r.get("src") == "server.r" for r in audit), audit


def test_without_jobs_a_role_is_its_cell_alone(kits: dict[str, Kit], tmp_path: Path) -> None:
    for role in (
        server.from_kit(kits["server"]),
        relay.from_kit(kits["server.r"]),
        edge.from_kit(kits[SITE]),
    ):
        assert (role.manager, role.relay, role.site, role.audit, role.policy) == (None,) * 5
    assert not any(tmp_path.glob("**/audit.jsonl"))


@pytest.mark.parametrize(
    ("build", "kit"),
    [
        (build, kit)
        for build, own in (
            (server.from_kit, "server"),
            (relay.from_kit, "server.r"),
            (edge.from_kit, SITE),
        )
        for kit in ("server", "server.r", SITE)
        if kit != own
    ],
)
def test_a_role_takes_only_its_own_kind_of_kit(kits: dict[str, Kit], build: Any, kit: str) -> None:
    with pytest.raises(errors.ConfigError, match="kit, not a"):
        build(kits[kit])


def test_cells_import_only_public_names() -> None:
    """``cells/`` lies outside the package import-linter checks (its ``private_modules``
    contract): here, no module or name imported from ``flare_async`` may be private."""
    private = []
    for path in sorted(CELLS.glob("**/*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "flare_async" and any(
                    p.startswith("_") and not p.endswith("__") for p in parts
                ):
                    private.append(f"{path.name}:{node.lineno}: {name}")
    assert sorted(p.name for p in CELLS.glob("*.py")) == [
        "__init__.py",
        "edge.py",
        "relay.py",
        "server.py",
    ]
    assert not private, private
