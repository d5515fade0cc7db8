"""``flare-async up TOPOLOGY``: provision a throwaway project and start every cell as a process.

For trying a deployment on one machine: the topology file is a project file (see
``cells/topologies/``); it is provisioned into a work folder (a temporary one unless
``--workdir`` is given), then each cell runs as ``python -m flare_async run KIT --jobs
jobs/NAME`` (ready for ``flare-async job submit`` with an admin kit from ``kits/``) with its
stdout and stderr in ``logs/NAME.log``. Parents start before children. Ctrl-C (or SIGTERM) stops
them all: SIGTERM to each, then SIGKILL to any still running after ``--grace`` seconds, and
``up`` exits 0 (its normal way to end). A cell that exits on its own stops the rest; ``up``
then names it with the last line it wrote (its own one-line error) and exits 1. A topology
that does not provision is one line on stderr and exit status 1 (see ``_main``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from subprocess import Popen
from types import FrameType
from typing import IO, Any

from flare_async.security import Kit, Role, provision

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Linked:
    """Follows the cells' event lines: which cells have a link to their parent."""

    def __init__(self) -> None:
        self.cells: set[str] = set()
        self.lock = threading.Lock()

    def follow(self, name: str, stdout: IO[bytes], log: IO[bytes]) -> None:
        """Copy a cell's event lines into its log, noting when it reaches its parent."""
        with stdout, log:
            for line in stdout:
                log.write(line)
                log.flush()
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "link-up" and event.get("role") == "parent":
                    with self.lock:
                        self.cells.add(name)


def start_cells(
    kits: list[Kit], workdir: Path, linked: _Linked, procs: list[tuple[Kit, Popen[bytes]]]
) -> None:
    """Start one ``flare_async run`` process per cell kit, parents first, each added to
    ``procs`` as it starts (so that a failure halfway still leaves them to stop)."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    order = sorted((k for k in kits if k.role is not Role.ADMIN), key=lambda k: k.name.count("."))
    for kit in order:
        log = (logs / f"{kit.name}.log").open("wb")
        proc = subprocess.Popen(  # our own interpreter and module
            [
                sys.executable,
                "-m",
                "flare_async",
                "run",
                str(workdir / "kits" / kit.name),
                "--jobs",
                str(workdir / "jobs" / kit.name),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        procs.append((kit, proc))
        assert proc.stdout is not None
        threading.Thread(
            target=linked.follow, args=(kit.name, proc.stdout, log), daemon=True
        ).start()


def last_error(log: Path, tail: int = 16384) -> str | None:
    """The last line a cell wrote to its log other than its JSON event lines (a cell that
    fails says why in one line on stderr), or ``None`` when there is none."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith("{"):
            return text
    return None


def stop_cells(procs: list[tuple[Kit, Popen[bytes]]], grace: float) -> None:
    """SIGTERM every process (children first), SIGKILL what is left after ``grace`` seconds."""
    for _, proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for _, proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def add_parser(sub: Any) -> None:
    """The ``up`` subcommand's arguments."""
    p = sub.add_parser("up", help="provision a throwaway project and start every cell locally")
    p.add_argument("topology", help="a project file, e.g. cells/topologies/two-tier.toml")
    p.add_argument("--workdir", help="where kits and logs go (default: a new temporary folder)")
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long cells get to stop before they are killed (default 10)",
    )


def run(args: Any) -> int:
    """Entry of ``flare-async up``; returns the exit status."""
    return up(args.topology, workdir=args.workdir, grace=args.grace)


def up(topology: str, *, workdir: str | None, grace: float) -> int:
    """Provision ``topology``, start its cells, wait for Ctrl-C or a cell's exit, stop all."""
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="flare-async-up-"))
    kits = provision(topology, work / "kits", now=datetime.now(UTC), force=workdir is not None)
    linked = _Linked()
    procs: list[tuple[Kit, Popen[bytes]]] = []
    # From here Ctrl-C and SIGTERM only raise a flag, which the loop checks and the stop
    # ignores (a second Ctrl-C must not cut the stop short). Handlers rather than blocked
    # signals: the threads we do not start (numpy's OpenBLAS workers) leave them unblocked,
    # and a signal delivered there would raise KeyboardInterrupt anywhere in the main thread.
    asked: list[int] = []

    def ask(signo: int, _frame: FrameType | None) -> None:
        asked.append(signo)

    previous = {s: signal.signal(s, ask) for s in _STOP_SIGNALS}
    status = 0
    try:
        start_cells(kits, work, linked, procs)
        children = {k.name for k, _ in procs if k.parent}
        print(f"started {len(procs)} cells from {topology}; logs in {work / 'logs'}")
        for kit, proc in procs:
            where = ", ".join(kit.listen) or f"-> {kit.parent}"
            print(f"  {kit.name:32s} {kit.role.value:7s} pid {proc.pid:<7d} {where}")
        print("Ctrl-C stops them all.")
        sys.stdout.flush()
        announced = False
        while not asked:
            dead = [(k, p) for k, p in procs if p.poll() is not None]
            if dead:
                for kit, proc in dead:
                    log = work / "logs" / f"{kit.name}.log"
                    said = last_error(log)
                    sys.stderr.write(
                        f"flare-async up: error: {kit.name} exited with status {proc.returncode}"
                        f"{': ' + said if said else ''} (its log: {log}); stopping the rest\n"
                    )
                    sys.stderr.flush()
                status = 1
                break
            with linked.lock:
                all_linked = children <= linked.cells
            if all_linked and not announced:
                announced = True
                print(f"all {len(procs)} cells linked")
                sys.stdout.flush()
            time.sleep(0.2)  # a signal's handler runs at once; the loop sees it on waking
    finally:
        stop_cells(procs, grace)
        for s, handler in previous.items():  # None: a handler not set from Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    print("all cells stopped")
    return status
