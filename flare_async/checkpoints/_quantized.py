"""A safetensors file quantized on the wire, tensor slice by tensor slice, and written back by the
receiver in its original layout (docs/llm.md, "The quantized file stream").

The stream's body is a sequence of records, each::

    u32 LE  n          length of the JSON that follows
    n B     JSON       {"tensor": NAME, "start": FIRST_VALUE, "count": VALUES, "size": B}
    B B     payload    the codec's encoding of {"v": the slice as a 1-D array}

Slices hold at most :data:`SLICE` values, cut at multiples of every codec's block, in the
file's data order; a tensor the codec leaves alone (integers, under 1,024 values) is in its
payload as it was. Memory at either end is one slice and its codes, whatever the file's size.
The receiver decodes each slice (dtype restored: bf16 stays bf16), checks it is the next one
of that tensor, and writes it at its place; the file is complete when every tensor is.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Generator
from pathlib import Path
from typing import Final

import msgspec
import numpy as np

from flare_async.codecs import CodecRegistry, tensor_layout
from flare_async.errors import DecodeError
from flare_async.wire import Buffer

SLICE: Final = 1 << 22
"""The most values a receiver takes in one record (8 MiB of bf16), a multiple of every codec's
block."""
SENT: Final = 1 << 20
"""Values per record this sender makes: a quarter of :data:`SLICE` (2 MiB of bf16; what a
record costs in memory at either end, several times over while it is made and decoded)."""
MAX_JSON: Final = 4096
MAX_RECORD: Final = SLICE * 8 + (1 << 16)
"""The largest payload a receiver takes: a slice of float64 and its codec's header."""

_U32 = struct.Struct("<I")


class RecordHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tensor: str
    start: int
    count: int
    size: int


def records(
    path: Path, header: bytes, codec: str
) -> Generator[tuple[list[Buffer], int], None, None]:
    """The records of ``path`` (whose header is ``header``) in ``codec``: each a list of
    buffers and how far into the file it reaches, produced on demand (call ``next`` in a
    worker thread)."""
    enc = CodecRegistry().get(codec)
    start, layout = tensor_layout(header)
    with path.open("rb") as f:
        fd = f.fileno()
        for name, dtype, count, begin, _end in layout:
            for first in range(0, count, SENT):  # an empty tensor is its header entry only
                n = min(SENT, count - first)
                raw = os.pread(fd, n * dtype.itemsize, start + begin + first * dtype.itemsize)
                if len(raw) != n * dtype.itemsize:
                    raise DecodeError(f"{path} ended inside tensor {name!r}")
                values = np.frombuffer(raw, dtype)
                parts = enc.encode({"v": values})
                size = sum(memoryview(p).nbytes for p in parts)
                head = msgspec.json.encode(RecordHead(name, first, n, size))
                through = start + begin + (first + n) * dtype.itemsize
                yield [_U32.pack(len(head)) + head, *parts], through


class ShardWriter:
    """Writes the file a record stream describes (to ``path``), as records are fed in."""

    def __init__(self, path: Path, header: bytes, codec: str) -> None:
        self._codec = CodecRegistry().get(codec)
        self._start, layout = tensor_layout(header)
        self._tensors = {name: (dtype, count, begin) for name, dtype, count, begin, _ in layout}
        self._next = dict.fromkeys(self._tensors, 0)
        self._left = sum(1 for _, count, _ in self._tensors.values() if count)
        self._buf = bytearray()
        self._file = path.open("wb")
        self._file.write(header)
        self._file.truncate(self._start + (layout[-1][4] if layout else 0))

    def feed(self, chunk: Buffer) -> None:
        """Take the next bytes of the stream; write each record completed.

        Raises:
            DecodeError: a record that is malformed, too large, out of order, or of another
                tensor's dtype or size.
        """
        self._buf += chunk
        while True:
            if len(self._buf) < 4:
                return
            (n,) = _U32.unpack_from(self._buf)
            if n > MAX_JSON:
                raise DecodeError(f"a record's head of {n} B (at most {MAX_JSON})")
            if len(self._buf) < 4 + n:
                return
            try:
                head = msgspec.json.decode(self._buf[4 : 4 + n], type=RecordHead)
            except msgspec.DecodeError as exc:
                raise DecodeError(f"a record's head: {exc}") from None
            if not 0 <= head.size <= MAX_RECORD:
                raise DecodeError(f"a record of {head.size} B (at most {MAX_RECORD})")
            if len(self._buf) < 4 + n + head.size:
                return
            self._write(head, memoryview(self._buf)[4 + n : 4 + n + head.size])
            del self._buf[: 4 + n + head.size]

    def _write(self, head: RecordHead, payload: memoryview) -> None:
        known = self._tensors.get(head.tensor)
        if known is None:
            raise DecodeError(f"a record for {head.tensor!r}, which the header does not name")
        dtype, count, begin = known
        if not 0 < head.count <= SLICE:  # what a slice may cost to decode: one slice's worth
            raise DecodeError(f"{head.tensor!r}: a record of {head.count} values (1 to {SLICE})")
        if head.start != self._next[head.tensor] or head.count > count - head.start:
            raise DecodeError(
                f"{head.tensor!r}: values {head.start}+{head.count} out of order (next: "
                f"{self._next[head.tensor]} of {count})"
            )
        try:
            values = self._codec.decode(payload).get("v")
        finally:
            payload.release()
        if values is None or values.dtype != dtype or values.ndim != 1 or values.size != head.count:
            raise DecodeError(f"{head.tensor!r}: a slice that is not {head.count} {dtype} values")
        os.pwrite(
            self._file.fileno(),
            np.ascontiguousarray(values).view(np.uint8).data,
            self._start + begin + head.start * dtype.itemsize,
        )
        self._next[head.tensor] = head.start + head.count
        if self._next[head.tensor] == count:
            self._left -= 1

    def finish(self, durable: bool = True) -> None:
        """Close the file once every tensor is whole.

        Raises:
            DecodeError: bytes left over, or a tensor not (wholly) sent.
        """
        try:
            if self._buf:
                raise DecodeError(f"{len(self._buf)} B after the last whole record")
            if self._left:
                missing = [n for n, (_, c, _) in self._tensors.items() if self._next[n] < c]
                raise DecodeError(f"tensors not sent whole: {', '.join(missing[:5])}")
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def close(self) -> None:
        self._file.close()


__all__ = ["MAX_RECORD", "SENT", "SLICE", "RecordHead", "ShardWriter", "records"]
