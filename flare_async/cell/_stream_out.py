"""The sending end of streams: ``Cell.stream`` and ``Cell.stream_many``.

One :class:`~flare_async.streaming.ChunkLog` reads the source once; one
:class:`StreamSender` per destination sends from it under that destination's credit. So an
object sent to N cells is read and digested once, and memory stays within the window: the log
reads ahead only while it holds less than a window, and drops a chunk once every destination
committed it.

Failures of the path are not failures of the stream. When a send fails (the link broke, no
route) or a relay reports it could not pass a chunk on, the sender waits and probes (a
``StreamOpen`` with ``resume``) every ``probe`` seconds; the receiver answers with what it
holds, and the sender resends from there. Only ``idle`` seconds without progress fail the
stream (:class:`~flare_async.errors.StreamStalled`): a long transfer that moves never does.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

from flare_async._concurrency import Signal, SignalLike
from flare_async.cell._api import ProgressCallback, Seal
from flare_async.cell._payload import Payload
from flare_async.cell._port import Port
from flare_async.cell._sources import ChunkLog, Digest
from flare_async.errors import DeadlineExceeded, ProtocolError, TransportError, Unreachable
from flare_async.streaming import (
    SHA256,
    Committed,
    Probe,
    ProgressMeter,
    SendData,
    SendEnd,
    SenderBackoff,
    SenderDone,
    SenderMachine,
    SenderState,
    SendOpen,
    StreamFail,
    StreamWait,
)
from flare_async.wire import (
    Frame,
    Routed,
    StreamAbort,
    StreamAck,
    StreamData,
    StreamDone,
    StreamEnd,
    StreamOpen,
    originate,
)

R = TypeVar("R", bound=Routed)

_SENDING = SenderState.SENDING


class StreamOptions:
    """How a stream is sent (see ``Cell.stream``)."""

    __slots__ = (
        "channel",
        "chunk",
        "codec",
        "digest",
        "headers",
        "idle",
        "probe",
        "progress",
        "seal",
        "sha256",
        "topic",
        "window",
    )

    def __init__(
        self,
        channel: str,
        topic: str,
        *,
        chunk: int,
        window: int,
        digest: str,
        sha256: str,
        idle: float,
        probe: float | None,
        codec: str,
        headers: Mapping[str, str],
        progress: ProgressCallback | None,
        seal: Seal | None = None,
    ) -> None:
        self.seal = seal
        self.channel = channel
        self.topic = topic
        self.chunk = chunk
        self.window = window
        self.digest = digest
        """The whole-object digest's algorithm ("" for none: see ``stream_digest``)."""
        self.sha256 = sha256
        self.idle = idle
        self.probe = probe if probe is not None else min(5.0, idle / 4)
        self.codec = codec
        self.headers = dict(headers)
        self.progress = progress

    def to_fanout(self, channel: str, topic: str, key: str, value: str) -> StreamOptions:
        """The same options addressed to a relay's fan-out handler, with one more header.
        Progress is the relay's (``Progress.peer`` names it): what it committed, which its
        own window keeps within reach of the slowest destination behind it."""
        return StreamOptions(
            channel,
            topic,
            chunk=self.chunk,
            window=self.window,
            digest=self.digest,
            sha256=self.sha256,
            idle=self.idle,
            probe=self.probe,
            codec=self.codec,
            headers={**self.headers, key: value},
            progress=self.progress,
        )


class StreamSender:
    """The sending end of one stream to one destination: executes one
    :class:`~flare_async.streaming.SenderMachine` (which holds the protocol's state, its
    credit and its timers), turning its actions into frames, waits and errors.

    Attributes:
        machine: the stream's state machine.
        reply: the receiver's answer, once the machine is DONE.
        error: why the stream failed, once the machine is FAILED (else None).
    """

    def __init__(
        self,
        port: Port,
        counters: Counter[str],
        dst: str,
        sid: int,
        log: ChunkLog,
        opts: StreamOptions,
    ) -> None:
        self.port = port
        self.counters = counters
        self.dst = dst
        self.sid = sid
        self.log = log
        # Joined here, not when run() starts: every destination holds chunks back from the
        # start, or one that fails first (and leaves) lets the log drop chunks another has not
        # sent yet.
        log.join(dst)
        self.opts = opts
        self.machine = SenderMachine(
            dst,
            me=port.name,
            now=port.clock(),
            sid=sid,
            chunk=opts.chunk,
            window=opts.window,
            idle=opts.idle,
            probe=opts.probe,
        )
        self.reply: Payload | None = None
        self.received = 0
        self.remote_sha256 = ""
        self._signal: SignalLike | None = None
        self._wanted = False  # a wake-up arrived while not waiting
        self._meter = ProgressMeter(port.clock, dst, sid, log.size)

    @property
    def error(self) -> BaseException | None:
        failure = self.machine.failure
        return None if failure is None else failure.error

    # ------------------------------------------------------------------ fed by the hub
    def wake(self) -> None:
        signal, self._signal = self._signal, None
        if signal is not None:
            signal.set()
        else:
            self._wanted = True

    def on_answer(self, h: StreamAck | StreamDone, frame: Frame) -> None:
        """The receiver's ``StreamAck`` or ``StreamDone``, for the machine.

        Raises:
            ProtocolError: an ack committing bytes never sent (the machine is then FAILED).
        """
        m = self.machine
        if isinstance(h, StreamDone):
            if m.on_done(h.received):  # SenderDone (nothing once the stream is over)
                self.reply = Payload.received(frame.parts, h.codec, h.headers)
                self.received = h.received
                self.remote_sha256 = h.sha256
                self._report(max(m.flow.committed, h.received))
        else:
            for action in m.on_ack(
                self.port.clock(),
                h.committed,
                h.limit,
                chunk=h.chunk,
                window=h.window,
                resend=h.resend,
            ):
                if type(action) is Committed:
                    self.log.commit(self.dst, action.offset)
                    self._report(action.offset)
                else:  # Rewind
                    self.counters["rewinds"] += 1
        self.wake()

    def on_abort(self, h: StreamAbort) -> None:
        """A ``StreamAbort`` about this stream, for the machine (it knows whose to heed)."""
        self.machine.on_abort(self.port.clock(), h.status, h.message, h.src)
        self.wake()

    def fail(self, error: BaseException) -> None:
        """Give up (the source failed, the cell stops, a broken answer)."""
        self.machine.fail(error)
        self.wake()

    def _report(self, done: int) -> None:
        """Call the progress callback; its exceptions are the caller's, not the cell's."""
        if self.opts.progress is None:
            return
        try:
            self.opts.progress(self._meter.update(done))
        except Exception as exc:
            self.port.log.warning("progress callback failed", dst=self.dst, error=repr(exc))

    # ------------------------------------------------------------------ the pump
    async def run(self, digest_result: Callable[[], Awaitable[str]]) -> None:
        """Send the object; returns once the receiver answered (``reply``), raises the
        stream's error once it failed (after telling the receiver where the machine says)."""
        try:
            await self._pump(digest_result)
        except BaseException as exc:  # cancelled, or an error of the source or the cell
            self.machine.fail(exc)  # nothing changes where the machine failed already
            raise
        finally:
            self.log.leave(self.dst)
            self.log.unwatch(self)
            self._abort_receiver()

    async def _pump(self, digest_result: Callable[[], Awaitable[str]]) -> None:
        """Carry out the machine's actions until it is DONE (return) or FAILED (raise)."""
        m = self.machine
        log = self.log
        port = self.port
        await self._send(m.start())
        while True:
            if m.size is None and log.eof:
                m.source_ended(log.end)
            held = None
            if m.state is _SENDING:
                offset = m.flow.next_offset
                if offset < log.end:
                    held = log.chunk_at(offset)
                    if held is None:  # cannot happen: the log keeps what is not committed
                        raise ProtocolError(f"stream {self.sid}: no chunk at {offset} to send")
            action = m.next_action(None if held is None else len(held.data))
            if isinstance(action, SendData):
                assert held is not None
                header = originate(
                    StreamData,
                    port.next_id(),
                    port.name,
                    self.dst,
                    sid=self.sid,
                    offset=held.offset,
                    crc=held.crc,
                )
                await self._send(action, Frame(header, (held.data,)))
            elif isinstance(action, StreamWait):
                await self._wait(action.deadline)
            elif isinstance(action, SendEnd):
                sha = await digest_result()
                trailer = dict(self.opts.seal(self.dst, sha)) if self.opts.seal else None
                end = self._header(StreamEnd, trailer, sid=self.sid, size=action.size, sha256=sha)
                await self._send(action, Frame(end))
            elif isinstance(action, SenderBackoff):
                await anyio.sleep(action.pause * (0.5 + port.random()))
                if m.state is SenderState.BUSY:  # nothing else happened meanwhile
                    self.counters["waits"] += 1
                    await self._send(m.reopen())
            elif isinstance(action, SenderDone):
                return
            elif isinstance(action, StreamFail):
                raise action.error
            else:  # pragma: no cover - next_action returns nothing else
                raise ProtocolError(f"stream {self.sid}: {action!r} from next_action")

    async def _send(
        self, action: SendOpen | Probe | SendData | SendEnd, frame: Frame | None = None
    ) -> None:
        """Send the frame for ``action`` (an open or a probe: built here) and tell the machine
        it went out, or that the path failed (it resumes, or fails at once where there was no
        route before the first ack)."""
        if frame is None:
            frame = self._open(resume=isinstance(action, Probe) and action.resume)
        try:
            await self.port.send(frame)
        except (TransportError, Unreachable, DeadlineExceeded) as exc:
            if not self.machine.on_link_lost(exc, self.port.clock()):
                self.port.log.info("stream path failed, will resume", dst=self.dst, error=str(exc))
            return
        self.machine.sent(action, self.port.clock())

    async def _wait(self, deadline: float | None) -> None:
        """Wait for a wake-up (an answer, a change of the log) or the machine's deadline;
        past the deadline, tell the machine the time (it probes, or fails a stalled stream)."""
        if self._wanted:
            self._wanted = False
            return
        signal = self._signal = Signal()
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
            await signal.wait()
        if self._signal is not signal:
            return  # woken
        self._signal = None
        for action in self.machine.on_tick(self.port.clock()):
            if isinstance(action, Probe):
                self.counters["probes"] += 1
                await self._send(action)
            else:  # StreamFail (StreamStalled): next_action returns it, run raises it
                self.counters["failed"] += 1

    def _header(self, kind: type[R], headers: dict[str, str] | None = None, **fields: Any) -> R:
        """A new message of this stream to the receiver."""
        port = self.port
        return originate(kind, port.next_id(), port.name, self.dst, headers=headers, **fields)

    def _open(self, resume: bool) -> Frame:
        o = self.opts
        size = self.log.size
        return Frame(
            self._header(
                StreamOpen,
                dict(o.headers),
                channel=o.channel,
                topic=o.topic,
                sid=self.sid,
                size=-1 if size is None else size,
                codec=o.codec,
                sha256=o.sha256,
                chunk=o.chunk,
                window=o.window,
                resume=resume,
                digest=bool(o.digest),
                idle=o.idle,
                digest_alg=o.digest or SHA256,
            )
        )

    def _abort_receiver(self) -> None:
        """Carry out the machine's failure: where it says so (the sender gave up: failed,
        cancelled, stopping), tell the receiver at once, so its handler and buffers do not
        wait for an idle timeout. Never waits, never raises."""
        failure = self.machine.failure
        if failure is None or failure.abort is None:
            return  # done, or the receiver ended it
        abort = self._header(
            StreamAbort,
            sid=self.sid,
            status=int(failure.abort),
            message=failure.message,
            sender=self.port.name,
        )
        with contextlib.suppress(Exception):
            self.port.post(Frame(abort))


async def send_streams(
    port: Port,
    outgoing: dict[int, StreamSender],
    counters: Counter[str],
    dsts: list[str],
    log: ChunkLog,
    digest: Digest | None,
    opts: StreamOptions,
    per_dst: Mapping[str, StreamOptions],
    sha_from: Callable[[], str] | None = None,
) -> dict[str, StreamSender]:
    """Send one object to every destination from one log; returns each sender (its ``reply``
    or ``error``). Each sender is in ``outgoing`` (the hub's, by stream id) while it runs.
    ``per_dst`` overrides the options for some destinations (fan-out relays);
    ``sha_from`` gives the digest at the end when the source knows it (a relayed stream)."""
    senders: dict[str, StreamSender] = {}
    sha_known = opts.sha256
    sha_value: list[str] = []
    sha_lock = anyio.Lock()

    async def digest_result() -> str:
        if sha_known:
            return sha_known
        if sha_from is not None:
            return sha_from()
        if digest is None:
            return ""
        async with sha_lock:
            if not sha_value:
                sha_value.append(await digest.hexdigest())
        return sha_value[0]

    async def one(sender: StreamSender) -> None:
        try:
            await sender.run(digest_result)
        except Exception as exc:  # kept as this destination's outcome (the machine's failure)
            sender.fail(exc)
        finally:
            outgoing.pop(sender.sid, None)

    async def read_ahead() -> None:
        """Keep the log filled up to the window while the senders send from it, so reading
        the source (a file: in a worker thread) overlaps with the sending. A source that
        fails fails every destination with its error."""
        try:
            while not log.eof:
                if log.has_room:
                    await log.fill()
                else:
                    await log.wait_room()
        except Exception as exc:
            for sender in senders.values():
                sender.fail(exc)

    try:
        async with anyio.create_task_group() as tg:
            if digest is not None and digest.hashes_bytes:
                tg.start_soon(digest.run)
            tg.start_soon(read_ahead)
            async with anyio.create_task_group() as pumps:
                for dst in dsts:
                    o = per_dst.get(dst, opts)
                    sender = StreamSender(port, counters, dst, port.next_id(), log, o)
                    senders[dst] = sender
                    outgoing[sender.sid] = sender
                    counters["sent"] += 1
                    log.watch(sender)
                    pumps.start_soon(one, sender)
            if digest is not None:
                digest.close()
            tg.cancel_scope.cancel()  # the reader, if every destination stopped early
    finally:
        await log.aclose()
    return senders


__all__ = ["ProgressCallback", "Seal", "StreamOptions", "StreamSender", "send_streams"]
