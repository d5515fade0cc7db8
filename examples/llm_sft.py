"""Federated full fine-tuning (SFT) of a small causal LM with the transformers ``Trainer``.

Every site fine-tunes the whole model (the tiny Llama of ``llm_common.py``) on its share of
the standard library's sources with ``Trainer``; a ``TrainerCallback`` puts the training loss
and the steps taken into the result's metrics and meta. The whole state dict travels each
round and FedAvg averages it. In the simulator the sites sit below relays that fold their
results (one partial sum per relay goes up: the server holds one model and one accumulator,
whatever the number of sites).

    python examples/llm_sft.py [--rounds 3] [--codec tensors|q8|nf4] [--sites 3] [--relays 1]

prints the global model's held-out perplexity after every round. On a deployment:
``flare-async job submit examples.llm_sft:recipe`` (the job process builds the initial state
dict from the config and the seed; it needs torch and transformers). See docs/llm.md.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

import flare_async.client as flare
from flare_async.fl import FedAvgRecipe, FLModel

try:  # run as a script, or imported as examples.llm_sft
    import llm_common as common
except ImportError:
    from examples import llm_common as common

SITES = 3
STEPS = 10
"""Optimizer steps per site per round."""
BATCH = 8
LR = 3e-3
TRAINERS = threading.Lock()
"""One ``Trainer`` at a time in a process (see :func:`train`)."""
Params = dict[str, np.ndarray]


def load_state(model: Any, params: Mapping[str, Any]) -> None:
    """Load a whole state dict (numpy or torch) into ``model``, strictly."""
    import torch  # noqa: PLC0415 - imported by the sites only

    model.load_state_dict(
        {k: torch.as_tensor(np.array(v, dtype=np.float32)) for k, v in params.items()}
    )


def training_args(folder: str, steps: int, lr: float, seed: int) -> Any:
    """Quiet, CPU-only ``TrainingArguments``: no checkpoints, no reporting, no progress bars,
    batches in the dataset's order (it is shuffled per round and site with a fixed seed)."""
    from transformers import TrainingArguments  # noqa: PLC0415

    return TrainingArguments(
        output_dir=folder,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        log_level="error",
        dataloader_pin_memory=False,
        train_sampling_strategy="sequential",
    )


def fl_callback() -> Any:
    """A ``TrainerCallback`` that keeps the losses ``Trainer`` logs and the steps it took,
    for the round's result (``.result(params)``)."""
    from transformers import TrainerCallback  # noqa: PLC0415

    class FLMetrics(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.steps = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.steps = int(state.global_step)

        def result(self, params: Params) -> FLModel:
            return FLModel(
                params=params,
                meta={"NUM_STEPS_CURRENT_ROUND": self.steps},  # FedAvg's weight, as FLARE's
                metrics={"loss": self.losses[-1], "first_loss": self.losses[0]},
            )

    return FLMetrics()


def train() -> None:
    """Every site's script: ``Trainer`` on the received model, the whole state dict back."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers import Trainer  # noqa: PLC0415
    from transformers.trainer_callback import PrinterCallback  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    flare.init()
    cfg = flare.get_config()
    site, sites = int(cfg["site_index"]), int(cfg.get("sites", SITES))
    steps, lr = int(cfg.get("steps", STEPS)), float(cfg.get("lr", LR))
    data = common.site_blocks(site, sites)
    model = common.base_model()
    with tempfile.TemporaryDirectory() as folder:
        while flare.is_running():
            task = flare.receive()
            if task is None:
                break
            load_state(model, task.params)
            seed = 1000 * task.current_round + site
            rows = np.concatenate(list(common.batches(data, BATCH, steps, seed)))
            dataset = [
                {"input_ids": torch.from_numpy(r), "labels": torch.from_numpy(r)} for r in rows
            ]
            callback = fl_callback()
            # accelerate keeps one state per process, which each Trainer sets up and resets:
            # sites that share a process (the simulator's threads) take turns.
            with TRAINERS:
                trainer = Trainer(
                    model=model,
                    args=training_args(folder, steps, lr, seed),
                    train_dataset=dataset,
                    callbacks=[callback],
                )
                trainer.remove_callback(PrinterCallback)  # its log lines; the callback keeps them
                trainer.train()
            state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            flare.send(callback.result(state))


def evaluate(rnd: int, params: Params) -> dict[str, float]:
    """The global model's held-out perplexity (in the process running the workflow)."""
    del rnd
    model = common.base_model()
    load_state(model, params)
    return {"perplexity": common.perplexity(model)}


def recipe(
    rounds: int = 3,
    codec: str = "tensors",
    steps: int = STEPS,
    evaluate_here: bool = False,
    on_eval: Callable[[int, float], None] | None = None,
) -> FedAvgRecipe:
    """Federated full fine-tuning as a job: ``flare-async job submit examples.llm_sft:recipe``.

    ``evaluate_here``: the workflow's process measures the global model's held-out perplexity
    after every round (``validation["perplexity"]``); ``on_eval(round, ppl)`` sees each value.
    """

    return common.recipe(
        common.base_state,
        train,
        evaluate,
        rounds=rounds,
        codec=codec,
        steps=steps,
        evaluate_here=evaluate_here,
        on_eval=on_eval,
    )


async def run(
    rounds: int, codec: str, sites: int, relays: int = 1, steps: int = STEPS
) -> list[float]:
    """Simulate the job with ``relays`` folding the sites' results; return the held-out
    perplexity after each round (and print it)."""
    base = common.perplexity(common.base_model())

    def make(on_eval: common.Eval) -> FedAvgRecipe:
        return recipe(rounds, codec, steps, evaluate_here=True, on_eval=on_eval)

    return await common.simulate_printed(make, base, rounds, clients=sites, relays=relays)


def main() -> None:
    common.main(__doc__, run, rounds=3, sites=SITES, steps=STEPS, relays=True)


if __name__ == "__main__":
    main()
