"""Federated LoRA (``examples/llm_lora.py``) and federated full fine-tuning with the ``Trainer``
(``examples/llm_sft.py``) as jobs on one real deployment: every cell its own OS process over
mTLS, each site's training in a process of its own, submitted with the admin CLI. The LoRA
job's model is the adapter alone: its checkpoint holds peft's adapter tensors and nothing of the
base model; the full job's is the whole state dict, folded at the relay."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flare_async.codecs import decode
from tests._procs import ROOT
from tests.system.test_jobs_deploy import SITES, Deployment

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, str(ROOT / "examples"))

import llm_common as common
import llm_lora

pytestmark = pytest.mark.slow


@pytest.fixture
def d(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    """test_jobs_deploy's deployment: server, relay, two sites, each its own process."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    deployment = Deployment(tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.mark.timeout(420)
def test_federated_lora_then_full_fine_tuning_on_a_deployment(
    d: Deployment, tmp_path: Path
) -> None:
    """2 rounds on the 2 sites, adapters quantized to 8 bits on the wire (``--codec q8``).
    The job's checkpoint is the adapter (peft's names and shapes, the base model's tensors
    absent); the held-out perplexity the first site measured on each model it received (the
    base, then round 1's) falls, and the final adapter, merged into the base here, is better
    still."""
    done = d.job(
        "submit", "examples.llm_lora:recipe", "--rounds", "2", "--codec", "q8",
        "--wait", "--timeout", "240",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    assert final["state"] == "finished", final
    assert final["rounds_done"] == 2
    folder = tmp_path / "jobs" / "server" / final["id"] / "checkpoints"
    tensors, meta = decode((folder / "last.safetensors").read_bytes())
    initial = common.lora_initial()
    assert sorted(tensors) == sorted(initial)
    for name, value in initial.items():
        assert tensors[name].shape == value.shape, name
    assert any(np.abs(tensors[k]).max() > 0 for k in tensors if ".lora_B." in k)  # trained
    history = json.loads(meta["flare.checkpoint"])["history"]
    assert [sorted(h["responded"]) for h in history] == [SITES, SITES]
    seen = [h["metrics"]["global_ppl"] for h in history]
    base = common.perplexity(common.base_model())
    assert seen[0] == pytest.approx(base, rel=1e-4)  # every site built the same base
    last = common.perplexity(llm_lora.merged(tensors))
    assert base > seen[1] > last, (base, seen, last)

    # The same deployment, the Trainer's job: the whole state dict both ways, 2 rounds.
    done = d.job("submit", "examples.llm_sft:recipe", "--rounds", "2", "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    assert (final["state"], final["rounds_done"]) == ("finished", 2), final
    folder = tmp_path / "jobs" / "server" / final["id"] / "checkpoints"
    tensors, meta = decode((folder / "last.safetensors").read_bytes())
    state = common.base_state()
    assert sorted(tensors) == sorted(state)  # every tensor of the model
    assert any(not np.array_equal(tensors[k], state[k]) for k in state)  # trained
    history = json.loads(meta["flare.checkpoint"])["history"]
    assert [sorted(h["responded"]) for h in history] == [SITES, SITES]
    losses = [h["metrics"]["loss"] for h in history]  # the sites' mean, as the Trainer logged
    assert losses[1] < losses[0], losses
