"""A SCAFFOLD training script in the shape of NVIDIA FLARE's (its CIFAR-10 client with
``--scaffold``), its import lines changed: it reads the server's control variate from
``input_model.meta[SCAFFOLD_CTRL_GLOBAL]``, corrects the weights after each optimizer step, and
sends a DIFF with its control's change in ``meta[SCAFFOLD_CTRL_DIFF]`` (numpy arrays)."""

from __future__ import annotations

import copy
from typing import Any

import torch

import flare_async.client as flare
from flare_async.client import ParamsType

SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"  # nvflare.app_common.app_constant.AlgorithmConstants
SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"
SEEN: list[dict[str, Any]] = []
"""What each round's script saw and sent (the test reads it)."""


def main() -> None:
    flare.init()
    site = flare.get_site_name()
    index = int(flare.get_config()["site_index"])
    torch.manual_seed(index)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + index  # each site its own offset
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    local: dict[str, torch.Tensor] | None = None
    while flare.is_running():
        input_model = flare.receive()
        model.load_state_dict(input_model.params, strict=True)
        global_model = copy.deepcopy(model)
        if local is None:
            local = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        raw = input_model.meta.get(SCAFFOLD_CTRL_GLOBAL) or {}
        controls = {k: torch.as_tensor(raw[k], dtype=v.dtype) for k, v in local.items()}
        steps, lr = 0, 0.05
        for _ in range(5):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for key, param in model.named_parameters():
                    param.sub_(lr * (controls[key] - local[key]))
            steps += 1
        new_local, delta = {}, {}
        for key, value in local.items():
            new = (
                value
                - controls[key]
                + (global_model.state_dict()[key] - model.state_dict()[key]) / (steps * lr)
            )
            delta[key] = (new - value).detach().numpy()
            new_local[key] = new.detach().clone()
        local = new_local
        diff = {k: v - global_model.state_dict()[k] for k, v in model.state_dict().items()}
        SEEN.append(
            {"site": site, "round": input_model.current_round, "global": raw, "delta": delta}
        )
        flare.send(
            flare.FLModel(
                params=diff,
                params_type=ParamsType.DIFF,
                meta={"NUM_STEPS_CURRENT_ROUND": steps, SCAFFOLD_CTRL_DIFF: delta},
            )
        )
