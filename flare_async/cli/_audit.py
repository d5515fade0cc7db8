"""``flare-async audit verify FILE``: check an audit log's hash chain.

Exit status 0 and ``ok: N entries, head HASH`` when every line holds together (and, with
``--head``, the last line's hash is the one expected: nothing was cut off the end); 1 and the
first bad line with the reason otherwise; a log that cannot be read is one line on stderr and
1 as well (``flare-async audit verify: error: no such file or directory: FILE``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from flare_async.security import verify_audit


def add_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="check audit logs")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = actions.add_parser("verify", help="check an audit log's hash chain")
    v.add_argument("file", help="the audit log (JSON lines)")
    v.add_argument("--head", help="the hash the last line must have (from a copy kept elsewhere)")


def run(args: Any) -> int:
    path = Path(args.file)
    with path.open(encoding="utf-8") as f:  # OSError: one line and status 1 (cli._main)
        report = verify_audit(f)
    if not report.ok:
        sys.stdout.write(f"BAD: {path}: line {report.bad_line}: {report.reason}\n")
        return 1
    if args.head and args.head != report.head:
        sys.stdout.write(
            f"BAD: {path}: ends at {report.head[:16]}... after {report.entries} entries, "
            f"expected {args.head[:16]}... (lines were cut off, or it is another log)\n"
        )
        return 1
    sys.stdout.write(f"ok: {report.entries} entries, head {report.head}\n")
    return 0
