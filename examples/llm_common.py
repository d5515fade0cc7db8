"""What the LLM examples share: the text, the tokenizer, the model's config, perplexity.

Nothing is downloaded. The text is the standard library's own Python sources (a fixed,
sorted selection of the files under ``sysconfig.get_paths()["stdlib"]``): every 8th file is
held out for perplexity, the others are dealt to the sites round-robin, file by file (each
site holds whole modules: its own style of code). The tokenizer is a byte-level BPE of
``VOCAB`` tokens trained on the training files on the spot (``tokenizers``; deterministic, so
every site trains the same one). The model is a tiny Llama (``LlamaConfig`` +
``LlamaForCausalLM``) with random weights from a fixed seed: every site builds the identical
base from the config and the seed.

torch, transformers, peft and tokenizers are imported inside the functions that need them:
the recipes import this module on the server (and in a deployment's job process), which never
loads them (:func:`lora_initial` builds the adapter in numpy).

Everything is cached per process, built once under a lock (the simulator's sites are threads
of one process).
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sysconfig
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from flare_async.fl import FedAvgRecipe

if TYPE_CHECKING:
    from peft import LoraConfig
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

SEED = 0
VOCAB = 1024
SEQ = 64
"""Tokens per training block."""
MODEL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": SEQ,
    "tie_word_embeddings": False,
}
"""The tiny Llama's ``LlamaConfig`` fields (the rest are the config's defaults)."""
LORA: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "lm_head"],
}
"""The sites' ``LoraConfig`` fields. ``lm_head`` is adapted too: the base's weights are
random, and adapters on the attention alone barely move its perplexity (1031 -> 969 in 90
steps on one site's text, against 1031 -> 395 with ``lm_head``); on a pretrained base
``["q_proj", "v_proj"]`` is the usual choice."""
FILES = 64
"""Source files in the selection (every 8th held out)."""
HELD_OUT_BLOCKS = 48
"""Blocks of the held-out files that perplexity is measured on."""

_lock = threading.RLock()


def _once(fn: Any) -> Any:
    """``functools.cache``, computed once even when threads ask at the same time."""
    cached = functools.cache(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        with _lock:
            return cached(*args)

    return wrapper


# ---------------------------------------------------------------- text
@_once
def source_files() -> tuple[Path, ...]:
    """The selection: the standard library's top-level modules of 8-64 KB, sorted by name,
    the first :data:`FILES`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked = [p for p in sorted(stdlib.glob("*.py")) if 8_000 <= p.stat().st_size <= 64_000]
    return tuple(picked[:FILES])


def _split(sites: int) -> tuple[list[Path], list[list[Path]]]:
    files = source_files()
    held = [f for i, f in enumerate(files) if i % 8 == 7]
    train = [f for i, f in enumerate(files) if i % 8 != 7]
    return held, [train[s::sites] for s in range(sites)]


@_once
def tokenizer() -> Tokenizer:
    """A byte-level BPE of :data:`VOCAB` tokens trained on the training files (all sites')."""
    from tokenizers import ByteLevelBPETokenizer  # noqa: PLC0415 - not on the server

    held = set(_split(1)[0])
    texts = [f.read_text(encoding="utf-8") for f in source_files() if f not in held]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return bpe._tokenizer  # the plain Tokenizer (what PreTrainedTokenizerFast takes)


def _blocks(files: list[Path]) -> np.ndarray:
    """The files' tokens, each file ending with ``<|endoftext|>``, cut into blocks of SEQ."""
    tok = tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for f in files:
        ids += [*tok.encode(f.read_text(encoding="utf-8")).ids, eot]
    n = len(ids) // SEQ
    return np.asarray(ids[: n * SEQ], dtype=np.int64).reshape(n, SEQ)


@_once
def site_blocks(site: int, sites: int) -> np.ndarray:
    """Site ``site``'s (0-based, of ``sites``) training text as ``[n, SEQ]`` token ids."""
    return _blocks(_split(sites)[1][site])


@_once
def held_out_blocks() -> np.ndarray:
    """The held-out text: the first :data:`HELD_OUT_BLOCKS` blocks of the held-out files,
    spread evenly over them."""
    blocks = _blocks(_split(1)[0])
    pick = np.linspace(0, len(blocks) - 1, HELD_OUT_BLOCKS).round().astype(int)
    return blocks[pick]


def batches(blocks: np.ndarray, batch: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` batches of ``batch`` blocks drawn without replacement (reshuffled per pass)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += rng.permutation(len(blocks)).tolist()
        pick, order = order[:batch], order[batch:]
        yield blocks[pick]


# ---------------------------------------------------------------- the model
def llama_config() -> LlamaConfig:
    from transformers import LlamaConfig  # noqa: PLC0415 - not on the server

    return LlamaConfig(**MODEL)


@_once
def _base() -> LlamaForCausalLM:
    import torch  # noqa: PLC0415 - not on the server
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    with torch.random.fork_rng():  # the base's weights come from SEED alone
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(llama_config())
    return model.eval()


def base_model() -> LlamaForCausalLM:
    """A fresh copy of the base model: random weights from :data:`SEED` (in float32)."""
    with _lock:
        return copy.deepcopy(_base())


def base_state() -> dict[str, np.ndarray]:
    """The base model's state dict in numpy (the full fine-tuning's initial model)."""
    return {k: v.detach().numpy().copy() for k, v in _base().state_dict().items()}


def perplexity(model: Any, blocks: np.ndarray | None = None, batch: int = 16) -> float:
    """``exp`` of the mean next-token loss of ``model`` on ``blocks`` (default: held out)."""
    import torch  # noqa: PLC0415 - not on the server

    data = held_out_blocks() if blocks is None else blocks
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch):
            ids = torch.from_numpy(data[i : i + batch])
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return math.exp(total / count)


# ---------------------------------------------------------------- LoRA
def lora_config() -> LoraConfig:
    from peft import LoraConfig  # noqa: PLC0415 - not on the server

    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def lora_shapes() -> dict[str, tuple[int, int]]:
    """Each LoRA-wrapped linear layer (its name in the model) and its (in, out) features,
    computed from :data:`MODEL` alone."""
    hidden = int(MODEL["hidden_size"])
    heads = int(MODEL["num_attention_heads"])
    kv_heads = int(MODEL.get("num_key_value_heads", heads))
    head_dim = hidden // heads
    inter = int(MODEL["intermediate_size"])
    per_layer = {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    targets = set(LORA["target_modules"])
    out: dict[str, tuple[int, int]] = {}
    for layer in range(int(MODEL["num_hidden_layers"])):
        for name, shape in per_layer.items():
            if name.rsplit(".", 1)[1] in targets:
                out[f"model.layers.{layer}.{name}"] = shape
    if "lm_head" in targets:
        out["lm_head"] = (hidden, int(MODEL["vocab_size"]))
    return out


def lora_initial(seed: int = SEED) -> dict[str, np.ndarray]:
    """The initial adapter in numpy, under peft's own names (what ``get_peft_model_state_dict``
    gives and ``set_peft_model_state_dict`` takes) and with peft's default init: ``lora_A``
    ``[r, in]`` uniform in ``+-1/sqrt(in)`` (``kaiming_uniform_(a=sqrt(5))``), ``lora_B``
    ``[out, r]`` zeros, so the adapted model starts as the base."""
    rng = np.random.default_rng(seed)
    r = int(LORA["r"])
    out: dict[str, np.ndarray] = {}
    for module, (fan_in, fan_out) in lora_shapes().items():
        bound = 1.0 / math.sqrt(fan_in)
        prefix = f"base_model.model.{module}"
        out[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (r, fan_in)).astype(np.float32)
        out[f"{prefix}.lora_B.weight"] = np.zeros((fan_out, r), np.float32)
    return out


Eval = Callable[[int, float], None]
"""``on_eval(round, perplexity)``: sees the global model's held-out perplexity each round."""


def recipe(
    initial: Callable[[], dict[str, np.ndarray]],
    script: Callable[[], None],
    evaluate: Callable[[int, dict[str, np.ndarray]], dict[str, float]],
    *,
    rounds: int,
    codec: str,
    steps: int,
    evaluate_here: bool,
    on_eval: Eval | None,
) -> FedAvgRecipe:
    """The job both examples are: FedAvg from ``initial`` with ``script`` on the sites (each
    gets ``steps``, its ``site_index`` and ``sites``); with ``evaluate_here`` the process
    running the workflow scores the global model after every round (``validation``)."""

    def validate(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
        scores = evaluate(rnd, params)
        if on_eval is not None:
            on_eval(rnd, scores["perplexity"])
        return scores

    return FedAvgRecipe(
        initial=initial,
        script=script,
        rounds=rounds,
        codec=codec,
        config={"steps": steps},
        evaluate=validate if evaluate_here else None,
        deadline=300.0,
    )


async def simulate_printed(
    make: Callable[[Eval], FedAvgRecipe], base: float, rounds: int, **simulate: Any
) -> list[float]:
    """Simulate the job ``make(on_eval)`` builds, printing the held-out perplexity of the
    base and after each round; return those of the rounds."""
    start = time.perf_counter()
    print(f"round  0/{rounds}: held-out perplexity {base:7.2f} (the base model)", flush=True)

    def show(rnd: int, ppl: float) -> None:
        took = time.perf_counter() - start
        print(f"round {rnd + 1:2d}/{rounds}: held-out perplexity {ppl:7.2f} ({took:5.1f} s)")

    final = await make(show).simulate(**simulate)
    return [h["validation"]["perplexity"] for h in final.meta["history"]]


def main(
    doc: str,
    run: Callable[..., Awaitable[list[float]]],
    *,
    rounds: int,
    sites: int,
    steps: int,
    relays: bool = False,
) -> None:
    """An example's command line: ``--rounds --codec --sites --steps`` (and ``--relays``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n", 1)[0])
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--codec", default="tensors", help="tensors, q8, nf4, fp16, bf16 ...")
    p.add_argument("--sites", type=int, default=sites)
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per site per round")
    if relays:
        p.add_argument("--relays", type=int, default=1, help="relays folding the sites' results")
    args = vars(p.parse_args())
    anyio.run(functools.partial(run, **args))
