"""``flare-async send KIT FILE --to CELL``: stream a file to a cell's inbox with a progress bar,
and ``flare-async run KIT --inbox DIR``'s receiving side.

The sending process joins the fabric as the kit's cell for the length of the transfer, so use a
kit whose cell is not running elsewhere (an operator's own site kit, ``provision --add-site``):
two cells claiming one name displace each other.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import msgspec

from flare_async import _logging
from flare_async.cell import Context, HandlerTable, IncomingStream
from flare_async.cli._kit import cell_from_kit, emit
from flare_async.cli._progress import ProgressBar
from flare_async.errors import BadRequest, ConfigError, FlareError
from flare_async.security import load_kit

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


def inbox_handlers(folder: Path) -> HandlerTable:
    """``files/put`` (stream): saves the object as ``folder/<name>`` (the ``name`` header),
    atomically and only once verified; answers JSON :class:`Stored`."""
    folder.mkdir(parents=True, exist_ok=True)
    table = HandlerTable("inbox")

    @table.stream(INBOX_CHANNEL, INBOX_TOPIC)
    async def put(ctx: Context, stream: IncomingStream) -> bytes:
        name = safe_name(stream.headers.get("name", ""))
        size = await stream.save(folder / name, durable=True)
        emit("stored", cell=ctx.cell.name, name=name, size=size, src=ctx.src)
        return msgspec.json.encode(Stored(name, size, stream.digest))

    return table


async def send(
    kit_path: Path, file: Path, size: int, dst: str, name: str, idle: float, digest: bool | str
) -> dict[str, Any]:
    kit = load_kit(kit_path, now=datetime.now(UTC))
    async with cell_from_kit(kit) as cell:
        with anyio.fail_after(30):
            await cell.wait_parent()
        bar = ProgressBar(sys.stderr, name)
        start = time.monotonic()
        reply = await cell.stream(
            dst,
            INBOX_CHANNEL,
            INBOX_TOPIC,
            file,
            headers={"name": name},
            progress=bar.update,
            idle=idle,
            digest=digest,
        )
        bar.finish()
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser("send", help="stream a file to a cell's inbox, with a progress bar")
    p.add_argument("kit", help="the kit to join as (its cell must not be running elsewhere)")
    p.add_argument("file", help="the file to send")
    p.add_argument("--to", required=True, metavar="CELL", help="the receiving cell")
    p.add_argument("--name", default=None, help="the name at the inbox (default: the file's)")
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
    _logging.configure(json=False, level=30)
    file = Path(args.file)
    name = args.name or file.name
    try:
        if not file.is_file():
            raise ConfigError(f"{file} is not a file")
        result = anyio.run(
            send,
            Path(args.kit),
            file,
            file.stat().st_size,
            args.to,
            name,
            args.idle,
            False if args.no_digest else (args.digest or True),
            backend_options={"use_uvloop": True},
        )
    except FlareError as exc:
        sys.stderr.write(f"\nflare-async send: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
