"""What a checkpoint transfer announces before any byte moves: the folder's files, each with its
size and SHA-256, and for a file quantized on the wire its safetensors header (the receiver
writes it back as it was). Pure data and checks, plus :func:`scan` (reads the folder)."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from pathlib import Path, PurePosixPath
from typing import Final

import msgspec

from flare_async.codecs import MAX_HEADER, tensor_layout
from flare_async.errors import BadRequest, ConfigError, DecodeError

MAX_FILES: Final = 10_000
"""Files in one checkpoint (a 405B model's folder has under 300)."""
MAX_PATH: Final = 1024
"""Bytes of a file's path (UTF-8)."""
MAX_FILE: Final = 1 << 40
"""Bytes of one file (1 TiB; a Hugging Face shard is at most a few GB)."""
_HEX64 = re.compile("[0-9a-f]{64}")
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
        announced again (same files, digests, quantization and headers) resumes. The first 32
        hex digits of the SHA-256 over the name (UTF-8), then for each file in order a line
        ``"\n" + "\0".join([path, str(size), sha256, quant, SHA-256 hex of header or ""])``
        (UTF-8): docs/llm.md, "The protocol"."""
        h = hashlib.sha256(self.name.encode())
        for f in self.files:
            header = hashlib.sha256(f.header).hexdigest() if f.header else ""
            h.update(("\n" + "\0".join([f.path, str(f.size), f.sha256, f.quant, header])).encode())
        return h.hexdigest()[:32]


def check_path(path: str) -> str:
    """A file's path as a receiver accepts it: relative, ``/``-separated, no ``..``, nothing
    hidden or partial, no empty part, no control character or backslash; each part at most
    255 bytes and the whole at most 1,024 bytes in UTF-8.

    Raises:
        BadRequest: anything else.
    """
    parts = path.split("/")
    if (
        not path
        or len(path.encode()) > MAX_PATH
        or any(ord(c) < 32 or c in "\x7f\\" for c in path)
        or any(
            not p or p.startswith(".") or p.endswith(".part") or len(p.encode()) > 255
            for p in parts
        )
        or PurePosixPath(path).is_absolute()
    ):
        raise BadRequest(f"{path!r} is not an acceptable file path in a checkpoint")
    return path


def check_manifest(manifest: Manifest) -> Manifest:
    """The receiver's checks of an announced manifest (names, sizes, headers), in time linear
    in its size.

    Raises:
        BadRequest: what is wrong, first found.
    """
    if not 0 < len(manifest.files) <= MAX_FILES:
        raise BadRequest(f"a checkpoint has 1 to {MAX_FILES} files, not {len(manifest.files)}")
    files: set[str] = set()
    folders: set[str] = set()
    for f in manifest.files:
        check_path(f.path)
        key = f.path.lower()  # a file system that ignores case must not see a clash either
        parts = key.split("/")
        above = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if key in files or key in folders or above & files:
            raise BadRequest(f"{f.path!r} is named twice, or is both a file and a folder")
        files.add(key)
        folders |= above
        if not 0 <= f.size <= MAX_FILE or not _HEX64.fullmatch(f.sha256):
            raise BadRequest(f"{f.path!r}: bad size or SHA-256")
        if not f.quant:
            if f.header:
                raise BadRequest(f"{f.path!r}: a header for a file sent byte for byte")
            continue
        if f.quant not in SCHEMES:
            raise BadRequest(f"{f.path!r}: unknown quantization {f.quant!r}")
        if quantized_size(f.header) != f.size:
            raise BadRequest(f"{f.path!r}: its header does not describe {f.size} B")
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
    ``*.safetensors`` files travel in that codec; one whose header the codecs cannot read
    (FP8 dtypes, say, or not safetensors at all) travels byte for byte.

    Raises:
        ConfigError: not a folder, no files, an unknown scheme.
    """
    if quantize and quantize not in SCHEMES:
        raise ConfigError(f"quantize is one of {', '.join(SCHEMES)}, not {quantize!r}")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    files: list[FileEntry] = []
    seen: set[tuple[int, int]] = set()  # folders by (device, inode): a symlink loop ends
    for root, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            path = Path(root) / n
            if n.startswith(".") or not path.is_file():
                continue
            rel = path.relative_to(folder).as_posix()
            header = b""
            if quantize and n.endswith(".safetensors"):
                try:
                    header = read_header(path)
                except ConfigError:  # dtypes the codecs do not know (FP8...): byte for byte
                    header = b""
            quant = quantize if header else ""
            files.append(FileEntry(rel, path.stat().st_size, _sha256(path), quant, header))
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
