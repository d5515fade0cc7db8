"""Jobs on a deployment, the site's side: a training process per job, started and stopped on
the server's word.

A site's cell (``flare-async run KIT --jobs DIR``) mounts :class:`SiteJobs`. When the server
starts a job (``job/start``), the site runs the job's training script in its own process
(``python -m flare_async.fl.worker``, its output in ``DIR/<job>/worker.log``) under a
:class:`ClientRuntime` of its own: tasks and results of several jobs never mix. When the job
ends the process ends with it; when the job is aborted (``job/abort``) or started again after a
server restart (a new attempt), the process gets SIGTERM at once and SIGKILL after a grace
period, and everything the job held on the site is freed.

Only the server may start, abort or read the logs of a job here.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from flare_async import _logging
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.errors import BadRequest, FlareError, IntegrityError, Unauthorized
from flare_async.fl._client import ClientRuntime
from flare_async.fl._jobs import CHANNEL
from flare_async.fl._privacy import SitePolicy
from flare_async.fl._signed import CHANNEL as FL_CHANNEL
from flare_async.security import AuditLog, SignatureVerifier, Signer, check_command

LOG_TAIL = 64 * 1024
"""How much of a job's worker log ``job logs --site`` returns (its end)."""


class _SiteJob:
    def __init__(self, job: str, attempt: int, runtime: ClientRuntime) -> None:
        self.job = job
        self.attempt = attempt
        self.runtime = runtime
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.pid: int | None = None


class SiteJobs:
    """A site's job runner. Mount :meth:`handlers` and run :meth:`run` beside the cell.

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
    """

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
    ) -> None:
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
            if "/" in job or job.startswith("."):
                raise BadRequest(f"bad job id {job!r:.80}")
            submitter = str(spec.get("submitter", ""))
            encrypt_to = self._server_certificate(spec.get("encrypt_to"))
            why = None
            if not self.policy.may_submit(submitter):
                why = f"{submitter!r} may not run jobs on this site"
            elif not self.policy.may_run(script):
                why = f"the script {script!r} is not allowed on this site"
            if why is not None:
                self._audit("job-refused", job=job, submitter=submitter, script=script, why=why)
                raise Unauthorized(f"{self.cell.name}: {why}")
            self._audit(
                "job-start",
                job=job,
                attempt=attempt,
                script=script,
                submitter=submitter,
                by=ctx.src,
                filters=self.policy.filters,
            )
            await self.start(
                job, attempt, script, config, codec=codec, digest=digest, encrypt_to=encrypt_to
            )
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

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, now=time.time(), **fields)

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
            try:
                while True:
                    self._parent_up = anyio.Event()  # a link-up from now on: register again
                    await self._register()
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
    ) -> None:
        """Start the job's training process (idempotent for the same attempt; a new attempt
        replaces the old process)."""
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
        await anyio.to_thread.run_sync(lambda: folder.mkdir(parents=True, exist_ok=True))
        self._tg.start_soon(self._run, running, script, folder)

    async def _run(self, running: _SiteJob, script: str, folder: Path) -> None:
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
            if self.jobs.get(job) is running:
                del self.jobs[job]
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
    if "/" in job or job.startswith("."):
        raise BadRequest(f"bad job id {job!r:.80}")
    return job


def _tail(path: Path, n: int) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read()


__all__ = ["SiteJobs"]
