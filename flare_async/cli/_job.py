"""``flare-async job ...``: an admin's commands to the server's job service.

Every command opens a short session to the server with the admin's startup kit (``--kit``, or
``FLARE_ASYNC_KIT``): mutual TLS with the admin's certificate, under the session name the server
expects for that admin (``server._admin-...``); the server refuses job commands from anyone
else. Commands::

    flare-async job export MODULE:RECIPE DIR [--include PATH ...]
    flare-async job submit MODULE:RECIPE|DIR [--include PATH ...] [--installed]
                                         [--rounds N] [--codec C] [--sites A,B] [--wait]
    flare-async job list
    flare-async job status JOB
    flare-async job wait JOB [--timeout S]
    flare-async job abort JOB
    flare-async job logs JOB [--site SITE]
    flare-async job metrics JOB [--site SITE] [--key KEY] [--json]
    flare-async job download JOB [-o DIR]

``export`` packs the job's own code (the recipe's package, its script's, ``--include``d files)
into DIR, signed with the admin's key (``fl/_artifact.py``); ``submit`` sends such a folder, or
packs ``MODULE:RECIPE`` (or ``path/to/file.py:RECIPE``) the same way when its module is the
user's own, with the current folder first on the path as ``python -m`` has it. A recipe from an
installed package (or with ``--installed``) is sent by name: the server and sites must have it.

``submit``, ``status``, ``wait`` and ``abort`` print the job's record as JSON; ``wait`` (and
``submit --wait``) exit 0 when the job finished, 1 when it failed or was aborted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from flare_async import _logging
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream
from flare_async.cli._kit import kit_drivers, kit_verifier
from flare_async.cli._progress import RoundProgress
from flare_async.errors import BadRequest, ConfigError, FlareError
from flare_async.fl import JOB_CHANNEL, JobCode, is_own_code, pack_job, render_matrix
from flare_async.security import (
    MessageSigning,
    Role,
    SignatureVerifier,
    Signer,
    admin_cell_name,
    load_kit,
)


@dataclass
class AdminSession:
    """A cell speaking for an admin to the server; its cell signs every command with the
    admin's key (the server checks it and keeps the signature in its audit log)."""

    cell: Cell
    server: str
    signer: Signer

    async def call(self, topic: str, body: dict[str, Any]) -> Any:
        data = json.dumps(body).encode()
        reply = await self.cell.request(self.server, JOB_CHANNEL, topic, data, timeout=120)
        raw = reply.tobytes()
        return json.loads(raw) if topic != "logs" else raw


@asynccontextmanager
async def admin_session(
    kit_path: str | os.PathLike[str],
    *,
    downloads: Path | None = None,
    connect_timeout: float = 20.0,
) -> AsyncIterator[AdminSession]:
    """A session speaking for the admin of ``kit_path`` to its server.

    Raises:
        ConfigError: not an admin kit.
        FlareError: the server cannot be reached within ``connect_timeout``.
    """
    kit = load_kit(Path(kit_path), now=datetime.now(UTC))
    if kit.role is not Role.ADMIN or kit.parent is None:
        raise ConfigError(f"{kit_path} is not an admin kit with a server to reach")
    server = kit.parent_name or "server"
    tables = [_download_handlers(downloads)] if downloads is not None else []
    cell = Cell(
        admin_cell_name(server, kit.name),
        parent=kit.parent,
        drivers=kit_drivers(kit),
        handlers=tables,
        verify_peer=kit_verifier(kit),
        heartbeat=None,
        signing=MessageSigning(Signer(kit), SignatureVerifier.from_kit(kit)),
    )
    async with cell:
        with anyio.move_on_after(connect_timeout) as waited:
            await cell.wait_parent()
        if waited.cancelled_caught:
            raise FlareError(f"cannot reach the server at {kit.parent} ({connect_timeout:g} s)")
        yield AdminSession(cell, server, Signer(kit))


def _download_handlers(folder: Path) -> HandlerTable:
    table = HandlerTable("job download")

    @table.stream(JOB_CHANNEL, "file")
    async def file(ctx: Context, stream: IncomingStream) -> bytes:
        job, name = stream.headers.get("job", ""), stream.headers.get("name", "")

        def place() -> Path:
            target = download_target(folder, job, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            return download_target(folder, job, name)  # again, now that its folders exist

        target = await anyio.to_thread.run_sync(place)
        await stream.save(target)
        return b"saved"

    return table


def download_target(folder: Path, job: str, name: str) -> Path:
    """Where a downloaded file goes: ``folder/job/name``, confined to ``folder`` whatever the
    peer named (a client trusts no path it is sent, not even the server's).

    ``job`` is one plain name, ``name`` plain names joined by ``/``: none empty, ``.`` or
    ``..``, none with a backslash, NUL or other control character (so no absolute path); no
    part of the way (nor the ``.part`` file the download is written to first) may be a
    symlink, and the resolved target must lie inside the resolved ``folder``.

    Raises:
        BadRequest: the file would go anywhere else; nothing is written.
    """

    def refuse(why: str) -> BadRequest:
        return BadRequest(f"refusing file {name!r:.80} of job {job!r:.40}: {why}")

    parts = [job, *name.split("/")]
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or any(ord(c) < 32 for c in part):
            raise refuse(f"{part!r:.40} is not a plain file name")
    root = folder.resolve()
    target = root.joinpath(*parts)
    way = [root.joinpath(*parts[: i + 1]) for i in range(len(parts))]
    for here in [*way, target.with_name(target.name + ".part")]:
        if here.is_symlink():
            raise refuse(f"{here} is a symbolic link")
    if not target.resolve().is_relative_to(root):
        raise refuse(f"it would go outside {root}")
    return target


ENDED = ("finished", "failed", "aborted")


async def _wait(
    session: AdminSession, job: str, timeout: float | None, *, as_json: bool = False
) -> dict[str, Any]:
    """Poll the job's record until it ends (its last record). On stderr meanwhile: the
    rounds as a person follows them (round k of n, sites answered, elapsed and remaining
    time, the latest metrics: :class:`RoundProgress`), or with ``as_json`` one JSON line per
    change; at the end, why it failed and each site's own error."""
    seen: tuple[Any, ...] = ()
    progress: RoundProgress | None = None
    try:
        with anyio.fail_after(timeout):
            while True:
                rec: dict[str, Any] = await session.call("status", {"id": job})
                now = (rec["state"], rec["rounds_done"], rec.get("rounds", 0))
                if now != seen:
                    seen = now
                    if as_json:
                        line = {"job": job, "state": rec["state"], "rounds": rec["rounds_done"]}
                        _print_line({**line, "metrics": rec["metrics"]}, err=True)
                    elif progress is None:
                        if rec["state"] == "running" and rec.get("rounds"):
                            progress = RoundProgress(
                                rec["rounds"], out=sys.stderr, first=rec["rounds_done"]
                            )
                    elif rec["rounds_done"] > progress.done:
                        progress.update(
                            rec["rounds_done"],
                            responded=rec.get("responded", 0),
                            expected=len(rec["sites"]) or None,
                            metrics=rec["metrics"],
                            rounds=rec["rounds"],
                        )
                if rec["state"] in ENDED:
                    break
                await anyio.sleep(1.0)
    finally:
        if progress is not None:
            progress.close()
    if rec["state"] != "finished" and not as_json:
        sys.stderr.write(f"job {job} {rec['state']}: {rec.get('error') or 'no reason given'}\n")
        for site, why in sorted(rec.get("site_errors", {}).items()):
            sys.stderr.write(f"  {site}: {why}\n")
    return rec


def _print_line(doc: Any, *, err: bool = False) -> None:
    out = sys.stderr if err else sys.stdout
    out.write(json.dumps(doc) + "\n")
    out.flush()


SECURE_KNOBS = ("clip", "max_weight", "scale", "bits", "metrics", "clear_metrics", "clamp")


def secure_knobs(args: Any) -> dict[str, Any]:
    """The ``--secure-*`` options given, as ``SecureAggregation`` fields (any turns secure
    aggregation on; the fields not given take their defaults, not the recipe's)."""
    knobs = {k: getattr(args, f"secure_{k}", None) for k in SECURE_KNOBS}
    if knobs["metrics"] is not None:
        knobs["metrics"] = [m for m in knobs["metrics"].split(",") if m]
    return {k: v for k, v in knobs.items() if v is not None}


def job_code(args: Any, signer: Signer) -> tuple[str, JobCode | None]:
    """The recipe to submit and the code to ship with it: an exported folder as it is, the
    user's own module packed now, an installed one (or ``--installed``) by name only.

    Raises:
        ConfigError: the folder or the recipe does not load, or the code breaks a limit.
        BadRequest, IntegrityError: an exported folder edited after its export.
    """
    folder = Path(args.recipe)
    if (folder / "manifest.json").is_file():
        code = JobCode.read(folder)
        if code.admin != signer.name:
            raise ConfigError(f"{folder} was signed by {code.admin}, not by {signer.name}")
        return code.recipe, code
    if args.installed:
        return args.recipe, None
    if not is_own_code(args.recipe, Path.cwd()):
        return args.recipe, None
    code = pack_job(args.recipe, signer, include=args.include or ())
    sys.stderr.write(
        f"shipping {len(code.files)} files ({code.size} bytes) with the job: "
        f"{', '.join(code.packages)}\n"
    )
    return code.recipe, code


async def main_async(args: Any) -> int:
    if args.action == "export":
        kit = load_kit(Path(args.kit), now=datetime.now(UTC))
        if kit.role is not Role.ADMIN:
            raise ConfigError(f"{args.kit} is not an admin kit: a job is signed by an admin")
        code = pack_job(args.recipe, Signer(kit), include=args.include or ())
        code.write(Path(args.dir))
        sys.stdout.write(
            f"{args.dir}: {code.recipe}, {len(code.files)} files ({code.size} bytes), "
            f"packages {', '.join(code.packages)}, signed by {code.admin}\n"
        )
        return 0
    downloads = Path(args.out) if args.action == "download" else None
    async with admin_session(args.kit, downloads=downloads) as session:
        if args.action == "submit":
            overrides = {
                k: getattr(args, k)
                for k in (
                    "rounds",
                    "codec",
                    "min_clients",
                    "min_responses",
                    "deadline",
                    "relay_aggregation",
                    "secure",
                    "encrypt",
                )
                if getattr(args, k) is not None
            }
            knobs = secure_knobs(args)
            if knobs:
                overrides["secure"] = knobs
            sites = [s for s in (args.sites or "").split(",") if s]
            recipe, shipped = job_code(args, session.signer)
            body: dict[str, Any] = {"recipe": recipe, "overrides": overrides, "sites": sites}
            if shipped is not None:
                body["code"] = shipped.to_wire()
            rec = await session.call("submit", body)
            _print_line(rec)
            if not args.wait:
                return 0
            rec = await _wait(session, rec["id"], args.timeout, as_json=args.json)
            _print_line(rec)
            return 0 if rec["state"] == "finished" else 1
        if args.action == "list":
            for rec in await session.call("list", {}):
                sys.stdout.write(
                    f"{rec['id']:20s} {rec['state']:10s} {rec['rounds_done']:>4d} rounds  "
                    f"{rec['recipe']}  by {rec['submitter']}\n"
                )
            return 0
        if args.action == "status":
            rec = await session.call("status", {"id": args.job})
            if args.matrix is None:
                _print_line(rec)
                return 0
            cross = rec.get("report", {}).get("cross_site")
            if not cross:
                sys.stderr.write(f"job {args.job} has no cross-site evaluation (yet)\n")
                return 1
            sys.stdout.write(render_matrix(cross, args.matrix or None) + "\n")
            return 0
        if args.action == "wait":
            rec = await _wait(session, args.job, args.timeout, as_json=args.json)
            _print_line(rec)
            return 0 if rec["state"] == "finished" else 1
        if args.action == "abort":
            _print_line(await session.call("abort", {"id": args.job}))
            return 0
        if args.action == "metrics":
            body = {"id": args.job, "site": args.site or "", "key": args.key or ""}
            body["limit"] = args.limit
            for rec in await session.call("metrics", body):
                if args.json:
                    _print_line(rec)
                else:
                    step = "-" if rec.get("step") is None else rec["step"]
                    sys.stdout.write(f"{rec['site']}  {rec['key']}  {step}  {rec['value']}\n")
            return 0
        if args.action == "logs":
            body = {"id": args.job, **({"site": args.site} if args.site else {})}
            sys.stdout.buffer.write(await session.call("logs", body))
            return 0
        names = await session.call("download", {"id": args.job})
        for name in names:
            sys.stdout.write(f"{Path(args.out) / args.job / name}\n")
        return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("job", help="submit and manage jobs on a deployment (admin)")
    p.add_argument(
        "--kit",
        default=os.environ.get("FLARE_ASYNC_KIT"),
        help="the admin's startup kit (default: $FLARE_ASYNC_KIT)",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser("export", help="pack a job with its own code, signed, into DIR")
    e.add_argument("recipe", help="MODULE:NAME (or path/to/file.py:NAME) of a recipe")
    e.add_argument("dir", help="the folder to write (must not exist, or be empty)")
    s = actions.add_parser("submit", help="submit a job: MODULE:RECIPE or an exported DIR")
    s.add_argument(
        "recipe",
        help="MODULE:NAME (or path/to/file.py:NAME) of a recipe, or a folder job export wrote",
    )
    s.add_argument(
        "--installed",
        action="store_true",
        help="the recipe is installed on the server and every site: send its name only",
    )
    for parser in (e, s):
        parser.add_argument(
            "--include",
            action="append",
            metavar="PATH",
            help="a file or folder (relative to here) the job's code needs besides the "
            "recipe's and script's packages (repeatable)",
        )
    s.add_argument("--rounds", type=int)
    s.add_argument("--codec")
    s.add_argument("--min-clients", dest="min_clients", type=int)
    s.add_argument("--min-responses", dest="min_responses", type=int)
    s.add_argument("--deadline", type=float, help="seconds per round")
    s.add_argument(
        "--no-relay-aggregation",
        dest="relay_aggregation",
        action="store_const",
        const=False,
        default=None,
        help="relays only forward; the server checks every site's signature",
    )
    s.add_argument(
        "--secure",
        action="store_const",
        const=True,
        default=None,
        help="secure aggregation: the server learns only the sum of the sites' results",
    )
    for flag, kind, text in (
        ("clip", float, "every value a site sends is within +-CLIP (default 1024)"),
        ("max-weight", float, "the largest num_samples a site may weigh its result with (2^20)"),
        ("scale", float, "fixed point: values travel as round(weight * value * SCALE) (2^16)"),
        ("bits", int, "the ring: 64 (default) or 32 (half the bytes, far less range)"),
        ("metrics", str, "comma-separated metric names averaged inside the masked sum"),
    ):
        s.add_argument(
            f"--secure-{flag}",
            dest=f"secure_{flag.replace('-', '_')}",
            type=kind,
            help=f"secure aggregation (implies --secure): {text}",
        )
    for flag, text in (
        ("clamp", "sites clip values beyond the clip instead of refusing their result"),
        ("clear-metrics", "every site's metrics travel in clear beside its masked vector"),
    ):
        s.add_argument(
            f"--secure-{flag}",
            dest=f"secure_{flag.replace('-', '_')}",
            action="store_const",
            const=True,
            default=None,
            help=f"secure aggregation (implies --secure): {text}",
        )
    s.add_argument(
        "--encrypt",
        action="store_const",
        const=True,
        default=None,
        help="seal results for the server's key: relays forward what they cannot read",
    )
    s.add_argument("--sites", help="comma-separated site names (default: every registered one)")
    s.add_argument("--wait", action="store_true", help="wait for the job to end")
    s.add_argument("--timeout", type=float, default=None, help="with --wait: give up after")
    s.add_argument(
        "--json", action="store_true", help="with --wait: a JSON line per change, no progress"
    )
    actions.add_parser("list", help="every job on the server")
    st = actions.add_parser("status", help="a job's record")
    st.add_argument("job")
    st.add_argument(
        "--matrix",
        nargs="?",
        const="",
        metavar="METRIC",
        help="print the cross-site evaluation's matrix (one metric: the first, or METRIC)",
    )
    actions.add_parser("abort", help="abort a job").add_argument("job")
    w = actions.add_parser("wait", help="wait until a job ends")
    w.add_argument("job")
    w.add_argument("--timeout", type=float, default=None)
    w.add_argument("--json", action="store_true", help="a JSON line per change, no progress")
    lg = actions.add_parser("logs", help="a job's event log, or a site's training log")
    lg.add_argument("job")
    lg.add_argument("--site", help="the site whose training process log to show")
    m = actions.add_parser("metrics", help="the values the job's scripts tracked")
    m.add_argument("job")
    m.add_argument("--site", help="one site's values only")
    m.add_argument("--key", help="one key's values only")
    m.add_argument("--limit", type=int, default=10_000, help="the last N values (default 10000)")
    m.add_argument("--json", action="store_true", help="one JSON record a line")
    d = actions.add_parser("download", help="a job's files: record, events, checkpoints")
    d.add_argument("job")
    d.add_argument("-o", "--out", default=".", help="where to put JOB/ (default .)")


def run(args: Any) -> int:
    _logging.configure(json=False, level=30)
    if not args.kit:
        sys.stderr.write("flare-async job: give the admin kit with --kit or FLARE_ASYNC_KIT\n")
        return 2
    try:
        status: int = anyio.run(main_async, args, backend_options={"use_uvloop": True})
    except TimeoutError:  # --timeout of submit --wait or wait: the job itself goes on
        raise FlareError(
            f"gave up waiting after {args.timeout:g} s; the job goes on (job wait JOB)"
        ) from None
    return status  # a FlareError is cli._main's to report: one line, status 1
