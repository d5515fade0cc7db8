"""The wire: frame prefix, msgspec headers, the sans-IO connection and the hello.

Pure and synchronous (layer L1): bytes in, events out. No sockets, no clock, no logging.
"""

from flare_async.wire._connection import (
    EOF,
    NEED_DATA,
    Buffer,
    Connection,
    ConnectionStatistics,
    Frame,
    payload_size,
)
from flare_async.wire._envelope import (
    ROUTED_KINDS,
    Bye,
    Envelope,
    Error,
    Event,
    Hello,
    Ping,
    Pong,
    Reply,
    Request,
    Routed,
)
from flare_async.wire._frame import (
    MAGIC,
    PREFIX,
    PREFIX_SIZE,
    WIRE_VERSION,
    Limits,
    decode_frame,
    decode_header,
    encode_head,
    encode_header,
    parse_prefix,
)
from flare_async.wire._hello import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Role,
    Session,
    check_hello,
    make_hello,
)

__all__ = [
    "EOF",
    "MAGIC",
    "MIN_PROTOCOL_VERSION",
    "NEED_DATA",
    "PREFIX",
    "PREFIX_SIZE",
    "PROTOCOL_VERSION",
    "ROUTED_KINDS",
    "WIRE_VERSION",
    "Buffer",
    "Bye",
    "Connection",
    "ConnectionStatistics",
    "Envelope",
    "Error",
    "Event",
    "Frame",
    "Hello",
    "Limits",
    "Ping",
    "Pong",
    "Reply",
    "Request",
    "Role",
    "Routed",
    "Session",
    "check_hello",
    "decode_frame",
    "decode_header",
    "encode_head",
    "encode_header",
    "make_hello",
    "parse_prefix",
    "payload_size",
]
