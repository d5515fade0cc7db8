"""Hugging Face checkpoint folders for the tests: a small Llama built from its config (random
weights, nothing downloaded) saved the way ``save_pretrained`` shards it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def llama_folder(folder: Path, *, dtype: str = "bfloat16", shard: str = "200KB") -> Any:
    """A sharded checkpoint (``model-0000k-of-0000n.safetensors``, its index, ``config.json``,
    ``generation_config.json``) and a tokenizer file in ``folder``; returns the model."""
    import torch  # noqa: PLC0415 - the llm extra, imported by the tests that use it
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"t": 1}}))
    return model


def digests(folder: Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file below ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
