"""Soak and chaos: a real deployment runs jobs back to back while cells are killed.

A server, one relay and ``--sites`` sites (each ``python -m flare_async run KIT --jobs DIR``, mutual
TLS on 127.0.0.1 free ports, kits from ``flare_async.security.provision``) run small FedAvg jobs
(``tests._fl_scripts:small_recipe``: 3 rounds, ``--min-responses 2``, 30 s round deadlines)
one after another for ``--minutes``, submitted and followed with the admin CLI. Every
``--kill-every`` seconds a random non-server cell (``--seed``) is SIGKILLed and started again;
with ``--kill-server-every N`` every Nth kill takes the server instead (jobs then resume or fail
with a reason).

Every ``--sample-every`` seconds the RSS (``/proc/PID/status`` VmRSS) and open file descriptors
(``/proc/PID/fd``) of every cell process are sampled, and training processes
(``flare_async.fl.worker``) whose site is gone are counted. At the end (JSON lines on stdout):

- ``rss-drift:<cell>``: over the cell's longest-lived process, after warm-up (the first 20 % of the
  run, and of that process's life, discarded): ``baseline`` the median of the first quarter of the
  remaining samples, ``value`` the median of the last 3, ``ratio`` value / baseline, with min/max;
- ``fd-growth:<cell>``: open fds of the same process, first and last (medians of 3) after warm-up;
- ``jobs_finished``, ``jobs_failed_named`` (failed or aborted with a non-empty, specific ``error``),
  ``jobs_unnamed_failures`` (no reason, the bare fallback ``failed``, or never ended);
- ``orphans``: processes of this run (marked by an environment variable every cell and its
  training processes inherit) still alive once the deployment has been stopped;
- ``loadavg``: the machine's 1-minute load average at start and end (the machine is shared).

Exit status 1 if a hard criterion fails: an unnamed failure, an orphan, fd growth over
``--fd-slack``, or an RSS ratio over ``1 + --rss-slack`` (5 %); the numbers are reported either way.
Loopback only; bounded (every wait has a timeout); stops by itself.

    .venv/bin/python benchmarks/soak.py > /tmp/soak.jsonl        # 10 minutes, a kill every 30 s
    .venv/bin/python benchmarks/soak.py --quick                  # 1 minute, a kill every 15 s
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from _report import line, log, parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flare_async.security import provision  # noqa: E402
from flare_async.testing import free_ports  # noqa: E402

RELAY = "server.relay-1"
ADMIN = "alice@example.org"
MARK = "FLARE_SOAK_RUN"
"""Environment variable every process of this run carries (inherited by training processes)."""
GENERIC_ERRORS = {"", "failed", "aborted"}
"""A job's ``error`` that names no reason: the manager's fallback when nothing said why."""


# ---------------------------------------------------------------- processes
@dataclass
class Life:
    """One OS process of a cell, from start to kill (or to the end of the run)."""

    pid: int
    start: float
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss B, fds)


class Cell:
    """One cell process (``flare_async run KIT``); its stdout events read by a thread."""

    def __init__(self, name: str, kit: Path, jobs: Path, log_path: Path, env: dict[str, str]):
        self.name = name
        self.kit = kit
        self.jobs = jobs
        self.log_path = log_path
        self.env = env
        self.events: Queue[dict[str, Any]] = Queue(maxsize=10_000)
        self.lives: list[Life] = []
        self.lock = threading.Lock()
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flare_async",
                    "run",
                    str(self.kit),
                    "--handshake-timeout",
                    "5",
                    "--jobs",
                    str(self.jobs),
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=ROOT,
            )
        self.lives.append(Life(proc.pid, time.monotonic()))
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if self.events.full():  # keep the newest: nothing waits on old events
                    with contextlib.suppress(Empty):
                        self.events.get_nowait()
                self.events.put(ev)

    def wait_all(self, event: str, key: str, values: list[str], timeout: float) -> None:
        missing = set(values)
        until = time.monotonic() + timeout
        while missing:
            try:
                ev = self.events.get(timeout=max(0.1, until - time.monotonic()))
            except Empty:
                raise RuntimeError(f"{self.name}: no {event} for {sorted(missing)}") from None
            if ev.get("event") == event:
                missing.discard(ev.get(key))

    def kill_and_restart(self, down: float) -> None:
        with self.lock:
            self.proc.kill()  # SIGKILL: no goodbye, no cleanup
            self.proc.wait(timeout=30)
            time.sleep(down)
            self.proc = self._start()

    def stop(self) -> int | None:
        with self.lock:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit 30 s after SIGTERM; SIGKILL")
                self.proc.kill()
                return self.proc.wait(timeout=30)


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    for row in status.splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) * 1024, fds
    return None  # a zombie has no VmRSS


def marked_processes(token: str) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process carrying this run's mark."""
    found: dict[int, tuple[int, str]] = {}
    needle = f"{MARK}={token}".encode()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue  # a zombie: already dead, its parent has not reaped it yet
        found[int(entry)] = (int(fields[1]), cmd.strip())
    return found


# ---------------------------------------------------------------- deployment
class Deployment:
    def __init__(self, root: Path, n_sites: int, token: str) -> None:
        self.root = root
        self.sites = [f"{RELAY}.site-{i + 1}" for i in range(n_sites)]
        p_server, p_relay = free_ports(2)
        orgs = ["hospital-a", "hospital-b", "hospital-c"]
        clients = "".join(
            f'[[clients]]\nname = "{site}"\norg = "{orgs[i % 3]}"\n'
            f'parent = "tls://127.0.0.1:{p_relay}"\n'
            for i, site in enumerate(self.sites)
        )
        project = root / "project.toml"
        project.write_text(f"""
project = "soak"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:{p_server}"]
[[relays]]
name = "{RELAY}"
parent = "tls://127.0.0.1:{p_server}"
listen = ["tls://127.0.0.1:{p_relay}"]
{clients}
[[admins]]
name = "{ADMIN}"
parent = "tls://127.0.0.1:{p_server}"
""")
        self.kits = root / "kits"
        provision(project, self.kits, now=datetime.now(UTC))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), MARK: token}
        self.admin_env = {k: v for k, v in self.env.items() if k != MARK}
        self.cells: dict[str, Cell] = {}
        for name in ["server", RELAY, *self.sites]:
            self.cells[name] = Cell(
                name,
                self.kits / name,
                root / "jobs" / name,
                root / f"{name}.log",
                self.env,
            )
        self.cells["server"].wait_all("site-registered", "site", self.sites, timeout=120)

    def admin(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        cmd = [sys.executable, "-m", "flare_async", "job", "--kit", str(self.kits / ADMIN), *args]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=self.admin_env,
                timeout=timeout,
                check=False,
                cwd=ROOT,
            )
        except subprocess.TimeoutExpired:
            return 124, "", f"admin command timed out after {timeout:g} s"
        return done.returncode, done.stdout, done.stderr

    def stop(self) -> None:
        for name in reversed(list(self.cells)):  # sites first, the server last
            self.cells[name].stop()


# ---------------------------------------------------------------- the run
@dataclass
class JobEnd:
    id: str
    state: str
    error: str
    seconds: float
    rounds: int


class Soak:
    def __init__(self, d: Deployment, args: Any, token: str) -> None:
        self.d = d
        self.args = args
        self.token = token
        self.stop_event = threading.Event()
        self.jobs: list[JobEnd] = []
        self.submit_errors: list[str] = []
        self.kills: list[tuple[float, str]] = []
        self.orphans_seen: dict[int, list[float]] = {}  # stray training process: first, last seen
        self.orphans_max = 0

    # jobs, one after another
    def run_jobs(self, until: float) -> None:
        a = self.args
        while time.monotonic() < until:
            rc, out, err = self.d.admin(
                "submit",
                "tests._fl_scripts:small_recipe",
                "--rounds",
                str(a.rounds),
                "--min-responses",
                "2",
                "--deadline",
                str(a.deadline),
                timeout=60,
            )
            if rc != 0:
                self.submit_errors.append(err.strip().splitlines()[-1] if err.strip() else "")
                log(f"submit refused: {self.submit_errors[-1]!r}")
                time.sleep(2)
                continue
            job = json.loads(out.splitlines()[-1])["id"]
            self.jobs.append(self.follow(job, time.monotonic()))
            j = self.jobs[-1]
            log(
                f"[{time.monotonic() - self.t0:6.0f} s] job {j.id}: {j.state} in "
                f"{j.seconds:.1f} s, {j.rounds} rounds{f' ({j.error})' if j.error else ''}"
            )

    def follow(self, job: str, t: float) -> JobEnd:
        cap = t + self.args.job_cap
        while time.monotonic() < cap:
            left = cap - time.monotonic()
            rc, out, err = self.d.admin("wait", job, "--timeout", f"{left:.0f}", timeout=left + 30)
            rec = None
            if out.strip():
                try:
                    rec = json.loads(out.splitlines()[-1])
                except ValueError:
                    rec = None
            if rec and rec.get("state") in ("finished", "failed", "aborted"):
                return JobEnd(
                    job,
                    rec["state"],
                    str(rec.get("error") or ""),
                    time.monotonic() - t,
                    int(rec.get("rounds_done") or 0),
                )
            log(f"job {job}: wait ended without an end state (rc {rc}): {err.strip()[-200:]}")
            time.sleep(2)  # the server restarting, say
        self.d.admin("abort", job, timeout=60)
        return JobEnd(job, "stuck", "", time.monotonic() - t, 0)

    # chaos
    def run_killer(self) -> None:
        rng = random.Random(self.args.seed)
        victims = [n for n in self.d.cells if n != "server"]
        n = 0
        while not self.stop_event.wait(self.args.kill_every):
            n += 1
            every = self.args.kill_server_every
            name = "server" if every and n % every == 0 else rng.choice(victims)
            log(f"[{time.monotonic() - self.t0:6.0f} s] kill -9 {name}")
            self.d.cells[name].kill_and_restart(self.args.down)
            self.kills.append((time.monotonic() - self.t0, name))

    # sampling
    def run_sampler(self) -> None:
        while not self.stop_event.wait(self.args.sample_every):
            now = time.monotonic()
            cell_pids = set()
            for cell in self.d.cells.values():
                with cell.lock:
                    life = cell.lives[-1]
                cell_pids.add(life.pid)
                got = rss_and_fds(life.pid)
                if got is not None:
                    life.samples.append((now, *got))
            strays = [
                pid
                for pid, (ppid, cmd) in marked_processes(self.token).items()
                if "flare_async.fl.worker" in cmd and ppid not in cell_pids
            ]
            for pid in strays:
                self.orphans_seen.setdefault(pid, [now, now])[1] = now
            self.orphans_max = max(self.orphans_max, len(strays))

    def run(self) -> None:
        self.t0 = time.monotonic()
        until = self.t0 + self.args.minutes * 60
        threads = [
            threading.Thread(target=self.run_killer, daemon=True),
            threading.Thread(target=self.run_sampler, daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self.run_jobs(until)
        finally:
            self.stop_event.set()
            for t in threads:
                t.join(timeout=60)
        self.t_end = time.monotonic()


# ---------------------------------------------------------------- the report
def med3(values: list[int]) -> float:
    return float(statistics.median(values))


def judge(soak: Soak, orphans: dict[int, tuple[int, str]], load: tuple[float, float]) -> bool:
    a = soak.args
    ok = True
    warm_end = soak.t0 + 0.2 * (soak.t_end - soak.t0)
    for name, cell in soak.d.cells.items():
        best: tuple[Life, list[tuple[float, int, int]]] | None = None
        for life in cell.lives:
            if not life.samples:
                continue
            # a process's own warm-up: 20 % of its life, and at least --settle seconds (a cell
            # restarted on a loaded machine takes seconds to import, listen and connect)
            own = life.start + max(a.settle, 0.2 * (life.samples[-1][0] - life.start))
            kept = [s for s in life.samples if s[0] >= max(warm_end, own)]
            if best is None or len(kept) > len(best[1]):
                best = (life, kept)
        span = best[1][-1][0] - best[1][0][0] if best and best[1] else 0.0
        if best is None or len(best[1]) < 8 or span < a.min_span:
            log(f"{name}: no process lived long enough after warm-up to judge ({span:.0f} s)")
            line(
                bench="soak",
                case=f"rss-drift:{name}",
                metric="ratio",
                value=None,
                unit="B",
                judged=False,
                lives=len(cell.lives),
            )
            continue
        life, kept = best
        rss = [s[1] for s in kept]
        fds = [s[2] for s in kept]
        base = med3(rss[: max(3, len(rss) // 4)])
        last = med3(rss[-3:])
        ratio = last / base
        drift_ok = ratio <= 1 + a.rss_slack
        ok &= drift_ok
        line(
            bench="soak",
            case=f"rss-drift:{name}",
            metric="ratio",
            value=int(last),
            unit="B",
            baseline=int(base),
            ratio=round(ratio, 4),
            drift_pct=round((ratio - 1) * 100, 2),
            min=min(rss),
            max=max(rss),
            samples=len(rss),
            seconds=round(span),
            lives=len(cell.lives),
            ok=drift_ok,
        )
        first_fd, last_fd = med3(fds[:3]), med3(fds[-3:])
        fd_ok = last_fd - first_fd <= a.fd_slack
        ok &= fd_ok
        line(
            bench="soak",
            case=f"fd-growth:{name}",
            metric="fds",
            value=last_fd - first_fd,
            unit="fd",
            first=first_fd,
            last=last_fd,
            min=min(fds),
            max=max(fds),
            ok=fd_ok,
        )
    finished = [j for j in soak.jobs if j.state == "finished"]
    named = [
        j
        for j in soak.jobs
        if j.state in ("failed", "aborted") and j.error.strip().lower() not in GENERIC_ERRORS
    ]
    unnamed = [j for j in soak.jobs if j not in finished and j not in named]
    unnamed_submits = [e for e in soak.submit_errors if not e]
    reasons: dict[str, int] = {}
    for j in named:
        reasons[j.error[:120]] = reasons.get(j.error[:120], 0) + 1
    durations = sorted(j.seconds for j in finished)
    line(
        bench="soak",
        case="jobs_finished",
        metric="count",
        value=len(finished),
        unit="jobs",
        of=len(soak.jobs),
        median_s=round(statistics.median(durations), 2) if durations else None,
        max_s=round(durations[-1], 2) if durations else None,
    )
    line(
        bench="soak",
        case="jobs_failed_named",
        metric="count",
        value=len(named),
        unit="jobs",
        reasons=reasons,
    )
    line(
        bench="soak",
        case="jobs_unnamed_failures",
        metric="count",
        value=len(unnamed) + len(unnamed_submits),
        unit="jobs",
        jobs=[{"id": j.id, "state": j.state, "error": j.error} for j in unnamed],
        ok=not unnamed and not unnamed_submits,
    )
    ok &= not unnamed and not unnamed_submits
    line(
        bench="soak",
        case="submit_refused",
        metric="count",
        value=len(soak.submit_errors),
        unit="submits",
        reasons=sorted(set(soak.submit_errors))[:10],
    )
    kills: dict[str, int] = {}
    for _, name in soak.kills:
        kills[name] = kills.get(name, 0) + 1
    line(bench="soak", case="kills", metric="count", value=len(soak.kills), unit="kills", by=kills)
    line(
        bench="soak",
        case="stray_workers_during_run",
        metric="count",
        value=len(soak.orphans_seen),
        unit="processes",
        max_at_once=soak.orphans_max,
        max_seen_s=round(max((b - a for a, b in soak.orphans_seen.values()), default=0.0), 1),
    )
    line(
        bench="soak",
        case="orphans",
        metric="count",
        value=len(orphans),
        unit="processes",
        processes=[f"{pid} (parent {pp}): {cmd[:160]}" for pid, (pp, cmd) in orphans.items()],
        ok=not orphans,
    )
    ok &= not orphans
    line(
        bench="soak",
        case="loadavg",
        metric="load1",
        value=load[1],
        unit="load",
        start=load[0],
        end=load[1],
        cores=os.cpu_count(),
    )
    return ok


def main() -> int:
    p = parser("a deployment running jobs back to back while cells are killed")
    p.add_argument("--minutes", type=float, default=None, help="run time (default 10; quick 1)")
    p.add_argument("--kill-every", type=float, default=None, help="seconds (30; quick 15)")
    p.add_argument("--kill-server-every", type=int, default=0, metavar="N", help="0: never")
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deadline", type=float, default=30, help="seconds per round")
    p.add_argument("--down", type=float, default=1, help="seconds a killed cell stays down")
    p.add_argument("--sample-every", type=float, default=None, help="seconds (3; quick 1)")
    p.add_argument("--job-cap", type=float, default=240, help="seconds a job may take at most")
    p.add_argument("--rss-slack", type=float, default=0.05)
    p.add_argument("--fd-slack", type=int, default=8)
    p.add_argument("--settle", type=float, default=None, help="a process's own warm-up (20; 10)")
    p.add_argument("--min-span", type=float, default=None, help="seconds judged at least")
    p.add_argument("--keep", action="store_true", help="keep the run's folder (logs, jobs)")
    args = p.parse_args()
    args.minutes = args.minutes or (1.0 if args.quick else 10.0)
    args.kill_every = args.kill_every or (15.0 if args.quick else 30.0)
    args.sample_every = args.sample_every or (1.0 if args.quick else 3.0)
    args.settle = args.settle if args.settle is not None else (10 if args.quick else 20)
    args.min_span = args.min_span if args.min_span is not None else (15 if args.quick else 60)

    token = uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="flare-soak-"))
    load0 = os.getloadavg()[0]
    log(f"soak: {args.minutes:g} min, kill every {args.kill_every:g} s, folder {root}")
    log(f"load average {os.getloadavg()} on {os.cpu_count()} cores")
    d = Deployment(root, args.sites, token)
    soak = Soak(d, args, token)
    try:
        soak.run()
    finally:
        log("stopping the deployment")
        d.stop()
    time.sleep(3)  # a training process told to stop gets its grace period
    orphans = marked_processes(token)
    for pid in orphans:  # ours: leave nothing behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ok = judge(soak, orphans, (load0, os.getloadavg()[0]))
    if args.keep or not ok:
        log(f"run folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    log("soak: all criteria met" if ok else "soak: a hard criterion failed (see ok: false)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
