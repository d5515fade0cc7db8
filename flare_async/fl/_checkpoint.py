"""Checkpoints: the global model after each round, as safetensors files, written atomically.

``last.safetensors`` holds the model after the last finished round; ``best.safetensors`` the
best one by the workflow's validation metric. Each carries, in its metadata, the round, the
history so far and the best score, so that a job restarted on the same folder continues after
the last finished round instead of starting over. A file is written to ``<name>.part`` and
renamed into place: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np

from flare_async._files import write_atomic
from flare_async.codecs import decode, encode
from flare_async.errors import DecodeError

STATE_KEY = "flare.checkpoint"


@dataclass
class Checkpoint:
    """What a job needs to continue: the model after ``round`` and the history."""

    round: int
    params: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def _write(path: Path, params: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    write_atomic(path, encode(params, {STATE_KEY: json.dumps(state)}))


async def save(
    folder: Path,
    name: str,
    ckpt: Checkpoint,
) -> None:
    """Write ``folder/<name>.safetensors`` atomically (in a worker thread)."""
    state = {"round": ckpt.round, "history": ckpt.history, "best": ckpt.best}
    await anyio.to_thread.run_sync(_write, folder / f"{name}.safetensors", ckpt.params, state)


def load(folder: Path, name: str = "last") -> Checkpoint | None:
    """The checkpoint in ``folder/<name>.safetensors``, or ``None`` if there is none.

    Raises:
        DecodeError: a file that is not one of our checkpoints.
    """
    path = folder / f"{name}.safetensors"
    if not path.exists():
        return None
    tensors, meta = decode(path.read_bytes())
    try:
        state = json.loads(meta[STATE_KEY])
        return Checkpoint(
            round=int(state["round"]),
            params={k: np.array(v) for k, v in tensors.items()},
            history=list(state["history"]),
            best=state.get("best"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DecodeError(f"{path} is not a flare_async checkpoint: {exc!r}") from None
