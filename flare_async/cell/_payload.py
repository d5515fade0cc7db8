"""Payloads: the bytes a message carries, as one or more buffers, plus codec id and headers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flare_async.wire import Buffer, payload_size

_NO_HEADERS: Mapping[str, str] = {}


class Payload:
    """What a message carries: buffers (never copied on the way), a codec id and headers.

    A payload may be made of several buffers (a codec's metadata and one buffer per tensor);
    they are written with vectored I/O and, over ``memory://``, handed over by reference.

    Args:
        data: one buffer, or a sequence of buffers.
        codec: the codec the bytes are encoded with ("" for raw bytes).
        headers: per-message extension headers.
    """

    __slots__ = ("codec", "headers", "parts")

    def __init__(
        self,
        data: Buffer | Sequence[Buffer] = b"",
        *,
        codec: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(data, bytes | bytearray | memoryview):
            self.parts: tuple[Buffer, ...] = (data,) if len(data) else ()
        else:
            self.parts = tuple(p for p in data if len(p))
        self.codec = codec
        self.headers: Mapping[str, str] = headers if headers is not None else _NO_HEADERS

    @classmethod
    def received(cls, parts: tuple[Buffer, ...], codec: str, headers: Mapping[str, str]) -> Payload:
        """A payload over buffers that came off a link (no checks: the hot path)."""
        self = cls.__new__(cls)
        self.parts = parts
        self.codec = codec
        self.headers = headers
        return self

    @property
    def nbytes(self) -> int:
        return payload_size(self.parts)

    def tobytes(self) -> bytes:
        """The payload as one ``bytes`` object (a copy)."""
        if len(self.parts) == 1:
            return bytes(self.parts[0])
        return b"".join(self.parts)

    __bytes__ = tobytes

    def view(self) -> memoryview:
        """The payload as one memoryview: no copy when it is a single buffer."""
        if len(self.parts) == 1:
            return memoryview(self.parts[0])
        return memoryview(self.tobytes())

    def __repr__(self) -> str:
        codec = f", codec={self.codec!r}" if self.codec else ""
        return f"Payload({self.nbytes} B in {len(self.parts)} part(s){codec})"


def as_payload(value: object) -> Payload:
    """Normalize what callers and handlers pass to a :class:`Payload`."""
    if isinstance(value, Payload):
        return value
    if value is None:
        return Payload()
    if isinstance(value, bytes | bytearray | memoryview):
        return Payload(value)
    kind = type(value).__name__
    raise TypeError(f"a payload must be bytes, bytearray, memoryview, Payload or None, not {kind}")
