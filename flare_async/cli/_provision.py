"""``flare-async provision``: a CA and startup kits from a project file, or one more kit later.

flare-async provision project.toml -o kits/
flare-async provision --add-site NAME --parent URL [--org ORG] [--role client|relay|admin]
                      [--listen URL ...] [--host HOST ...] -o kits/
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

from flare_async.errors import ConfigError
from flare_async.security import (
    CA_DIR,
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    Kit,
    Role,
    add_site,
    provision,
)

__all__ = ["add_parser", "as_flags", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``provision`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "provision",
        help="create a CA and startup kits from a project file, or add one kit later",
        description=(
            "Create the project's CA and one startup kit per participant (PROJECT given), or "
            "issue one more kit from the CA already in the output folder (--add-site)."
        ),
    )
    p.add_argument("project", nargs="?", type=Path, help="the project file (TOML)")
    p.add_argument("-o", "--out", type=Path, required=True, help="the kits folder")
    p.add_argument("--add-site", metavar="NAME", help="issue one more kit, for NAME")
    p.add_argument("--parent", metavar="URL", help="with --add-site: the parent's listen URL")
    p.add_argument("--org", help="with --add-site: the organisation (default: the project's)")
    p.add_argument(
        "--role",
        choices=[Role.CLIENT.value, Role.RELAY.value, Role.ADMIN.value],
        default=Role.CLIENT.value,
        help="with --add-site: what NAME is (default: client)",
    )
    p.add_argument(
        "--listen",
        metavar="URL",
        action="append",
        default=[],
        help="with --add-site --role relay: a URL it listens on (repeatable)",
    )
    p.add_argument(
        "--host",
        metavar="HOST",
        action="append",
        default=[],
        help="with --add-site --role relay: another name it is reached at (repeatable)",
    )
    p.add_argument(
        "--days", type=int, default=DEFAULT_CERT_DAYS, help="certificate validity in days"
    )
    p.add_argument(
        "--ca-days", type=int, default=DEFAULT_CA_DAYS, help="CA validity in days (provision)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing kits (without --add-site: a new CA, so every kit changes)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``provision`` with parsed arguments; returns the exit status."""
    now = datetime.now(UTC)
    out: Path = args.out
    try:
        if args.add_site is not None:
            if args.project is not None:
                return _usage("give either PROJECT or --add-site, not both")
            if args.parent is None and args.role != Role.ADMIN.value:
                return _usage("--add-site needs --parent URL")
            kit = add_site(
                out,
                args.add_site,
                args.parent,
                args.org,
                args.role,
                now=now,
                listen=args.listen,
                hosts=args.host,
                days=args.days,
                force=args.force,
            )
            sys.stdout.write(f"added a kit to {out} from the CA in {out / CA_DIR}:\n")
            sys.stdout.write(_line(kit))
            return 0
        if args.project is None:
            return _usage("give a PROJECT file, or --add-site NAME --parent URL")
        for flag, value in (("--parent", args.parent), ("--org", args.org)):
            if value is not None:
                return _usage(f"{flag} goes with --add-site")
        if args.listen or args.host:
            return _usage("--listen and --host go with --add-site")
        kits = provision(
            args.project, out, now=now, days=args.days, ca_days=args.ca_days, force=args.force
        )
    except ConfigError as exc:
        sys.stderr.write(f"flare-async provision: error: {as_flags(str(exc))}\n")
        return 1
    sys.stdout.write(f"provisioned {len(kits)} kits of project {kits[0].project!r} in {out}:\n")
    sys.stdout.write(
        f"  {CA_DIR + '/':<32} CA certificate and key: keep ca.key secret and offline; "
        "it is in no kit\n"
    )
    for kit in kits:
        sys.stdout.write(_line(kit))
    sys.stdout.write("send each participant its own folder; key.pem in it is secret\n")
    return 0


# The library's messages name its Python arguments; on the command line they are flags.
_FLAGS = (
    (re.compile(r"\buse add_site to add a participant\b"), "use --add-site NAME to add one"),
    (re.compile(r"\badd_site\b"), "--add-site"),
    (re.compile(r"(?<![-\w])force\b"), "--force"),
)


def as_flags(message: str) -> str:
    """``message`` with the Python names of provisioning's options (``add_site``,
    ``force``) replaced by the command's flags (``--add-site``, ``--force``)."""
    for pattern, flag in _FLAGS:
        message = pattern.sub(flag, message)
    return message


def _line(kit: Kit) -> str:
    where = f"parent {kit.parent}" if kit.parent else ""
    if kit.listen:
        where = f"listen {', '.join(kit.listen)}" + (f"; {where}" if where else "")
    return f"  {kit.name + '/':<32} {kit.role.value:<7} {kit.org:<16} {where}\n"


def _usage(message: str) -> int:
    sys.stderr.write(f"flare-async provision: error: {message}\n")
    return 2
