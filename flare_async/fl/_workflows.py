"""Workflows: plain async functions over an :class:`FLServer`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flare_async.fl._aggregate import fedavg_step
from flare_async.fl._model import FLModel, copy_params
from flare_async.fl._server import FLServer, RoundResult


async def fedavg(
    server: FLServer,
    initial: Mapping[str, Any],
    *,
    rounds: int,
    fraction: float = 1.0,
    min_clients: int = 1,
    min_responses: int | None = None,
    deadline: float = 60.0,
    validation_key: str | None = None,
) -> FLModel:
    """Federated averaging.

    Each round samples ``fraction`` of the clients (at least ``min_clients``), sends them the
    global model, folds their results (weighted by ``meta["num_samples"]``; FULL weights or
    DIFF updates) as they arrive, and steps the global model. A round with fewer than
    ``min_responses`` results (default: all sampled) by ``deadline`` seconds fails the job
    with ``RoundFailed``.

    Returns:
        the final model; ``meta["history"]`` holds each round's averaged metrics and who
        answered; with ``validation_key``, ``meta["best"]`` the best round by that metric and
        ``params`` stay the last round's.
    """
    params = copy_params(initial)
    history: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    for rnd in range(rounds):
        targets = server.sample(fraction, min_clients)
        model = FLModel(params=params, current_round=rnd, total_rounds=rounds)
        result: RoundResult = await server.run_round(
            model,
            targets,
            min_responses=min(min_responses, len(targets)) if min_responses else None,
            deadline=deadline,
        )
        params = fedavg_step(params, result.sum)
        metrics = result.mean_metrics()
        history.append(
            {
                "round": rnd,
                "metrics": metrics,
                "responded": result.responded,
                "failed": sorted(result.failed),
            }
        )
        if validation_key is not None and validation_key in metrics:
            score = metrics[validation_key]
            if best is None or score > best[0]:
                best = (score, rnd)
    meta: dict[str, Any] = {"history": history}
    if best is not None:
        meta["best"] = {"round": best[1], validation_key or "": best[0]}
    return FLModel(
        params=params,
        meta=meta,
        current_round=rounds - 1,
        total_rounds=rounds,
        metrics=history[-1]["metrics"] if history else {},
    )


__all__ = ["fedavg"]
