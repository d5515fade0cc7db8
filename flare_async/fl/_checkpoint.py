"""Checkpoints: the global model after each round, as safetensors files, written atomically.

``last.safetensors`` holds the model after the last finished round; ``best.safetensors`` the
best one by the workflow's validation metric. Each carries, in its metadata, the round, the
history so far and the best score, so that a job restarted on the same folder continues after
the last finished round instead of starting over. A file is written to ``<name>.part`` and
renamed into place: a crash mid-write leaves the previous checkpoint intact.

A strategy's state (a server optimizer's moments, SCAFFOLD's control variate) is written
beside it, first, as ``<name>.state-<round>.safetensors``, which the model's file then names;
so ``last.safetensors`` stays a plain model file (it loads into the model as it is), and a
crash between the two writes leaves the previous pair intact.
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
    state: dict[str, np.ndarray] = field(default_factory=dict)
    """The strategy's state after ``round`` (see ``fl/_strategies.py``)."""


def _write(path: Path, params: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    write_atomic(path, encode(params, {STATE_KEY: json.dumps(state)}))


async def save(
    folder: Path,
    name: str,
    ckpt: Checkpoint,
) -> None:
    """Write ``folder/<name>.safetensors`` atomically (in a worker thread), and the strategy's
    state beside it (see above)."""
    state: dict[str, Any] = {"round": ckpt.round, "history": ckpt.history, "best": ckpt.best}
    if ckpt.state:
        state["state"] = f"{name}.state-{ckpt.round}.safetensors"
        await anyio.to_thread.run_sync(_write, folder / state["state"], ckpt.state, {})
    await anyio.to_thread.run_sync(_write, folder / f"{name}.safetensors", ckpt.params, state)
    await anyio.to_thread.run_sync(_prune, folder, name, state.get("state"))


def _prune(folder: Path, name: str, keep: str | None) -> None:
    """Remove the state files of ``name`` but ``keep``."""
    for old in folder.glob(f"{name}.state-*.safetensors"):
        if old.name != keep:
            old.unlink(missing_ok=True)


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
        extra = _state(folder, name, state.get("state"))
        return Checkpoint(
            round=int(state["round"]),
            params={k: np.array(v) for k, v in tensors.items()},
            history=list(state["history"]),
            best=state.get("best"),
            state=extra,
        )
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise DecodeError(f"{path} is not a flare_async checkpoint: {exc!r}") from None


def _state(folder: Path, name: str, beside: Any) -> dict[str, np.ndarray]:
    """The state file a checkpoint names (none: empty), in ``folder`` only."""
    if not beside:
        return {}
    path = folder / str(beside)
    if path.name != str(beside) or not path.name.startswith(f"{name}.state-"):
        raise ValueError(f"a state file named wrongly: {beside!r:.80}")
    return {k: np.array(v) for k, v in decode(path.read_bytes())[0].items()}
