"""The tensor-dict codec: ``{name: array}`` <-> the safetensors layout, without copies.

Wire form (exactly a ``.safetensors`` file when the parts are written one after another)::

    [u64 LE: header length][JSON header, padded with spaces to 8 bytes][tensor bytes...]

The header maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
the data area) and may carry ``"__metadata__": {str: str}``. Encoding returns the header and one
buffer per tensor: a view of the array's own memory when it is C-contiguous and little-endian
(zero-copy), a copy otherwise. So a stream of this payload saved with
``IncomingStream.save`` is a file that ``safetensors`` (or :func:`decode` over ``mmap``) opens.

Decoding checks everything it trusts: the header length against the data, offsets contiguous,
in order and inside the data, each size equal to ``prod(shape) * itemsize``, dtypes known,
shapes non-negative. Anything else is :class:`~flare_async.errors.DecodeError`. The arrays it
returns are read-only views of the received bytes (no copy).

dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL. BF16 is ``ml_dtypes.bfloat16`` in
numpy and ``torch.bfloat16`` in torch: bf16 stays bf16, bit for bit, never through fp32.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, cast

import ml_dtypes
import numpy as np

from flare_async.errors import CodecError, DecodeError

Buffer = bytes | bytearray | memoryview

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 * 1024 * 1024
"""The largest JSON header accepted (safetensors' own limit)."""
METADATA = "__metadata__"


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The safetensors name of a numpy dtype.

    Raises:
        CodecError: a dtype the layout has no name for (complex, object, strings...).
    """
    little = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    for name, known in _DTYPES.items():
        if little == known:
            return name
    raise CodecError(f"dtype {dtype} cannot travel as a tensor")


def dtype_named(name: str) -> np.dtype[Any]:
    """The numpy dtype of a safetensors dtype name (``F32``, ``BF16``...).

    Raises:
        DecodeError: not a name the layout has.
    """
    found = _DTYPES.get(name) if isinstance(name, str) else None
    if found is None:
        raise DecodeError(f"no tensor dtype is named {name!r:.40}")
    return found


def as_numpy(value: Any) -> np.ndarray:
    """A numpy view of a numpy array or a torch tensor (torch imported only if given one)."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        import torch  # noqa: PLC0415 - torch is optional

        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            t = t.contiguous().view(torch.int16)
            return cast(np.ndarray, t.numpy()).view(ml_dtypes.bfloat16)
        return cast(np.ndarray, t.numpy())
    if isinstance(value, np.generic | int | float | bool):
        return np.asarray(value)
    raise CodecError(
        f"a tensor must be a numpy array or a torch tensor, not {type(value).__name__}"
    )


def _le_contiguous(a: np.ndarray) -> np.ndarray:
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one)
    return a if a.flags.c_contiguous else a.copy(order="C")


def encode(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> list[Buffer]:
    """The parts of the safetensors layout for ``tensors``: header first, then one buffer per
    tensor (views of the arrays' memory where possible).

    Raises:
        CodecError: a name or value that cannot travel.
    """
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA] = {str(k): str(v) for k, v in metadata.items()}
    parts: list[Buffer] = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or name == METADATA:
            raise CodecError(f"tensor name {name!r} is not allowed")
        a = _le_contiguous(as_numpy(value))
        dname = dtype_name(a.dtype)
        size = a.nbytes
        header[name] = {
            "dtype": dname,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
        if size:
            parts.append(memoryview(cast(Any, a.reshape(-1).view(np.uint8))))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return [struct.pack("<Q", len(text)) + text, *parts]


def _parse_header(data: memoryview) -> tuple[dict[str, Any], int]:
    if data.nbytes < 8:
        raise DecodeError(f"tensor payload of {data.nbytes} B is shorter than its length prefix")
    (hlen,) = struct.unpack_from("<Q", data)
    if hlen > MAX_HEADER or 8 + hlen > data.nbytes:
        raise DecodeError(f"tensor header of {hlen} B does not fit in {data.nbytes} B")
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(f"tensor header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise DecodeError("tensor header is not a JSON object")
    return header, 8 + hlen


def _check_entry(name: str, entry: Any) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise DecodeError(f"tensor {name!r}: entry is not an object")
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise DecodeError(f"tensor {name!r}: unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(type(d) is int and 0 <= d < 1 << 48 for d in shape)
    ):
        raise DecodeError(f"tensor {name!r}: bad shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise DecodeError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    count = math.prod(shape)
    if (offsets[1] - offsets[0]) != count * dtype.itemsize:
        raise DecodeError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} B for shape {shape} of {entry['dtype']}"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def decode(
    parts: Sequence[Buffer] | Buffer,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` from the parts (or one buffer) of the layout: read-only numpy
    views of the bytes, no copy when the data is one buffer (a received payload, a mapped
    file).

    Raises:
        DecodeError: anything that does not hold together.
    """
    if isinstance(parts, bytes | bytearray | memoryview):
        data = memoryview(parts).cast("B")
    elif len(parts) == 1:
        data = memoryview(parts[0]).cast("B")
    else:
        data = memoryview(b"".join(parts))  # parts by reference (memory transport): one copy
    header, start = _parse_header(data)
    meta = header.pop(METADATA, {}) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise DecodeError("tensor metadata must map strings to strings")
    body = data[start:]
    out: dict[str, np.ndarray] = {}
    expected = 0
    for name, dtype, shape, begin, end in _tiled(header):
        if end > body.nbytes:
            raise DecodeError(f"tensor {name!r} ends at {end}, past the {body.nbytes} B of data")
        raw = np.frombuffer(body[begin:end], dtype=np.uint8)
        arr = raw.view(dtype).reshape(shape)
        arr.flags.writeable = False
        out[name] = arr
        expected = end
    if expected != body.nbytes:
        raise DecodeError(f"tensor data is {body.nbytes} B but the header describes {expected} B")
    return {name: out[name] for name in header}, dict(meta)


def _tiled(
    header: Mapping[str, Any],
) -> list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]]:
    """The header's entries (metadata removed), each checked, in data order, their offsets
    tiling the data from 0 with no gap or overlap.

    Raises:
        DecodeError: an entry that does not hold together, a gap or an overlap.
    """
    entries = sorted(
        ((name, *_check_entry(name, entry)) for name, entry in header.items()),
        key=lambda e: (e[3], e[4]),
    )
    expected = 0
    for name, _dtype, _shape, begin, end in entries:
        if begin != expected:
            raise DecodeError(
                f"tensor {name!r} starts at {begin}, not {expected}: a gap or overlap"
            )
        expected = end
    return entries


def tensor_layout(header: bytes) -> tuple[int, list[tuple[str, np.dtype[Any], int, int, int]]]:
    """``(data_start, [(name, dtype, count, begin, end)...])`` of a safetensors file's header
    (its length prefix and JSON, nothing after), in data order, checked as :func:`decode`
    checks a whole payload: known dtypes, sizes that match shapes, offsets that tile the data
    with no gap or overlap. ``begin`` / ``end`` are relative to ``data_start``.

    Raises:
        DecodeError: a header that does not hold together.
    """
    table, start = _parse_header(memoryview(header))
    if start != len(header):
        raise DecodeError("a safetensors header must be exactly its length prefix and JSON")
    table.pop(METADATA, None)
    return start, [
        (name, dtype, math.prod(shape), begin, end)
        for name, dtype, shape, begin, end in _tiled(table)
    ]


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Torch tensors (copies, writable) of decoded arrays; BF16 becomes ``torch.bfloat16``."""
    import torch  # noqa: PLC0415 - torch is optional

    out: dict[str, Any] = {}
    for name, a in arrays.items():
        if a.dtype == _DTYPES["BF16"]:
            t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a.copy())
        out[name] = t
    return out
