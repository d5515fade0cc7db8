"""The sending side of a checkpoint transfer: :func:`send_checkpoint`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import anyio
import msgspec

from flare_async.cell import Cell, Payload
from flare_async.checkpoints._manifest import FileEntry, Manifest, scan
from flare_async.checkpoints._quantized import records
from flare_async.checkpoints._receive import CHANNEL, COMMIT, FILE, OPEN, Opened, StoredCheckpoint
from flare_async.errors import (
    ConnectError,
    DecodeError,
    StreamAborted,
    StreamError,
    StreamStalled,
    Unreachable,
)
from flare_async.streaming import DEFAULT_WINDOW
from flare_async.streaming import Progress as StreamProgress
from flare_async.wire import Buffer

T = TypeVar("T")
Progress = Callable[[int, int], None]
"""``progress(done, total)``: source bytes through, of all (the slowest receiver's)."""

RETRY = (StreamStalled, StreamAborted, Unreachable, ConnectError, TimeoutError)
"""Failures worth another attempt at a file (the link, not the receiver's verdict)."""


async def send_checkpoint(
    cell: Cell,
    folder: str | Path | Manifest,
    to: str | Iterable[str],
    *,
    source: str | Path | None = None,
    name: str = "",
    quantize: str = "",
    overwrite: bool = False,
    window: int = DEFAULT_WINDOW,
    idle: float = 60.0,
    probe: float | None = None,
    attempts: int = 3,
    progress: Progress | None = None,
) -> dict[str, StoredCheckpoint | BaseException]:
    """Send a checkpoint folder to one or many cells' inboxes (``files/ckpt-*``, which
    ``flare-async run`` mounts beside ``files/put``); return each destination's outcome.

    Every file streams once from here, to all destinations together: those behind one relay
    get one stream to it, which it forwards chunk by chunk (``Cell.stream_many``). A lossless
    file travels with its SHA-256 (computed once, here) and arrives byte for byte; with
    ``quantize`` (``bf16``, ``fp16``, ``q8``, ``nf4``) each ``*.safetensors`` file travels a
    slice of a tensor at a time in that codec and the receiver writes it back in its original
    layout and dtypes. A dropped link resumes inside the file (the stream's own resume); a
    file whose stream failed anyway is sent again to the destinations that lack it, up to
    ``attempts`` times; and sending the same folder again later skips the files a
    destination already verified. Memory here and at every hop stays within ``window`` (and
    one slice, quantized) whatever the checkpoint's size.

    Args:
        folder: the checkpoint folder, or a manifest already made with :func:`scan` (then
            ``source`` is the folder).
        to: the receiving cells.
        name: the folder's name at the receivers (default: the folder's own).
        overwrite: replace a folder of that name there (default: refused, ``BadRequest``).
        idle / window / probe: the streams' (``Cell.stream``).
        progress: called with ``(done, total)`` source bytes.

    Returns:
        ``{cell: StoredCheckpoint}`` for each destination that has the folder in place, or
        the error it failed with (one failed destination fails nothing else).

    Raises:
        ConfigError: the folder cannot be sent (not a folder, no files, an unknown scheme).
    """
    if isinstance(folder, Manifest):
        manifest, root = folder, Path(source or ".")
    else:
        root = Path(folder)
        manifest = await anyio.to_thread.run_sync(
            lambda: scan(root, name=name, quantize=quantize, overwrite=overwrite)
        )
    mid = manifest.id  # (a hash over every entry: once)
    dsts = [to] if isinstance(to, str) else list(dict.fromkeys(to))
    outcomes: dict[str, StoredCheckpoint | BaseException] = {}
    have: dict[str, set[str]] = {}
    for dst, reply in (
        await _ask(cell, dsts, OPEN, msgspec.json.encode(manifest), idle, attempts)
    ).items():
        opened = _decoded(reply, Opened)
        if isinstance(opened, Opened) and opened.id != mid:
            opened = DecodeError(f"{dst} names the checkpoint {opened.id!r}, not {mid!r}")
        if isinstance(opened, Opened):
            have[dst] = set(opened.have)
        else:
            outcomes[dst] = opened

    total, done, shown = manifest.total, 0, 0
    for entry in manifest.files:
        base = done

        def moved(n: int, base: int = base) -> None:
            nonlocal shown
            if progress is not None and base + n > shown:  # never backwards
                shown = base + n
                progress(shown, total)

        for _ in range(max(attempts, 1)):
            lacking = [d for d in dsts if d in have and entry.path not in have[d]]
            if not lacking:
                break
            results = await _send_file(
                cell, root, mid, entry, lacking, (window, idle, probe), moved
            )
            for dst, outcome in results.items():
                if isinstance(outcome, Payload):
                    have[dst].add(entry.path)
                elif not isinstance(outcome, RETRY):
                    outcomes[dst] = outcome  # the receiver's verdict: not worth a retry
                    del have[dst]
        for dst in [d for d in dsts if d in have and entry.path not in have[d]]:
            outcomes[dst] = StreamError(f"{entry.path}: not sent after {attempts} attempts")
            del have[dst]
        done += entry.size
        if progress is not None and done > shown:
            shown = done
            progress(done, total)

    for dst, reply in (
        # once: a commit whose answer was lost did commit (the stream's own resume already
        # asks again for a lost answer); a second one would be told it is not open any more
        await _ask(cell, list(have), COMMIT, mid.encode(), idle, 1)
    ).items():
        outcomes[dst] = _decoded(reply, StoredCheckpoint)
    return {d: outcomes[d] for d in dsts}


async def _ask(
    cell: Cell, dsts: list[str], topic: str, body: bytes, idle: float, attempts: int = 3
) -> dict[str, bytes | BaseException]:
    """A small stream to each of ``dsts`` (fanned out as one through relays): its reply's
    bytes, or what it failed with; asked again, up to ``attempts`` times, where the path
    failed (:data:`RETRY`), not where the receiver answered (for idempotent asks: the open)."""
    out: dict[str, bytes | BaseException] = {}
    ask = list(dsts)
    for _ in range(max(attempts, 1)):
        if not ask:
            break
        results = await cell.stream_many(ask, CHANNEL, topic, body, idle=idle)
        for dst, result in results.items():
            out[dst] = result if isinstance(result, BaseException) else result.tobytes()
        ask = [d for d in ask if isinstance(out[d], RETRY)]
    return out


def _decoded(reply: bytes | BaseException, kind: type[T]) -> T | BaseException:
    if isinstance(reply, BaseException):
        return reply
    try:
        return msgspec.json.decode(reply, type=kind)
    except msgspec.DecodeError as exc:
        return DecodeError(f"not a {kind.__name__} answer: {exc}")


async def _send_file(
    cell: Cell,
    root: Path,
    mid: str,
    entry: FileEntry,
    dsts: list[str],
    flow: tuple[int, float, float | None],
    moved: Callable[[int], None],
) -> Mapping[str, Payload | BaseException]:
    headers = {"id": mid, "path": entry.path}
    window, idle, probe = flow
    path = root / entry.path
    if not entry.quant:
        done: dict[str, int] = {}  # by the peer streamed to (a destination, or a relay)

        def slowest(p: StreamProgress) -> None:
            done[p.peer] = p.done
            moved(min(done.values()))

        return await cell.stream_many(
            dsts,
            CHANNEL,
            FILE,
            path,
            window=window,
            idle=idle,
            probe=probe,
            sha256=f"sha256:{entry.sha256}",
            headers=headers,
            progress=slowest,
        )
    return await cell.stream_many(
        dsts,
        CHANNEL,
        FILE,
        _quantized(path, entry, moved),
        digest="blake3",  # cryptographic: the source's SHA-256 cannot apply to lossy bytes
        window=window,
        idle=idle,
        probe=probe,
        codec=entry.quant,
        headers=headers,
    )


async def _quantized(
    path: Path, entry: FileEntry, moved: Callable[[int], None]
) -> AsyncIterator[Buffer]:
    """The record stream of a quantized file, each record made in a worker thread."""
    made = records(path, entry.header, entry.quant)
    try:
        while (record := await anyio.to_thread.run_sync(next, made, None)) is not None:
            parts, through = record
            for part in parts:
                yield part
            moved(through)
    finally:
        made.close()


__all__ = ["send_checkpoint"]
