"""Entry point of ``flare-async``. Subcommands arrive with the issues that need them
(provision, run, up, simulate, job ...); each lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flare_async import __version__
from flare_async.cli import _audit, _job, _provision, _run, _send, _simulate, _up
from flare_async.wire import PROTOCOL_VERSION


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flare-async",
        description="flare_async: an asynchronous runtime and SDK for federated learning.",
    )
    parser.add_argument("--version", action="version", version=f"flare-async {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the package and protocol versions")
    _provision.add_parser(sub)
    _run.add_parser(sub)
    _up.add_parser(sub)
    _send.add_parser(sub)
    _simulate.add_parser(sub)
    _job.add_parser(sub)
    _audit.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = _parser().parse_args(argv)
    if args.command in (None, "version"):
        sys.stdout.write(f"flare-async {__version__} (wire protocol {PROTOCOL_VERSION})\n")
        return 0
    if args.command == "provision":
        return _provision.run(args)
    if args.command == "run":
        return _run.run(args)
    if args.command == "up":
        return _up.run(args)
    if args.command == "send":
        return _send.run(args)
    if args.command == "simulate":
        return _simulate.run(args)
    if args.command == "job":
        return _job.run(args)
    if args.command == "audit":
        return _audit.run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first
