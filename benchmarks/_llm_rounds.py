"""One round of federated LoRA against one round of federated full fine-tuning, on the same
model: bytes on the wire and seconds per round (``benchmarks/llm.py`` reports them).

Both run the examples' own jobs (``examples/llm_lora.py``, ``examples/llm_sft.py``: the tiny
Llama of ``examples/llm_common.py``, 64 hidden, 2 layers, vocab 1024: 262,464 parameters) in
the simulator, in this process over ``memory://``, with the same sites, the same optimizer
steps per site (batches of 8 x 64 tokens) and no relays. LoRA trains and sends the adapters
(r=8 on q_proj, v_proj and lm_head: 12,800 parameters); full fine-tuning trains and sends the
whole state dict.

Cases ``lora-{S}sites-{N}steps`` and ``full-{S}sites-{N}steps`` (``--quick``: 2 sites, 5
steps, one run; else 3 sites, 20 steps, the median of 3 runs), metrics:

- ``wire_bytes_per_round`` (B): every frame sent on the simulation's network from the
  workflow's start to the round's end, both directions (``MemoryNetwork.statistics()``: the
  models, the results, and the round's control messages).
- ``model_bytes_down`` / ``result_bytes_up`` (B): the encoded payloads, server to sites and
  sites to server (the model encoded with the job's codec, once per site; each site's result
  carries the same tensors).
- ``seconds_per_round`` (s): from the workflow's start to the round's end (every site trained
  and the server folded the results); the per-process caches (tokenizer, data, base model)
  are built before, as they are after a site's first round.

The LoRA records carry the full fine-tuning's value as ``baseline`` (``ratio``: LoRA's share).

    python benchmarks/_llm_rounds.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import llm_common as common  # noqa: E402 - the examples' folder is on the path only now
import llm_lora  # noqa: E402
import llm_sft  # noqa: E402

from flare_async import MemoryNetwork  # noqa: E402
from flare_async.codecs import CodecRegistry, default_codecs  # noqa: E402
from flare_async.fl import FLServer, RoundResult, simulate  # noqa: E402

BENCH = "llm"


def _record(
    case: str, metric: str, value: float, unit: str, baseline: float | None = None
) -> dict[str, Any]:
    """One measurement in the shape of ``_report.emit``'s lines (not printed)."""
    out: dict[str, Any] = {
        "bench": BENCH,
        "case": case,
        "metric": metric,
        "value": float(f"{value:.6g}"),
        "unit": unit,
    }
    if baseline is not None:
        out["baseline"] = float(f"{baseline:.6g}")
        out["ratio"] = round(value / baseline, 4) if baseline else None
    return out


def _encoded_bytes(params: dict[str, Any], codec: str) -> int:
    parts = CodecRegistry(default_codecs()).get(codec).encode(params)
    return sum(memoryview(p).nbytes for p in parts)


async def _one_round(module: Any, sites: int, steps: int, codec: str) -> dict[str, float]:
    job = module.recipe(1, codec, steps)
    net = MemoryNetwork()
    marks: dict[str, tuple[float, int]] = {}
    folded: list[list[str]] = []

    async def workflow(server: FLServer) -> Any:
        marks["start"] = (time.perf_counter(), net.statistics().bytes_sent)
        return await job.run(server)

    def on_round(result: RoundResult) -> None:
        marks["end"] = (time.perf_counter(), net.statistics().bytes_sent)
        folded.append(result.sum.names())

    final = await simulate(
        workflow,
        job.script,
        clients=sites,
        config=job.config,
        codec=codec,
        network=net,
        on_round=on_round,
    )
    (t0, b0), (t1, b1) = marks["start"], marks["end"]
    assert sorted(folded[0]) == sorted(final.params)  # the results carried the model's tensors
    model = _encoded_bytes(dict(final.params), codec)
    return {
        "wire_bytes_per_round": float(b1 - b0),
        "model_bytes_down": float(sites * model),
        "result_bytes_up": float(sites * model),
        "seconds_per_round": t1 - t0,
        "parameters": float(sum(v.size for v in final.params.values())),
    }


UNITS = {
    "wire_bytes_per_round": "B",
    "model_bytes_down": "B",
    "result_bytes_up": "B",
    "seconds_per_round": "s",
    "parameters": "1",
}


def lora_vs_full(quick: bool, codec: str = "tensors") -> list[dict[str, Any]]:
    """One round of each (``quick``: 2 sites, 5 steps, once; else 3 sites, 20 steps, the
    median of 3), as JSON-lines records (see the module's docstring)."""
    sites, steps, repeat = (2, 5, 1) if quick else (3, 20, 3)
    common.tokenizer()  # the per-process caches, as a site has them after its first round
    for site in range(sites):
        common.site_blocks(site, sites)
    common.base_model()
    results: dict[str, dict[str, float]] = {}
    for name, module in (("full", llm_sft), ("lora", llm_lora)):
        runs = [anyio.run(_one_round, module, sites, steps, codec) for _ in range(repeat)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = []
    for name in ("lora", "full"):
        case = f"{name}-{sites}sites-{steps}steps" + ("" if codec == "tensors" else f"-{codec}")
        for metric, value in results[name].items():
            base = results["full"][metric] if name == "lora" else None
            out.append(_record(case, metric, value, UNITS[metric], base))
    return out


if __name__ == "__main__":
    import json

    for rec in lora_vs_full("--quick" in sys.argv[1:]):
        print(json.dumps(rec), flush=True)
