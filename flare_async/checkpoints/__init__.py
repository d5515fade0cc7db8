"""Checkpoint folders between cells: a Hugging Face model's folder (sharded ``*.safetensors``
with ``model.safetensors.index.json``, ``config.json``, tokenizer files) sent from one cell to
one or many through relays, each file byte for byte with its SHA-256 or, per tensor, quantized
on the wire; resumable; memory bounded by the streams' window whatever the size (docs/llm.md).

* :func:`send_checkpoint`: the sender (``flare-async send KIT DIR --to CELL``).
* :func:`checkpoint_handlers`: the receiver (mounted in every site's inbox by ``flare-async run``).
* :func:`scan` / :class:`Manifest`: what is announced before any byte moves.
"""

from flare_async.checkpoints._manifest import SCHEMES, FileEntry, Manifest, scan
from flare_async.checkpoints._receive import Opened, StoredCheckpoint, checkpoint_handlers
from flare_async.checkpoints._send import send_checkpoint

__all__ = [
    "SCHEMES",
    "FileEntry",
    "Manifest",
    "Opened",
    "StoredCheckpoint",
    "checkpoint_handlers",
    "scan",
    "send_checkpoint",
]
