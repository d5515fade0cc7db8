"""Jobs on a deployment, the site's side: a training process per job, started and stopped on
the server's word.

A site's cell (``flare-async run KIT --jobs DIR``) mounts :class:`SiteJobs`. When the server
starts a job (``job/start``), the site runs the job's training script in its own process
(``python -m flare_async.fl.worker``, its output in ``DIR/<job>/worker.log``) under a
:class:`ClientRuntime` of its own: tasks and results of several jobs never mix. When the job
ends the process ends with it; when the job is aborted (``job/abort``) or started again after a
server restart (a new attempt), the process gets SIGTERM at once and SIGKILL after a grace
period, and everything the job held on the site is freed.

A start is taken once per attempt for the job's whole life and after: every attempt started
here is kept in ``DIR/.starts.json`` (surviving a restart of the site), and the same start
again (a replayed message, or the server's own retry) starts nothing; an older attempt than
the last one started is refused, a newer one (the server restarted) replaces the old process.

A site never trusts itself to have heard of a job's end: on every (re)link it asks the server
which of its jobs still run (``job/active``) and stops every process the server does not list
at that attempt (a site unreachable when its job ended); and each process must be confirmed
by the server every ``lease`` seconds (asked every quarter lease), or it is stopped (the
server is gone). Both are audited (``job-orphaned``, ``job-lease-expired``).

Only the server may start, abort or read the logs of a job here.

Why one file past 500 lines: starts, their persisted record, reconciliation with the server
and the leases all act on the same running jobs; split apart they would share its privates.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from flare_async import _logging
from flare_async._files import write_atomic
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.codecs import as_numpy, encode
from flare_async.errors import BadRequest, ConfigError, FlareError, IntegrityError, Unauthorized
from flare_async.fl._artifact import CODE, JobCode, load_wire
from flare_async.fl._client import ClientRuntime
from flare_async.fl._jobs import CHANNEL
from flare_async.fl._model import FLModel
from flare_async.fl._privacy import SitePolicy
from flare_async.fl._signed import CHANNEL as FL_CHANNEL
from flare_async.security import AuditLog, SignatureVerifier, Signer, check_command

INBOX = "inbox"
"""The name a site's inbox has in its jobs folder (``flare-async run --jobs``): no job's."""

LOG_TAIL = 64 * 1024
"""How much of a job's worker log ``job logs --site`` returns (its end)."""

STARTS = ".starts.json"
"""The attempts started here, in the jobs DIR (no job id starts with a dot)."""

KEEP_STARTS = 24 * 3600.0
"""How long an ended job's start is remembered: far beyond the freshness window of a signed
start (``MAX_AGE``, 300 s), after which a replay is refused on its age alone."""


class _SiteJob:
    def __init__(self, job: str, attempt: int, runtime: ClientRuntime) -> None:
        self.job = job
        self.attempt = attempt
        self.runtime = runtime
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.pid: int | None = None
        self.since = time.monotonic()
        self.confirmed = self.since  # the start is the server's word that the job runs
        self.retiring = False


class SiteJobs:
    """A site's job runner. Mount :meth:`handlers` and run :meth:`run` beside the cell.

    ``SiteJobs.INBOX`` is the one name in the jobs folder that is no job's (the site's inbox
    under ``flare-async run --jobs``): a start naming it is refused.

    Args:
        cell: the site's cell.
        workdir: where each job's folder (its worker log) goes.
        server: the server cell's name.
        grace: seconds a training process gets to stop before it is killed.
        on_event: called with ``(event, fields)`` for job process starts and ends (the
            ``flare-async run`` event stream).
        audit: where job starts, aborts and refused commands are recorded.
        signer: signs every result of every job end to end (the site's kit).
        policy: the site's own rules (``policy.toml`` in its kit): whose jobs and which
            scripts run here, and the privacy filters forced on every result.
        verifier: checks the server certificate a job seals its results for (the CA).
        lease: seconds a job's process runs without the server confirming that the job still
            runs at that attempt (asked every quarter lease, and on every link-up); then it is
            stopped.
    """

    INBOX = INBOX

    def __init__(
        self,
        cell: Cell,
        workdir: str | os.PathLike[str],
        *,
        server: str = "server",
        grace: float = 10.0,
        on_event: Callable[..., None] | None = None,
        audit: AuditLog | None = None,
        signer: Signer | None = None,
        policy: SitePolicy | None = None,
        verifier: SignatureVerifier | None = None,
        lease: float = 120.0,
    ) -> None:
        if not 0 < lease < math.inf:  # NaN too
            raise ConfigError(f"lease must be a positive number of seconds, not {lease}")
        self.lease = lease
        self.verifier = verifier
        self.cell = cell
        self.audit = audit
        self.signer = signer
        self.policy = policy or SitePolicy()
        self.workdir = Path(workdir)
        self.server = server
        self.grace = grace
        self.on_event = on_event or (lambda event, **fields: None)
        self.jobs: dict[str, _SiteJob] = {}
        self.failed: dict[str, str] = {}
        """Jobs whose training script failed here, and why (the last 100): their tasks are
        refused with the script's own words."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._parent_up = anyio.Event()
        self._log = _logging.get_logger(cell=cell.name)
        self._starts = self._load_starts()

    def parent_up(self) -> None:
        """The link towards the server came (back) up: register again."""
        self._parent_up.set()

    def handlers(self) -> HandlerTable:
        table = HandlerTable("site jobs")

        @table.request(CHANNEL, "start")
        async def start(ctx: Context, msg: Payload) -> bytes:
            self._from_server(ctx, msg)
            try:
                spec = json.loads(msg.tobytes())
                job, attempt = str(spec["id"]), int(spec["attempt"])
                script, config = str(spec["script"]), dict(spec["config"])
                codec, digest = str(spec.get("codec", "tensors")), bool(spec.get("digest", True))
            except (ValueError, KeyError, TypeError) as exc:
                raise BadRequest(f"bad job start: {exc}") from None
            _check_job_id(job)
            submitter = str(spec.get("submitter", ""))
            encrypt_to = self._server_certificate(spec.get("encrypt_to"))
            code = self._job_code(spec.get("code"), job, submitter)
            why = None
            if not self.policy.may_submit(submitter):
                why = f"{submitter!r} may not run jobs on this site"
            elif not self.policy.may_run(script):
                why = f"the script {script!r} is not allowed on this site"
            elif code is not None and code.script != script:
                why = f"the job's code was packed for {code.script!r:.200}, not {script!r:.200}"
            elif code is not None:
                why = self.policy.refuses_code(code.admin, code.packages)
            if why is not None:
                self._audit("job-refused", job=job, submitter=submitter, script=script, why=why)
                raise Unauthorized(f"{self.cell.name}: {why}")
            if not self._first_start(job, attempt):  # checks and records it before any await
                self._log.info("job start repeated: nothing to do", job=job, attempt=attempt)
                return b"started"
            self._audit(
                "job-start",
                job=job,
                attempt=attempt,
                script=script,
                submitter=submitter,
                by=ctx.src,
                filters=self.policy.filters,
                code=code.digest if code is not None else "",
            )
            try:
                await self.start(
                    job,
                    attempt,
                    script,
                    config,
                    codec=codec,
                    digest=digest,
                    encrypt_to=encrypt_to,
                    code=code,
                )
            except BaseException as exc:
                self._ended(job, attempt, f"not started: {type(exc).__name__}: {exc}", "failed")
                raise
            return b"started"

        @table.request(CHANNEL, "abort")
        async def abort(ctx: Context, msg: Payload) -> bytes:
            self._from_server(ctx, msg)
            job = _job_id(msg)
            self._audit("job-abort", job=job, by=ctx.src)
            await self.stop(job)
            return b"aborted"

        @table.request(CHANNEL, "ping")
        async def ping(ctx: Context, msg: Payload) -> bytes:
            self._from_server(ctx, msg)
            return b"here"

        @table.request(CHANNEL, "logs")
        async def logs(ctx: Context, msg: Payload) -> bytes:
            self._from_server(ctx, msg)
            path = self.workdir / _job_id(msg) / "worker.log"
            return await anyio.to_thread.run_sync(_tail, path, LOG_TAIL)

        @table.stream(FL_CHANNEL, "task")
        async def task(ctx: Context, stream: IncomingStream) -> bytes:
            job = stream.headers.get("job", "")
            running = self.jobs.get(job)
            if running is None:
                if job in self.failed:
                    raise BadRequest(f"{self.cell.name} cannot train: {self.failed[job]}")
                raise BadRequest(f"no job {job!r:.80} runs here")
            return await running.runtime.take_task(stream)

        @table.stream(FL_CHANNEL, "handoff")
        async def handoff(ctx: Context, stream: IncomingStream) -> bytes:
            return await self._job_of(stream.headers).runtime.handoffs.take_stream(stream)

        @table.stream(FL_CHANNEL, "swarm_update")
        async def swarm_update(ctx: Context, stream: IncomingStream) -> bytes:
            return await self._job_of(stream.headers).runtime.in_swarm().take_update(stream)

        @table.stream(FL_CHANNEL, "swarm_model")
        async def swarm_model(ctx: Context, stream: IncomingStream) -> bytes:
            return await self._job_of(stream.headers).runtime.in_swarm().take_model(stream)

        @table.request(FL_CHANNEL, "secagg")
        async def secagg(ctx: Context, msg: Payload) -> bytes:
            running = self.jobs.get(ctx.headers.get("job", ""))
            if running is None:
                raise BadRequest(f"no job {ctx.headers.get('job', '')!r:.80} runs here")
            return await running.runtime.secagg_step(ctx.src, msg)

        @table.request(FL_CHANNEL, "stop")
        async def stop(ctx: Context, msg: Payload) -> bytes:
            if ctx.src != self.server:
                raise Unauthorized(f"only {self.server} stops jobs here, not {ctx.src}")
            running = self.jobs.get(ctx.headers.get("job", ""))
            if running is not None:
                running.runtime.stop()  # the script's loop ends; the process exits by itself
            return b"stopping"

        return table

    def _job_of(self, headers: Mapping[str, str]) -> _SiteJob:
        """The running job a message names (its ``job`` header).

        Raises:
            BadRequest: no such job runs here.
        """
        running = self.jobs.get(headers.get("job", ""))
        if running is None:
            raise BadRequest(f"no job {headers.get('job', '')!r:.80} runs here")
        return running

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, now=time.time(), **fields)

    # ------------------------------------------------------------ starts, kept on disk
    def _load_starts(self) -> dict[str, dict[str, Any]]:
        """The attempts started here before (``.starts.json``); one that was running when the
        site stopped ended with it."""
        path = self.workdir / STARTS
        try:
            doc = json.loads(path.read_text()) if path.exists() else {}
            starts = {
                str(job): {**rec, "attempt": int(rec["attempt"]), "state": str(rec["state"])}
                for job, rec in dict(doc).items()
            }
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self._log.error("unreadable record of job starts", path=str(path), error=str(exc))
            return {}
        for rec in starts.values():
            if rec["state"] == "running":
                rec.update(state="ended", outcome="the site stopped during it")
        return starts

    def _save_starts(self) -> None:
        """Write ``.starts.json`` atomically, forgetting ended jobs after :data:`KEEP_STARTS`."""
        old = time.time() - KEEP_STARTS
        for job in [j for j, r in self._starts.items() if r["state"] != "running"]:
            if float(self._starts[job].get("time", 0)) < old:
                del self._starts[job]
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.workdir / STARTS, json.dumps(self._starts, indent=1).encode())

    def _first_start(self, job: str, attempt: int) -> bool:
        """Whether this start of ``job`` is new, recorded on disk if it is (no await between
        the check and the record: two copies of one start cannot both pass).

        Raises:
            BadRequest: an older attempt than one started here, or this attempt could not
                start here.
        """
        seen = self._starts.get(job)
        if seen is not None and attempt < seen["attempt"]:
            raise BadRequest(
                f"attempt {attempt} of job {job} is older than attempt {seen['attempt']} "
                "started here"
            )
        if seen is not None and attempt == seen["attempt"]:
            if seen["state"] == "failed":
                raise BadRequest(f"attempt {attempt} of job {job}: {seen.get('outcome', '')}")
            return False
        self._starts[job] = {"attempt": attempt, "state": "running", "time": time.time()}
        self._save_starts()
        return True

    def _ended(self, job: str, attempt: int, outcome: str, state: str = "ended") -> None:
        seen = self._starts.get(job)
        if seen is None or seen["attempt"] != attempt:
            return  # a newer attempt took its place
        seen.update(state=state, outcome=outcome, time=time.time())
        try:
            self._save_starts()
        except OSError as exc:
            self._log.error("cannot record the end of a job", job=job, error=str(exc))

    def _job_code(self, doc: object, job: str, submitter: str) -> JobCode | None:
        """The job's own code in a start, checked here (never trusting the server for it):
        well formed, every file as its manifest says, signed by the submitting admin.

        Raises:
            BadRequest: malformed (audited).
            IntegrityError: changed, or not signed by the submitter (audited).
        """
        try:
            code = load_wire(doc, "the job's code")
            if code is not None:
                code.verify(self.verifier, now=datetime.now(UTC), admin=submitter)
        except (BadRequest, IntegrityError) as exc:
            self._audit("job-refused", job=job, submitter=submitter, why=str(exc))
            raise
        return code

    def _server_certificate(self, value: object) -> bytes | None:
        """The server certificate a job seals results for, checked against the CA."""
        if value is None:
            return None
        if self.verifier is None:
            raise BadRequest("this site cannot check a certificate to seal results for")
        try:
            der = base64.b64decode(str(value), validate=True)
        except ValueError as exc:
            raise BadRequest(f"bad certificate: {exc}") from None
        self.verifier.check_certificate(der, self.server, datetime.now(UTC))
        return der

    def _from_server(self, ctx: Context, msg: Payload) -> None:
        """Only the server manages jobs here; with a kit, only with its signature.

        Raises:
            Unauthorized: from another cell.
            IntegrityError: not signed by the server for this site, command and body, or
                issued too long ago (replayed).
        """
        if ctx.src != self.server:
            self._audit("refused", src=ctx.src, command=ctx.topic, why="not the server")
            raise Unauthorized(f"only {self.server} manages jobs here, not {ctx.src}")
        if self.verifier is None:
            return
        try:
            check_command(
                self.verifier,
                ctx.headers,
                src=self.server,
                cell=ctx.src,
                dst=ctx.cell.name,
                command=f"{ctx.channel}/{ctx.topic}",
                body=msg.tobytes(),
                now=datetime.now(UTC),
            )
        except IntegrityError as exc:
            self._audit("refused", src=ctx.src, command=ctx.topic, why=str(exc))
            raise

    async def run(self) -> None:
        """Register with the server whenever the link towards it comes up; run the jobs'
        processes. Runs until cancelled (which stops every job's process)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._keep_leases)
            try:
                while True:
                    self._parent_up = anyio.Event()  # a link-up from now on: register again
                    await self._register()
                    await self._reconcile()
                    await self._parent_up.wait()
            finally:
                self._tg = None
                for running in self.jobs.values():
                    running.scope.cancel()

    async def _register(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.cell.wait_parent()
                await self.cell.request(self.server, CHANNEL, "register", b"", timeout=10)
                return
            except FlareError as exc:
                self._log.info("registration failed, retrying", error=str(exc), delay=delay)
                await anyio.sleep(delay)
                delay = min(2 * delay, 10.0)

    async def _keep_leases(self) -> None:
        """Every quarter lease: ask the server about the running jobs, stop those it has not
        confirmed for a whole lease."""
        while True:
            await anyio.sleep(self.lease / 4)
            if self.jobs:
                await self._reconcile()
            now = time.monotonic()
            for job, running in list(self.jobs.items()):
                swarm = running.runtime.swarm
                if swarm is not None and swarm.final is None and swarm.alive(now):
                    running.confirmed = now  # no server in its data path: its rounds confirm
                if not running.retiring and now - running.confirmed > self.lease:
                    fields = {"job": job, "attempt": running.attempt, "lease": self.lease}
                    self._log.warning("job unconfirmed by the server: stopping it", **fields)
                    self._audit("job-lease-expired", **fields)
                    self.on_event("job-lease-expired", **fields)
                    self._retire(running)

    async def _reconcile(self) -> None:
        """Ask the server which of this site's jobs run, at which attempt (``job/active``);
        confirm those, stop every other (its end never reached this site)."""
        asked = time.monotonic()
        try:
            reply = await self.cell.request(
                self.server, CHANNEL, "active", b"", timeout=min(10.0, max(0.5, self.lease / 4))
            )
            active = {str(k): int(v) for k, v in dict(json.loads(reply.tobytes())).items()}
        except (FlareError, ValueError, TypeError) as exc:
            self._log.info("cannot ask the server which jobs run", error=str(exc))
            return
        for job, running in list(self.jobs.items()):
            if running.since > asked or running.retiring:
                continue  # started after the question: the answer may be older than the start
            if active.get(job) == running.attempt:
                running.confirmed = max(running.confirmed, asked)
                continue
            why = f"not running on the server at attempt {running.attempt}"
            if job in active:
                why += f" (it runs attempt {active[job]})"
            self._log.warning("orphaned job: stopping it", job=job, why=why)
            self._audit("job-orphaned", job=job, attempt=running.attempt, why=why)
            self.on_event("job-orphaned", job=job, attempt=running.attempt, why=why)
            self._retire(running)

    def _retire(self, running: _SiteJob) -> None:
        """Stop a job's process in the background: asked to end first (a job that ended
        meanwhile exits by itself), SIGTERM after the grace period, SIGKILL after another."""
        running.retiring = True

        async def retire() -> None:
            running.runtime.stop()
            with anyio.move_on_after(self.grace):
                await running.done.wait()
            running.scope.cancel()
            await running.done.wait()

        if self._tg is not None:
            self._tg.start_soon(retire)

    async def start(
        self,
        job: str,
        attempt: int,
        script: str,
        config: dict[str, Any],
        *,
        codec: str = "tensors",
        digest: bool = True,
        encrypt_to: bytes | None = None,
        code: JobCode | None = None,
    ) -> None:
        """Start the job's training process (idempotent for the same attempt; a new attempt
        replaces the old process). With ``code`` (checked by the caller) the process runs in
        the job's folder with the code in ``code/`` first on its path; that folder is removed
        when the process ends."""
        old = self.jobs.get(job)
        if old is not None and old.attempt == attempt and not old.done.is_set():
            return
        if old is not None:
            await self.stop(job)
        if self._tg is None:
            raise FlareError("the site's job runner is not running")
        runtime = ClientRuntime(
            self.cell,
            self.server,
            config=config,
            codec=codec,
            digest=digest,
            signer=self.signer,
            policy=self.policy,
            on_privacy=lambda dp: self._audit("privacy", job=job, **dp),
            encrypt_to=encrypt_to,
            task_verifier=self.verifier,
            job=job,
        )
        running = _SiteJob(job, attempt, runtime)
        self.jobs[job] = running
        folder = self.workdir / job
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise BadRequest(f"{job} names something else than a job's folder here")
        await anyio.to_thread.run_sync(lambda: folder.mkdir(parents=True, exist_ok=True))
        if code is not None:
            try:
                await anyio.to_thread.run_sync(code.install, folder / CODE)
            except OSError as exc:
                raise BadRequest(f"cannot write the job's code here: {exc}") from None
        self._tg.start_soon(self._run, running, script, folder, code is not None)

    async def _run(self, running: _SiteJob, script: str, folder: Path, shipped: bool) -> None:
        job = running.job

        def started(pid: int) -> None:
            running.pid = pid
            self.on_event("job-process", job=job, attempt=running.attempt, pid=pid)

        outcome = "finished"
        try:
            with running.scope:
                await running.runtime.run_subprocess(
                    script,
                    stop_timeout=self.grace,
                    log=folder / "worker.log",
                    on_start=started,
                    code=folder / CODE if shipped else None,
                    cwd=folder if shipped else None,
                )
            if running.runtime.failed is not None:  # even if the job's abort came after
                outcome = f"failed: {running.runtime.failed}"
            elif running.scope.cancel_called:
                outcome = "stopped"
        except Exception as exc:  # one job's failure never takes the site down
            outcome = f"failed: {type(exc).__name__}: {exc}"
            self._log.warning("job process failed", job=job, error=str(exc))
            await running.runtime.fail(f"training process failed: {type(exc).__name__}: {exc}")
        finally:
            final = running.runtime.swarm.final if running.runtime.swarm is not None else None
            if final is not None:  # a swarm's final model stays with every member
                with anyio.CancelScope(shield=True):
                    await _keep_final(folder / SWARM_FINAL, final)
            if shipped:  # the job's code goes with it (its log stays for ``job logs``);
                # here, not in a worker thread: this also runs as the site shuts down
                _remove_code(folder / CODE)
            if self.jobs.get(job) is running:
                del self.jobs[job]
            self._ended(job, running.attempt, outcome)
            if running.runtime.failed is not None:
                self.failed[job] = running.runtime.failed
                while len(self.failed) > 100:
                    del self.failed[next(iter(self.failed))]
            running.done.set()
            self.on_event("job-ended", job=job, attempt=running.attempt, outcome=outcome)

    async def stop(self, job: str) -> None:
        """Stop the job's training process (SIGTERM, SIGKILL after the grace period) and wait
        until it is gone."""
        running = self.jobs.get(job)
        if running is None:
            return
        running.runtime.stop()
        running.scope.cancel()
        await running.done.wait()


def _job_id(msg: Payload) -> str:
    try:
        job = str(json.loads(msg.tobytes())["id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadRequest(f"expected {{'id': JOB}}: {exc}") from None
    _check_job_id(job)
    return job


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _check_job_id(job: str) -> None:
    """A job id names a folder of the jobs folder: a plain name, and not the inbox's."""
    if not _JOB_ID.fullmatch(job) or job == INBOX:
        raise BadRequest(f"bad job id {job!r:.80}")


SWARM_FINAL = "swarm_final.safetensors"
"""A swarm job's final model, as this site got it, in the job's folder."""


async def _keep_final(path: Path, model: FLModel) -> None:
    params = {k: np.asarray(as_numpy(v)) for k, v in model.params.items()}
    try:
        await anyio.to_thread.run_sync(write_atomic, path, encode(params))
    except OSError as exc:
        _logging.get_logger().warning(
            "swarm's final model not kept", path=str(path), error=str(exc)
        )


def _remove_code(code: Path) -> None:
    shutil.rmtree(code, ignore_errors=True)


def _tail(path: Path, n: int) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read()


__all__ = ["SiteJobs"]
