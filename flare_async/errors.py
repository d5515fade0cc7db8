"""The one exception tree of flare_async.

Every error the runtime raises derives from :class:`FlareError`, so callers can catch the
whole family at once or one branch precisely::

    FlareError
    ├── ConfigError (also ValueError)       bad arguments, settings or names, found locally
    │   ├── InvalidName                     a cell name that breaks the naming rules
    │   └── UnsupportedScheme               a URL whose scheme no driver of this cell serves
    ├── CodecError                          an object could not be encoded or decoded
    │   └── DecodeError                     bytes that do not decode: bad meta, truncated buffers
    ├── ProtocolError                       a peer broke the wire protocol; that link is closed
    │   ├── FrameTooLarge                   refused from the frame prefix, before the body is read
    │   ├── VersionMismatch                 the hello named a protocol version we cannot speak
    │   └── IdentityError                   the hello claimed a name the peer may not have
    ├── TransportError                      a link could not carry the message
    │   ├── ConnectError                    no link could be made (refused, unknown address)
    │   ├── LinkClosed                      the link was closed on purpose (by us, or a peer's bye)
    │   └── LinkBroken                      the link broke: peer vanished, reset, truncated frame
    ├── RoutingError
    │   └── Unreachable                     no route to the destination: unknown, loop, hop limit
    ├── DeadlineExceeded (also TimeoutError) the message's deadline passed, here or at any hop
    ├── CellClosed                          the cell is not running (not started, or shut down)
    ├── StreamError                         a stream (chunked transfer) failed
    │   ├── StreamCorrupted                 bytes arrived damaged: a chunk kept failing its CRC, or
    │   │                                   the whole object did not match its SHA-256
    │   ├── StreamStalled (also TimeoutError) no progress within the stream's idle limit
    │   └── StreamAborted                   the other side gave the stream up (its reason inside)
    └── RemoteError                         the destination answered with an error status
        ├── NoHandler                       nothing is mounted there for that channel/topic
        ├── BadRequest                      the handler refused the input (message is the handler's)
        ├── Unauthorized                    the destination's policy refused the sender
        ├── IntegrityError                  an end-to-end signature, origin or signed field does
        │                                   not verify: changed on the way, replayed or forged
        ├── Overloaded                      the destination's bounded queues were full; retry later
        └── InternalError                   the handler failed; its text stays at the remote side

Errors that a remote cell reports travel as a numeric :class:`Status` on the wire and are
raised on the caller's side as the matching class (:func:`error_for_status`).
``Unreachable``, ``DeadlineExceeded`` and ``LinkBroken`` may be raised locally *or* be reported
by a relay on the path; ``reported_by`` tells which cell decided.

Cancellation is never one of these: anyio's cancellation exception passes through untouched.
"""

from __future__ import annotations

import enum

__all__ = [
    "BadRequest",
    "CellClosed",
    "ConfigError",
    "CodecError",
    "ConnectError",
    "DeadlineExceeded",
    "DecodeError",
    "FlareError",
    "FrameTooLarge",
    "IdentityError",
    "IntegrityError",
    "InternalError",
    "InvalidName",
    "LinkBroken",
    "LinkClosed",
    "NoHandler",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "RoutingError",
    "Status",
    "StreamAborted",
    "StreamCorrupted",
    "StreamError",
    "StreamStalled",
    "TransportError",
    "Unauthorized",
    "Unreachable",
    "UnsupportedScheme",
    "VersionMismatch",
    "error_for_status",
    "status_for_error",
]


class FlareError(Exception):
    """Root of every error raised by flare_async.

    Attributes:
        reported_by: name of the cell that decided this error, when it came over the wire
            (``None`` when it was raised locally).
    """

    reported_by: str | None

    def __init__(self, message: str = "", *, reported_by: str | None = None) -> None:
        super().__init__(message)
        self.reported_by = reported_by

    def __str__(self) -> str:
        text = super().__str__()
        if self.reported_by is not None:
            return f"{text} (reported by {self.reported_by})"
        return text


class ConfigError(FlareError, ValueError):
    """A bad argument, setting or name, detected before anything was sent."""


class InvalidName(ConfigError):
    """A cell name that breaks the naming rules (see ``flare_async.routing``)."""


class UnsupportedScheme(ConfigError):
    """A URL whose scheme no driver registered on this cell serves."""


class CodecError(FlareError):
    """An object could not be encoded (unsupported type or dtype) or decoded."""


class DecodeError(CodecError):
    """Bytes that do not decode: malformed meta, truncated or oversized buffers, unknown
    codec. Never a crash, never a wrongly shaped tensor."""


class ProtocolError(FlareError):
    """A peer sent something the wire protocol does not allow.

    The link it came over is closed; other links are unaffected.

    Attributes:
        peer: a description of the peer (cell name or address) when known.
    """

    def __init__(self, message: str = "", *, peer: str | None = None) -> None:
        super().__init__(f"{message} [peer {peer}]" if peer else message)
        self.peer = peer


class FrameTooLarge(ProtocolError):
    """A frame whose prefix announces a header or payload beyond the configured limits."""


class VersionMismatch(ProtocolError):
    """The peer's hello names a protocol version this cell does not speak."""


class IdentityError(ProtocolError):
    """The peer's hello claims a name it may not use at this place in the tree."""


class TransportError(FlareError):
    """A link failed to carry a message."""


class ConnectError(TransportError):
    """No link could be made to the URL (refused, unknown address, handshake failed)."""


class LinkClosed(TransportError):
    """The link was closed on purpose, by this side or by the peer's orderly goodbye."""


class LinkBroken(TransportError):
    """The link broke: the peer vanished, the connection reset or a frame was cut short."""


class RoutingError(FlareError):
    """A routing decision failed."""


class Unreachable(RoutingError):
    """No route leads to the destination: unknown name, routing loop or hop limit."""


class DeadlineExceeded(FlareError, TimeoutError):
    """The message's deadline passed before a reply came (here or at any hop)."""


class CellClosed(FlareError):
    """The cell is not running: it was not started or has shut down."""


class StreamError(FlareError):
    """A stream failed."""


class StreamCorrupted(StreamError):
    """Bytes arrived damaged and could not be repaired by sending them again."""


class StreamStalled(StreamError, TimeoutError):
    """A stream made no progress for longer than its idle limit."""


class StreamAborted(StreamError):
    """The other side of the stream gave it up."""


class RemoteError(FlareError):
    """The destination answered with an error status."""


class NoHandler(RemoteError):
    """Nothing is mounted at the destination for that kind, channel and topic."""


class BadRequest(RemoteError):
    """The handler refused the input. Raise it in a handler to send its message back."""


class Unauthorized(RemoteError):
    """The destination's policy refused the sender."""


class IntegrityError(RemoteError):
    """A message or stream whose end-to-end signature, origin or signed fields do not verify:
    changed on the way (a relay that tampered, reordered or replayed it) or forged."""


class Overloaded(RemoteError):
    """The destination's bounded queues were full; the message was not processed."""


class InternalError(RemoteError):
    """The handler failed. Its exception text stays at the remote side (only a reference
    is sent), so tracebacks never leak across institutions."""


class Status(enum.IntEnum):
    """Error statuses as they travel on the wire. Values are frozen: add, never renumber."""

    UNREACHABLE = 1
    NO_HANDLER = 2
    DEADLINE_EXCEEDED = 3
    INTERNAL = 4
    BAD_REQUEST = 5
    UNAUTHORIZED = 6
    OVERLOADED = 7
    LINK_BROKEN = 8
    STREAM_CORRUPTED = 9
    STREAM_STALLED = 10
    STREAM_ABORTED = 11
    INTEGRITY = 12


_STATUS_TO_ERROR: dict[int, type[FlareError]] = {
    Status.UNREACHABLE: Unreachable,
    Status.NO_HANDLER: NoHandler,
    Status.DEADLINE_EXCEEDED: DeadlineExceeded,
    Status.INTERNAL: InternalError,
    Status.BAD_REQUEST: BadRequest,
    Status.UNAUTHORIZED: Unauthorized,
    Status.OVERLOADED: Overloaded,
    Status.LINK_BROKEN: LinkBroken,
    Status.STREAM_CORRUPTED: StreamCorrupted,
    Status.STREAM_STALLED: StreamStalled,
    Status.STREAM_ABORTED: StreamAborted,
    Status.INTEGRITY: IntegrityError,
}
_ERROR_TO_STATUS: dict[type[FlareError], Status] = {
    **{cls: Status(code) for code, cls in _STATUS_TO_ERROR.items()},
    DecodeError: Status.BAD_REQUEST,  # bytes a handler could not decode: the sender's fault
}


def error_for_status(status: int, message: str, reported_by: str) -> FlareError:
    """Build the caller-side exception for a status received on the wire.

    Unknown statuses (from a newer peer) become :class:`RemoteError` so nothing is lost.
    """
    cls = _STATUS_TO_ERROR.get(status, RemoteError)
    return cls(message, reported_by=reported_by)


def status_for_error(exc: FlareError) -> Status:
    """The wire status for an error raised at this side; unknown kinds map to INTERNAL."""
    for cls in type(exc).__mro__:
        status = _ERROR_TO_STATUS.get(cls)
        if status is not None:
            return status
    return Status.INTERNAL
