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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from flare_async import _logging
from flare_async.cell import Cell
from flare_async.cli._kit import cell_from_kit, emit, load_handlers
from flare_async.cli._send import inbox_handlers
from flare_async.errors import ConfigError
from flare_async.fl import RelayAggregator
from flare_async.fl._jobs import AdminRights, JobManager
from flare_async.fl._privacy import load_policy
from flare_async.fl._site import SiteJobs
from flare_async.security import (
    AuditLog,
    Decryptor,
    Identity,
    Kit,
    Role,
    SignatureVerifier,
    Signer,
    load_kit,
)


async def serve(
    kit_path: Path,
    handlers: list[str],
    handshake_timeout: float,
    inbox: Path | None = None,
    jobs: Path | None = None,
) -> None:
    """Run the kit's cell until SIGINT or SIGTERM (with ``jobs``, its part in FL jobs)."""
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
