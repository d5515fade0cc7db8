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

Each incoming stream holds one :class:`~flare_async.streaming.ReceiverMachine`: the hub turns
the sender's frames into its events and its ``Ack``/``AskResend``/``StreamFail`` into frames;
the stream queues what it ``Deliver``s and turns ``next_read`` into the handler's chunks, waits
(``StreamWait``, then ``on_tick``: a stall) and end (``ReceiverComplete``: the digest checked).
Past ~500 lines because the two carry out one machine together and ``IncomingStream`` is the
handlers' API (imported from here by ``cell/__init__`` and ``_system``).
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
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
from flare_async.cell._sources import open_digest
from flare_async.cell._stream_out import StreamSender
from flare_async.errors import (
    FlareError,
    ProtocolError,
    Status,
    StreamAborted,
    StreamCorrupted,
    error_for_status,
)
from flare_async.streaming import (
    BLAKE3,
    CRYPTOGRAPHIC,
    Ack,
    AskResend,
    Deliver,
    Progress,
    ProgressMeter,
    ReceiverComplete,
    ReceiverMachine,
    ReceiverState,
    StreamFail,
    StreamWait,
    check_algorithm,
    checksum,
    normalize_digest,
    parse_digest,
    receiver_idle,
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
ORIGIN_HEADER = "fanout-origin"
"""The header a fan-out relay adds to the streams it feeds: where the stream came from."""

StreamHandler = Callable[[Context, "IncomingStream"], Awaitable[Any]]


def stream_origin(me: str, src: str, headers: Mapping[str, str]) -> str:
    """Where a stream arriving at ``me`` from ``src`` came from: ``src``, or the
    ``fanout-origin`` a relay above ``me`` names (a relay on the path could put any ``src``
    on what it forwards anyway; the header from any other cell is ignored)."""
    claimed = headers.get(ORIGIN_HEADER, "")
    return claimed if claimed and me.startswith(f"{src}.") else src


_FINISHED_KEPT = 256
"""Finished streams remembered per cell, to answer a sender whose final answer was lost."""


class IncomingStream:
    """One stream arriving at this cell (see the module text).

    Attributes:
        src: the sending cell (for a stream a relay fanned out, that relay).
        origin: the cell the object came from: ``src``, or for a stream that a relay above
            this cell fanned out (``Cell.stream_many``), the cell that sent it to the relay,
            as the relay reports it (``fanout-origin``). Decide who may send by this. A relay
            above this cell could claim any origin, as it could put any ``src`` on what it
            forwards; the claim is taken from no other cell.
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
        machine: ReceiverMachine,
        algorithm: str,
        origin: str,
    ) -> None:
        self._hub = hub
        self._machine = machine
        self.src = open_.src
        self.sid = open_.sid
        self.channel = open_.channel
        self.topic = open_.topic
        self.size = open_.size if open_.size >= 0 else None
        self.codec = open_.codec
        self.headers = dict(open_.headers)
        self.origin = origin  # (stream_origin's, as the hub admitted it by)
        self.chunk = machine.chunk
        self.window = machine.window
        self.idle = machine.idle
        self._chunks: deque[memoryview] = deque()  # delivered, not taken yet (see max_chunks)
        self._wakeup: SignalLike | None = None
        self._expected_sha = normalize_digest(open_.sha256)  # checked by the hub
        self.digest_requested: bool | str = open_.digest_alg if open_.digest else False
        """The sender's digest algorithm, or False (a fan-out relay asks the same)."""
        self._digest = open_digest(algorithm, machine.chunk) if algorithm else None
        self._digest_started = False
        self.digest_computed = False
        """:attr:`digest` was computed here from the bytes taken (and matched the sender's),
        not only announced by the sender (who may announce one without asking this cell to
        compute it): what a handler that trusts the digest checks."""
        self.digest = ""
        """The digest of the bytes taken, in text form (``"crc32c:<hex>"``, ``"blake3:<hex>"``,
        ``"sha256:<hex>"``), once the stream ended (verified against the sender's when both
        computed one); else the sender's, if it announced one."""
        self.received = 0
        self.trailer: dict[str, str] = {}
        """Headers the sender put in the stream's end message (``seal``: a signature over
        the digest); complete once the stream ended."""
        self.finished = False
        """The handler took the whole object and its digest matched (from then on, reading
        gives ``None``)."""
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
        digest = self._digest
        if digest is not None and not digest.hashes_bytes:
            digest = None  # the CRCs were folded in as the chunks arrived
        elif digest is not None and not self._digest_started:
            self._digest_started = True
            self._hub.port.spawn(digest.run, name=f"stream {self.src}/{self.sid} digest")
        machine = self._machine
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                if digest is not None:
                    await digest.update(chunk)
                self.received += chunk.nbytes
                for ack in machine.on_consumed(chunk.nbytes):  # credit grew by a quarter
                    self._hub.ack(self, ack)
                return chunk
            if self.finished:
                return None
            action = machine.next_read(self._hub.port.clock())
            if isinstance(action, StreamWait):
                signal = self._wakeup = Signal()
                deadline = math.inf if action.deadline is None else action.deadline
                with anyio.CancelScope(deadline=deadline):
                    await signal.wait()
                if self._wakeup is signal:  # nobody woke us: the deadline passed
                    self._wakeup = None
                    for fail in machine.on_tick(self._hub.port.clock()):  # stalled
                        if fail.abort is not None:
                            self._hub.abort(self, fail.abort, fail.message)
            elif isinstance(action, ReceiverComplete):
                await self._finish()
                return None
            else:  # StreamFail
                raise action.error

    async def _finish(self) -> None:
        if self._digest is not None:
            self.digest = await self._digest.hexdigest()
            if self._expected_sha and self.digest != self._expected_sha:
                error = StreamCorrupted(
                    f"stream {self.sid} from {self.src} does not match its digest "
                    f"(expected {self._expected_sha[:23]}..., got {self.digest[:23]}...)"
                )
                self.fail(error)
                self._hub.abort(self, Status.STREAM_CORRUPTED, str(error))
                raise error
            self.digest_computed = True
        else:
            self.digest = self._expected_sha
        self.finished = True

    @property
    def sha256(self) -> str:
        """:attr:`digest` (its name from when SHA-256 was the only algorithm)."""
        return self.digest

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
        """The whole object's digest (text form) once the stream ended: the one computed
        here, else the one the sender announced ("" if neither). A relay passes it on when it
        fans out."""
        return self.digest

    def progress(self) -> Progress:
        """Bytes received so far, rate and ETA."""
        return self._meter.update(self._machine.committed)

    # ------------------------------------------------------------------ fed by the hub
    def _wake(self) -> None:
        signal, self._wakeup = self._wakeup, None
        if signal is not None:
            signal.set()

    def _deliver(self, payload: memoryview, offset: int, crc: int) -> None:
        """The machine's ``Deliver``: the chunk (its CRC checked) is the handler's to take."""
        if self._digest is not None:
            self._digest.add(offset, payload.nbytes, crc)  # a CombinedDigest folds it in
        self._chunks.append(payload)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """The stream failed here (the machine keeps the first failure; what the sender is
        told is the hub's to send): drop what is queued, wake the handler."""
        self._machine.fail(error, None)
        self._release()

    def close(self) -> None:
        """The handler returned: the stream is over here."""
        self._machine.close()
        self._release()

    def _release(self) -> None:
        self._chunks.clear()
        if self._digest is not None:
            self._digest.close()
        self._wake()


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
            for ask in stream._machine.on_open():
                self.ack(stream, ask)
            return
        if key in self._finished:
            done = self._finished[key]
            if done is not None:
                self._post(done)  # the answer was lost on the way: send it again
            return
        if h.resume:
            self._abort_to(h.src, h.src, h.sid, Status.STREAM_ABORTED, "unknown stream")
            return
        # judged by origin: a stream a relay above fanned out is the sender's, not the relay's
        origin = stream_origin(self.port.name, h.src, h.headers)
        fn = self.port.admit(Kind.STREAM, origin, h.channel, h.topic)
        if isinstance(fn, tuple):
            self._abort_to(h.src, h.src, h.sid, *fn)
            return
        if len(self.incoming) >= self.max_incoming:
            msg = f"{self.port.name} receives {self.max_incoming} streams already"
            self._abort_to(h.src, h.src, h.sid, Status.OVERLOADED, msg)
            return
        machine = ReceiverMachine(  # raises ProtocolError for a proposal of no size
            h.src,
            chunk=h.chunk,
            window=h.window,
            max_chunk=self.port.limits.max_frame,
            idle=receiver_idle(self.idle, h.idle),
            sid=h.sid,
        )
        algorithm = self._digest_to_compute(h)  # raises ProtocolError: refused
        stream = IncomingStream(self, h, machine, algorithm, origin)
        self.incoming[key] = stream
        if not self.port.spawn(self._run_handler, stream, fn, h):
            del self.incoming[key]
            return
        self.counters["received"] += 1
        for first in machine.accept():  # the first window
            self.ack(stream, first)

    def _digest_to_compute(self, h: StreamOpen) -> str:
        """The digest this cell computes of stream ``h`` ("" for none).

        A fan-out relay passes the sender's digest on and lets the final receivers check it:
        hashing there too would cost the relay a core for nothing. A topic that requires a
        digest (``require_digest``) gets a cryptographic one whatever the sender asked.

        Raises:
            ProtocolError: an unknown algorithm or a malformed digest; or a non-cryptographic
                one where a digest is required.
        """
        algorithm = check_algorithm(h.digest_alg) if h.digest else ""
        if h.sha256:
            known = parse_digest(h.sha256)[0]
            if h.digest and known != algorithm:
                raise ProtocolError(f"the stream announces {algorithm} but a {known} digest")
            algorithm = known
        if (h.channel, h.topic) == (FANOUT_CHANNEL, FANOUT_TOPIC):
            return ""
        if (h.channel, h.topic) in self.digest_always:
            if algorithm and algorithm not in CRYPTOGRAPHIC:
                raise ProtocolError(
                    f"{h.channel}/{h.topic} requires a cryptographic digest, not {algorithm}"
                )
            return algorithm or BLAKE3
        return algorithm

    def _on_data(self, h: StreamData, frame: Frame) -> None:
        stream = self.incoming.get((h.src, h.sid))
        if stream is None:
            if (h.src, h.sid) not in self._finished:
                self._abort_to(h.src, h.src, h.sid, Status.STREAM_ABORTED, "unknown stream")
            return
        payload = memoryview(frame.parts[0] if frame.parts else _RELEASED)
        crc = checksum(payload)
        intact = crc == h.crc
        for action in stream._machine.on_data(h.offset, payload.nbytes, intact):
            if isinstance(action, Deliver):
                stream._deliver(payload, action.offset, crc)
            elif isinstance(action, AskResend):
                self.counters["resends_asked"] += 1
                self.ack(stream, action)
            else:  # StreamFail: the chunk kept arriving damaged (not asked again)
                self._drop(h, action)
                return
        if not intact:
            self.counters["damaged_chunks"] += 1

    def _on_end(self, h: StreamEnd) -> None:
        stream = self.incoming.get((h.src, h.sid))
        if stream is None:
            return
        if h.sha256:
            stream._expected_sha = normalize_digest(h.sha256)  # ProtocolError: the stream fails
        if h.headers:
            stream.trailer = dict(h.headers)
        machine = stream._machine
        for ask in machine.on_end(h.size):  # AskResend: bytes are missing at the end
            self.ack(stream, ask)
        if machine.state is ReceiverState.COMPLETE:
            stream._wake()  # the handler finishes (checks the digest)

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
            stream._machine.on_abort(h.message, h.src)  # StreamFail, nothing to send back
            stream._release()

    def _stream_error(self, h: object, exc: ProtocolError | StreamCorrupted) -> None:
        """A peer broke the stream protocol, or its bytes kept arriving damaged: that stream
        fails (both ends learn why), not the link."""
        if isinstance(h, StreamData | StreamEnd | StreamOpen):
            status = (
                Status.STREAM_CORRUPTED if isinstance(exc, StreamCorrupted) else Status.BAD_REQUEST
            )
            self._drop(h, StreamFail(exc, status, str(exc)))
        elif isinstance(h, StreamAck | StreamDone):
            sender = self.outgoing.get(h.sid)
            if sender is not None:
                sender.fail(exc)

    def _drop(self, h: StreamData | StreamEnd | StreamOpen, fail: StreamFail) -> None:
        """The stream of ``h`` failed for what its sender sent: it fails here and the sender
        is told (once: a later probe gets nothing, the sender already knows)."""
        stream = self.incoming.pop((h.src, h.sid), None)
        if stream is not None:
            stream.fail(fail.error)
        self._finished_put((h.src, h.sid), None)
        if fail.abort is not None:
            self._abort_to(h.src, h.src, h.sid, fail.abort, fail.message)

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
            stream.close()

    def _finished_put(self, key: tuple[str, int], done: Frame | None) -> None:
        self._finished[key] = done
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)

    # ------------------------------------------------------------------ sending small frames
    def _id(self) -> int:
        return self.port.next_id()

    def _post(self, frame: Frame) -> None:
        self.port.post(frame)

    def ack(self, stream: IncomingStream, ack: Ack | AskResend) -> None:
        """Carry out the machine's ``Ack`` or ``AskResend``: a ``StreamAck`` to the sender."""
        h = originate(
            StreamAck,
            self._id(),
            self.port.name,
            stream.src,
            sid=stream.sid,
            committed=ack.committed,
            limit=ack.limit,
            chunk=ack.chunk,
            window=ack.window,
            resend=type(ack) is AskResend,
        )
        self._post(Frame(h))

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
