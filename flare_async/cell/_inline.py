"""Small streams in one message: an object of at most ``inline`` bytes (64 KiB by default,
chosen per call) travels as one ``Request`` to the destination's *stream* handler, and the
handler's result comes back as its ``Reply``: two frames where a stream takes five or more
(open, ack, data, end, done), and no stream machinery at either end.

The request carries the stream's channel, topic, codec and headers as a request does, plus one
header, :data:`INLINE_HEADER`, whose JSON value holds what a stream's end message would: the
object's digest in text form (``""`` for none) and the trailer (``seal``). The receiver admits
it as a stream (its policy judges the origin, as for a fan-out stream), checks the digest over
the bytes it holds (so ``digest_computed`` means what it means for a stream), and hands the
handler an :class:`InlineStream`: the same reading API as a streamed object's.

What an inline object gives up: a stream resumes after a dropped link, and waits for a slow
handler for as long as the receiver answers its probes; an inline object is one request,
failed by a dropped link (``LinkBroken``; never resent, since its handler may have run), with
the stream's ``idle`` as its deadline (a fan-out relay's hop :data:`FANOUT_IDLES` times that).
A receiver whose handler queue is full answers ``Overloaded``, and
the sender tries again after a randomized, growing pause within ``idle``, as a stream whose
open is refused does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import msgspec

from flare_async.cell._handlers import Context
from flare_async.cell._payload import Payload
from flare_async.cell._sources import digest_parts
from flare_async.cell._stream_in import FANOUT_CHANNEL, FANOUT_TOPIC, IncomingStream
from flare_async.cell._stream_out import StreamOptions
from flare_async.errors import (
    BadRequest,
    FlareError,
    Overloaded,
    ProtocolError,
    StreamCorrupted,
)
from flare_async.streaming import BLAKE3, CRYPTOGRAPHIC, Progress, normalize_digest, parse_digest
from flare_async.wire import Buffer, Request

INLINE_MAX = 64 * 1024
"""Objects of at most this many bytes go inline by default (``Cell(inline_max=)``)."""
INLINE_HEADER = "inline-stream"
"""The request header that makes a request an inline stream (JSON :class:`InlineInfo`)."""
FANOUT_IDLES = 4
"""A fan-out relay's inline hop gets this many ``idle`` periods as its deadline."""
_FIRST_PAUSE = 0.05
_MOST_PAUSE = 2.0

StreamHandler = Callable[[Context, IncomingStream], Awaitable[Any]]


class InlineInfo(msgspec.Struct, frozen=True):
    """What :data:`INLINE_HEADER` holds: the object's headers (a stream's open would carry
    them), its digest in text form (``""``: none announced) and the trailer a stream's end
    message would carry. The object's headers travel here, not as the request's own: those
    are the request's (a cell that signs its messages puts its signature there)."""

    headers: dict[str, str] = {}
    sha256: str = ""
    trailer: dict[str, str] = {}


def read_info(h: Request) -> InlineInfo:
    """The :class:`InlineInfo` of inline request ``h``.

    Raises:
        BadRequest: it is not JSON of that shape.
    """
    try:
        return _decode_info(h.headers[INLINE_HEADER])
    except msgspec.DecodeError as exc:
        raise BadRequest(f"bad inline stream from {h.src}: {exc}") from None


_decode_info = msgspec.json.Decoder(InlineInfo).decode
_encode = msgspec.json.Encoder().encode


class InlineStream(IncomingStream):
    """An object that arrived whole in one message: the :class:`IncomingStream` reading API
    (iteration, ``read_chunk``, ``read_joined``, ``read_all``, ``save``) over the buffers the
    message brought; nothing to wait for, nothing to acknowledge. ``sid`` is the request's id.
    """

    def __init__(
        self,
        h: Request,
        info: InlineInfo,
        payload: Payload,
        *,
        origin: str,
        digest: str,
        computed: bool,
        idle: float,
        clock: Callable[[], float],
    ) -> None:
        # Deliberately not IncomingStream.__init__: no hub, no state machine, no window.
        self.src = h.src
        self.sid = h.id
        self.channel = h.channel
        self.topic = h.topic
        self.codec = h.codec
        self.headers = dict(info.headers)
        self.origin = origin
        self.parts = [memoryview(p).cast("B") for p in payload.parts]
        """The object's buffers as they arrived (a fan-out relay passes them on as they are)."""
        size = self._size = sum(p.nbytes for p in self.parts)
        self.size = size
        self.chunk = max(1, size)
        self.window = self.chunk
        self.idle = idle
        """The receiving cell's stream idle limit (what a fan-out relay passes on)."""
        self.digest_requested = parse_digest(digest)[0] if digest else False
        self.digest = digest
        self.digest_computed = computed
        self.trailer = dict(info.trailer)
        self.received = 0
        self.finished = False
        self._next = 0
        self._clock = clock
        self._opened = clock()

    async def read_chunk(self) -> memoryview | None:
        """The next buffer of the object, or ``None`` after the last."""
        if self._next < len(self.parts):
            part = self.parts[self._next]
            self._next += 1
            self.received += part.nbytes
            return part
        self.finished = True
        return None

    def progress(self) -> Progress:
        """All bytes arrived with the message."""
        return Progress(
            self.src, self.sid, self._size, self._size, self._clock() - self._opened, 0.0
        )

    def fail(self, error: BaseException) -> None:
        """Nothing to stop: the object is here whole; what is unread is dropped."""
        self._next = len(self.parts)


def open_inline(
    h: Request,
    info: InlineInfo,
    payload: Payload,
    *,
    origin: str,
    required: bool,
    idle: float,
    clock: Callable[[], float],
) -> InlineStream:
    """The :class:`InlineStream` for an inline request, its digest checked: an announced one
    is recomputed over the bytes; where ``required`` (``require_digest``) and none was
    announced, BLAKE3 is computed. A fan-out relay checks nothing (its receivers do).

    Raises:
        BadRequest: a malformed header or digest; a non-cryptographic digest where one is
            required.
        StreamCorrupted: the bytes do not match the announced digest.
    """
    try:
        announced = normalize_digest(info.sha256)
        algorithm = parse_digest(announced)[0] if announced else ""
    except ProtocolError as exc:
        raise BadRequest(f"bad inline stream from {h.src}: {exc}") from None
    computed = False
    digest = announced
    if (h.channel, h.topic) != (FANOUT_CHANNEL, FANOUT_TOPIC):
        if required and algorithm and algorithm not in CRYPTOGRAPHIC:
            raise BadRequest(
                f"{h.channel}/{h.topic} requires a cryptographic digest, not {algorithm}"
            )
        algorithm = algorithm or (BLAKE3 if required else "")
        if algorithm:
            digest = digest_parts(algorithm, payload.parts)
            if announced and digest != announced:
                raise StreamCorrupted(
                    f"inline stream {h.id} from {h.src} does not match its digest "
                    f"(expected {announced[:23]}..., got {digest[:23]}...)"
                )
            computed = True
    return InlineStream(
        h,
        info,
        payload,
        origin=origin,
        digest=digest,
        computed=computed,
        idle=idle,
        clock=clock,
    )


def inline_handler(
    fn: StreamHandler,
    h: Request,
    info: InlineInfo,
    origin: str,
    *,
    required: bool,
    idle: float,
    clock: Callable[[], float],
) -> Callable[[Context, Payload], Awaitable[Any]]:
    """The request handler that runs stream handler ``fn`` on inline request ``h``."""

    async def handle(ctx: Context, payload: Payload) -> Any:
        stream = open_inline(
            h, info, payload, origin=origin, required=required, idle=idle, clock=clock
        )
        return await fn(ctx, stream)

    return handle


class Requester(Protocol):
    """What :func:`send_inline` needs of a cell."""

    name: str

    async def request(
        self,
        dst: str,
        channel: str,
        topic: str,
        payload: Payload,
        *,
        timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> Payload: ...


async def send_inline(
    cell: Requester,
    dsts: Sequence[str],
    parts: Sequence[Buffer],
    opts: StreamOptions,
    per_dst: Mapping[str, StreamOptions],
    *,
    random: Callable[[], float],
    clock: Callable[[], float],
    log_warning: Callable[..., object],
) -> dict[str, Payload | FlareError]:
    """Send one small object to every destination as one inline request each (see the module
    text); returns each one's reply or error. Each request's deadline is ``idle`` (a stream
    that long without an answer to its probes fails too), a fan-out relay's
    :data:`FANOUT_IDLES` times that: it answers once every destination behind it did, each
    within its own."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    size = sum(v.nbytes for v in views)
    sha = opts.sha256
    if not sha and opts.digest:
        sha = digest_parts(opts.digest, views)
    out: dict[str, Payload | FlareError] = {}

    async def one(dst: str) -> None:
        o = per_dst.get(dst, opts)
        trailer = dict(o.seal(dst, sha)) if o.seal is not None else {}
        headers = {INLINE_HEADER: _encode(InlineInfo(o.headers, sha, trailer)).decode()}
        body = Payload(views, codec=o.codec)
        fanout = (o.channel, o.topic) == (FANOUT_CHANNEL, FANOUT_TOPIC)
        timeout = o.idle * (FANOUT_IDLES if fanout else 1)
        until = clock() + o.idle
        pause = _FIRST_PAUSE
        while True:
            try:
                out[dst] = await cell.request(
                    dst, o.channel, o.topic, body, timeout=timeout, headers=headers
                )
            except Overloaded as exc:
                if clock() + pause >= until:
                    out[dst] = exc
                    return
                await anyio.sleep(pause * (0.5 + random()))
                pause = min(pause * 2, _MOST_PAUSE)
                continue
            except FlareError as exc:
                out[dst] = exc
                return
            if o.progress is not None:
                try:
                    o.progress(Progress(dst, 0, size, size, 0.0, 0.0))
                except Exception as exc:  # the caller's callback; never the transfer's
                    log_warning("progress callback failed", dst=dst, error=repr(exc))
            return

    if len(dsts) == 1:  # a site's result: no task group (its scope, task and event)
        await one(dsts[0])
        return out
    async with anyio.create_task_group() as tg:
        for dst in dsts:
            tg.start_soon(one, dst)
    return out


__all__ = [
    "INLINE_HEADER",
    "INLINE_MAX",
    "InlineInfo",
    "InlineStream",
    "inline_handler",
    "open_inline",
    "read_info",
    "send_inline",
]
