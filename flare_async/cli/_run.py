"""``flare-async run KIT``: start one cell from its startup kit and run it until told to stop.

The kit says who the cell is (name, role), where it listens and which parent it dials; its
certificate, key and CA make the mutual-TLS contexts. Every link is checked against the
certificate presented on it (:func:`kit_verifier`). The process writes one JSON line per event to
stdout (``ready``, ``link-up``, ``link-down``, ``stopped``) so supervisors and tests can follow it
without parsing logs; logs go to stderr. SIGINT and SIGTERM stop it cleanly (goodbyes on every
link, exit status 0).
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson

from flare_async import _logging
from flare_async._spec import load_object
from flare_async.cell import Cell, HandlerTable, PeerVerifier, system_handlers
from flare_async.errors import ConfigError, IdentityError
from flare_async.fl import EdgeClient, RelayAggregator
from flare_async.fl._jobs import AdminRights, JobManager
from flare_async.fl._privacy import load_policy
from flare_async.fl._site import SiteJobs
from flare_async.routing import CellName
from flare_async.security import (
    AuditLog,
    Decryptor,
    Identity,
    Kit,
    MessageSigning,
    Role,
    SignatureVerifier,
    Signer,
    admin_cell_name,
    check_claim,
    client_context,
    identity_from_certificate,
    load_kit,
    server_context,
)
from flare_async.transport import Driver, Link, TcpDriver, WebSocketDriver
from flare_async.wire import Session


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed (the process's machine-readable event stream)."""
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


def kit_verifier(kit: Kit, admins: dict[str, Identity] | None = None) -> PeerVerifier:
    """Check each link's peer certificate against the name and place it claims.

    A child must hold a certificate for exactly the name it claims, directly below this cell
    (its name's parent is this cell's name: ``server.relay-1.site-1`` links only to
    ``server.relay-1``), and be a client or relay; a parent must be the server or a relay (a
    client certificate cannot act as one); a direct peer must be a cell of the project. With
    ``admins`` (the server), an admin certificate may connect as a child under its session name
    (:func:`admin_cell_name`); the session name is recorded in ``admins`` with the admin's
    identity (name and organisation).
    """

    def verify(link: Link, session: Session) -> None:
        der = link.extra().get("peer_certificate")
        if not der:
            raise IdentityError(f"{session.peer!r} presented no certificate on {link.peer_address}")
        identity = identity_from_certificate(der)
        if session.role == "child" and identity.role is Role.ADMIN and admins is not None:
            expected = admin_cell_name(kit.name, identity.name)
            if session.peer != expected:
                raise IdentityError(
                    f"admin {identity.name!r} must connect as {expected!r}, not {session.peer!r}"
                )
            admins[session.peer] = identity
        elif session.role == "child":
            check_claim(identity, session.peer, Role.CLIENT, below=kit.name)
            # The name places a cell in the tree: its parent is its name's prefix, the cell its
            # kit dials. A valid certificate must not let it skip that cell (and its policy).
            parent = str(CellName(session.peer).parent)
            if parent != kit.name:
                raise IdentityError(
                    f"{session.peer!r} may link only directly below {parent!r}, not {kit.name!r}",
                    peer=identity.name,
                )
        elif session.role == "parent":
            acting = identity.role if identity.role in (Role.SERVER, Role.RELAY) else Role.RELAY
            check_claim(identity, session.peer, acting)
            if kit.parent_name is not None and session.peer != kit.parent_name:
                raise IdentityError(
                    f"expected parent {kit.parent_name!r}, the certificate is {session.peer!r}"
                )
        else:
            check_claim(identity, session.peer, Role.CLIENT)

    return verify


def kit_drivers(kit: Kit) -> list[Driver]:
    """The network drivers of a kit's cell: tls:// and wss:// with the kit's TLS contexts
    (plain tcp:// and ws:// stay available for closed test networks)."""
    client_tls = client_context(kit)
    server_tls = server_context(kit) if kit.listen else None
    return [
        TcpDriver(server_tls=server_tls, client_tls=client_tls),
        WebSocketDriver(server_ssl=server_tls, client_ssl=client_tls),
    ]


def load_handlers(spec: str) -> HandlerTable:
    """``module:name`` -> the :class:`HandlerTable` it names (or a function returning one).

    Raises:
        ConfigError: the module or name does not exist, or is not a handler table.
    """
    target = load_object(spec, "--handlers")
    table = target() if callable(target) and not isinstance(target, HandlerTable) else target
    if not isinstance(table, HandlerTable):
        raise ConfigError(f"--handlers {spec!r} is a {type(table).__name__}, not a HandlerTable")
    return table


def cell_from_kit(
    kit: Kit,
    *,
    handlers: Iterable[HandlerTable] = (),
    heartbeat: float | None = 15.0,
    handshake_timeout: float = 10.0,
    admins: dict[str, Identity] | None = None,
    on_link: Callable[[str, str, bool], None] | None = None,
    accept: Callable[[str, str, str], bool] | None = None,
    on_refused: Callable[[str, str, str, str], None] | None = None,
) -> Cell:
    """The cell a kit describes, with the ``sys`` handlers and ``handlers`` mounted.

    Args:
        admins: (the server) admit admin sessions and keep who is behind each (see
            :func:`kit_verifier`); an entry leaves when its link goes down.
        on_link: also called on every link change, after the event line is written.
        accept: which origins may send which channels/topics here (a site's policy).
        on_refused: called for every message refused for its signature (``(identity, cell,
            topic, reason)``): every message a kit's cell sends is signed, and every one it
            receives is checked (``security.MessageSigning``).
    """
    if kit.role is Role.ADMIN:
        raise IdentityError(f"{kit.name!r} is an admin kit: admins are not cells")

    def link_changed(peer: str, role: str, up: bool) -> None:
        emit("link-up" if up else "link-down", cell=kit.name, peer=peer, role=role)
        if not up and admins is not None:
            admins.pop(peer, None)
        if on_link is not None:
            on_link(peer, role, up)

    def identity_of(cell: str) -> str:
        """Admin sessions sign with their admin's certificate; every other cell with its own."""
        admin = admins.get(cell) if admins is not None else None
        return admin.name if admin is not None else cell

    return Cell(
        kit.name,
        listen=list(kit.listen),
        parent=kit.parent,
        drivers=kit_drivers(kit),
        handlers=[system_handlers(), *handlers],
        verify_peer=kit_verifier(kit, admins),
        heartbeat=heartbeat,
        handshake_timeout=handshake_timeout,
        on_link=link_changed,
        accept=accept,
        signing=MessageSigning(
            Signer(kit),
            SignatureVerifier.from_kit(kit),
            identity_of=identity_of,
            on_refused=on_refused,
        ),
    )


def edge_client_from_kit(kit: Kit, server: str = "server", **options: Any) -> EdgeClient:
    """An intermittent edge client as a kit describes it: it visits its kit's parent URL
    (``wss://`` through a proxy) with the kit's certificate, signs every message and every
    result, and takes only tasks signed by the server (the project CA).

    ``options`` go to :class:`~flare_async.fl.EdgeClient` (config, codec, timeouts...).

    Raises:
        IdentityError: the kit is not a client's, or names no parent.
    """
    if kit.role is not Role.CLIENT or kit.parent is None:
        raise IdentityError(f"{kit.name!r} is not a client kit with a parent to visit")
    verifier = SignatureVerifier.from_kit(kit)
    return EdgeClient(
        kit.name,
        kit.parent,
        server,
        drivers=kit_drivers(kit),
        verify_peer=kit_verifier(kit),
        signing=MessageSigning(Signer(kit), verifier),
        signer=Signer(kit),
        task_verifier=verifier,
        **options,
    )


async def serve(
    kit_path: Path,
    handlers: list[str],
    handshake_timeout: float,
    inbox: Path | None = None,
    jobs: Path | None = None,
) -> None:
    """Run the kit's cell until SIGINT or SIGTERM (with ``jobs``, its part in FL jobs)."""
    from flare_async.cli._send import inbox_handlers  # noqa: PLC0415 - _send imports us

    kit = load_kit(kit_path, now=datetime.now(UTC))
    tables = [load_handlers(spec) for spec in handlers]
    if inbox is not None:
        tables.append(inbox_handlers(inbox))
    admins: dict[str, Identity] | None = {} if kit.role is Role.SERVER else None
    role = JobRole(kit, jobs, admins) if jobs is not None else None
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        cell = cell_from_kit(
            kit,
            handlers=tables,
            handshake_timeout=handshake_timeout,
            admins=admins,
            on_link=role.link_changed if role is not None else None,
            accept=role.accept if role is not None and role.policy is not None else None,
            on_refused=role.refused if role is not None else None,
        )
        if role is not None:
            role.mount(cell)
        async with cell, anyio.create_task_group() as tg:
            if role is not None:
                tg.start_soon(role.run)
            emit(
                "ready",
                cell=cell.name,
                role=kit.role.value,
                listen=cell.listen_urls,
                parent=kit.parent,
            )
            async for signum in signals:
                emit("stopping", cell=cell.name, signal=signal.Signals(signum).name)
                break
            tg.cancel_scope.cancel()
    emit("stopped", cell=kit.name)


def _der(cert_path: str) -> bytes:
    """A PEM certificate file as DER (what the sites seal results for)."""
    return ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())


class JobRole:
    """A deployed cell's part in FL jobs (``--jobs DIR``): the server runs the job service
    (jobs kept in DIR), a relay aggregates its subtree, a site runs the jobs' training
    processes (their logs in DIR). Each keeps its audit log in ``DIR/audit.jsonl``. Results
    are signed end to end with the sites' (and relays') keys and checked against the project
    CA by whoever folds them."""

    def __init__(self, kit: Kit, folder: Path, admins: dict[str, Identity] | None) -> None:
        self.kit = kit
        self.folder = folder
        self.admins = admins
        self.server = kit.name.split(".", 1)[0]
        self.manager: JobManager | None = None
        self.site: SiteJobs | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.folder / "audit.jsonl")
        self.policy = (
            load_policy(Path(kit.cert).parent / "policy.toml") if kit.role is Role.CLIENT else None
        )

    def accept(self, src: str, channel: str, topic: str) -> bool:
        """The site's ``[accept]`` rules; a refusal is audited."""
        assert self.policy is not None
        if self.policy.accepts(src, channel, topic):
            return True
        self.audit.append(
            "refused",
            now=time.time(),
            src=src,
            command=f"{channel}/{topic}",
            why="not accepted by the site's policy",
        )
        return False

    def refused(self, identity: str, cell: str, topic: str, reason: str) -> None:
        """A message whose signature failed, refused by the cell: audited."""
        self.audit.append(
            "refused", now=time.time(), src=cell, by=identity, command=topic, why=reason
        )

    def mount(self, cell: Cell) -> None:
        audit = self.audit
        if self.kit.role is Role.SERVER:
            admins = self.admins if self.admins is not None else {}

            def admin_of(src: str) -> str | None:
                identity = admins.get(src)
                return identity.name if identity is not None else None

            def org_of(admin: str) -> str:
                return next((i.org for i in admins.values() if i.name == admin), "")

            self.manager = JobManager(
                cell,
                self.folder,
                admin_of=admin_of,
                on_event=emit,
                audit=audit,
                verifier=SignatureVerifier.from_kit(self.kit),
                rights=AdminRights.load(Path(self.kit.cert).parent / "admins.toml"),
                org_of=org_of,
                certificate=_der(self.kit.cert),
                decryptor=Decryptor(self.kit),
                signer=Signer(self.kit),
            )
            cell.mount(self.manager.handlers())
        elif self.kit.role is Role.RELAY:
            relay = RelayAggregator(
                cell,
                verifier=SignatureVerifier.from_kit(self.kit),
                signer=Signer(self.kit),
            )
            cell.mount(relay.handlers())
        else:
            self.site = SiteJobs(
                cell,
                self.folder,
                server=self.server,
                on_event=emit,
                audit=audit,
                signer=Signer(self.kit),
                policy=self.policy,
                verifier=SignatureVerifier.from_kit(self.kit),
            )
            cell.mount(self.site.handlers())

    def link_changed(self, peer: str, role: str, up: bool) -> None:
        if up and role == "parent" and self.site is not None:
            self.site.parent_up()

    async def run(self) -> None:
        if self.manager is not None:
            await self.manager.run()
        elif self.site is not None:
            await self.site.run()


def add_parser(sub: Any) -> None:
    """The ``run`` subcommand's arguments."""
    p = sub.add_parser("run", help="start one cell from its startup kit")
    p.add_argument("kit", help="the kit folder (or its kit.toml)")
    p.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help="mount a HandlerTable (or a function returning one); repeatable",
    )
    p.add_argument(
        "--inbox",
        default=None,
        metavar="DIR",
        help="accept files streamed with `flare-async send` into DIR (files/put)",
    )
    p.add_argument(
        "--jobs",
        default=None,
        metavar="DIR",
        help="take part in FL jobs: the server keeps its jobs in DIR, a site its job logs",
    )
    p.add_argument("--json-logs", action="store_true", help="JSON log lines on stderr")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a new link may take to say hello (default 10)",
    )


def run(args: Any) -> int:
    """Entry of ``flare-async run``; returns the exit status."""
    _logging.configure(json=args.json_logs, level=getattr(logging, args.log_level.upper()))
    try:
        anyio.run(
            serve,
            Path(args.kit),
            args.handlers,
            args.handshake_timeout,
            Path(args.inbox) if args.inbox else None,
            Path(args.jobs) if args.jobs else None,
            backend_options={"use_uvloop": True},
        )
    except ConfigError as exc:
        sys.stderr.write(f"flare-async run: {exc}\n")
        return 2
    return 0
