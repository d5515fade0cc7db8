"""``flare-async run KIT``: start one cell from its startup kit and run it until told to stop.

The kit says who the cell is (name, role), where it listens and which parent it dials; its
certificate, key and CA make the mutual-TLS contexts. Every link is checked against the
certificate presented on it (:func:`kit_verifier`). The process writes one JSON line per event to
stdout (``ready``, ``link-up``, ``link-down``, ``stored``, ``stopped``) so supervisors and tests
can follow it without parsing logs; logs go to stderr.

A site (a client kit) run with ``--jobs JOBS`` takes files sent with ``flare-async send`` into
``JOBS/inbox`` (:func:`inbox_for`), as every site of ``flare-async up`` does; ``--inbox DIR``
puts the inbox elsewhere (on any kit), ``--no-inbox`` takes none.

SIGINT and SIGTERM stop it cleanly (goodbyes on every link, exit status 0).
"""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from flare_async import _logging
from flare_async.cli._kit import emit, load_handlers
from flare_async.cli._roles import RoleCell, beside_cert
from flare_async.cli._send import inbox_handlers
from flare_async.fl import SiteJobs, load_policy
from flare_async.security import Kit, Role, load_kit


def inbox_for(
    kit: Kit, inbox: Path | None, jobs: Path | None, *, none: bool = False
) -> Path | None:
    """Where the cell takes files sent to it: ``inbox`` if given; for a site with a jobs
    folder ``jobs/inbox``; else (and with ``none``) nowhere."""
    if none:
        return None
    if inbox is not None:
        return inbox
    if kit.role is Role.CLIENT and jobs is not None:
        return jobs / SiteJobs.INBOX  # a name no job may take
    return None


async def serve(
    kit_path: Path,
    handlers: list[str],
    handshake_timeout: float,
    inbox: Path | None = None,
    jobs: Path | None = None,
    no_inbox: bool = False,
) -> None:
    """Run the kit's cell until SIGINT or SIGTERM (with ``jobs``, its part in FL jobs: the
    role is built by :class:`RoleCell`, as the repo's ``cells/`` build it)."""
    kit = load_kit(kit_path, now=datetime.now(UTC))
    tables = [load_handlers(spec) for spec in handlers]
    inbox = inbox_for(kit, inbox, jobs, none=no_inbox)
    if inbox is not None:
        # A site's policy decides who may send it files, with or without --jobs (with them
        # the cell applies it to everything, audited; without, nothing else reads it).
        policy = load_policy(beside_cert(kit, "policy.toml")) if kit.role is Role.CLIENT else None
        tables.append(inbox_handlers(inbox, accepts=None if policy is None else policy.accepts))
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        role = RoleCell(
            kit, jobs=jobs, handlers=tables, on_event=emit, handshake_timeout=handshake_timeout
        )
        async with role:
            emit(
                "ready",
                cell=role.cell.name,
                role=kit.role.value,
                listen=role.cell.listen_urls,
                parent=kit.parent,
                inbox=None if inbox is None else str(inbox),
            )
            async for signum in signals:
                emit("stopping", cell=role.cell.name, signal=signal.Signals(signum).name)
                break
    emit("stopped", cell=kit.name)


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
        help="accept files streamed with `flare-async send` into DIR (files/put); a site "
        "run with --jobs JOBS has JOBS/inbox unless told otherwise",
    )
    p.add_argument(
        "--no-inbox",
        action="store_true",
        help="accept no files (a site with --jobs otherwise takes them into JOBS/inbox)",
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
    """Entry of ``flare-async run``; returns the exit status. A kit or handler table that does
    not load, like any failure, is ``cli._main``'s to report (one line, status 1)."""
    _logging.configure(json=args.json_logs, level=getattr(logging, args.log_level.upper()))
    anyio.run(
        serve,
        Path(args.kit),
        args.handlers,
        args.handshake_timeout,
        Path(args.inbox) if args.inbox else None,
        Path(args.jobs) if args.jobs else None,
        args.no_inbox,
        backend_options={"use_uvloop": True},
    )
    return 0
