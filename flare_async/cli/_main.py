"""Entry point of ``flare-async``. Subcommands arrive with the issues that need them
(provision, run, up, simulate, job ...); each lives in its own module.

Errors end here: whatever a command raises becomes one line on stderr,
``flare-async COMMAND: error: WHAT WENT WRONG[; WHAT TO DO]``, and an exit status:

====  ===================================================================================
0     done
1     it failed, and the line says why: a file or setting that does not load (a missing
      file, TOML syntax, a URL, a parent, a recipe), a job that failed or was aborted, a
      cell that exited, a connection or transfer that failed, an address already in use,
      an audit log that does not verify
2     usage: the command line itself is wrong (an unknown option, a missing argument,
      options that do not go together); nothing was done
130   interrupted (Ctrl-C), where that is not the command's normal way to stop
====  ===================================================================================

``flare-async --debug COMMAND ...`` prints the traceback as well (and keeps the log lines a
command would otherwise silence while it stops). See docs/deployment.md, "Exit codes and
errors".
"""

from __future__ import annotations

import argparse
import errno
import sys
import tomllib
import traceback
from collections.abc import Sequence

from flare_async import __version__
from flare_async.cli import _audit, _job, _kube, _provision, _run, _send, _simulate, _up
from flare_async.cli._status import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from flare_async.errors import ConfigError, ConnectError, FlareError, Unauthorized
from flare_async.wire import PROTOCOL_VERSION

_ADDRESS_IN_USE = "address already in use"
_HINT_ADDRESS_IN_USE = "another process listens there: stop it, or choose another port"
_HINT_BUG = "this is a bug: rerun with `flare-async --debug ...` and report the traceback"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flare-async",
        description="flare_async: an asynchronous runtime and SDK for federated learning.",
        epilog="Exit status: 0 done, 1 it failed (the error line says why), 2 usage error, "
        "130 interrupted (see docs/deployment.md, 'Exit codes and errors').",
    )
    parser.add_argument("--version", action="version", version=f"flare-async {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the traceback as well as the one-line reason",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the package and protocol versions")
    _provision.add_parser(sub)
    _run.add_parser(sub)
    _up.add_parser(sub)
    _send.add_parser(sub)
    _simulate.add_parser(sub)
    _job.add_parser(sub)
    _audit.add_parser(sub)
    _kube.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (see the module's table)."""
    args = _parser().parse_args(argv)
    command = " ".join(
        str(part) for part in (args.command, getattr(args, "action", None)) if part is not None
    )
    try:
        return _dispatch(args)
    except (Exception, KeyboardInterrupt) as exc:  # every failure: one line and a status
        status, reason = describe(exc)
        if args.debug:
            traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.write(f"flare-async {command}: {reason}\n")
        sys.stderr.flush()
        return status


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in (None, "version"):
        sys.stdout.write(f"flare-async {__version__} (wire protocol {PROTOCOL_VERSION})\n")
        return EXIT_OK
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
    if args.command == "kube":
        return _kube.run(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands first


def describe(exc: BaseException) -> tuple[int, str]:
    """The exit status for ``exc`` and the line that names its cause (``error: ...``, or
    ``interrupted``). Exception groups (from task groups) are described by the leaf that
    matters: an interrupt first, else the first leaf."""
    leaves = list(_leaves(exc))
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return EXIT_INTERRUPTED, "interrupted"
    exc = leaves[0] if leaves else exc
    if isinstance(exc, ConfigError):
        return EXIT_FAILED, f"error: {exc}"
    if isinstance(exc, tomllib.TOMLDecodeError):
        return EXIT_FAILED, f"error: not valid TOML: {exc}"
    if isinstance(exc, FlareError):
        text = f"{type(exc).__name__}: {exc}"
        if _ADDRESS_IN_USE in str(exc).lower():
            return EXIT_FAILED, f"error: {text}; {_HINT_ADDRESS_IN_USE}"
        if isinstance(exc, ConnectError) and not str(exc).startswith("cannot listen"):
            return EXIT_FAILED, f"error: {text}; is the cell there running, and the URL right?"
        if isinstance(exc, Unauthorized):
            return EXIT_FAILED, f"error: {text}; its admins.toml or policy.toml decides who may"
        return EXIT_FAILED, f"error: {text}"
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return EXIT_FAILED, f"error: {_os_reason(exc)}; {_HINT_ADDRESS_IN_USE}"
        return EXIT_FAILED, f"error: {_os_reason(exc)}"
    return EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc}; {_HINT_BUG}"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror.lower() if exc.strerror else str(exc)
    return f"{reason}: {exc.filename}" if exc.filename is not None else reason
