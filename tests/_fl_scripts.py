"""Training scripts the FL tests run as subprocesses (``MODULE:FUNCTION``)."""

from __future__ import annotations

import os

import numpy as np

import flare_async.client as flare
from flare_async.fl import FedAvgRecipe, FLModel


def add_site_weight() -> None:
    """Site i adds (i + 1) to every parameter and reports i + 1 samples (as in test_fl)."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(
            FLModel(
                params=params,
                meta={"num_samples": i + 1},
                metrics={"site": float(i), "pid": float(os.getpid())},
            )
        )


def dies_at_site_3() -> None:
    """Site 3's process exits while holding its task; the others behave."""
    if flare.get_site_name().endswith("site-3"):
        flare.init()
        flare.receive()
        os._exit(3)
    add_site_weight()


def small_recipe() -> FedAvgRecipe:
    """A job for ``flare-async simulate``: 3 rounds, scripts in their own processes."""
    return FedAvgRecipe(
        initial={"w": np.zeros(3)}, script="tests._fl_scripts:add_site_weight", rounds=3
    )
