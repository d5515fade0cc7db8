"""Files written so that a crash leaves either the old content or the new, never a mix."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from flare_async.wire import Buffer


def write_atomic(path: Path, data: bytes | Iterable[Buffer]) -> None:
    """Write ``data`` (bytes, or pieces written one after another) to ``path`` through
    ``path.part``: flushed to the disk (``fsync``), then renamed over ``path`` in one step."""
    part = path.with_name(path.name + ".part")
    with part.open("wb") as f:
        for piece in [data] if isinstance(data, bytes) else data:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


__all__ = ["write_atomic"]
