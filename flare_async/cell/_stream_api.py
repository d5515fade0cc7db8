"""``Cell.stream`` and ``Cell.stream_many``: the public face of the sending side of streams
(kept apart from ``_cell.py``, which holds the fabric itself; the engine is
``_stream_out.py``, the receiving side ``_stream_in.py``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import msgspec

from flare_async.cell._api import ProgressCallback, Seal
from flare_async.cell._inline import InlineStream, Requester, send_inline
from flare_async.cell._payload import Payload
from flare_async.cell._router import Router
from flare_async.cell._sources import (
    ChunkLog,
    StreamSource,
    in_memory,
    open_digest,
    open_source,
)
from flare_async.cell._stream_in import FANOUT_CHANNEL, FANOUT_TOPIC, StreamHub
from flare_async.cell._stream_out import StreamOptions, send_streams
from flare_async.errors import CellClosed, ConfigError, FlareError, InternalError, ProtocolError
from flare_async.routing import validate_name
from flare_async.streaming import (
    BLAKE3,
    CRC32C,
    CRYPTOGRAPHIC,
    DEFAULT_WINDOW,
    DIGESTS,
    normalize_digest,
    pick_chunk,
)


class FanoutRequest(msgspec.Struct, frozen=True):
    """What a fan-out stream's ``fanout`` header carries (JSON): the targets below the relay
    and the channel/topic to deliver to. A list too long for a header (past
    :data:`LISTED_MAX` bytes) is parked at the relay first (``sys/fanout-targets``) and
    named here by the ``ref`` the relay gave it, with ``targets`` empty."""

    targets: list[str]
    channel: str
    topic: str
    codec: str = ""
    ref: str = ""


LISTED_MAX = 8 * 1024
"""Bytes of a fan-out header's JSON past which its targets are parked at the relay instead."""
PARK_TOPIC = "fanout-targets"
"""The ``sys`` request that parks a long target list at a relay; the reply is its ref."""


class FanoutOutcome(msgspec.Struct, frozen=True):
    """One target's outcome, as a relay reports it back."""

    ok: bool
    reply: bytes = b""
    codec: str = ""
    error: str = ""
    kind: str = ""
    reported_by: str | None = None


class StreamingMixin:
    """The stream-sending methods of :class:`~flare_async.Cell`, which sets what they use."""

    name: str
    inline_max: int
    _router: Router
    _streams: StreamHub

    def require_digest(self, channel: str, topic: str) -> None:
        """Compute a cryptographic digest of every stream received on ``channel``/``topic``,
        even when the sender (or a relay on the way) does not ask for it, and refuse streams
        that announce a non-cryptographic one (``crc32c``): for handlers that check a signed
        digest (``IncomingStream.digest`` is then always set once the stream ended)."""
        self._streams.digest_always.add((channel, topic))

    async def stream(
        self,
        dst: str,
        channel: str,
        topic: str,
        source: StreamSource,
        *,
        size: int | None = None,
        chunk: int | None = None,
        window: int = DEFAULT_WINDOW,
        digest: bool | str = True,
        sha256: str = "",
        idle: float = 60.0,
        probe: float | None = None,
        codec: str = "",
        headers: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        seal: Seal | None = None,
        inline: int | None = None,
    ) -> Payload:
        """Send one object of any size to ``dst``'s stream handler; return its reply.

        Args:
            source: bytes-like, a sequence of buffers (a codec's output), a file path (read
                a chunk at a time), or an async iterable of buffers.
            size: the size, for an async iterable that knows it (used for progress only).
            chunk / window: proposed chunk size and flow-control window, in bytes (the
                receiver may lower them). Memory held for the stream on every hop stays
                within the window. Without ``chunk``: 4 MiB for objects in memory of 64 MiB
                or more where the window holds four such chunks, else 1 MiB
                (:func:`~flare_async.streaming.pick_chunk`).
            digest: the whole-object digest both ends compute and compare (a mismatch fails
                the stream); chunks always carry their own CRC-32C. ``True`` (the default):
                ``"crc32c"``, the object's CRC-32C combined from the chunks' (no extra pass
                over the bytes), or ``"blake3"`` when the digest is signed (``seal``).
                ``"blake3"`` / ``"sha256"``: that hash, computed in a worker thread beside
                the transfer. ``False``: none (``seal`` still implies one).
            sha256: the object's digest when the caller knows it, in text form
                (``"blake3:<hex>"``; a bare 64-digit hex is SHA-256): not recomputed here,
                the receiver still checks.
            idle: seconds without progress after which the stream fails. Link drops in
                between are survived: the sender resumes where the receiver stands.
            probe: seconds between resume probes while the path is down (default
                ``min(5, idle / 4)``).
            progress: called with a :class:`~flare_async.streaming.Progress` as the receiver
                commits bytes.
            seal: called with ``(dst, digest)`` (text form) once the whole object was read
                and digested; the headers it returns travel in the stream's end message (the
                receiver reads them as ``IncomingStream.trailer``): a signature over the digest
                without a second pass over the bytes. Implies a cryptographic ``digest``.
            inline: objects in memory (bytes, buffers) of at most this many bytes go whole in
                one request to the stream handler, which gets them as an ``InlineStream``
                (two frames instead of five or more; no resume after a dropped link: see
                ``docs/streaming.md``); ``0``: always stream. Default: the cell's
                ``inline_max`` (64 KiB).

        Raises:
            Unreachable: no route to ``dst`` when the stream starts.
            NoHandler / Overloaded / BadRequest / ...: the receiver refused or its handler
                failed.
            StreamCorrupted: the object arrived damaged and could not be repaired.
            StreamStalled: no progress for ``idle`` seconds.
            StreamAborted: the receiver gave the stream up.
        """
        results = await self.stream_many(
            [dst],
            channel,
            topic,
            source,
            size=size,
            chunk=chunk,
            window=window,
            digest=digest,
            sha256=sha256,
            idle=idle,
            probe=probe,
            codec=codec,
            headers=headers,
            progress=progress,
            seal=seal,
            inline=inline,
            via_relays=False,
        )
        outcome = results[dst]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def stream_many(
        self,
        dsts: Iterable[str],
        channel: str,
        topic: str,
        source: StreamSource,
        *,
        size: int | None = None,
        chunk: int | None = None,
        window: int = DEFAULT_WINDOW,
        digest: bool | str = True,
        sha256: str = "",
        idle: float = 60.0,
        probe: float | None = None,
        codec: str = "",
        headers: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        seal: Seal | None = None,
        inline: int | None = None,
        via_relays: bool = True,
    ) -> dict[str, Payload | FlareError]:
        """Send one object to many cells; the source is read and digested once.

        With ``via_relays``, destinations behind the same child relay get one stream to that
        relay, which feeds it to them (recursively, tier by tier): the object crosses each
        link once, not once per destination. Every cell serves the relays' part, the
        ``sys/fanout`` stream handler, unless it was built with ``routing_handlers=False``
        (or mounts a handler of its own there); such a relay answers ``NoHandler``.

        ``progress`` is called per stream this cell sends (``Progress.peer`` says to whom):
        a destination streamed to directly, or a relay fanning out to those behind it (its
        window keeps it within reach of the slowest of them). The other options are
        :meth:`stream`'s.

        Returns:
            each destination's reply, or the error it failed with (one failed destination
            fails nothing else).
        """
        targets = list(dict.fromkeys(dsts))
        for dst in targets:
            validate_name(dst)
        if chunk is not None and chunk <= 0:
            raise ConfigError("stream chunk must be positive and the window at least one chunk")
        opts = StreamOptions(
            channel,
            topic,
            chunk=chunk or 0,  # 0: picked for the object's size once the source is open
            window=window,
            digest=stream_digest(digest, sealed=seal is not None, known=sha256),
            sha256=normalize_known(sha256),
            idle=idle,
            probe=probe,
            codec=codec,
            headers=headers or {},
            progress=progress,
            seal=seal,
        )
        limit = self.inline_max if inline is None else inline
        if limit < 0:
            raise ConfigError(f"inline must not be negative, not {inline}")
        if not via_relays:
            return await self._stream_to(
                targets, channel, topic, source, size=size, opts=opts, inline=limit
            )
        groups = self._fanout_groups(targets)
        direct = [dst for hop, members in groups.items() for dst in members if hop is None]
        relayed = {hop: members for hop, members in groups.items() if hop is not None}
        out: dict[str, Payload | FlareError] = {}
        per_dst: dict[str, StreamOptions] = {}
        for hop, members in list(relayed.items()):
            value = msgspec.json.encode(FanoutRequest(members, channel, topic, codec))
            if len(value) > LISTED_MAX:
                try:
                    ref = await self._park(hop, members, idle)
                except FlareError as exc:
                    out.update(dict.fromkeys(relayed.pop(hop), exc))
                    continue
                value = msgspec.json.encode(FanoutRequest([], channel, topic, codec, ref=ref))
            per_dst[hop] = opts.to_fanout(FANOUT_CHANNEL, FANOUT_TOPIC, "fanout", value.decode())
        stream_dsts = direct + list(relayed)
        results = await self._stream_to(
            stream_dsts,
            channel,
            topic,
            source,
            size=size,
            opts=opts,
            per_dst=per_dst,
            inline=limit,
        )
        out.update((dst, results[dst]) for dst in direct)
        for hop, members in relayed.items():
            answer = results[hop]
            if isinstance(answer, FlareError):
                out.update(dict.fromkeys(members, answer))
                continue
            try:
                outcomes = msgspec.json.decode(answer.tobytes(), type=dict[str, FanoutOutcome])
            except msgspec.DecodeError as exc:
                err = InternalError(f"relay {hop} sent a bad fan-out answer: {exc}")
                out.update(dict.fromkeys(members, err))
                continue
            for dst in members:
                got = outcomes.get(dst)
                if got is None:
                    out[dst] = InternalError(f"relay {hop} did not report on {dst}")
                elif got.ok:
                    out[dst] = Payload(got.reply, codec=got.codec)
                else:
                    out[dst] = _rebuild_error(got)
        return out

    async def _park(self, hop: str, targets: list[str], idle: float) -> str:
        """Park a long target list at relay ``hop``; the ref its fan-out header names."""
        reply = await cast(Requester, self).request(
            hop,
            FANOUT_CHANNEL,
            PARK_TOPIC,
            Payload(msgspec.json.encode(targets)),
            timeout=idle,
            headers=None,
        )
        return reply.tobytes().decode(errors="replace")

    def _fanout_groups(self, targets: list[str]) -> dict[str | None, list[str]]:
        """Destinations by the relay they lie behind (``None``: sent to directly — a child
        itself, or a lone one behind its relay). Those below this cell go by the child on
        their way; those reached through the parent (two or more) as one group, to the
        nearest cell above them all (an admin's session sending to sites: one stream up,
        fanned out where the paths part)."""
        groups: dict[str | None, list[str]] = {}
        up = _above_all([d for d in targets if _child_below(self.name, d) is None])
        for dst in targets:
            child = _child_below(self.name, dst)
            key = up if child is None else child if child != dst else None
            groups.setdefault(key, []).append(dst)
        for hop in [
            h
            for h, members in groups.items()
            if h is not None and (len(members) < 2 or h in targets)
        ]:
            # A lone destination behind a relay, or a relay that is a destination itself:
            # sent to directly (one stream per destination, one sender per name).
            groups.setdefault(None, []).extend(groups.pop(hop))
        return groups

    async def _stream_to(
        self,
        dsts: list[str],
        channel: str,
        topic: str,
        source: StreamSource,
        *,
        size: int | None,
        opts: StreamOptions,
        per_dst: Mapping[str, StreamOptions] | None = None,
        inline: int = 0,
    ) -> dict[str, Payload | FlareError]:
        port = self._router
        if not port.running:
            raise CellClosed(f"cell {self.name} is not running")
        for dst in dsts:
            validate_name(dst)
        if opts.chunk < 0 or opts.window < max(opts.chunk, 1):
            raise ConfigError("stream chunk must be positive and the window at least one chunk")
        if opts.chunk > port.limits.max_frame:
            raise ConfigError(
                f"stream chunk of {opts.chunk} B exceeds max_frame ({port.limits.max_frame} B)"
            )
        if not opts.idle > 0:
            raise ConfigError("stream idle must be a positive number of seconds")
        parts = source.parts if isinstance(source, InlineStream) else in_memory(source)
        inline = min(inline, port.limits.max_frame)  # one frame must carry it
        if parts is not None and inline > 0 and sum(memoryview(p).nbytes for p in parts) <= inline:
            self._streams.counters["inline_sent"] += len(dsts)
            return await send_inline(
                cast(Requester, self),
                dsts,
                parts,
                opts,
                per_dst or {},
                random=port.random,
                clock=port.clock,
                log_warning=port.log.warning,
            )
        sha_from = getattr(source, "final_sha256", None)
        src = open_source(source, size)
        if not opts.chunk:
            chunk = pick_chunk(src.size, opts.window, in_memory=src.in_memory)
            chunk = min(chunk, port.limits.max_frame)
            for o in (opts, *(per_dst or {}).values()):
                o.chunk = o.chunk or chunk
        wants_digest = opts.digest and not opts.sha256 and sha_from is None
        digest = open_digest(opts.digest, opts.chunk) if wants_digest else None
        log = ChunkLog(src, opts.chunk, opts.window, digest)
        hub = self._streams
        senders = await send_streams(
            port, hub.outgoing, hub.counters, dsts, log, digest, opts, per_dst or {}, sha_from
        )
        out: dict[str, Payload | FlareError] = {}
        for dst, sender in senders.items():
            if sender.reply is not None:
                out[dst] = sender.reply
            elif isinstance(sender.error, FlareError):
                out[dst] = sender.error
            else:
                out[dst] = InternalError(f"stream to {dst} failed: {sender.error!r}")
        return out


def stream_digest(digest: bool | str, *, sealed: bool, known: str = "") -> str:
    """The algorithm of a stream's whole-object digest ("" for none), from ``Cell.stream``'s
    ``digest``, whether it is signed (``seal``) and the digest the caller knows.

    Raises:
        ConfigError: an unknown algorithm, a signed stream with a non-cryptographic one, or a
            known digest of another algorithm than ``digest`` names.
    """
    if isinstance(digest, bool):
        algorithm = (BLAKE3 if sealed else CRC32C) if digest or sealed else ""
    elif digest in DIGESTS:
        algorithm = digest
    else:
        raise ConfigError(f"unknown stream digest {digest!r} (known: {', '.join(DIGESTS)})")
    if known:
        named = _known_algorithm(known)
        if isinstance(digest, str) and digest != named:
            raise ConfigError(f"the known digest is {named}, not {digest}")
        algorithm = named
    if sealed and algorithm not in CRYPTOGRAPHIC:
        raise ConfigError(f"a signed stream needs a cryptographic digest, not {algorithm!r}")
    return algorithm


def normalize_known(text: str) -> str:
    """A caller's known digest in text form (``sha256=`` of ``Cell.stream``).

    Raises:
        ConfigError: not a digest in text form or a bare SHA-256.
    """
    try:
        return normalize_digest(text)
    except ProtocolError as exc:
        raise ConfigError(f"sha256= is not a digest: {exc}") from None


def _known_algorithm(text: str) -> str:
    return normalize_known(text).partition(":")[0]


def _above_all(names: list[str]) -> str | None:
    """The nearest cell above every one of ``names`` (``None`` for fewer than two, or when one
    of them is that cell, or they share no root)."""
    if len(names) < 2:
        return None
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    above = ".".join(common)
    return above if above and above not in names else None


def _child_below(me: str, dst: str) -> str | None:
    """The name of ``me``'s child on the way to ``dst``, if ``dst`` is below ``me``."""
    if not dst.startswith(me + "."):
        return None
    rest = dst[len(me) + 1 :]
    return f"{me}.{rest.split('.', 1)[0]}"


def _rebuild_error(outcome: FanoutOutcome) -> FlareError:
    from flare_async import errors  # noqa: PLC0415 - the error classes by name

    cls = getattr(errors, outcome.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, FlareError)):
        cls = errors.RemoteError
    return cls(outcome.error, reported_by=outcome.reported_by)


__all__ = [
    "FANOUT_CHANNEL",
    "FANOUT_TOPIC",
    "LISTED_MAX",
    "PARK_TOPIC",
    "FanoutOutcome",
    "FanoutRequest",
    "StreamingMixin",
]
