"""WebSocket connections before their hello: counted, timed, and their frames checked.

Before the hello (a listener given :meth:`Listener.guard`, as a cell's are): connections are
capped per listener and per source address at the TCP accept, and cut when the admission's
timeout passes before ``hello_done`` (TLS handshake, HTTP upgrade and hello together); the first
message may be no bigger than a hello (1009). Client frames without a mask are refused (1002)
on every accepted connection. See :class:`_FrameCheck` and docs/design.md §3.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

from flare_async import _logging
from flare_async.transport._listening import Pending
from flare_async.transport._ws_link import max_msg_size

_UNMASKED: Final = b"\x83\x80"
"""A frame aiohttp's reader refuses with 1002 (a reserved opcode): stands in for an unmasked one."""
_TOO_BIG: Final = b"\x82\xff" + b"\xff" * 8
"""A frame header aiohttp's reader refuses with 1009 (a length beyond 2**63): stands in for a
message bigger than the hello phase allows."""


class Admitted:
    """One accepted connection of a listener: its place among the pending ones, its deadline,
    and what the frame check found. Lives from the TCP accept to the connection's end."""

    def __init__(self, source: str, peer: str, pending: Pending | None) -> None:
        self.source = source
        self.peer = peer
        self.pending = pending
        self.max_message = (
            max_msg_size(pending.admission.limits) - 1 if pending is not None else None
        )
        """Largest first message allowed before the hello (``None``: no hello phase)."""
        self.timer: asyncio.TimerHandle | None = None
        self.starting: asyncio.Task[None] | None = None
        """Wraps the socket in a transport (and runs the TLS handshake) until it is done."""
        self.transport: asyncio.BaseTransport | None = None
        self.upgraded = False
        """The HTTP upgrade is done: a link was made (the cell counts its refusals from then)."""
        self.violation: str | None = None

    def hello_done(self) -> None:
        self.max_message = None
        self._release()

    def closed(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.release(self.source)

    def expire(self) -> None:
        """The deadline passed before the hello: cut the connection (TLS, upgrade or hello)."""
        self.timer = None
        pending = self.pending
        if pending is None:
            return
        if not self.upgraded:  # still before the upgrade: the cell never saw it, count it here
            pending.admission.refused["no hello in time"] += 1
            _logging.get_logger().warning(
                "connection refused before hello", peer=self.peer, reason="no hello in time"
            )
        self._release()
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        elif self.transport is not None:
            self.transport.close()
        elif self.starting is not None:
            self.starting.cancel()


class _FrameCheck:
    """Sits between aiohttp's request handler and its WebSocket reader, on the raw bytes.

    Reads only the frame headers (payloads pass untouched, without a copy): a client frame
    without a mask (RFC 6455 §5.1) and, before the hello, a data message bigger than a hello are
    refused. aiohttp has no hook for either, so the check feeds the reader, at that frame's
    boundary, a frame header the reader itself refuses with the right code (1002, 1009): the link
    then fails through aiohttp's ordinary path (its close frame, our ``ProtocolError`` or
    ``FrameTooLarge`` with the reason recorded here); the bytes after it are never parsed.
    """

    def __init__(self, parser: Any, admitted: Admitted) -> None:
        self._parser = parser
        self._admitted = admitted
        self._held = b""  # a frame header split over reads (forwarded once whole)
        self._skip = 0  # payload bytes of the current frame still to pass
        self._message = 0  # bytes of the current data message so far
        self._failed = False

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._failed:
            return self._parser.feed_data(data)  # type: ignore[no-any-return]
        buf = self._held + data if self._held else data
        self._held = b""
        n = len(buf)
        i = 0
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                i += take
                self._skip -= take
                continue
            if n - i < 2:
                return self._hold(buf, i)
            second = buf[i + 1]
            short = second & 0x7F
            extra = 2 if short == 126 else 8 if short == 127 else 0
            size = 2 + extra + (4 if second & 0x80 else 0)
            if n - i < size:
                return self._hold(buf, i)
            length = int.from_bytes(buf[i + 2 : i + 2 + extra]) if extra else short
            refusal = self._refusal(buf[i], second, length)
            if refusal is not None:
                self._failed = True
                if i:
                    self._parser.feed_data(buf[:i])
                return self._parser.feed_data(refusal)  # type: ignore[no-any-return]
            self._skip = length
            i += size
        return self._parser.feed_data(buf)  # type: ignore[no-any-return]

    def _hold(self, buf: bytes, start: int) -> tuple[bool, bytes]:
        self._held = buf[start:]
        if not start:
            return False, b""
        return self._parser.feed_data(buf[:start])  # type: ignore[no-any-return]

    def _refusal(self, first: int, second: int, length: int) -> bytes | None:
        admitted = self._admitted
        if not second & 0x80:
            admitted.violation = "unmasked frame from the client (RFC 6455 §5.1)"
            return _UNMASKED
        limit = admitted.max_message
        if limit is not None and first & 0x0F <= 0x2:  # continuation, text, binary
            self._message += length
            if self._message > limit:
                admitted.violation = (
                    f"first message of at least {self._message} bytes is bigger than a hello"
                    f" ({limit} bytes)"
                )
                return _TOO_BIG
            if first & 0x80:  # FIN: the message ends with this frame
                self._message = 0
        return None


class Handler(web.RequestHandler):
    """aiohttp's request handler for one connection, with our frame check and bookkeeping."""

    __slots__ = ("admitted",)

    def __init__(self, manager: web.Server, *, admitted: Admitted, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.admitted = admitted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.admitted.transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.admitted.closed()
        super().connection_lost(exc)

    def set_parser(self, parser: Any, data_received_cb: Any = None) -> None:
        # The reader is used only through feed_data/feed_eof, which the check provides.
        check: Any = _FrameCheck(parser, self.admitted)
        super().set_parser(check, data_received_cb)
