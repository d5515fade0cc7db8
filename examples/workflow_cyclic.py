"""A second workflow, written only with the public API: cyclic weight transfer.

The model visits the sites one after another; each trains it on its own data and hands it on.
No averaging: the result of one site is the model the next one starts from. (Used where sites
have little data each, or to compare against FedAvg.)

    python examples/workflow_cyclic.py
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np

import flare_async.client as flare
from flare_async.fl import FLModel, FLServer, fedavg_step, simulate


async def cyclic(
    server: FLServer, initial: dict[str, Any], *, rounds: int, deadline: float = 60.0
) -> FLModel:
    """Each round, every client in turn trains the current model; returns the last model."""
    model = FLModel(params=dict(initial), total_rounds=rounds)
    order = sorted(server.clients)
    for rnd in range(rounds):
        for site in order:
            model.current_round = rnd
            result = await server.run_round(model, [site], deadline=deadline)
            # One result: its weighted mean is the site's own model (FULL) or the model plus
            # its update (DIFF); fedavg_step handles both.
            model = FLModel(
                params=fedavg_step(model.params, result.sum),
                current_round=rnd,
                total_rounds=rounds,
                metrics=result.mean_metrics(),
            )
    return model


def count_visits() -> None:
    """A site's script: adds 1 to the counter of its own index, so the path is visible."""
    flare.init()
    index = flare.get_config()["site_index"]
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        visits = np.array(model.params["visits"], copy=True)
        visits[index] += 1
        flare.send(FLModel(params={"visits": visits}, metrics={"site": float(index)}))


async def main() -> FLModel:
    out = await simulate(
        lambda server: cyclic(server, {"visits": np.zeros(3)}, rounds=2),
        count_visits,
        clients=3,
    )
    print("visits per site after 2 cycles:", out.params["visits"])
    return out


if __name__ == "__main__":
    anyio.run(main)
