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
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

from flare_async._concurrency import Signal, SignalLike
from flare_async.cell._api import ProgressCallback, Seal
from flare_async.cell._payload import Payload
from flare_async.cell._port import Port
from flare_async.errors import (
    DeadlineExceeded,
    ProtocolError,
    Status,
    StreamAborted,
    StreamStalled,
    TransportError,
    Unreachable,
    error_for_status,
)
from flare_async.streaming import ChunkLog, Digest, ProgressMeter, SenderFlow
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

_PATH_TROUBLE = frozenset({Status.UNREACHABLE, Status.LINK_BROKEN, Status.DEADLINE_EXCEEDED})
"""Statuses with which a relay reports it could not pass a chunk on: resume, do not fail."""


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
        digest: bool,
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
        self.sha256 = sha256
        self.idle = idle
        self.probe = probe if probe is not None else min(5.0, idle / 4)
        self.codec = codec
        self.headers = dict(headers)
        self.progress = progress

    def to_fanout(self, channel: str, topic: str, key: str, value: str) -> StreamOptions:
        """The same options addressed to a relay's fan-out handler, with one more header
        (and no progress callback: the relay's answer is not one destination's)."""
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
            progress=None,
        )


class StreamSender:
    """The sending end of one stream to one destination."""

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
        self.flow = SenderFlow(opts.chunk, opts.window)
        self.reply: Payload | None = None
        self.error: BaseException | None = None
        self.received = 0
        self.remote_sha256 = ""
        self._signal: SignalLike | None = None
        self._wanted = False  # a wake-up arrived while not waiting
        self.last_progress = port.clock()
        self.connected = False  # an ack came since the last path failure
        self._end_sent_at = -1
        self._meter = ProgressMeter(port.clock, dst, sid, log.size)
        self._busy: StreamAbort | None = None  # the receiver had no slot for the stream yet
        self._busy_tries = 0

    # ------------------------------------------------------------------ fed by the hub
    def wake(self) -> None:
        signal, self._signal = self._signal, None
        if signal is not None:
            signal.set()
        else:
            self._wanted = True

    def on_answer(self, h: StreamAck | StreamDone, frame: Frame) -> None:
        if self.error is not None or self.reply is not None:
            return
        if isinstance(h, StreamDone):
            self.reply = Payload.received(frame.parts, h.codec, h.headers)
            self.received = h.received
            self.remote_sha256 = h.sha256
            self._report(max(self.flow.committed, h.received))
            self.wake()
            return
        before = self.flow.committed
        if self.flow.on_ack(h.committed, h.limit, chunk=h.chunk, window=h.window, resend=h.resend):
            self.counters["rewinds"] += 1
        self.connected = True
        complete = self.log.eof and self.flow.committed >= self.log.end
        if self.flow.committed > before or complete:
            self.last_progress = self.port.clock()  # bytes moved, or the handler is alive
            self.log.commit(self.dst, self.flow.committed)
            if self.flow.committed > before:
                self._report(self.flow.committed)
        self.wake()

    def _report(self, done: int) -> None:
        """Call the progress callback; its exceptions are the caller's, not the cell's."""
        if self.opts.progress is None:
            return
        try:
            self.opts.progress(self._meter.update(done))
        except Exception as exc:
            self.port.log.warning("progress callback failed", dst=self.dst, error=repr(exc))

    def on_abort(self, h: StreamAbort) -> None:
        src, me, dst = h.src, self.port.name, self.dst
        on_path = dst.startswith(src + ".") or me.startswith(src + ".")
        if src != dst and not on_path:
            return  # no cell off the path may end our stream
        # Once the receiver has answered, a relay's report is trouble on the path, which a
        # resume gets over; before that, as for a request, no route means no stream.
        if h.src != self.dst and h.status in _PATH_TROUBLE and self.flow.started:
            self.connected = False  # a relay lost the path: probe until it is back
            self.wake()
            return
        if h.src == self.dst and h.status == Status.OVERLOADED and not self.flow.started:
            # The receiver takes as many streams at once as it allows, and this one came when
            # it was full: ask again a little later (backpressure), as long as the idle limit
            # allows, instead of failing a transfer that only has to wait its turn.
            self._busy = h
            self.wake()
            return
        if h.status == Status.STREAM_ABORTED:
            self.fail(StreamAborted(h.message, reported_by=h.src))
        else:
            self.fail(error_for_status(h.status, h.message, h.src))

    async def _open_again(self, refused: StreamAbort) -> None:
        """Open the stream again after a randomized pause that grows with each refusal (up
        to the probe interval); past the idle limit the refusal is the stream's error."""
        self._busy = None
        if self.port.clock() - self.last_progress > self.opts.idle:
            raise error_for_status(refused.status, refused.message, refused.src)
        self._busy_tries += 1
        pause = min(self.opts.probe, 0.02 * 2 ** min(self._busy_tries, 8))
        await anyio.sleep(pause * (0.5 + self.port.random()))
        self.counters["waits"] += 1
        await self._send(self._open(resume=False))

    def fail(self, error: BaseException) -> None:
        if self.error is None and self.reply is None:
            self.error = error
        self.wake()

    # ------------------------------------------------------------------ the pump
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
                digest=o.digest or bool(o.sha256),
                idle=o.idle,
            )
        )

    async def _send(self, frame: Frame) -> bool:
        """Send one frame; False when the path failed (then probe until it is back)."""
        try:
            await self.port.send(frame)
        except (TransportError, Unreachable, DeadlineExceeded) as exc:
            if not self.flow.started and isinstance(exc, Unreachable):
                raise  # no route at all at the start: fail at once, as a request would
            self.connected = False
            self.port.log.info("stream path failed, will resume", dst=self.dst, error=str(exc))
            return False
        return True

    async def _wait(self) -> None:
        """Wait for an answer, a change of the log, or the probe interval; probe or give up
        when nothing moved."""
        if self._wanted:
            self._wanted = False
            return
        signal = self._signal = Signal()
        with anyio.move_on_after(self.opts.probe) as scope:
            await signal.wait()
        if not scope.cancelled_caught:
            return
        self._signal = None
        if self.port.clock() - self.last_progress > self.opts.idle:
            self.counters["failed"] += 1
            raise StreamStalled(
                f"stream {self.sid} to {self.dst} made no progress for {self.opts.idle} s "
                f"({self.flow.committed} B committed)"
            )
        self.counters["probes"] += 1
        self._end_sent_at = -1  # the End may have been lost: send it again after the probe
        await self._send(self._open(resume=self.flow.started))

    async def run(self, digest_result: Callable[[], Awaitable[str]]) -> None:
        """Send the object; returns once the receiver answered (``reply``) or failed."""
        log = self.log
        flow = self.flow
        try:
            if not await self._send(self._open(resume=False)):
                self.connected = False
            while self.reply is None:
                if self.error is not None:
                    raise self.error
                if self._busy is not None:
                    await self._open_again(self._busy)
                    continue
                if not flow.started or not self.connected:
                    await self._wait()
                    continue
                offset = flow.next_offset
                if offset < log.end:
                    held = log.chunk_at(offset)
                    if held is None:  # cannot happen: the log keeps what is not committed
                        raise ProtocolError(f"stream {self.sid}: no chunk at {offset} to resend")
                    data = held.data
                    if len(data) > flow.credit:
                        await self._wait()
                        continue
                    header = self._header(StreamData, sid=self.sid, offset=offset, crc=held.crc)
                    frame = Frame(header, (data,))
                    if await self._send(frame):
                        flow.sent(len(data))
                    continue
                if not log.eof:
                    await self._wait()  # for the reader task to bring the next chunk
                    continue
                if self._end_sent_at != offset:
                    sha = await digest_result()
                    trailer = dict(self.opts.seal(self.dst, sha)) if self.opts.seal else None
                    end = self._header(StreamEnd, trailer, sid=self.sid, size=log.end, sha256=sha)
                    if await self._send(Frame(end)):
                        self._end_sent_at = offset
                    continue
                await self._wait()
        finally:
            log.leave(self.dst)
            log.unwatch(self)
            if self.reply is None:
                self._abort_receiver()

    def _abort_receiver(self) -> None:
        """The sender gave up (failed, cancelled, stopping): tell the receiver at once, so its
        handler and buffers do not wait for an idle timeout. Never waits, never raises."""
        error = self.error
        if isinstance(error, StreamAborted | Unreachable) and error.reported_by == self.dst:
            return  # the receiver ended it
        name = self.port.name
        why = f"the sender gave up: {error!r}" if error is not None else "the sender gave up"
        abort = self._header(
            StreamAbort,
            sid=self.sid,
            status=int(Status.STREAM_ABORTED),
            message=why[:500],
            sender=name,
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
        except Exception as exc:  # kept as this destination's outcome, never a group
            sender.error = sender.error or exc
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
            if digest is not None:
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
