"""Federated LoRA: sites fine-tune adapters of a small causal LM on their own text; only the
adapters travel, both ways.

Each site wraps the same base model (a tiny ``LlamaForCausalLM`` built from its config and a
fixed seed, see ``llm_common.py``) with peft's ``LoraConfig`` and trains the adapters in a
plain PyTorch loop on its share of the standard library's sources. The server's model is the
adapter alone: built in numpy with peft's names and init (``llm_common.lora_initial``), so the
server never loads the base model, nor imports torch or transformers. FedAvg averages the
adapters; a site's result carries only the adapter tensors (a partial update of the model,
see docs/fl.md, "Weights, partial updates and dtypes").

    python examples/llm_lora.py [--rounds 5] [--codec tensors|q8|nf4] [--sites 3]

prints the global model's held-out perplexity after every round: the simulator's process
merges the global adapter into the base (``merge_and_unload``) to measure it. On a deployment
(``flare-async job submit examples.llm_lora:recipe``) nothing of the model is on the server;
site 1 reports the held-out perplexity of the global model it received each round
(``global_ppl`` in the round's metrics). See docs/llm.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

import flare_async.client as flare
from flare_async.fl import FedAvgRecipe, FLModel

try:  # run as a script, or imported as examples.llm_lora
    import llm_common as common
except ImportError:
    from examples import llm_common as common

SITES = 3
STEPS = 20
"""Optimizer steps per site per round."""
BATCH = 8
LR = 1e-2
Params = dict[str, np.ndarray]


def adapter_model() -> Any:
    """The base model wrapped with the sites' LoRA adapters (``PeftModel``)."""
    from peft import get_peft_model  # noqa: PLC0415 - not on the server

    return get_peft_model(common.base_model(), common.lora_config())


def load_adapter(model: Any, params: Mapping[str, Any]) -> None:
    """Put ``params`` (numpy or torch, peft's names) into ``model``'s adapters.

    Raises:
        KeyError: ``params`` misses an adapter tensor of the model, or has another tensor.
    """
    import torch  # noqa: PLC0415 - not on the server
    from peft import set_peft_model_state_dict  # noqa: PLC0415

    tensors = {k: torch.as_tensor(np.array(v, dtype=np.float32)) for k, v in params.items()}
    loaded = set_peft_model_state_dict(model, tensors)
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing or loaded.unexpected_keys:
        raise KeyError(f"adapter mismatch: missing {missing}, unexpected {loaded.unexpected_keys}")


def adapter_params(model: Any) -> Params:
    """The adapters' tensors in numpy, under peft's names (never the base layers)."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415 - not on the server

    # save_embedding_layers=False: with lm_head among the targets peft would add the base
    # output layer itself ("auto" saves it), which must not travel.
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def merged(params: Mapping[str, Any]) -> Any:
    """The base model with the adapter ``params`` merged into its weights (a plain
    ``LlamaForCausalLM``)."""
    model = adapter_model()
    load_adapter(model, params)
    return model.merge_and_unload()


def train() -> None:
    """Every site's script: LoRA fine-tuning in a plain PyTorch loop."""
    import torch  # noqa: PLC0415 - not on the server

    flare.init()
    cfg = flare.get_config()
    site, sites = int(cfg["site_index"]), int(cfg.get("sites", SITES))
    steps, lr = int(cfg.get("steps", STEPS)), float(cfg.get("lr", LR))
    data = common.site_blocks(site, sites)
    model = adapter_model()
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        load_adapter(model, task.params)
        metrics: dict[str, float] = {}
        if site == 0:  # one site measures the global model it received (all would agree)
            metrics["global_ppl"] = common.perplexity(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        seed = 1000 * task.current_round + site
        loss = torch.zeros(())
        for batch in common.batches(data, BATCH, steps, seed):
            ids = torch.from_numpy(batch)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        metrics["loss"] = float(loss.detach())
        flare.send(
            FLModel(
                params=adapter_params(model),
                meta={"num_samples": steps * BATCH},
                metrics=metrics,
            )
        )


def evaluate(rnd: int, params: Params) -> dict[str, float]:
    """The global adapter merged into the base, on the held-out text (in the simulator's
    process: it loads the base model; a deployment's server does not)."""
    del rnd
    return {"perplexity": common.perplexity(merged(params))}


def recipe(
    rounds: int = 5,
    codec: str = "tensors",
    steps: int = STEPS,
    evaluate_here: bool = False,
    on_eval: Callable[[int, float], None] | None = None,
) -> FedAvgRecipe:
    """Federated LoRA as a job: ``flare-async job submit examples.llm_lora:recipe``.

    ``evaluate_here``: the process running the workflow measures the global model's
    held-out perplexity after every round (``validation["perplexity"]``), loading the base
    model: for the simulator, never on a deployment's server. ``on_eval(round, ppl)`` sees
    each value.
    """
    return common.recipe(
        common.lora_initial,
        train,
        evaluate,
        rounds=rounds,
        codec=codec,
        steps=steps,
        evaluate_here=evaluate_here,
        on_eval=on_eval,
    )


async def run(rounds: int, codec: str, sites: int, steps: int = STEPS) -> list[float]:
    """Simulate the job; return the held-out perplexity after each round (and print it)."""
    base = common.perplexity(merged(common.lora_initial()))

    def make(on_eval: common.Eval) -> FedAvgRecipe:
        return recipe(rounds, codec, steps, evaluate_here=True, on_eval=on_eval)

    return await common.simulate_printed(make, base, rounds, clients=sites)


def main() -> None:
    common.main(__doc__, run, rounds=5, sites=SITES, steps=STEPS)


if __name__ == "__main__":
    main()
