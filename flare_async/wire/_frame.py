"""The fixed frame prefix, limits, and header encoding.

A frame on the wire is::

    +-------+---------+-------+------------+-------------+----------+-----------+
    | magic | version | flags | header_len | payload_len |  header  |  payload  |
    | 2 B   | 1 B     | 1 B   | u32 BE     | u64 BE      | msgpack  |  raw      |
    +-------+---------+-------+------------+-------------+----------+-----------+

The prefix alone tells how much follows, so an oversize frame is refused before a byte of its
body is read or a buffer for it is allocated. The message kind is the tag inside the header
(one source of truth; see docs/design.md §3). The payload is a separate segment: written with
vectored I/O and forwarded by relays without being decoded or copied.
"""

from __future__ import annotations

import math
import struct
from typing import Final

import msgspec

from flare_async.errors import FrameTooLarge, ProtocolError
from flare_async.wire._envelope import Envelope, Hello, Routed

MAGIC: Final = b"\xfa\x5c"
WIRE_VERSION: Final = 1
"""Version of the frame layout itself (the prefix). Protocol versions live in the hello."""
PREFIX: Final = struct.Struct(">2sBBIQ")
PREFIX_SIZE: Final = PREFIX.size

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Envelope] = msgspec.msgpack.Decoder(Envelope)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Hard limits of the wire, explicit and per cell.

    Attributes:
        max_header: largest encoded header accepted, in bytes.
        max_frame: largest payload of one frame, in bytes (objects beyond it are streamed).
        max_route: most hops a routed message may take; also the longest route list accepted.
    """

    max_header: int = 64 * 1024
    max_frame: int = 64 * 1024 * 1024
    max_route: int = 32

    def __post_init__(self) -> None:
        if not 256 <= self.max_header <= 16 * 1024 * 1024:
            raise ValueError("max_header must be between 256 B and 16 MiB")
        if not 0 <= self.max_frame < 2**63:
            raise ValueError("max_frame must be non-negative and below 2**63")
        if not 2 <= self.max_route <= 1024:
            raise ValueError("max_route must be between 2 and 1024")


def encode_head(env: Envelope, payload_len: int, limits: Limits, flags: int = 0) -> bytes:
    """Encode the prefix and header of a frame whose payload has ``payload_len`` bytes.

    Raises:
        FrameTooLarge: the header or payload exceed ``limits`` (nothing is sent).
    """
    header = _encoder.encode(env)
    if len(header) > limits.max_header:
        raise FrameTooLarge(f"header of {len(header)} B exceeds max_header {limits.max_header} B")
    if payload_len > limits.max_frame:
        raise FrameTooLarge(f"payload of {payload_len} B exceeds max_frame {limits.max_frame} B")
    return PREFIX.pack(MAGIC, WIRE_VERSION, flags, len(header), payload_len) + header


def parse_prefix(prefix: bytes | bytearray | memoryview, limits: Limits) -> tuple[int, int, int]:
    """Check a frame prefix against ``limits``.

    Returns:
        ``(flags, header_len, payload_len)``.

    Raises:
        ProtocolError: bad magic or frame-layout version, or an empty header.
        FrameTooLarge: the announced header or payload exceed ``limits``.
    """
    magic, version, flags, header_len, payload_len = PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}")
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported frame layout version {version}")
    if header_len == 0:
        raise ProtocolError("frame with an empty header")
    if header_len > limits.max_header:
        raise FrameTooLarge(f"announced header of {header_len} B exceeds {limits.max_header} B")
    if payload_len > limits.max_frame:
        raise FrameTooLarge(f"announced payload of {payload_len} B exceeds {limits.max_frame} B")
    return flags, header_len, payload_len


def decode_header(data: bytes | bytearray | memoryview, limits: Limits) -> Envelope:
    """Decode and check one header.

    Raises:
        ProtocolError: the bytes are not a valid header, a route is longer than allowed, or a
            deadline budget is not a finite number (NaN or infinity would poison every timer
            on the path).
    """
    try:
        env = _decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"malformed frame header: {exc}") from None
    if isinstance(env, Routed):
        if len(env.route) > limits.max_route:
            raise ProtocolError(
                f"route of {len(env.route)} hops exceeds max_route {limits.max_route}"
            )
        if env.budget is not None and not math.isfinite(env.budget):
            raise ProtocolError(f"deadline budget {env.budget!r} is not a finite number")
    elif isinstance(env, Hello) and not math.isfinite(env.heartbeat):
        raise ProtocolError(f"hello heartbeat {env.heartbeat!r} is not a finite number")
    return env


def decode_frame(
    data: bytes | bytearray | memoryview, limits: Limits, *, payload_size: int | None = None
) -> tuple[Envelope, int]:
    """Check and decode a whole frame held in one buffer (a WebSocket message), or its head
    alone when the payload travels apart (``payload_size``, the memory transport).

    Returns:
        the header, and the offset in ``data`` where the payload starts.

    Raises:
        ProtocolError: too short, a bad prefix or header, or lengths that disagree.
        FrameTooLarge: the prefix announces more than ``limits`` allow.
    """
    view = memoryview(data).cast("B")
    size = view.nbytes
    if size < PREFIX_SIZE:
        raise ProtocolError(f"frame of {size} B is shorter than its prefix")
    _, header_len, payload_len = parse_prefix(view[:PREFIX_SIZE], limits)
    start = PREFIX_SIZE + header_len
    have = size - start if payload_size is None else payload_size
    if start > size or (payload_size is not None and start != size) or have != payload_len:
        raise ProtocolError(
            f"frame of {size} B does not match its prefix "
            f"({header_len} B header, {payload_len} B payload)"
        )
    return decode_header(view[PREFIX_SIZE:start], limits), start


def encode_header(env: Envelope) -> bytes:
    """Encode a header alone (used for measurements and signatures)."""
    return _encoder.encode(env)
