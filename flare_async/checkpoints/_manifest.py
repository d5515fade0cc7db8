"""What a checkpoint transfer announces before any byte moves: the folder's files, each with its
size and SHA-256, and for a file quantized on the wire its safetensors header (the receiver
writes it back as it was). Pure data and checks, plus :func:`scan` (reads the folder)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path, PurePosixPath
from typing import Final

import msgspec

from flare_async.codecs import MAX_HEADER, tensor_layout
from flare_async.errors import BadRequest, ConfigError, DecodeError

MAX_FILES: Final = 10_000
"""Files in one checkpoint (a 405B model's folder has under 300)."""
MAX_PATH: Final = 1024
SCHEMES: Final = ("bf16", "fp16", "q8", "nf4")
"""What a checkpoint's safetensors files may be quantized to on the wire (the codecs')."""


class FileEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One file of the folder."""

    path: str
    """Relative to the folder, ``/``-separated (``model-00001-of-00002.safetensors``)."""
    size: int
    """The source file's size in bytes."""
    sha256: str
    """The source file's SHA-256, hex. A lossless file arrives with exactly this digest."""
    quant: str = ""
    """The codec it travels in when quantized (``q8``...); empty: byte for byte."""
    header: bytes = b""
    """Quantized files only: the source's safetensors header (length prefix included), which
    the receiver writes back unchanged, so every tensor keeps its place, name and dtype."""


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A checkpoint as announced to the receivers (``files/ckpt-open``, JSON)."""

    name: str
    """The folder's name at the receiver."""
    files: tuple[FileEntry, ...]
    overwrite: bool = False

    @property
    def total(self) -> int:
        """Source bytes in all."""
        return sum(f.size for f in self.files)

    @property
    def id(self) -> str:
        """What the receiver keeps verified files under between attempts: the same folder
        announced again (same files, same digests, same quantization) resumes."""
        h = hashlib.sha256(self.name.encode())
        for f in self.files:
            h.update(msgspec.json.encode((f.path, f.size, f.sha256, f.quant)))
        return h.hexdigest()[:32]


def check_path(path: str) -> str:
    """A file's path as a receiver accepts it: relative, ``/``-separated, no ``..``, nothing
    hidden or partial, no empty part.

    Raises:
        BadRequest: anything else.
    """
    parts = path.split("/")
    if (
        not path
        or len(path) > MAX_PATH
        or "\x00" in path
        or "\\" in path
        or any(not p or p.startswith(".") or p.endswith(".part") or len(p) > 255 for p in parts)
        or PurePosixPath(path).is_absolute()
    ):
        raise BadRequest(f"{path!r} is not an acceptable file path in a checkpoint")
    return path


def check_manifest(manifest: Manifest) -> Manifest:
    """The receiver's checks of an announced manifest (names, sizes, headers).

    Raises:
        BadRequest: what is wrong, first found.
    """
    if not 0 < len(manifest.files) <= MAX_FILES:
        raise BadRequest(f"a checkpoint has 1 to {MAX_FILES} files, not {len(manifest.files)}")
    seen: set[str] = set()
    for f in manifest.files:
        check_path(f.path)
        if f.path in seen or any(f"{f.path}/".startswith(f"{s}/") for s in seen):
            raise BadRequest(f"{f.path!r} is named twice, or is both a file and a folder")
        seen.add(f.path)
        if f.size < 0 or len(f.sha256) != 64 or not all(c in "0123456789abcdef" for c in f.sha256):
            raise BadRequest(f"{f.path!r}: bad size or SHA-256")
        if f.quant:
            if f.quant not in SCHEMES:
                raise BadRequest(f"{f.path!r}: unknown quantization {f.quant!r}")
            if quantized_size(f.header) != f.size:
                raise BadRequest(f"{f.path!r}: its header does not describe {f.size} B")
    if len(seen) != len({p.lower() for p in seen}):
        raise BadRequest("two paths differ only in case")
    return manifest


def quantized_size(header: bytes) -> int:
    """The size of the file a quantized transfer writes: the header and the data it
    describes (-1 for a header that does not hold together)."""
    try:
        start, layout = tensor_layout(header)
    except DecodeError:
        return -1
    return start + (layout[-1][4] if layout else 0)


def read_header(path: Path) -> bytes:
    """A safetensors file's header, length prefix included.

    Raises:
        ConfigError: not a safetensors file.
    """
    with path.open("rb") as f:
        prefix = f.read(8)
        (hlen,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
        if not 0 < hlen <= MAX_HEADER:
            raise ConfigError(f"{path} is not a safetensors file")
        header = prefix + f.read(hlen)
    try:
        tensor_layout(header)
    except DecodeError as exc:
        raise ConfigError(f"{path} is not a safetensors file: {exc}") from None
    return header


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def scan(folder: Path, *, name: str = "", quantize: str = "", overwrite: bool = False) -> Manifest:
    """The manifest of ``folder``: every regular file below it (symlinks followed, as in a
    Hugging Face cache snapshot; hidden files and folders left out), sorted, each hashed once
    (SHA-256, which releases the GIL: run this in a worker thread). With ``quantize``, its
    ``*.safetensors`` files travel in that codec.

    Raises:
        ConfigError: not a folder, no files, an unknown scheme, a file that is not safetensors.
    """
    if quantize and quantize not in SCHEMES:
        raise ConfigError(f"quantize is one of {', '.join(SCHEMES)}, not {quantize!r}")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    files: list[FileEntry] = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            path = Path(root) / n
            if n.startswith(".") or not path.is_file():
                continue
            rel = path.relative_to(folder).as_posix()
            quant = quantize if quantize and n.endswith(".safetensors") else ""
            files.append(
                FileEntry(
                    rel,
                    path.stat().st_size,
                    _sha256(path),
                    quant,
                    read_header(path) if quant else b"",
                )
            )
    if not files:
        raise ConfigError(f"{folder} has no files to send")
    return Manifest(name or folder.resolve().name, tuple(files), overwrite)


__all__ = [
    "MAX_FILES",
    "SCHEMES",
    "FileEntry",
    "Manifest",
    "check_manifest",
    "check_path",
    "quantized_size",
    "read_header",
    "scan",
]
