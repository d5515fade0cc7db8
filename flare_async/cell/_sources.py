"""What a stream reads from and how its bytes are checked: sources, the shared chunk log that
fan-out sends from, and the whole-object SHA-256 computed off the event loop.

The I/O half of streaming, so it lives with the cell that executes the protocol (the sans-IO
half, ``flare_async.streaming``, has no threads, no waiting and no clock).

Sources (:func:`open_source`) turn bytes-like objects, sequences of buffers (a codec's output),
file paths and async iterables into chunks of at most the negotiated size, read once. Chunks
of a bytes-like source are views (never copied); a file is read in a worker thread, up to
:data:`READ_BATCH` chunks and their CRC-32C a trip, so the event loop never blocks on the disk.

The :class:`ChunkLog` holds what was read and not yet committed by every receiver: one stream
or many (fan-out) send from the same log, so an object sent to N cells is read, digested and
checksummed once, and the log never holds more than the window (the fastest receiver waits for the
slowest one there, not in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import anyio
import anyio.to_thread
import blake3
import numpy as np

from flare_async._concurrency import Channel, ChannelClosed, Signal, SignalLike
from flare_async.errors import ConfigError
from flare_async.streaming import (
    BLAKE3,
    CRC32C,
    CRYPTOGRAPHIC,
    DIGESTS,
    CrcDigest,
    checksum,
    format_digest,
)
from flare_async.wire import Buffer

StreamSource = Buffer | Sequence[Buffer] | str | os.PathLike[str] | AsyncIterable[Buffer]
"""What ``Cell.stream`` accepts: bytes-like, a sequence of buffers, a file path, or an async
iterable of buffers."""


class ChunkSource(Protocol):
    """Sequential reads of an object's bytes."""

    size: int | None
    """Total bytes, when known in advance."""
    in_memory: bool
    """The bytes are already in memory (chunks are views of them)."""

    async def read_checked(self, max_bytes: int, count: int) -> list[tuple[Buffer, int | None]]:
        """The next chunks (up to ``count`` of at most ``max_bytes`` each; none at the end),
        each with its CRC-32C where that costs nothing extra, else None (then the chunk log
        computes it when the chunk is first sent)."""
        ...

    async def aclose(self) -> None: ...


class _OneChunkAtATime:
    """Sources in memory or behind an async iterator: one chunk per call, its CRC left to
    the first send. A chunk of a buffer in memory comes cold from memory, and the CRC right
    before the ``sendmsg`` leaves it in the cache for the kernel's copy; computed any earlier
    (ahead, in a thread), both passes would read memory (measured: 2.2 GB/s became 1.4)."""

    async def read(self, max_bytes: int) -> Buffer:
        """Up to ``max_bytes`` next bytes; empty at the end."""
        raise NotImplementedError

    async def read_checked(self, max_bytes: int, count: int) -> list[tuple[Buffer, int | None]]:
        data = await self.read(max_bytes)
        return [(data, None)] if len(data) else []


class _BufferSource(_OneChunkAtATime):
    def __init__(self, parts: Sequence[Buffer]) -> None:
        self._parts = deque(memoryview(p).cast("B") for p in parts if len(p))
        self.size: int | None = sum(p.nbytes for p in self._parts)
        self.in_memory = True

    async def read(self, max_bytes: int) -> Buffer:
        if not self._parts:
            return b""
        head = self._parts[0]
        if head.nbytes <= max_bytes:
            self._parts.popleft()
            return head
        self._parts[0] = head[max_bytes:]
        return head[:max_bytes]

    async def aclose(self) -> None:
        self._parts.clear()


class _FileSource:
    def __init__(self, path: Path) -> None:
        try:
            self._file = path.open("rb", buffering=0)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        self.size: int | None = os.fstat(self._file.fileno()).st_size
        self.in_memory = False
        self._path = path

    async def read_checked(self, max_bytes: int, count: int) -> list[tuple[Buffer, int | None]]:
        """Up to ``count`` next chunks with their CRC-32C, in one trip to a worker thread
        (fewer at the end of the file; none past it). Each CRC reads bytes the copy just
        brought into the cache, and one trip for several chunks saves the thread round trips
        (~0.1 ms each on this machine), which one at a time held the sender back."""
        return await anyio.to_thread.run_sync(self._read_checked, max_bytes, count)

    def _read_checked(self, max_bytes: int, count: int) -> list[tuple[Buffer, int | None]]:
        out: list[tuple[Buffer, int | None]] = []
        for _ in range(count):
            data = self._read(max_bytes)
            if not data.nbytes:
                break
            out.append((data, checksum(data)))
            if data.nbytes < max_bytes:
                break
        return out

    def _read(self, max_bytes: int) -> memoryview:
        # One copy, page cache to a buffer nobody zero-filled; the chunk is that buffer.
        out = memoryview(cast(Any, np.empty(max_bytes, dtype=np.uint8)))
        got = 0
        while got < max_bytes:
            n = self._file.readinto(out[got:])
            if not n:
                break
            got += n
        return out[:got].toreadonly()

    async def aclose(self) -> None:
        self._file.close()


class _IterSource(_OneChunkAtATime):
    def __init__(self, items: AsyncIterable[Buffer], size: int | None) -> None:
        self._it: AsyncIterator[Buffer] = aiter(items)
        self._rest: memoryview | None = None
        self.size = size
        self.in_memory = False

    async def read(self, max_bytes: int) -> Buffer:
        while self._rest is None or not self._rest.nbytes:
            try:
                item = await anext(self._it)
            except StopAsyncIteration:
                return b""
            self._rest = memoryview(item).cast("B")
        rest = self._rest
        if rest.nbytes <= max_bytes:
            self._rest = None
            return rest
        self._rest = rest[max_bytes:]
        return rest[:max_bytes]

    async def aclose(self) -> None:
        close = getattr(self._it, "aclose", None)
        if close is not None:
            await close()


def in_memory(source: object) -> Sequence[Buffer] | None:
    """The buffers of a source held in memory (bytes, or a list or tuple of buffers), else
    None. (An inline object's buffers are its ``parts``: the caller takes those.)"""
    if isinstance(source, bytes | bytearray | memoryview):
        return (source,)
    if isinstance(source, list | tuple) and all(
        isinstance(p, bytes | bytearray | memoryview) for p in source
    ):
        return source
    return None


def open_source(source: StreamSource, size: int | None = None) -> ChunkSource:
    """A :class:`ChunkSource` for what a caller passes to ``Cell.stream``.

    Raises:
        ConfigError: a file that cannot be opened, or something that is not a source.
    """
    buffers = in_memory(source)
    if buffers is not None:
        return _BufferSource(buffers)
    if isinstance(source, str | os.PathLike):
        return _FileSource(Path(source))
    if isinstance(source, AsyncIterable):
        return _IterSource(source, size)
    kind = type(source).__name__
    raise ConfigError(f"cannot stream a {kind}: pass bytes, buffers, a path or an async iterable")


_HASH_INLINE_BELOW = 64 * 1024


DIGEST_QUEUE = 8 << 20
"""Bytes a digest's queue holds at most (beside the stream's window): see
:meth:`HashDigest.for_chunks`."""


class _Hasher(Protocol):
    def update(self, data: Buffer, /) -> object: ...

    def hexdigest(self) -> str: ...


def _hasher(algorithm: str) -> _Hasher:
    if algorithm == BLAKE3:
        return cast(_Hasher, blake3.blake3())
    return hashlib.sha256()


class HashDigest:
    """A cryptographic digest (BLAKE3 or SHA-256) of a byte sequence, computed in a worker
    thread beside the transfer.

    Both hashes release the GIL while they hash, so the digest runs on another core while the
    event loop moves the next chunks. :meth:`update` waits only when ``depth`` chunks are
    queued (the hash is slower than the wire: BLAKE3 ~3 GB/s, SHA-256 ~1.3 GB/s here), which
    bounds the memory it holds. :meth:`run` must run in a task while the digest is fed.
    """

    hashes_bytes = True
    """:meth:`update` needs the bytes (and :meth:`run` a task)."""

    @classmethod
    def for_chunks(cls, chunk: int, algorithm: str = BLAKE3) -> HashDigest:
        """A digest whose queue holds about :data:`DIGEST_QUEUE` bytes of ``chunk``-sized
        chunks (at least two): 8 chunks of 1 MiB, 2 of 4 MiB."""
        return cls(algorithm, depth=max(2, DIGEST_QUEUE // max(1, chunk)))

    def __init__(self, algorithm: str = BLAKE3, depth: int = 8) -> None:
        if algorithm not in CRYPTOGRAPHIC:
            raise ConfigError(f"{algorithm!r} is not a hash (use {sorted(CRYPTOGRAPHIC)})")
        self.algorithm = algorithm
        self._hash = _hasher(algorithm)
        self._queue: Channel[Buffer] = Channel(depth)
        self._done: SignalLike | None = None
        self.nbytes = 0

    async def update(self, data: Buffer) -> None:
        if len(data):
            self.nbytes += len(data)
            # Closed because the stream failed: the caller learns that next.
            with contextlib.suppress(ChannelClosed):
                await self._queue.put(data)

    def add(self, offset: int, length: int, crc: int) -> None:
        """A chunk's CRC (used by :class:`CombinedDigest`; a hash reads the bytes instead)."""

    async def run(self) -> None:
        self._done = Signal()
        try:
            while True:
                try:
                    data = await self._queue.get()
                except ChannelClosed:
                    return
                if len(data) < _HASH_INLINE_BELOW:
                    self._hash.update(data)  # cheaper than the trip to a thread
                else:
                    await anyio.to_thread.run_sync(self._hash.update, data)
        finally:
            self._done.set()

    def close(self) -> None:
        """Stop hashing (the stream failed): the task ends, queued bytes are dropped."""
        self._queue.close()
        self._queue.clear()

    async def hexdigest(self) -> str:
        """Wait for every queued byte to be hashed; the digest in text form
        (``"blake3:<hex>"``, ``"sha256:<hex>"``)."""
        self._queue.close()
        if self._done is not None:
            await self._done.wait()
        else:
            # run() never got to start (everything was fed without a pause): hash here.
            for data in self._queue.clear():
                await anyio.to_thread.run_sync(self._hash.update, data)
        return format_digest(self.algorithm, self._hash.hexdigest())


class CombinedDigest:
    """The default digest: the whole object's CRC-32C combined from the chunk CRCs the
    stream computes anyway (no pass over the bytes, no task: see
    :mod:`flare_async.streaming._digest`)."""

    hashes_bytes = False
    algorithm = CRC32C

    def __init__(self) -> None:
        self._crc = CrcDigest()

    @property
    def nbytes(self) -> int:
        return self._crc.nbytes

    async def update(self, data: Buffer) -> None:
        """Nothing: the chunk's CRC comes through :meth:`add`."""

    def add(self, offset: int, length: int, crc: int) -> None:
        self._crc.add(offset, length, crc)

    async def run(self) -> None:
        """Nothing to run."""

    def close(self) -> None:
        """Nothing to stop."""

    async def hexdigest(self) -> str:
        """``"crc32c:<8 hex>"``."""
        return self._crc.hexdigest()


Digest = HashDigest | CombinedDigest
"""A stream's whole-object digest while it is computed."""


def open_digest(algorithm: str, chunk: int) -> Digest:
    """The digest named ``algorithm`` (one of ``streaming.DIGESTS``) for ``chunk``-sized chunks.

    Raises:
        ConfigError: an unknown algorithm.
    """
    if algorithm == CRC32C:
        return CombinedDigest()
    if algorithm not in CRYPTOGRAPHIC:
        raise ConfigError(f"unknown stream digest {algorithm!r} (known: {', '.join(DIGESTS)})")
    return HashDigest.for_chunks(chunk, algorithm)


def digest_parts(algorithm: str, parts: Sequence[Buffer]) -> str:
    """The digest named ``algorithm`` of the bytes of ``parts`` in a row, in text form, computed
    here at once (for a small object: what an inline stream announces and checks).

    Raises:
        ConfigError: an unknown algorithm.
    """
    if algorithm == CRC32C:
        crc = CrcDigest()
        offset = 0
        for part in parts:
            n = memoryview(part).nbytes
            crc.add(offset, n, checksum(part))
            offset += n
        return crc.hexdigest()
    if algorithm not in CRYPTOGRAPHIC:
        raise ConfigError(f"unknown stream digest {algorithm!r} (known: {', '.join(DIGESTS)})")
    h = _hasher(algorithm)
    for part in parts:
        h.update(part)
    return format_digest(algorithm, h.hexdigest())


class Watcher(Protocol):
    def wake(self) -> None: ...


READ_BATCH = 4
"""Chunks a file source reads in one trip to a worker thread, where the window has room."""


class HeldChunk:
    """A chunk in the log: its offset, bytes, and CRC-32C once computed (:attr:`crc`)."""

    __slots__ = ("_crc", "_digest", "data", "offset")

    def __init__(self, offset: int, data: Buffer, crc: int | None, digest: Digest | None) -> None:
        self.offset = offset
        self.data = data
        self._crc = crc
        self._digest = digest  # told the CRC once known (a CombinedDigest folds it in)
        if crc is not None and digest is not None:
            digest.add(offset, len(data), crc)

    @property
    def crc(self) -> int:
        """Computed once, however many destinations and resends send the chunk."""
        if self._crc is None:
            self._crc = checksum(self.data)
            if self._digest is not None:
                self._digest.add(self.offset, len(self.data), self._crc)
        return self._crc


class ChunkLog:
    """Chunks read from a source and not yet committed by every receiver.

    Receivers (one per destination) are registered by key; each reads the log by offset.
    :meth:`fill` reads the next chunk from the source when the log holds less than
    ``window`` bytes; :meth:`trim` drops what every receiver committed.

    Attributes:
        start: the offset of the first chunk held.
        end: the offset after the last chunk read.
        eof: the source is exhausted (:attr:`end` is the object's size).
    """

    def __init__(self, source: ChunkSource, chunk: int, window: int, digest: Digest | None):
        self._source = source
        self.chunk = chunk
        self.window = window
        self._digest = digest
        self._chunks: deque[HeldChunk] = deque()
        self.start = 0
        self.end = 0
        self.eof = False
        self._committed: dict[str, int] = {}
        self._watchers: set[Watcher] = set()
        self._room: SignalLike | None = None

    @property
    def size(self) -> int | None:
        return self.end if self.eof else self._source.size

    def join(self, key: str) -> None:
        self._committed[key] = self.start

    def leave(self, key: str) -> None:
        """A receiver is done (or failed): it no longer holds chunks back."""
        self._committed.pop(key, None)
        self.trim()

    def commit(self, key: str, offset: int) -> None:
        if key in self._committed and offset > self._committed[key]:
            self._committed[key] = offset
            self.trim()

    def trim(self) -> None:
        low = min(self._committed.values(), default=self.end)
        chunks = self._chunks
        while chunks and chunks[0].offset + len(chunks[0].data) <= low:
            chunks.popleft()
        self.start = chunks[0].offset if chunks else self.end
        self._wake()

    @property
    def held(self) -> int:
        return self.end - self.start

    def chunk_at(self, offset: int) -> HeldChunk | None:
        """The chunk starting at ``offset``, if held (resends start at chunk boundaries:
        receivers commit whole chunks)."""
        for held in self._chunks:
            if held.offset == offset:
                return held
            if held.offset > offset:
                break
        return None

    @property
    def has_room(self) -> bool:
        return self.held < self.window

    async def fill(self) -> bool:
        """Read at least one more chunk, as many as the window has room for (up to
        ``READ_BATCH`` in one go); one reader at a time (``send_streams``' read-ahead task).
        Returns False at the end of the source."""
        if self.eof:
            return False
        try:
            room = max(1, (self.window - self.held) // max(1, self.chunk))
            chunks = await self._source.read_checked(self.chunk, min(room, READ_BATCH))
            if not chunks:
                self.eof = True
                return False
            digest = self._digest
            for data, crc in chunks:
                if digest is not None and digest.hashes_bytes:
                    await digest.update(data)
                self._chunks.append(HeldChunk(self.end, data, crc, digest))
                self.end += len(data)
            return True
        finally:
            self._wake()

    async def wait_room(self) -> None:
        """Wait until a trim makes room (every receiver committed the oldest chunk)."""
        signal = self._room = Signal()
        await signal.wait()

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher.wake()`` whenever the log changes (a chunk read, a trim, the end)."""
        self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def _wake(self) -> None:
        for watcher in list(self._watchers):
            watcher.wake()
        room, self._room = self._room, None
        if room is not None and self.has_room:
            room.set()
        elif room is not None:
            self._room = room

    async def aclose(self) -> None:
        self._chunks.clear()
        await self._source.aclose()
