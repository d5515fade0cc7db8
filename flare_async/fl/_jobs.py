"""Jobs on a deployment: the server's job service, its persisted store, and the lifecycle.

A job is a recipe (``MODULE:RECIPE``, importable on the server and on the sites) with a few
overrides (rounds, codec, sites...). An admin submits it to the server (``flare-async job
submit``); the server keeps every job in a folder of its own and runs it when it can::

    SUBMITTED -> RUNNING -> FINISHED | FAILED | ABORTED
                         -> INTERRUPTED (the server stopped) -> RUNNING when it starts again

Each state change is written to ``<store>/<job>/job.json`` (atomically) before anything acts on
it, with a line in ``<store>/<job>/events.jsonl`` (state changes, every round's outcome). The
global model is checkpointed after every round in ``<store>/<job>/checkpoints``. A server that
is stopped mid-job marks it ``INTERRUPTED``; one that dies finds it ``RUNNING``: either way,
when it starts again it runs the job again: the workflow
resumes after the last checkpointed round, and the sites start a fresh training process for the
new attempt. Aborting a job cancels its workflow and tells every site to stop the job's training
process (SIGTERM, then SIGKILL), freeing everything it held.

Sites announce themselves (``job/register``) whenever their link to the tree comes up; a server
that starts again asks the sites it knew (``job/ping``) instead of waiting for them. A site
asks which of its jobs run (``job/active``) on every link-up and every quarter of its lease,
and stops the processes of any other. A job runs
on the sites named at submission, or on every registered site.

Why one file past 500 lines: the store, the admin commands and the job lifecycle share the
job records and their locks (the admin bodies are typed in ``fl/_admin.py``); splitting the
store from the lifecycle is left to the redesign of issue 19.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import math
import os
import secrets
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from flare_async import _logging
from flare_async._files import write_atomic
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.errors import BadRequest, ConfigError, FlareError, IntegrityError, Unauthorized
from flare_async.fl._admin import JobRef, Logs, Metrics, Submit, decode_as
from flare_async.fl._artifact import CODE, JobCode, load_wire
from flare_async.fl._jobchannel import JobProcessError
from flare_async.fl._jobproc import BEAT, JobFacts, JobProcess, check_recipe
from flare_async.fl._server import FLServer, RoundFailed, RoundResult
from flare_async.fl._signed import CHANNEL as FL_CHANNEL
from flare_async.security import (
    AuditLog,
    Decryptor,
    Role,
    SignatureVerifier,
    Signer,
    check_command,
)
from flare_async.security._signing import CERT as SIG_CERT

CHANNEL = "job"
ARTIFACT = "artifact"
"""Where a job's own code is kept in its folder (``manifest.json``, ``signature.json``,
``code/``)."""
RUN_CODE = "code"
"""Where each attempt's job process loads it from: written anew from the checked copy."""


RIGHTS = frozenset({"submit", "code", "abort", "abort-any", "view"})
"""``code``: submit a job that brings its own code (which runs in the job's process on the
server, and on the sites whose policy allows it)."""


@dataclasses.dataclass(frozen=True)
class AdminRights:
    """Who may do what with jobs on this server (``admins.toml`` in the server's kit)::

        [rights]
        "alice@example.org" = ["submit", "code", "abort-any", "view"]
        "bob@example.org" = ["submit", "abort", "view"]   # abort: his own jobs only;
                                                            # only recipes installed here
        "org:hospital-a" = ["submit", "abort", "view"]    # admins of that organisation
        "*" = ["view"]                                      # every other admin

    Without the file every admin may do everything.
    """

    rights: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=lambda: {"*": RIGHTS})

    def of(self, admin: str, org: str = "") -> frozenset[str]:
        """The admin's own entry, else its organisation's (``"org:NAME"``), else ``"*"``."""
        for key in (admin, f"org:{org}" if org else None, "*"):
            if key is not None and key in self.rights:
                return self.rights[key]
        return frozenset()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AdminRights:
        """Read ``admins.toml`` (a missing file: everyone may do everything).

        Raises:
            ConfigError: not TOML, or an unknown right.
        """
        p = Path(path)
        if not p.exists():
            return cls()
        try:
            doc = tomllib.loads(p.read_text())
            table = {str(k): frozenset(str(r) for r in v) for k, v in doc["rights"].items()}
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{p}: {type(exc).__name__}: {exc}") from None
        unknown = set().union(*table.values()) - RIGHTS if table else set()
        if unknown:
            raise ConfigError(f"{p}: unknown rights {sorted(unknown)}; known: {sorted(RIGHTS)}")
        return cls(table)


class JobState(enum.StrEnum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"
    """The server stopped while the job ran: it resumes when the server starts again."""

    @property
    def done(self) -> bool:
        return self in (JobState.FINISHED, JobState.FAILED, JobState.ABORTED)


@dataclasses.dataclass
class JobRecord:
    """A job as the server keeps it (``job.json``)."""

    id: str
    recipe: str
    submitter: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    sites: list[str] = dataclasses.field(default_factory=list)
    state: JobState = JobState.SUBMITTED
    attempt: int = 0
    submitted: float = 0.0
    started: float | None = None
    ended: float | None = None
    rounds_done: int = 0
    rounds: int = 0
    """The rounds the job's workflow runs (known once its recipe loaded; 0 before)."""
    responded: int = 0
    """Sites that answered the last round."""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str = ""
    code: str = ""
    """The SHA-256 of the job's signed manifest when it brings its own code (kept in
    ``<store>/<job>/artifact``), else empty: the recipe is installed here and on the sites."""
    site_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    """Why each site that failed a round failed it, as it said (its script's exception)."""
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the workflow reported at its end beyond metrics: ``cross_site``, the cross-site
    evaluation's matrix (``job status JOB --matrix`` prints it)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> JobRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        rec = cls(**{k: v for k, v in doc.items() if k in fields})
        rec.state = JobState(rec.state)
        return rec


class JobStore:
    """The server's job folders: ``<root>/<job>/job.json``, ``events.jsonl``, ``checkpoints/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, job: str) -> Path:
        if not job or "/" in job or job.startswith("."):
            raise BadRequest(f"bad job id {job!r:.80}")
        return self.root / job

    def save(self, rec: JobRecord) -> None:
        """Write ``job.json`` atomically (a crash leaves the previous state)."""
        folder = self.folder(rec.id)
        folder.mkdir(exist_ok=True)
        write_atomic(folder / "job.json", json.dumps(rec.to_json(), indent=1).encode())

    def event(self, job: str, event: str, **fields: Any) -> None:
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields})
        with (self.folder(job) / "events.jsonl").open("a") as f:
            f.write(line + "\n")

    def load_all(self) -> list[JobRecord]:
        out = []
        for path in sorted(self.root.glob("*/job.json")):
            try:
                out.append(JobRecord.from_json(json.loads(path.read_text())))
            except (ValueError, TypeError) as exc:
                _logging.get_logger().error("unreadable job record", path=str(path), error=str(exc))
        return sorted(out, key=lambda r: r.submitted)

    def known_sites(self) -> list[str]:
        """Every site that ever registered with this server (``sites.json``)."""
        path = self.root / "sites.json"
        return list(json.loads(path.read_text())) if path.exists() else []

    def add_known_site(self, site: str) -> None:
        sites = sorted({*self.known_sites(), site})
        write_atomic(self.root / "sites.json", json.dumps(sites).encode())

    def add_metrics(self, job: str, recs: list[dict[str, Any]]) -> None:
        """Append tracked values to ``<job>/metrics.jsonl``, one record a line."""
        lines = "".join(json.dumps(r) + "\n" for r in recs)
        with (self.folder(job) / "metrics.jsonl").open("a") as f:
            f.write(lines)

    def metrics(
        self, job: str, *, site: str = "", key: str = "", limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """The job's tracked values (of one site, one key), the last ``limit`` of them."""
        path = self.folder(job) / "metrics.jsonl"
        if not path.exists():
            return []
        out: list[dict[str, Any]] = []
        with path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if (not site or rec.get("site") == site) and (not key or rec.get("key") == key):
                    out.append(rec)
                    if len(out) > 2 * limit:
                        del out[:-limit]
        return out[-limit:]

    def files(self, job: str) -> list[str]:
        """The job's files, relative to its folder (what ``download`` sends)."""
        folder = self.folder(job)
        return sorted(
            str(p.relative_to(folder))
            for p in folder.rglob("*")
            if p.is_file() and not p.name.endswith(".part")
        )


class JobManager:
    """The server's job service. Mount :meth:`handlers` on the server cell and run :meth:`run`
    beside it.

    Args:
        cell: the server cell.
        store: the folder holding the jobs.
        admin_of: the admin behind a cell name, or ``None`` if that cell is no admin (the
            deployment fills it from the certificates of admin links).
        max_running: jobs run at once (the rest wait, ``submitted``).
        site_wait: how long a job waits for enough of its sites to be registered.
        audit: where every admin command, refusal, state change and rejected result is
            recorded (hash-chained; ``flare-async audit verify``).
        verifier: every result must carry a valid end-to-end signature (the project CA).
        rights: which admin may submit, abort and view jobs (default: every admin all).
        org_of: an admin's organisation (from its certificate), for ``org:`` rights.
        certificate / decryptor: this server's certificate (DER, sent to the sites of jobs
            that seal their results) and the key to open them.
        signer: signs every task, so sites can check the model was not changed on the way.
        max_model_bytes: the most a job's process may send in one message (its model).
        hang_after: a job process that sends nothing for this long (not even its heartbeat:
            its event loop is blocked) is killed and its job fails.
        on_event: called with ``(event, fields)`` on every state change (``job-state``) and
            finished round (``job-round``, then ``job-checkpoint`` once it is saved): the
            ``flare-async run`` event stream.
    """

    def __init__(
        self,
        cell: Cell,
        store: str | os.PathLike[str],
        *,
        admin_of: Callable[[str], str | None],
        max_running: int = 1,
        site_wait: float = 60.0,
        digest: bool = True,
        on_event: Callable[..., None] | None = None,
        audit: AuditLog | None = None,
        verifier: SignatureVerifier | None = None,
        rights: AdminRights | None = None,
        org_of: Callable[[str], str] | None = None,
        certificate: bytes | None = None,
        decryptor: Decryptor | None = None,
        signer: Signer | None = None,
        max_model_bytes: int = 32 * 2**30,
        hang_after: float = 60.0,
    ) -> None:
        if not BEAT < hang_after < math.inf:  # NaN too: a hang must be longer than a beat
            raise ConfigError(f"hang_after must be seconds above {BEAT:g}, not {hang_after}")
        if max_model_bytes < 1:
            raise ConfigError(f"max_model_bytes must be positive, not {max_model_bytes}")
        self.max_model_bytes = max_model_bytes
        self.hang_after = hang_after
        self.signer = signer
        self.certificate = certificate
        self.decryptor = decryptor
        self.org_of = org_of or (lambda admin: "")
        self.cell = cell
        self.audit = audit
        self.verifier = verifier
        self.rights = rights or AdminRights()
        self.on_event = on_event or (lambda event, **fields: None)
        self.store = JobStore(store)
        self.admin_of = admin_of
        self.max_running = max_running
        self.site_wait = site_wait
        self.digest = digest
        self.jobs: dict[str, JobRecord] = {r.id: r for r in self.store.load_all()}
        self.sites: set[str] = set()
        self._servers: dict[str, FLServer] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._done: dict[str, anyio.Event] = {}
        self._wake = anyio.Event()
        self._sites_changed = anyio.Event()
        self._log = _logging.get_logger(cell=cell.name)

    # ------------------------------------------------------------------ the service
    def handlers(self) -> HandlerTable:
        table = HandlerTable("jobs")

        @table.request(CHANNEL, "register")
        async def register(ctx: Context, msg: Payload) -> bytes:
            """Only a cell provisioned as a site registers: on a deployment (``verifier``) the
            role its certificate names (the cell checked the request's signature with it), a
            relay's or an admin's is refused and nothing is stored. Without certificates the
            role cannot be proven; a cell that registered sites lie below relays for them."""
            why = None
            if self.admin_of(ctx.src) is not None:
                why = "an admin session is not a site"
            elif self.verifier is not None:
                try:
                    der = base64.b64decode(ctx.headers.get(SIG_CERT, ""), validate=True)
                    identity = self.verifier.check_certificate(der, ctx.src, datetime.now(UTC))
                except (ValueError, IntegrityError) as exc:
                    why = f"{ctx.src} registers without a site's certificate: {exc}"
                else:
                    if identity.role is not Role.CLIENT:
                        why = f"{ctx.src} is a {identity.role.value}, not a site"
            else:
                below = sorted(s for s in self.sites if s.startswith(ctx.src + "."))
                if below:
                    why = f"sites are registered below {ctx.src} ({below[0]}...): not a site"
            if why is not None:
                self._audit("refused", src=ctx.src, command=ctx.topic, why=why)
                raise (BadRequest if self.admin_of(ctx.src) is not None else Unauthorized)(why)
            self._registered(ctx.src)
            return b"registered"

        @table.request(CHANNEL, "active")
        async def active(ctx: Context, msg: Payload) -> bytes:
            """The asking site's jobs that run, at their attempts: it stops every other
            process of its own (a job whose end never reached it)."""
            if self.admin_of(ctx.src) is not None:
                raise BadRequest("an admin session is not a site")
            return json.dumps(self.active(ctx.src)).encode()

        @table.request(CHANNEL, "submit")
        async def submit(ctx: Context, msg: Payload) -> bytes:
            admin = self._admin(ctx, "submit", msg)
            req = decode_as(msg, Submit)
            if req.code is not None and "code" not in self.rights.of(admin, self.org_of(admin)):
                why = f"{admin} may not submit a job with its own code (the right 'code')"
                self._audit("refused", admin=admin, command=ctx.topic, why=why)
                raise Unauthorized(why)
            code = load_wire(req.code, "the job's code")
            rec = await self.submit(
                req.recipe,
                admin,
                overrides=dict(req.overrides),
                sites=list(req.sites),
                code=code,
            )
            return json.dumps(rec.to_json()).encode()

        @table.request(CHANNEL, "list")
        async def list_(ctx: Context, msg: Payload) -> bytes:
            self._admin(ctx, "view", msg, record=False)
            return json.dumps([r.to_json() for r in self.jobs.values()]).encode()

        @table.request(CHANNEL, "status")
        async def status(ctx: Context, msg: Payload) -> bytes:
            self._admin(ctx, "view", msg, record=False)
            return json.dumps(self._job(decode_as(msg, JobRef)).to_json()).encode()

        @table.request(CHANNEL, "abort")
        async def abort(ctx: Context, msg: Payload) -> bytes:
            ref = decode_as(msg, JobRef)
            found = self.jobs.get(ref.id)
            admin = self._admin(ctx, "abort", msg, job=found)  # before saying whether it exists
            if found is not None and found.state.done:
                raise BadRequest(f"job {found.id} already {found.state.value}: nothing to abort")
            rec = await self.abort(self._job(ref).id, by=admin)
            return json.dumps(rec.to_json()).encode()

        @table.request(CHANNEL, "logs")
        async def logs(ctx: Context, msg: Payload) -> bytes:
            self._admin(ctx, "view", msg)
            req = decode_as(msg, Logs)
            rec = self._job(req)
            if req.site:
                if req.site not in rec.sites:
                    raise BadRequest(f"{req.site:.200} is not a site of job {rec.id}")
                body = json.dumps({"id": rec.id}).encode()
                return (await self._to_site(req.site, "logs", body, timeout=30)).tobytes()
            path = self.store.folder(rec.id) / "events.jsonl"
            return await anyio.to_thread.run_sync(path.read_bytes) if path.exists() else b""

        @table.request(CHANNEL, "metrics")
        async def metrics(ctx: Context, msg: Payload) -> bytes:
            self._admin(ctx, "view", msg, record=False)
            req = decode_as(msg, Metrics)
            rec = self._job(req)
            found = await anyio.to_thread.run_sync(
                lambda: self.store.metrics(rec.id, site=req.site, key=req.key, limit=req.clamped)
            )
            return json.dumps(found).encode()

        @table.request(CHANNEL, "download")
        async def download(ctx: Context, msg: Payload) -> bytes:
            self._admin(ctx, "view", msg)
            rec = self._job(decode_as(msg, JobRef))
            names = self.store.files(rec.id)
            folder = self.store.folder(rec.id)
            for name in names:
                await self.cell.stream(
                    ctx.src,
                    CHANNEL,
                    "file",
                    folder / name,
                    headers={"job": rec.id, "name": name},
                    digest=self.digest,
                )
            return json.dumps(names).encode()

        # FL traffic of the running jobs, each to its own FLServer.
        @table.stream(FL_CHANNEL, "result")
        async def result(ctx: Context, stream: IncomingStream) -> bytes:
            server = self._servers.get(stream.headers.get("task", "").split(":", 1)[0])
            if server is None:
                return b"late"
            return await server.take_result(ctx.src, stream)

        @table.request(FL_CHANNEL, "metrics")
        async def tracked(ctx: Context, msg: Payload) -> bytes:
            server = self._servers.get(ctx.headers.get("job", ""))
            if server is None:
                raise BadRequest(f"no job {ctx.headers.get('job', '')!r:.80} runs here")
            return server.take_metrics(ctx.src, msg)

        @table.request(FL_CHANNEL, "failed")
        async def failed(ctx: Context, msg: Payload) -> bytes:
            task = ctx.headers.get("task", "")
            server = self._servers.get(task.split(":", 1)[0])
            return server.take_failure(ctx.src, task, msg) if server else b"late"

        return table

    def active(self, site: str) -> dict[str, int]:
        """``{job: attempt}`` of the jobs running on ``site``, as far as this server knows."""
        return {
            r.id: r.attempt
            for r in self.jobs.values()
            if r.state is JobState.RUNNING and site in r.sites
        }

    def _registered(self, site: str) -> None:
        self._log.info("site registered", site=site)
        self.sites.add(site)
        if site not in self.store.known_sites():
            self.store.add_known_site(site)  # a small file, here: two at once must not race
        self._sites_changed.set()
        self.on_event("site-registered", site=site)

    async def _probe(self, site: str) -> None:
        """Ask a site known from an earlier run whether it is there (after a restart of this
        server, sites below a relay whose link stayed up have no reason to register again)."""
        delay = 0.2
        with anyio.move_on_after(self.site_wait):
            while site not in self.sites:
                try:
                    await self._to_site(site, "ping", b"", timeout=10)
                except FlareError:
                    await anyio.sleep(delay)
                    delay = min(2 * delay, 5.0)
                    continue
                if site not in self.sites:
                    self._registered(site)

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, now=time.time(), **fields)

    def _admin(
        self,
        ctx: Context,
        need: str,
        msg: Payload,
        *,
        job: JobRecord | None = None,
        record: bool = True,
    ) -> str:
        """The admin behind the request, if it holds the right ``need`` (``abort`` of a job
        it did not submit needs ``abort-any``). Recorded in the audit log unless it only reads
        a job's state (``job wait`` polls it every second); refusals always are."""
        admin = self.admin_of(ctx.src)
        if admin is None:
            self._audit("refused", src=ctx.src, command=ctx.topic, why="not an admin")
            raise Unauthorized(f"{ctx.src} is not an admin")
        rights = self.rights.of(admin, self.org_of(admin))
        allowed = need in rights or (need == "abort" and "abort-any" in rights)
        if need == "abort" and "abort-any" not in rights and job is not None:
            allowed = allowed and job.submitter == admin
        if not allowed:
            why = f"{admin} may not {need}" + (f" job {job.id}" if job is not None else "")
            self._audit("refused", admin=admin, command=ctx.topic, why=why)
            raise Unauthorized(why)
        signature = self._check_signed_command(ctx, admin, msg)
        if record:
            self._audit("admin-command", admin=admin, command=ctx.topic, signature=signature)
        return admin

    def _check_signed_command(self, ctx: Context, admin: str, msg: Payload) -> str:
        """With a verifier (a deployment), every admin command is signed with the admin's key
        over the command and the SHA-256 of its body; the signature is kept in the audit log.

        Raises:
            IntegrityError: unsigned, or signed by someone else or for something else.
        """
        if self.verifier is None:
            return ""
        try:
            return check_command(
                self.verifier,
                ctx.headers,
                src=admin,
                cell=ctx.src,
                dst=self.cell.name,
                command=f"{ctx.channel}/{ctx.topic}",
                body=msg.tobytes(),
                now=datetime.now(UTC),
            )
        except IntegrityError as exc:
            self._audit("refused", admin=admin, command=ctx.topic, why=str(exc))
            raise

    def _job(self, ref: JobRef) -> JobRecord:
        rec = self.jobs.get(ref.id)
        if rec is None:
            raise BadRequest(f"no job {ref.id!r:.80}")
        return rec

    def _set(self, rec: JobRecord, state: JobState, **fields: Any) -> None:
        """Change a job's state: persisted first, then logged."""
        rec.state = state
        for k, v in fields.items():
            setattr(rec, k, v)
        self.store.save(rec)
        self.store.event(rec.id, "state", state=state.value, **fields)
        self._audit(
            "job-state", **{"job": rec.id, "attempt": rec.attempt, **fields}, state=state.value
        )
        self._log.info("job state", job=rec.id, state=state.value)
        self.on_event("job-state", job=rec.id, state=state.value, attempt=rec.attempt)

    async def submit(
        self,
        recipe: str,
        submitter: str,
        *,
        overrides: dict[str, Any] | None = None,
        sites: list[str] | None = None,
        code: JobCode | None = None,
    ) -> JobRecord:
        """Check and queue a job (with ``code``: the job's own, signed by ``submitter``,
        kept in the job's folder and loaded from there).

        Raises:
            BadRequest: the recipe does not load here, or an override is not allowed; the
                code is malformed or names another recipe.
            IntegrityError: the code is not signed by the submitter, or changed.
        """
        known = self.sites | set(self.store.known_sites())
        unknown = [s for s in sites or [] if s not in known]
        if unknown:
            why = (
                f"no site {', '.join(repr(s) for s in unknown)} ever registered here "
                f"(known: {', '.join(sorted(known)) or 'none yet'})"
            )
            self._audit("job-refused", recipe=recipe, by=submitter, why=why)
            raise BadRequest(f"job refused: {why}")
        job = f"{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}"
        where = None
        if code is not None and code.recipe != recipe:
            why = f"the job's code is for {code.recipe!r:.200}, not {recipe!r:.200}"
            self._audit("job-refused", recipe=recipe, by=submitter, why=why)
            raise BadRequest(f"job refused: {why}")
        try:
            if code is not None:
                code.verify(self.verifier, now=datetime.now(UTC), admin=submitter)
                where = self.store.folder(job) / ARTIFACT
                await anyio.to_thread.run_sync(code.write, where)
            # In a child process: the server never imports a job's code (a module that
            # crashes or hangs as it loads takes that process down, not the server).
            await check_recipe(recipe, dict(overrides or {}), code=where and where / CODE)
        except (ConfigError, BadRequest, IntegrityError, OSError) as exc:
            if where is not None:
                await anyio.to_thread.run_sync(_remove, self.store.folder(job))
            why = str(exc) if not isinstance(exc, OSError) else f"cannot keep its code: {exc}"
            self._audit("job-refused", recipe=recipe, by=submitter, why=why)
            if isinstance(exc, IntegrityError):
                raise
            raise BadRequest(f"job refused: {why}") from None
        rec = JobRecord(
            id=job,
            recipe=recipe,
            submitter=submitter,
            overrides=dict(overrides or {}),
            sites=list(sites or []),
            submitted=time.time(),
            code=code.digest if code is not None else "",
        )
        self.jobs[rec.id] = rec
        self._audit(
            "job-submitted", job=rec.id, recipe=recipe, by=submitter, overrides=rec.overrides
        )
        self._set(rec, JobState.SUBMITTED, submitter=submitter)
        self._wake.set()
        return rec

    async def abort(self, job: str, *, by: str) -> JobRecord:
        """Abort a job: queued, it never starts; running, its workflow is cancelled and its
        sites stop their training processes."""
        rec = self.jobs[job]
        if rec.state.done:
            return rec
        scope = self._scopes.get(job)
        if scope is None:
            self._set(rec, JobState.ABORTED, ended=time.time(), error=f"aborted by {by}")
            return rec
        rec.error = f"aborted by {by}"
        self._audit("job-abort", job=job, by=by)
        scope.cancel()
        await self._done[job].wait()  # set once the sites were told to stop
        return rec

    # ------------------------------------------------------------------ running jobs
    async def run(self) -> None:
        """Run jobs as they come, forever (cancel to stop). Jobs found ``running`` (the server
        died during them) run again from their last checkpoint."""
        async with anyio.create_task_group() as tg:
            for site in self.store.known_sites():
                tg.start_soon(self._probe, site)
            while True:
                running = len(self._scopes)
                for rec in sorted(self.jobs.values(), key=lambda r: (r.state, r.submitted)):
                    if running >= self.max_running:
                        break
                    if rec.state in (
                        JobState.RUNNING,
                        JobState.SUBMITTED,
                        JobState.INTERRUPTED,
                    ) and (rec.id not in self._scopes):
                        self._scopes[rec.id] = anyio.CancelScope()
                        self._done[rec.id] = anyio.Event()
                        tg.start_soon(self._run_job, rec)
                        running += 1
                await self._wake.wait()
                self._wake = anyio.Event()

    async def _run_job(self, rec: JobRecord) -> None:
        scope = self._scopes[rec.id]
        interrupted = False
        try:
            with scope:
                await self._attempt(rec)
        except anyio.get_cancelled_exc_class():
            interrupted = not scope.cancel_called  # the server stops (an abort ends here)
            raise
        except Exception as exc:  # any failure of a job fails that job, never the server
            self._log.error("job failed", job=rec.id, exc_info=exc)
            # A job process's failure already names what its workflow raised.
            named = isinstance(exc, JobProcessError)
            rec.error = str(exc) if named else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, RoundFailed):
                rec.site_errors.update(exc.failed)
        finally:
            with anyio.CancelScope(shield=True):
                if interrupted:
                    self._set(rec, JobState.INTERRUPTED, error="the server stopped during the job")
                else:
                    await self._finish(rec, aborted=scope.cancel_called)
            self._scopes.pop(rec.id, None)
            self._servers.pop(rec.id, None)
            self._wake.set()
            self._done[rec.id].set()

    async def _attempt(self, rec: JobRecord) -> None:
        folder = self.store.folder(rec.id)
        code = await anyio.to_thread.run_sync(self._code, rec)
        if code is not None:  # what was checked runs: a fresh copy for each attempt
            await anyio.to_thread.run_sync(code.install, folder / RUN_CODE)
        async with JobProcess.start(
            rec.id,
            rec.recipe,
            rec.overrides,
            log=folder / "job_process.log",
            max_bytes=self.max_model_bytes,
            hang_after=self.hang_after,
            code=folder / RUN_CODE if code is not None else None,
        ) as proc:
            facts = proc.facts
            if code is not None and facts.script != code.script:
                raise FlareError(
                    f"the recipe names the script {facts.script!r:.200}, its code was packed "
                    f"for {code.script!r:.200}"
                )
            sites = await self._wait_for_sites(rec, facts.min_clients)
            resumed = rec.state in (JobState.RUNNING, JobState.INTERRUPTED)
            self._set(
                rec,
                JobState.RUNNING,
                sites=sites,
                attempt=rec.attempt + 1,
                started=rec.started or time.time(),
                rounds=facts.rounds,
                error="",
            )
            if resumed:
                self.store.event(rec.id, "resumed", attempt=rec.attempt)
            started = await self._start_sites(rec, facts, code)
            server = FLServer(
                self.cell,
                started,
                job=rec.id,
                codec=facts.codec,
                digest=self.digest,
                decryptor=self.decryptor,
                signer=self.signer,
                hierarchical=facts.relay_aggregation
                and not facts.encrypt
                and any(s.rsplit(".", 1)[0] != self.cell.name for s in started),
                on_round=lambda result: self._round(rec, result),
                verifier=self.verifier,
                on_reject=lambda site, task, why: self._audit(
                    "result-rejected", job=rec.id, site=site, task=task, why=why
                ),
                on_metrics=lambda site, recs: self.store.add_metrics(rec.id, recs),
            )
            self._servers[rec.id] = server
            rec.metrics = await proc.run(
                server,
                checkpoints=str(folder / "checkpoints"),
                on_checkpoint=lambda rnd: self.on_event("job-checkpoint", job=rec.id, round=rnd),
            )
            rec.report = proc.report
        await server.stop_clients()
        self._set(rec, JobState.FINISHED, ended=time.time())

    def _round(self, rec: JobRecord, result: RoundResult) -> None:
        rec.rounds_done = result.round + 1
        rec.responded = len(result.responded)
        rec.metrics = result.mean_metrics()
        rec.site_errors.update(result.failed)
        self.store.save(rec)
        self.store.event(
            rec.id,
            "round",
            round=result.round,
            responded=result.responded,
            failed=result.failed,
            metrics=rec.metrics,
            late=result.late,
        )
        self.on_event("job-round", job=rec.id, round=result.round, responded=result.responded)

    async def _wait_for_sites(self, rec: JobRecord, min_clients: int) -> list[str]:
        """The job's sites once enough of them are registered (all named ones, or at least
        ``min_clients`` of any), waiting up to ``site_wait`` seconds."""
        with anyio.move_on_after(self.site_wait):
            while True:
                wanted = rec.sites or sorted(self.sites)
                ready = [s for s in wanted if s in self.sites]
                if len(ready) >= max(1, min_clients) and (
                    not rec.sites or len(ready) == len(rec.sites)
                ):
                    return rec.sites or ready
                self._sites_changed = anyio.Event()
                await self._sites_changed.wait()
        ready = [s for s in (rec.sites or sorted(self.sites)) if s in self.sites]
        if len(ready) < max(1, min_clients):
            raise FlareError(
                f"{len(ready)} sites registered within {self.site_wait:g} s, "
                f"{max(1, min_clients)} needed"
            )
        return rec.sites or ready

    def _code(self, rec: JobRecord) -> JobCode | None:
        """The job's own code as it was submitted (``None``: the recipe is installed).

        Raises:
            IntegrityError: the kept copy changed since (the sites would refuse it anyway).
        """
        if not rec.code:
            return None
        try:
            code = JobCode.read(self.store.folder(rec.id) / ARTIFACT)
        except (ConfigError, BadRequest) as exc:
            raise IntegrityError(f"the job's code is gone or damaged: {exc}") from None
        if code.digest != rec.code:
            raise IntegrityError("the job's code changed since it was submitted")
        return code

    async def _start_sites(
        self, rec: JobRecord, facts: JobFacts, code: JobCode | None = None
    ) -> list[str]:
        """Tell each site to start the job's training process (with the job's own code, if it
        brings some); the ones that fail to (a policy that refuses the job, a site gone) are
        left out of the job's sites, each with its reason in ``site_errors``.

        Raises:
            FlareError: fewer sites started than the recipe's ``min_clients`` (each one's
                reason named).
        """
        script = facts.script
        started: list[str] = []
        refused: dict[str, str] = {}
        # The code, encoded once for every site (up to ~22 MB of base64 each otherwise).
        code_json = json.dumps(code.to_wire()) if code is not None else None

        async def one(i: int, site: str) -> None:
            body = {
                "id": rec.id,
                "attempt": rec.attempt,
                "submitter": rec.submitter,
                "recipe": rec.recipe,
                "script": script,
                "codec": facts.codec,
                "digest": self.digest,
                "config": {**facts.config, "site_index": i, "sites": len(rec.sites)},
            }
            if facts.encrypt:
                if self.certificate is None:
                    raise FlareError("the job seals results but this server has no certificate")
                body["encrypt_to"] = base64.b64encode(self.certificate).decode()
            text = json.dumps(body)
            if code_json is not None:
                text = f'{text[:-1]}, "code": {code_json}}}'
            try:
                await self._to_site(site, "start", text.encode(), timeout=60)
                started.append(site)
            except FlareError as exc:
                self.store.event(rec.id, "site-not-started", site=site, error=str(exc))
                refused[site] = f"not started: {exc}"

        async with anyio.create_task_group() as tg:
            for i, site in enumerate(rec.sites):
                tg.start_soon(one, i, site)
        if refused:
            rec.site_errors.update(refused)
            rec.sites = sorted(started)
            self.store.save(rec)
        need = max(1, facts.min_clients)
        if len(started) < need:
            reasons = "; ".join(f"{site}: {why}" for site, why in sorted(refused.items()))
            raise FlareError(
                f"{len(started)} of {len(started) + len(refused)} sites started the job, "
                f"{need} needed ({reasons})"
            )
        return sorted(started)

    async def _finish(self, rec: JobRecord, *, aborted: bool) -> None:
        if aborted:
            self._set(rec, JobState.ABORTED, ended=time.time(), error=rec.error or "aborted")
        elif rec.state is not JobState.FINISHED:
            self._set(rec, JobState.FAILED, ended=time.time(), error=rec.error or "failed")
        if rec.sites and rec.state is not JobState.FINISHED:
            body = json.dumps({"id": rec.id}).encode()

            async def stop(site: str) -> None:
                try:
                    await self._to_site(site, "abort", body, timeout=20)
                except FlareError as exc:
                    self.store.event(rec.id, "site-not-stopped", site=site, error=str(exc))

            with anyio.move_on_after(30):
                async with anyio.create_task_group() as tg:
                    for site in rec.sites:
                        tg.start_soon(stop, site)

    async def _to_site(self, site: str, topic: str, body: bytes, *, timeout: float) -> Payload:
        """A command to a site. On a deployment the cell signs it (``Cell(signing=)``) and a
        site with a kit refuses it unsigned (``SiteJobs``), so no relay on the way can forge,
        change or replay a job start, abort or log request."""
        return await self.cell.request(site, CHANNEL, topic, body, timeout=timeout)


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


__all__ = ["CHANNEL", "JobManager", "JobRecord", "JobState", "JobStore"]
