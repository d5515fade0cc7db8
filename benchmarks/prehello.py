"""Memory of a listening cell under connections that never say hello (issue 18, items 5-6).

A cell listens on ``tcp://127.0.0.1:0`` in a child process. Measured (RSS of that process,
from ``/proc``):

* ``idle``: the listening cell alone;
* ``half-open``: with ``--links`` connections that connect and send nothing;
* ``max-frame``: with, in addition, 16 connections whose first frame announces ``max_frame``
  (64 MiB) of payload and then send all of it but the last byte (so it is held, unfinished).

``--cap N`` raises the cell's caps on connections not yet past their hello (per listener and
per source address) to ``N``, so that every half-open link is kept and the cost of one can be
seen; with the default caps the cell refuses most of them at once (all come from 127.0.0.1).

Run as ``python benchmarks/prehello.py`` (``--quick``: 200 half-open links, 4 big ones).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

from _report import emit, log, parser

from flare_async.wire import Limits, encode_head, make_hello

CHILD = r"""
import sys, anyio
from flare_async import Cell
from flare_async.transport import TcpDriver
kw = {}
cap = int(sys.argv[1])
if cap:
    from flare_async.transport import Admission
    kw["admission"] = Admission(max_pending=cap, max_pending_per_source=cap)
async def main():
    async with Cell("server", listen=["tcp://127.0.0.1:0"], drivers=[TcpDriver()],
                    handshake_timeout=120.0, heartbeat=None, **kw) as cell:
        print(cell.listen_urls[0].rsplit(":", 1)[1], flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
anyio.run(main)
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(pid: int) -> None:
    """Wait (bounded) until the child's descriptor count stops changing."""
    last, same = -1, 0
    for _ in range(100):
        now = fds(pid)
        same = same + 1 if now == last else 0
        if same >= 5:
            return
        last = now
        time.sleep(0.1)


def big_head() -> bytes:
    limits = Limits()
    return encode_head(make_hello("server.x", "child", limits), limits.max_frame, limits)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--links", type=int, default=1000, help="half-open connections")
    p.add_argument("--big", type=int, default=16, help="connections sending max_frame")
    p.add_argument("--cap", type=int, default=0, help="caps on pending links (0: defaults)")
    args = p.parse_args()
    if args.quick:
        args.links, args.big = 200, 4
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(args.cap)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdin is not None
    port = int(child.stdout.readline())
    case = f"tcp-cap{args.cap}" if args.cap else "tcp-default-caps"
    socks: list[socket.socket] = []
    try:
        settle(child.pid)
        idle = rss_mib(child.pid)
        emit("prehello", case, "rss-idle", idle, "MiB")
        for _ in range(args.links):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        settle(child.pid)
        half = rss_mib(child.pid)
        emit("prehello", f"{case}-{args.links}-half-open", "rss", half, "MiB", baseline=idle)
        emit("prehello", f"{case}-{args.links}-half-open", "fds-held", fds(child.pid), "fds")
        head = big_head()
        payload = memoryview(bytearray(64 * 1024 * 1024))
        refused = 0
        for _ in range(args.big):
            s = socket.create_connection(("127.0.0.1", port))
            socks.append(s)
            try:
                s.sendall(head)
                s.sendall(payload[:-1])
            except OSError:
                refused += 1
        settle(child.pid)
        big = rss_mib(child.pid)
        emit("prehello", f"{case}-{args.big}-max-frame", "rss", big, "MiB", baseline=idle)
        emit("prehello", f"{case}-{args.big}-max-frame", "refused-mid-payload", refused, "links")
        log(f"idle {idle:.0f} MiB, half-open {half:.0f} MiB, max-frame {big:.0f} MiB")
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        child.stdin.close()
        child.wait(timeout=30)


if __name__ == "__main__":
    main()
