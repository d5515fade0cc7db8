"""The receiving end of streams: what a stream handler reads, and the hub that routes every
stream message of a cell to the stream it belongs to.

A stream handler gets an :class:`IncomingStream`::

    @table.stream("models", "upload")
    async def upload(ctx: Context, stream: IncomingStream) -> bytes:
        size = await stream.save(inbox / "model.safetensors")   # written as it arrives
        return b"stored"

Iterating the stream yields each chunk (a read-only memoryview) once it passed its CRC-32C;
the iteration ends only after the whole object matched its SHA-256, and raises
:class:`~flare_async.errors.StreamCorrupted` otherwise. The sender may send at most a window
ahead of what the handler took, so a handler that reads slowly holds the sender back, never
the cell's memory. Whatever the handler returns goes back to the sender as the stream's reply.
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from flare_async._concurrency import Signal, SignalLike
from flare_async.cell._api import CellAPI, StreamStatistics
from flare_async.cell._dispatch import handler_failure
from flare_async.cell._handlers import Context, Kind
from flare_async.cell._payload import Payload, as_payload
from flare_async.cell._port import Port
from flare_async.cell._stream_out import StreamSender
from flare_async.errors import (
    FlareError,
    ProtocolError,
    Status,
    StreamAborted,
    StreamCorrupted,
    StreamStalled,
    error_for_status,
)
from flare_async.streaming import (
    Digest,
    EndVerdict,
    Progress,
    ProgressMeter,
    ReceiverFlow,
    Verdict,
    checksum,
    negotiate,
)
from flare_async.wire import (
    Frame,
    StreamAbort,
    StreamAck,
    StreamData,
    StreamDone,
    StreamEnd,
    StreamOpen,
    originate,
)

FANOUT_CHANNEL = "sys"
FANOUT_TOPIC = "fanout"
"""The system stream handler on relays that feeds one incoming stream to many children."""

StreamHandler = Callable[[Context, "IncomingStream"], Awaitable[Any]]

_MAX_IDLE = 3600.0
_FINISHED_KEPT = 256
"""Finished streams remembered per cell, to answer a sender whose final answer was lost."""


class IncomingStream:
    """One stream arriving at this cell (see the module text).

    Attributes:
        src: the sending cell.
        sid: the stream id, unique per sender.
        channel / topic: what the sender addressed.
        size: the object's size when the sender knew it, else ``None``.
        codec: the codec of the bytes ("" for raw bytes).
        headers: the sender's extension headers.
        received: bytes handed to the handler so far.
    """

    def __init__(
        self,
        hub: StreamHub,
        open_: StreamOpen,
        chunk: int,
        window: int,
        digest: bool,
        idle: float,
    ) -> None:
        self._hub = hub
        self.src = open_.src
        self.sid = open_.sid
        self.channel = open_.channel
        self.topic = open_.topic
        self.size = open_.size if open_.size >= 0 else None
        self.codec = open_.codec
        self.headers = dict(open_.headers)
        self.chunk = chunk
        self.window = window
        self.idle = idle
        self._flow = ReceiverFlow(window)
        self._chunks: deque[memoryview] = deque()
        self._max_chunks = window // 1024 + 64
        """Chunks held at most: a peer sending tiny chunks must not turn a byte window into
        a flood of Python objects (each costs hundreds of bytes)."""
        self._wakeup: SignalLike | None = None
        self._error: BaseException | None = None
        self._expected_sha = open_.sha256
        self.digest_requested = open_.digest
        self._digest = Digest.for_chunks(chunk) if digest else None
        self._digest_started = False
        self.sha256 = ""
        """The digest of the bytes taken, once the stream ended (verified against the
        sender's when both computed one)."""
        self.received = 0
        self.trailer: dict[str, str] = {}
        """Headers the sender put in the stream's end message (``seal``: a signature over
        the digest); complete once the stream ended."""
        self.damaged_seen = 0
        self.finished = False
        self._meter = ProgressMeter(hub.port.clock, self.src, self.sid, self.size)

    # ------------------------------------------------------------------ reading
    def __aiter__(self) -> IncomingStream:
        return self

    async def __anext__(self) -> memoryview:
        chunk = await self.read_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read_chunk(self) -> memoryview | None:
        """The next verified chunk, or ``None`` once the whole object arrived and matched.

        Raises:
            StreamCorrupted: the object does not match its SHA-256 (or a chunk kept failing).
            StreamStalled: nothing arrived for the stream's idle limit.
            StreamAborted: the sender gave the stream up.
        """
        if self._digest is not None and not self._digest_started:
            self._digest_started = True
            self._hub.port.spawn(self._digest.run, name=f"stream {self.src}/{self.sid} digest")
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                if self._digest is not None:
                    await self._digest.update(chunk)
                self.received += chunk.nbytes
                if self._flow.on_consumed(chunk.nbytes):
                    self._hub.ack(self)
                return chunk
            if self._error is not None:
                raise self._error
            if self._flow.complete:
                await self._finish()
                return None
            signal = self._wakeup = Signal()
            with anyio.move_on_after(self.idle) as scope:
                await signal.wait()
            if scope.cancelled_caught and self._wakeup is signal:
                self.fail(StreamStalled(f"nothing arrived from {self.src} for {self.idle} s"))
                self._hub.abort(self, Status.STREAM_STALLED, "the receiver saw no progress")

    async def _finish(self) -> None:
        if self.finished:
            return
        if self._digest is not None:
            self.sha256 = await self._digest.hexdigest()
            if self._expected_sha and self.sha256 != self._expected_sha:
                error = StreamCorrupted(
                    f"stream {self.sid} from {self.src} does not match its SHA-256 "
                    f"(expected {self._expected_sha[:16]}..., got {self.sha256[:16]}...)"
                )
                self.fail(error)
                self._hub.abort(self, Status.STREAM_CORRUPTED, str(error))
                raise error
        else:
            self.sha256 = self._expected_sha
        self.finished = True

    async def read_joined(self) -> memoryview:
        """The whole object as one buffer, each chunk copied in as it arrives (and then
        released): for decoders that want contiguous bytes, this holds one object plus the
        window, where :meth:`read_all` and a join afterwards hold the object twice.

        Raises:
            StreamCorrupted: more or fewer bytes than the size the sender announced.
            StreamCorrupted / StreamStalled / StreamAborted: as :meth:`read_chunk`.
        """
        if self.size is None:
            return memoryview(b"".join((await self.read_all()).parts))
        out = np.empty(self.size, dtype=np.uint8)  # pages are touched as the chunks land
        filled = 0
        async for chunk in self:
            end = filled + chunk.nbytes
            if end > self.size:
                raise StreamCorrupted(f"stream {self.sid} from {self.src}: past its size")
            out[filled:end] = np.frombuffer(chunk, dtype=np.uint8)
            filled = end
        if filled != self.size:
            raise StreamCorrupted(
                f"stream {self.sid} from {self.src}: {filled} B of the {self.size} announced"
            )
        return out.data

    async def read_all(self) -> Payload:
        """Every remaining chunk, as one payload of many parts (nothing is joined)."""
        parts: list[memoryview] = []
        async for chunk in self:
            parts.append(chunk)
        return Payload(parts, codec=self.codec)

    async def save(self, path: str | os.PathLike[str], *, durable: bool = False) -> int:
        """Write the object to ``path`` as it arrives; returns its size.

        The bytes go to ``<path>.part`` (in a worker thread), which is renamed to ``path`` only
        once the whole object arrived and matched its SHA-256, so ``path`` never holds a
        partial or damaged object. On failure the partial file is removed. ``durable`` syncs
        the file to disk before the rename.

        Raises:
            StreamCorrupted / StreamStalled / StreamAborted: as :meth:`read_chunk`; ``path``
                is then left untouched.
            OSError: the file could not be written.
        """
        final = Path(path)
        part = final.with_name(final.name + ".part")
        f = await anyio.to_thread.run_sync(lambda: part.open("wb", buffering=0))
        try:
            written = 0
            async for chunk in self:
                written += await anyio.to_thread.run_sync(_write_all, f, chunk)
            if durable:
                await anyio.to_thread.run_sync(os.fsync, f.fileno())
        except BaseException:
            f.close()
            part.unlink(missing_ok=True)
            raise
        f.close()
        await anyio.to_thread.run_sync(os.replace, part, final)
        return written

    def final_sha256(self) -> str:
        """The whole object's SHA-256 once the stream ended: the one computed here, else the
        one the sender announced ("" if neither). A relay passes it on when it fans out."""
        return self.sha256

    def progress(self) -> Progress:
        """Bytes received so far, rate and ETA."""
        return self._meter.update(self._flow.committed)

    # ------------------------------------------------------------------ fed by the hub
    def _wake(self) -> None:
        signal, self._wakeup = self._wakeup, None
        if signal is not None:
            signal.set()

    def on_data(self, h: StreamData, payload: memoryview) -> Verdict:
        intact = checksum(payload) == h.crc
        if not intact:
            self.damaged_seen += 1
        verdict = self._flow.on_data(h.offset, payload.nbytes, intact)
        if verdict is Verdict.ACCEPT and payload.nbytes:
            if len(self._chunks) >= self._max_chunks:
                raise ProtocolError(
                    f"more than {self._max_chunks} chunks held for stream {self.sid}: "
                    "chunks too small for the window"
                )
            self._chunks.append(payload)
            self._wake()
        return verdict

    def on_end(self, h: StreamEnd) -> EndVerdict:
        if h.sha256:
            self._expected_sha = h.sha256
        if h.headers:
            self.trailer = dict(h.headers)
        verdict = self._flow.on_end(h.size)
        if verdict is EndVerdict.COMPLETE:
            self._wake()
        return verdict

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self.finished:
            self._error = error
        self._chunks.clear()
        if self._digest is not None:
            self._digest.close()
        self._wake()

    def ack_frame(self, hub_name: str, msg_id: int, *, first: bool, resend: bool) -> Frame:
        flow = self._flow
        if resend:
            flow.resend_asked = True
        return Frame(
            originate(
                StreamAck,
                msg_id,
                hub_name,
                self.src,
                sid=self.sid,
                committed=flow.committed,
                limit=flow.acked(),
                chunk=self.chunk if first else 0,
                window=self.window if first else 0,
                resend=resend,
            )
        )


_RELEASED = memoryview(b"")


def _write_all(f: Any, data: memoryview) -> int:
    view = data
    while view.nbytes:
        n = f.write(view)
        view = view[n:]
    return data.nbytes


class StreamHub:
    """Every stream of one cell: incoming ones by (sender, sid), outgoing ones by sid.

    Args:
        port: the cell's router.
        face: what the stream handlers get as ``ctx.cell``.
        max_incoming: streams received at once; more are refused with ``Overloaded``.
        idle: seconds a receiving stream may see no progress before it fails.
        digest: whether receivers compute the whole-object SHA-256 (senders decide for
            their side per stream).
    """

    def __init__(
        self, port: Port, face: CellAPI, *, max_incoming: int = 64, idle: float = 60.0
    ) -> None:
        self.port = port
        self._face = face
        self.max_incoming = max_incoming
        self.idle = idle
        self.incoming: dict[tuple[str, int], IncomingStream] = {}
        self.digest_always: set[tuple[str, str]] = set()
        """(channel, topic) of streams whose SHA-256 this cell computes whatever the sender
        says (a receiver that checks a signed digest must not trust a relay to ask for it)."""
        self.outgoing: dict[int, StreamSender] = {}
        self._finished: OrderedDict[tuple[str, int], Frame | None] = OrderedDict()
        self.counters: Counter[str] = Counter()

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            receiving=len(self.incoming), sending=len(self.outgoing), **self.counters
        )

    # ------------------------------------------------------------------ dispatch
    def on_frame(self, frame: Frame) -> None:
        """A stream message addressed to this cell (never waits)."""
        h = frame.header
        try:
            if isinstance(h, StreamData):
                self._on_data(h, frame)
            elif isinstance(h, StreamAck | StreamDone):
                sender = self.outgoing.get(h.sid)
                if sender is not None and sender.dst == h.src:
                    sender.on_answer(h, frame)
            elif isinstance(h, StreamOpen):
                self._on_open(h)
            elif isinstance(h, StreamEnd):
                self._on_end(h)
            elif isinstance(h, StreamAbort):
                self._on_abort(h)
        except (ProtocolError, StreamCorrupted) as exc:
            # A broken or damaged stream fails alone: never the link, never the cell.
            self._stream_error(h, exc)

    def _on_open(self, h: StreamOpen) -> None:
        key = (h.src, h.sid)
        stream = self.incoming.get(key)
        if stream is not None:  # a resume (or a duplicate open): say where we stand
            self.counters["resumes"] += 1
            self._post(stream.ack_frame(self.port.name, self._id(), first=True, resend=True))
            return
        if key in self._finished:
            done = self._finished[key]
            if done is not None:
                self._post(done)  # the answer was lost on the way: send it again
            return
        if h.resume:
            self._abort_to(h.src, h.src, h.sid, Status.STREAM_ABORTED, "unknown stream")
            return
        fn = self.port.admit(Kind.STREAM, h.src, h.channel, h.topic)
        if isinstance(fn, tuple):
            self._abort_to(h.src, h.src, h.sid, *fn)
            return
        if len(self.incoming) >= self.max_incoming:
            msg = f"{self.port.name} receives {self.max_incoming} streams already"
            self._abort_to(h.src, h.src, h.sid, Status.OVERLOADED, msg)
            return
        chunk, window = negotiate(h.chunk, h.window, self.port.limits.max_frame)
        # The sender's idle limit, if longer than ours, but never more than an hour: a peer
        # must not hold a receiving slot for ever by going silent.
        idle = max(self.idle, min(h.idle, _MAX_IDLE) if h.idle > 0 else 0.0)
        # A fan-out relay passes the sender's digest on and lets the final receivers check it:
        # hashing here too would cost the relay a core for nothing.
        digest = (h.digest or (h.channel, h.topic) in self.digest_always) and (
            h.channel,
            h.topic,
        ) != (FANOUT_CHANNEL, FANOUT_TOPIC)
        stream = IncomingStream(self, h, chunk, window, digest, idle)
        self.incoming[key] = stream
        self.counters["received"] += 1
        if not self.port.spawn(self._run_handler, stream, fn, h):
            del self.incoming[key]
            return
        self._post(stream.ack_frame(self.port.name, self._id(), first=True, resend=False))

    def _on_data(self, h: StreamData, frame: Frame) -> None:
        stream = self.incoming.get((h.src, h.sid))
        if stream is None:
            if (h.src, h.sid) not in self._finished:
                self._abort_to(h.src, h.src, h.sid, Status.STREAM_ABORTED, "unknown stream")
            return
        payload = frame.parts[0] if frame.parts else _RELEASED
        verdict = stream.on_data(h, memoryview(payload))
        if stream.damaged_seen:
            self.counters["damaged_chunks"] += stream.damaged_seen
            stream.damaged_seen = 0
        if verdict is Verdict.RESEND:
            self.counters["resends_asked"] += 1
            self._post(stream.ack_frame(self.port.name, self._id(), first=False, resend=True))

    def _on_end(self, h: StreamEnd) -> None:
        stream = self.incoming.get((h.src, h.sid))
        if stream is None:
            return
        if stream.on_end(h) is EndVerdict.RESEND:
            self._post(stream.ack_frame(self.port.name, self._id(), first=False, resend=True))

    def _on_abort(self, h: StreamAbort) -> None:
        if h.sender == self.port.name:  # about a stream we send
            sender = self.outgoing.get(h.sid)
            if sender is not None:
                sender.on_abort(h)
            return
        if h.src != h.sender:
            # A cell on the way reporting trouble with the sender's stream: the sender resumes
            # or gives up itself. Nothing here is keyed by (that cell, sid): leave it alone.
            return
        stream = self.incoming.pop((h.src, h.sid), None)
        if stream is not None:
            stream.fail(
                StreamAborted(f"{h.src} aborted the stream: {h.message}", reported_by=h.src)
            )

    def _stream_error(self, h: object, exc: ProtocolError | StreamCorrupted) -> None:
        """A peer broke the stream protocol, or its bytes kept arriving damaged: that stream
        fails (both ends learn why), not the link."""
        if isinstance(h, StreamData | StreamEnd | StreamOpen):
            stream = self.incoming.pop((h.src, h.sid), None)
            if stream is not None:
                stream.fail(exc)
            status = (
                Status.STREAM_CORRUPTED if isinstance(exc, StreamCorrupted) else Status.BAD_REQUEST
            )
            self._finished_put((h.src, h.sid), None)
            self._abort_to(h.src, h.src, h.sid, status, str(exc))
        elif isinstance(h, StreamAck | StreamDone):
            sender = self.outgoing.get(h.sid)
            if sender is not None:
                sender.fail(exc)

    # ------------------------------------------------------------------ handlers
    async def _run_handler(self, stream: IncomingStream, fn: StreamHandler, h: StreamOpen) -> None:
        port = self.port
        key = (stream.src, stream.sid)
        ctx = Context(
            self._face, h.src, h.channel, h.topic, h.id, h.route, h.headers, math.inf, port.clock
        )
        try:
            try:
                result = await fn(ctx, stream)
                body = as_payload(result)
            except Exception as exc:
                self.abort(stream, *handler_failure(port, exc, h.channel, h.topic, h.src))
                return
            done = Frame(
                originate(
                    StreamDone,
                    self._id(),
                    port.name,
                    stream.src,
                    headers=dict(body.headers),
                    sid=stream.sid,
                    sha256=stream.sha256 if stream.finished else "",
                    received=stream.received,
                    codec=body.codec,
                ),
                body.parts,
            )
            self._finished_put(key, done)
            await port.send(done)
        except FlareError as exc:
            port.log.info("stream answer could not be sent", dst=stream.src, error=str(exc))
        finally:
            self.incoming.pop(key, None)
            stream.fail(StreamAborted("the stream handler returned"))

    def _finished_put(self, key: tuple[str, int], done: Frame | None) -> None:
        self._finished[key] = done
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)

    # ------------------------------------------------------------------ sending small frames
    def _id(self) -> int:
        return self.port.next_id()

    def _post(self, frame: Frame) -> None:
        self.port.post(frame)

    def ack(self, stream: IncomingStream) -> None:
        self._post(stream.ack_frame(self.port.name, self._id(), first=False, resend=False))

    def abort(self, stream: IncomingStream, status: Status, message: str) -> None:
        """Give up an incoming stream and tell its sender (again, if it probes later: the
        abort is kept with the finished streams)."""
        key = (stream.src, stream.sid)
        self.incoming.pop(key, None)
        stream.fail(error_for_status(status, message, self.port.name))
        self._finished_put(key, self._abort_to(stream.src, stream.src, stream.sid, status, message))

    def _abort_to(self, dst: str, sender: str, sid: int, status: Status, message: str) -> Frame:
        name = self.port.name
        abort = originate(
            StreamAbort,
            self._id(),
            name,
            dst,
            sid=sid,
            status=int(status),
            message=message,
            sender=sender,
        )
        frame = Frame(abort)
        self._post(frame)
        return frame

    def trouble(self, h: StreamOpen | StreamData | StreamEnd, status: Status, message: str) -> None:
        """A relay could not pass a sender's stream message on: tell the sender (who resumes
        once the path is back). Called by the relaying cell."""
        self._abort_to(h.src, h.src, h.sid, status, message)

    def close(self) -> None:
        """The cell stops: every stream fails."""
        for stream in list(self.incoming.values()):
            stream.fail(StreamAborted(f"cell {self.port.name} stopped"))
        self.incoming.clear()
        for sender in list(self.outgoing.values()):
            sender.fail(StreamAborted(f"cell {self.port.name} stopped"))


__all__ = ["IncomingStream", "StreamHandler", "StreamHub"]
