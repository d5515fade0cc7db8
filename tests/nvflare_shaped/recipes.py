"""Jobs of the FLARE-shaped scripts, for the simulator and for a deployment."""

from __future__ import annotations

import numpy as np

from flare_async.fl import FedAvgRecipe


def initial_pt() -> dict[str, object]:
    import torch  # noqa: PLC0415 - the server needs torch only for this job

    from tests.nvflare_shaped.net import SimpleNetwork  # noqa: PLC0415

    torch.manual_seed(0)
    return dict(SimpleNetwork().state_dict())


def hello_numpy() -> FedAvgRecipe:
    return FedAvgRecipe(
        initial={"numpy_key": np.arange(1, 10, dtype=np.float32).reshape(3, 3)},
        script="tests.nvflare_shaped.hello_numpy:main",
        rounds=3,
    )


def hello_pt() -> FedAvgRecipe:
    return FedAvgRecipe(
        initial=initial_pt, script="tests.nvflare_shaped.hello_pt:main", rounds=3, deadline=120
    )


def hello_lightning() -> FedAvgRecipe:
    return FedAvgRecipe(
        initial=lambda: {f"model.{k}": v for k, v in initial_pt().items()},
        script="tests.nvflare_shaped.hello_lightning:main",
        rounds=2,
        deadline=120,
    )


def broken() -> FedAvgRecipe:
    """A job whose script fails at import on one site (a module it needs is missing)."""
    return FedAvgRecipe(
        initial={"w": np.zeros(3)},
        script="tests._fl_scripts:broken_at_import",
        rounds=2,
        deadline=600,
    )
