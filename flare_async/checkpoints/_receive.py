"""The receiving side of a checkpoint transfer: ``files/ckpt-open``, ``files/ckpt-file`` (one
per file) and ``files/ckpt-commit``, all three streams (docs/llm.md, "The protocol"): a stream
fans out through relays as one, and takes the same path as ``files/put`` (an admin's session
sends streams to sites; its requests are the server's alone).

Files are kept in a hidden staging folder named by the manifest's id (``.incoming-ckpt-<id>``),
each written beside it (``.incoming-ckpt-<id>-<random>``) and put there only once it arrived
whole and matched (a lossless file: the SHA-256 the manifest announced, computed here; a
quantized one: its stream's BLAKE3, every tensor written). The manifest is kept beside it too
(``.incoming-ckpt-<id>.json``), so a transfer goes on after this cell restarted; announcing
the same manifest again answers which files are already there, so a transfer that failed part
way resumes with the files it lacks. The commit renames the folder into place in one step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec

from flare_async.cell import Context, HandlerTable, IncomingStream
from flare_async.checkpoints._manifest import FileEntry, Manifest, check_manifest, check_path
from flare_async.checkpoints._quantized import ShardWriter
from flare_async.errors import BadRequest, DecodeError, Unauthorized

CHANNEL = "files"
_ID = re.compile("[0-9a-f]{32}")
STRONG = ("blake3:", "sha256:")
"""The digests a quantized file may arrive with (cryptographic: not the CRC-32C default)."""
OPEN, FILE, COMMIT = "ckpt-open", "ckpt-file", "ckpt-commit"
STAGING = ".incoming-ckpt-"
MAX_OPEN = 32
"""Manifests a receiver remembers between their open and commit (oldest forgotten first)."""
MAX_MANIFEST = 64 << 20
"""The largest manifest a receiver reads (quantized files carry their headers in it)."""
MAX_OPEN_BYTES = 256 << 20
"""Bytes of manifests a receiver remembers in all (oldest forgotten first)."""


@dataclass
class _Open:
    """A manifest between its open and its commit, as the handlers use it."""

    manifest: Manifest
    size: int
    """Its bytes as announced (for :data:`MAX_OPEN_BYTES`)."""
    files: dict[str, FileEntry] = field(init=False)
    """Its files by path."""

    def __post_init__(self) -> None:
        self.files = {f.path: f for f in self.manifest.files}


class Opened(msgspec.Struct, frozen=True):
    """The answer to ``ckpt-open`` (JSON)."""

    id: str
    have: tuple[str, ...]
    """Files already verified in staging from an earlier attempt: not sent again."""


class StoredCheckpoint(msgspec.Struct, frozen=True):
    """The answer to ``ckpt-commit`` (JSON): the folder is in place."""

    name: str
    files: int
    size: int
    replaced: bool


def checkpoint_handlers(
    folder: Path,
    *,
    accepts: Callable[[str, str, str], bool] | None = None,
    durable: bool = True,
    on_stored: Callable[[Context, str, StoredCheckpoint], None] | None = None,
    stale_after: float = 7 * 86400.0,
) -> HandlerTable:
    """Take checkpoint folders into ``folder/<name>/`` (a site's inbox). ``accepts(src,
    "files", topic)`` is the site's policy, as for ``files/put``: the same ``files/*`` rules
    decide who may send files and checkpoints. What an abandoned transfer left (its staging
    folder, a file that was arriving) is removed at the next open once untouched for
    ``stale_after`` seconds (a week); before that, sending the same folder again resumes it.
    ``on_stored(ctx, origin, stored)`` is called once a folder is in place (``flare-async
    run`` writes its ``stored`` event line)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = HandlerTable("checkpoints")
    opened: OrderedDict[str, _Open] = OrderedDict()  # by id
    committing = anyio.Lock()  # one commit at a time: renames of one name never interleave

    def admit(ctx: Context, stream: IncomingStream) -> None:
        # By origin: a stream fanned out by a relay above comes from the relay (src).
        if accepts is not None and not accepts(stream.origin, CHANNEL, stream.topic):
            raise Unauthorized(
                f"{ctx.cell.name}'s policy does not accept files from {stream.origin}"
            )

    def remember(mid: str, manifest: Manifest, size: int) -> _Open:
        opened[mid] = entry = _Open(manifest, size)
        opened.move_to_end(mid)
        while len(opened) > MAX_OPEN or sum(o.size for o in opened.values()) > MAX_OPEN_BYTES:
            opened.popitem(last=False)  # (still on disk: read again when needed)
        return entry

    async def known(mid: str) -> _Open:
        """The open manifest ``mid``: remembered, or kept beside its staging folder (by an
        open before this cell restarted, or before it was forgotten for newer ones)."""
        entry = opened.get(mid)
        if entry is not None:
            return entry
        kept = folder / f"{STAGING}{mid}.json"
        if _ID.fullmatch(mid) is not None and await anyio.to_thread.run_sync(kept.is_file):
            data = await anyio.to_thread.run_sync(kept.read_bytes)
            manifest = await anyio.to_thread.run_sync(_read_manifest, data)
            if manifest.id == mid:
                return remember(mid, manifest, len(data))
        raise BadRequest(f"checkpoint {mid!r} is not open here (send {OPEN} first)")

    def taken(ctx: Context, name: str) -> BadRequest:
        return BadRequest(
            f"{name} is already in {ctx.cell.name}'s inbox; send it with --overwrite to replace it"
        )

    async def body(stream: IncomingStream, limit: int) -> bytes:
        if stream.size is None or stream.size > limit:
            raise BadRequest(f"{stream.topic} takes a body of known size up to {limit} B")
        return (await stream.read_all()).tobytes()

    @table.stream(CHANNEL, OPEN)
    async def open_(ctx: Context, stream: IncomingStream) -> bytes:
        admit(ctx, stream)
        data = await body(stream, MAX_MANIFEST)
        manifest = await anyio.to_thread.run_sync(_read_manifest, data)  # linear, off the loop
        exists = await anyio.to_thread.run_sync(os.path.lexists, folder / manifest.name)
        if exists and not manifest.overwrite:
            raise taken(ctx, manifest.name)
        mid = manifest.id
        staging = folder / f"{STAGING}{mid}"
        await anyio.to_thread.run_sync(_sweep, folder, staging.name, stale_after)
        have = await anyio.to_thread.run_sync(_staged, staging, manifest, True)
        kept = folder / f"{STAGING}{mid}.json"  # survives a restart of this cell
        await anyio.to_thread.run_sync(_keep, kept, data)
        remember(mid, manifest, len(data))
        return msgspec.json.encode(Opened(mid, have))

    @table.stream(CHANNEL, FILE)
    async def file(ctx: Context, stream: IncomingStream) -> bytes:
        admit(ctx, stream)
        mid = stream.headers.get("id", "")
        announced = await known(mid)
        path = stream.headers.get("path", "")
        entry = announced.files.get(path)
        if entry is None:
            raise BadRequest(f"{path!r} is not a file of checkpoint {announced.manifest.name}")
        if stream.codec != entry.quant:
            raise BadRequest(
                f"{path!r} is announced in {entry.quant or 'bytes'}, not {stream.codec}"
            )
        staging = folder / f"{STAGING}{mid}"
        # Beside the staging folder, not in it: what a crash leaves there is never committed.
        incoming = folder / f"{STAGING}{mid}-{secrets.token_hex(8)}"
        try:
            if entry.quant:
                writer = ShardWriter(incoming, entry.header, entry.quant)
                try:
                    async for chunk in stream:
                        await anyio.to_thread.run_sync(writer.feed, chunk)
                    if not stream.digest_computed or not stream.digest.startswith(STRONG):
                        raise BadRequest(  # (finish writes nothing more)
                            f"{path!r} must arrive with a BLAKE3 or SHA-256 digest this cell "
                            f"computes, not {stream.digest or 'none'}"
                        )
                    await anyio.to_thread.run_sync(writer.finish, durable)
                except DecodeError as exc:
                    raise BadRequest(f"{path}: {exc}") from None
                finally:
                    writer.close()
            else:
                await stream.save(incoming, durable=durable)
                if not stream.digest_computed or stream.digest != f"sha256:{entry.sha256}":
                    raise BadRequest(
                        f"{path!r} must arrive with its SHA-256 for this cell to compute, not "
                        f"{stream.digest or 'none'}{'' if stream.digest_computed else ' (claimed)'}"
                    )
            target = staging / path
            await anyio.to_thread.run_sync(_place, incoming, target)
        finally:
            incoming.unlink(missing_ok=True)
        return msgspec.json.encode({"path": path, "size": entry.size})

    @table.stream(CHANNEL, COMMIT)
    async def commit(ctx: Context, stream: IncomingStream) -> bytes:
        admit(ctx, stream)
        mid = (await body(stream, 64)).decode(errors="replace")
        async with committing:
            # (again after a commit of that id: not open any more)
            manifest = (await known(mid)).manifest
            staging = folder / f"{STAGING}{mid}"
            staged = await anyio.to_thread.run_sync(_staged, staging, manifest, False)
            lacking = [f.path for f in manifest.files if f.path not in staged]
            if lacking:
                raise BadRequest(f"checkpoint {manifest.name} lacks {', '.join(lacking[:5])}")
            final = folder / manifest.name
            try:
                replaced = await anyio.to_thread.run_sync(
                    _commit, staging, final, manifest, durable
                )
            except FileExistsError:
                raise taken(ctx, manifest.name) from None
            opened.pop(mid, None)
            await anyio.to_thread.run_sync((folder / f"{STAGING}{mid}.json").unlink)
        stored = StoredCheckpoint(manifest.name, len(manifest.files), manifest.total, replaced)
        if on_stored is not None:
            on_stored(ctx, stream.origin, stored)
        return msgspec.json.encode(stored)

    return table


def _sweep(folder: Path, keep: str, older_than: float) -> None:
    """Remove what abandoned transfers left in ``folder`` (hidden ``.incoming-ckpt-*``
    folders and files) untouched for ``older_than`` seconds, except ``keep``."""
    limit = time.time() - older_than
    for entry in os.scandir(folder):
        if not entry.name.startswith(STAGING) or entry.name in (keep, f"{keep}.json"):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or in use: next time
            if entry.stat(follow_symlinks=False).st_mtime >= limit:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _keep(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a file of its own (two opens of one manifest at
    once each write theirs), renamed into place in one step."""
    part = path.with_name(f"{path.name}-{secrets.token_hex(8)}.part")
    try:
        part.write_bytes(data)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _staged(staging: Path, manifest: Manifest, make: bool) -> tuple[str, ...]:
    """The files of ``manifest`` in ``staging`` at their sizes (put there once verified)."""
    if make:
        staging.mkdir(exist_ok=True)
    return tuple(
        f.path
        for f in manifest.files
        if (p := staging / f.path).is_file() and p.stat().st_size == f.size
    )


def _place(incoming: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(incoming, target)


def _read_manifest(data: bytes) -> Manifest:
    """The announced manifest, checked.

    Raises:
        BadRequest: not one, or one a receiver refuses (``check_manifest``).
    """
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"not a checkpoint manifest: {exc}") from None
    check_manifest(manifest)
    if "/" in manifest.name:
        raise BadRequest(f"{manifest.name!r} is not a plain folder name")
    check_path(manifest.name)
    return manifest


_TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def _commit(staging: Path, final: Path, manifest: Manifest, durable: bool) -> bool:
    """Rename ``staging`` to ``final``, holding the manifest's files and nothing else (what an
    older version or a crash left there is removed first); whether it replaced a folder.

    Raises:
        FileExistsError: ``final`` exists (or appeared meanwhile) and the manifest does not
            overwrite: nothing changed.
    """
    keep = {f.path for f in manifest.files}
    for root, dirs, names in os.walk(staging, topdown=False):
        for name in names:
            path = Path(root, name)
            if path.relative_to(staging).as_posix() not in keep:
                path.unlink()
        for name in dirs:
            with contextlib.suppress(OSError):  # not empty: it holds files to keep
                Path(root, name).rmdir()
    replaced = os.path.lexists(final)
    if replaced and not manifest.overwrite:
        raise FileExistsError(final)
    old = final.with_name(f"{STAGING}old-{secrets.token_hex(8)}")
    if replaced:
        os.rename(final, old)
    try:
        os.rename(staging, final)  # refuses (not replaces) a non-empty folder or a file there
    except OSError as exc:
        if replaced:
            os.rename(old, final)  # put the folder that was there back
        if exc.errno in _TAKEN:
            raise FileExistsError(final) from None
        raise
    if durable:
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames themselves survive a crash
        finally:
            os.close(fd)
    if replaced:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    return replaced


__all__ = ["CHANNEL", "COMMIT", "FILE", "OPEN", "Opened", "StoredCheckpoint", "checkpoint_handlers"]
