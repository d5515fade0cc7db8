"""``flare-async send KIT FILE|DIR --to CELL``: stream a file, or a checkpoint folder
(``flare_async.checkpoints``), to a cell's inbox with a progress bar, and the inbox's side
(``files/put`` and ``files/ckpt-*``), which ``flare-async run`` mounts on a site
(``JOBS/inbox`` with ``--jobs JOBS``, or ``--inbox DIR``).

The sending process joins the fabric for the length of the transfer: with an admin's kit as the
admin's session below the server (``server._admin-...``, as ``flare-async job`` does), with a
cell's kit as that cell, so use one whose cell is not running elsewhere (an operator's own site
kit, ``provision --add-site``): two cells claiming one name displace each other (and so do two
sessions of one admin at once).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TextIO, cast

import anyio
import msgspec

from flare_async import _logging
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream
from flare_async.checkpoints import SCHEMES, StoredCheckpoint, checkpoint_handlers, send_checkpoint
from flare_async.cli._kit import cell_from_kit, emit
from flare_async.cli._progress import AboveBar, ProgressBar
from flare_async.errors import BadRequest, ConfigError, FlareError, Unauthorized
from flare_async.security import Role, load_kit
from flare_async.streaming import ProgressMeter

INBOX_CHANNEL = "files"
INBOX_TOPIC = "put"


class Stored(msgspec.Struct, frozen=True):
    """What the inbox answers (JSON)."""

    name: str
    size: int
    digest: str
    """The file's digest as checked on arrival, text form (``"crc32c:<hex>"``...)."""


def safe_name(name: str) -> str:
    """The file name an inbox accepts: a plain name, no folders, nothing hidden or partial.

    Raises:
        BadRequest: anything else (the sender hears why).
    """
    plain = PurePosixPath(name.replace("\\", "/")).name
    if (
        not plain
        or plain != name
        or plain.startswith(".")
        or plain.endswith(".part")
        or "\x00" in plain
        or len(plain) > 255
    ):
        raise BadRequest(f"{name!r} is not an acceptable file name for the inbox")
    return plain


INCOMING = ".incoming-"
"""How the inbox names a file while it arrives (then ``.part``): hidden, so no name the inbox
accepts (:func:`safe_name`) can be one."""


def inbox_handlers(
    folder: Path, *, accepts: Callable[[str, str, str], bool] | None = None
) -> HandlerTable:
    """``files/put`` (stream): saves the object as ``folder/<name>`` (the ``name`` header),
    atomically and only once verified; answers JSON :class:`Stored`. ``files/ckpt-*``
    (:func:`~flare_async.checkpoints.checkpoint_handlers`): checkpoint folders into
    ``folder/<name>/``, under the same policy.

    ``accepts(src, "files", "put")`` (a site's policy, ``SitePolicy.accepts``) decides who may
    send; a sender it refuses gets ``Unauthorized`` before anything is written (a cell built
    with the same ``accept=`` refuses it earlier still).

    A name already in the inbox is refused (``BadRequest``, the file untouched) unless the
    sender says ``overwrite: 1`` (``send --overwrite``): checked when the stream opens, so
    nothing is sent in vain, and again when the file is put in place (a hard link, which
    fails if the name appeared meanwhile), so two senders of one name never overwrite each
    other by accident."""
    folder.mkdir(parents=True, exist_ok=True)
    table = HandlerTable("inbox")

    @table.stream(INBOX_CHANNEL, INBOX_TOPIC)
    async def put(ctx: Context, stream: IncomingStream) -> bytes:
        if accepts is not None and not accepts(stream.origin, INBOX_CHANNEL, INBOX_TOPIC):
            raise Unauthorized(
                f"{ctx.cell.name}'s policy does not accept files from {stream.origin}"
            )
        name = safe_name(stream.headers.get("name", ""))
        overwrite = stream.headers.get("overwrite", "") == "1"
        final = folder / name

        def taken() -> BadRequest:
            return BadRequest(
                f"{name} is already in {ctx.cell.name}'s inbox; send it with --overwrite to "
                "replace it"
            )

        if not overwrite and await anyio.to_thread.run_sync(os.path.lexists, final):
            raise taken()
        incoming = folder / f"{INCOMING}{secrets.token_hex(8)}"
        try:
            size = await stream.save(incoming, durable=True)
            replaced = await anyio.to_thread.run_sync(_place, incoming, final, overwrite)
        except FileExistsError:
            raise taken() from None
        finally:
            incoming.unlink(missing_ok=True)  # gone once placed; here also when cancelled
        emit(
            "stored", cell=ctx.cell.name, name=name, size=size, src=stream.origin, replaced=replaced
        )
        return msgspec.json.encode(Stored(name, size, stream.digest))

    def stored(ctx: Context, origin: str, done: StoredCheckpoint) -> None:
        emit(
            "stored",
            cell=ctx.cell.name,
            name=done.name,
            size=done.size,
            files=done.files,
            src=origin,
            replaced=done.replaced,
        )

    for d in checkpoint_handlers(folder, accepts=accepts, on_stored=stored):
        table.add(d.kind, d.channel, d.topic, d.fn)
    return table


def _place(incoming: Path, final: Path, overwrite: bool) -> bool:
    """Put the arrived file in place; whether it replaced one.

    Raises:
        FileExistsError: ``final`` exists and ``overwrite`` is false (nothing changed).
    """
    if overwrite:
        existed = os.path.lexists(final)
        os.replace(incoming, final)
        return existed
    try:
        os.link(incoming, final)  # never replaces: fails if the name was taken meanwhile
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name, then fill it
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(incoming, final)
    return False


@asynccontextmanager
async def sender_cell(kit_path: Path, connect_timeout: float = 30.0) -> AsyncIterator[Cell]:
    """The cell a transfer is sent from, linked to its parent: an admin kit's session below
    the server (``server._admin-...``, as ``flare-async job`` opens it), or a cell kit's own
    cell (which must not be running elsewhere)."""
    kit = load_kit(kit_path, now=datetime.now(UTC))
    if kit.role is Role.ADMIN:
        from flare_async.cli._job import admin_session  # noqa: PLC0415 - admins only

        async with admin_session(kit_path, connect_timeout=connect_timeout) as session:
            yield session.cell
        return
    async with cell_from_kit(kit) as cell:
        with anyio.move_on_after(connect_timeout) as waited:
            await cell.wait_parent()
        if waited.cancelled_caught:
            raise FlareError(f"cannot reach the parent at {kit.parent} ({connect_timeout:g} s)")
        yield cell


async def send(
    kit_path: Path,
    file: Path,
    size: int,
    dst: str,
    name: str,
    idle: float,
    digest: bool | str,
    overwrite: bool = False,
) -> dict[str, Any]:
    headers = {"name": name, **({"overwrite": "1"} if overwrite else {})}
    async with sender_cell(kit_path) as cell:
        bar = ProgressBar(sys.stderr, name)
        start = time.monotonic()
        try:
            reply = await cell.stream(
                dst,
                INBOX_CHANNEL,
                INBOX_TOPIC,
                file,
                headers=headers,
                progress=bar.update,
                idle=idle,
                digest=digest,
            )
        finally:
            bar.finish()  # the bar's line ends before anything else is written
        seconds = time.monotonic() - start
    stored = msgspec.json.decode(reply.tobytes(), type=Stored)
    return {
        "event": "sent",
        "to": dst,
        "name": stored.name,
        "size": size,
        "stored": stored.size,
        "digest": stored.digest,
        "seconds": round(seconds, 3),
        "rate": round(size / seconds) if seconds > 0 else None,
    }


async def send_folder(
    kit_path: Path,
    folder: Path,
    dsts: list[str],
    name: str,
    idle: float,
    quantize: str,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """A checkpoint folder to each of ``dsts``: one ``sent`` line each (or the error).

    Raises:
        FlareError: the one destination failed (with several: see each line's ``error``).
    """
    async with sender_cell(kit_path) as cell:
        bar = ProgressBar(sys.stderr, name)
        meter = ProgressMeter(time.monotonic, dsts[0] if len(dsts) == 1 else "*", 0, None)
        start = time.monotonic()

        def moved(done: int, total: int) -> None:
            meter.total = total
            bar.update(meter.update(done))

        try:
            outcomes = await send_checkpoint(
                cell,
                folder,
                dsts,
                name=name,
                quantize=quantize,
                overwrite=overwrite,
                idle=idle,
                progress=moved,
            )
        finally:
            bar.finish()
        seconds = time.monotonic() - start
    if len(dsts) == 1 and isinstance(outcomes[dsts[0]], BaseException):
        raise outcomes[dsts[0]]  # type: ignore[misc]
    lines: list[dict[str, Any]] = []
    for dst, outcome in outcomes.items():
        line: dict[str, Any] = {"event": "sent", "to": dst, "name": name}
        if isinstance(outcome, StoredCheckpoint):
            line |= {
                "files": outcome.files,
                "size": outcome.size,
                "quantized": quantize or None,
                "replaced": outcome.replaced,
                "seconds": round(seconds, 3),
                "rate": round(outcome.size / seconds) if seconds > 0 else None,
            }
        else:
            line |= {"event": "failed", "error": f"{type(outcome).__name__}: {outcome}"}
        lines.append(line)
    return lines


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "send", help="stream a file or a checkpoint folder to cells' inboxes, with a progress bar"
    )
    p.add_argument(
        "kit",
        help="the kit to send with: an admin's (a session below the server, as `job` opens), "
        "or a cell's that is not running elsewhere",
    )
    p.add_argument(
        "file",
        help="the file to send, or a folder: a checkpoint (a Hugging Face model's folder), "
        "each file with its SHA-256, stored as INBOX/NAME/ once whole",
    )
    p.add_argument(
        "--to",
        required=True,
        action="append",
        metavar="CELL",
        help="the receiving cell; a folder may go to several (--to A --to B), once through "
        "each relay",
    )
    p.add_argument("--name", default=None, help="the name at the inbox (default: the file's)")
    p.add_argument(
        "--quantize",
        choices=SCHEMES,
        default="",
        help="a folder's *.safetensors files travel in this codec, a slice of a tensor at a "
        "time, and are written back in their own dtypes (lossy; default: byte for byte)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a file of that name in the inbox (default: refuse, the file untouched)",
    )
    p.add_argument("--idle", type=float, default=60.0, help="seconds without progress to fail")
    p.add_argument(
        "--digest",
        choices=["crc32c", "blake3", "sha256"],
        default=None,
        help="the whole-file digest checked on arrival (default: crc32c, combined from the "
        "chunks' CRCs at no cost; blake3 or sha256 hash every byte once more at both ends)",
    )
    p.add_argument(
        "--no-digest", action="store_true", help="skip the whole-file digest (CRCs stay)"
    )


def run(args: Any) -> int:
    """Entry of ``flare-async send``: the ``sent`` line on stdout, status 0. A refusal or
    failure (a name already in the inbox, the site's policy, no route, a stalled transfer) is
    ``cli._main``'s to report: one line, ``flare-async send: error: BadRequest: ...``, status 1."""
    _logging.configure(json=False, level=30, stream=cast(TextIO, AboveBar(sys.stderr)))
    file = Path(args.file)
    name = args.name or file.resolve().name
    if file.is_dir():
        if args.digest or args.no_digest:  # not silently ignored
            raise ConfigError(
                "a folder's files travel with their SHA-256 (quantized ones with BLAKE3): "
                "--digest and --no-digest are for a single file"
            )
        lines = anyio.run(
            send_folder,
            Path(args.kit),
            file,
            args.to,
            name,
            args.idle,
            args.quantize,
            args.overwrite,
            backend_options={"use_uvloop": True},
        )
        for line in lines:
            sys.stdout.write(json.dumps(line) + "\n")
        return 1 if any(line["event"] == "failed" for line in lines) else 0
    if not file.is_file():
        raise ConfigError(f"{file} is not a file or a folder")
    if len(args.to) != 1 or args.quantize:
        raise ConfigError("a file goes to one cell, as it is (--quantize: folders only)")
    result = anyio.run(
        send,
        Path(args.kit),
        file,
        file.stat().st_size,
        args.to[0],
        name,
        args.idle,
        False if args.no_digest else (args.digest or True),
        args.overwrite,
        backend_options={"use_uvloop": True},
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
