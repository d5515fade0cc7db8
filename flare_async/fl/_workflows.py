"""Workflows: plain async functions over an :class:`FLServer`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np

from flare_async.codecs import as_numpy
from flare_async.errors import ConfigError
from flare_async.fl import _checkpoint as checkpoint
from flare_async.fl._model import FLModel, params_format_of
from flare_async.fl._robust import NotEnoughUpdates
from flare_async.fl._secure import SecureAggregation
from flare_async.fl._server import RoundResult, Rounds
from flare_async.fl._strategies import FedAvg


async def fedavg(
    server: Rounds,
    initial: Mapping[str, Any],
    *,
    rounds: int,
    fraction: float = 1.0,
    min_clients: int = 1,
    min_responses: int | None = None,
    deadline: float = 60.0,
    evaluate: Callable[[int, dict[str, np.ndarray]], Mapping[str, float]] | None = None,
    validation_key: str | None = None,
    checkpoints: str | os.PathLike[str] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    secure: bool | SecureAggregation = False,
    strategy: FedAvg | None = None,
) -> FLModel:
    """Federated averaging.

    Each round samples ``fraction`` of the clients (at least ``min_clients``), sends them the
    global model, folds their results (weighted by ``meta["num_samples"]``, else
    ``meta["NUM_STEPS_CURRENT_ROUND"]``, else 1; FULL weights or DIFF updates, of all the
    tensors or some: each is averaged over the sites that sent it, the others stay) as they
    arrive, and steps the global model (each tensor keeps its dtype). A round with fewer than
    ``min_responses`` results (default: all sampled) by ``deadline`` seconds fails the job with
    ``RoundFailed``.

    ``evaluate(round, params)``, if given, scores each new global model on the server side
    (a validation set the server holds); its metrics go into the history, and with
    ``validation_key`` the best round by that metric is kept.

    With ``checkpoints`` (a folder), the global model is saved after every round
    (``last.safetensors``) and whenever the validation metric improves (``best.safetensors``),
    atomically (then ``on_checkpoint(round)`` is called); started again on the same folder (the
    server restarted), the job continues after the last finished round.

    With ``secure``, every round runs under secure aggregation (``secure_round``: the server
    learns only the weighted sum; a majority of the sampled sites must stay): ``True`` for the
    default range, or ``SecureAggregation(clip=, max_weight=, scale=, bits=, metrics=,
    clear_metrics=)``. A round whose sum could overflow the ring fails the job with
    ``SecAggRangeError`` before any site is asked; a site whose values or weight are beyond
    the declared range counts as failed (it refuses to encode rather than wrap). Metrics are
    not sent in clear: the declared ones are averaged inside the masked sum.

    ``strategy`` picks the algorithm on this loop (default :class:`FedAvg`): ``FedProx``,
    ``Ditto``, ``FedOpt``, ``Scaffold``, ``Robust`` (see ``fl/_strategies.py``); its state
    (a server optimizer's moments, a control variate) is checkpointed and resumed with the
    model.

    Returns:
        the final model; ``meta["history"]`` holds each round's averaged client metrics, the
        validation metrics and who answered; ``meta["best"]`` the best round by
        ``validation_key`` (its params in ``meta["best_params"]``); ``params`` are the last.
    """
    # Never changed in place (each round makes new arrays): no copy of a large model.
    if server.params_format is None:  # the sites' scripts get their framework back
        server.params_format = params_format_of(initial)
    params = {k: np.asarray(as_numpy(v)) for k, v in initial.items()}
    del initial
    algo = strategy if strategy is not None else FedAvg()
    config = SecureAggregation.of(secure)
    if config is not None and not algo.secure_ok:
        raise ConfigError(f"{algo.name} does not run under secure aggregation")
    state: dict[str, np.ndarray] = {}
    history: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    best_params: dict[str, np.ndarray] = {}
    folder = Path(checkpoints) if checkpoints is not None else None
    first = 0
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        last = await anyio.to_thread.run_sync(checkpoint.load, folder, "last")
        if last is not None:
            params, history, first = last.params, last.history, last.round + 1
            state = last.state
            saved_best = await anyio.to_thread.run_sync(checkpoint.load, folder, "best")
            if saved_best is not None and saved_best.best is not None:
                # The best file's own mark: consistent with its params even if the job died
                # between writing it and writing last.
                best = (float(saved_best.best["score"]), int(saved_best.best["round"]))
                best_params = saved_best.params
    for rnd in range(first, rounds):
        targets = server.sample(fraction, min_clients)
        task = FLModel(
            params=algo.task_params(params, state),
            meta=algo.meta(),
            current_round=rnd,
            total_rounds=rounds,
        )
        need = None if min_responses is None else min(min_responses, len(targets))
        result: RoundResult = await server.run_round(
            task,
            targets,
            min_responses=need,
            deadline=deadline,
            secure=config,
            collect=algo.collect,
        )
        del task
        # In worker threads: a large model's step, or a long validation, never blocks the
        # event loop (in a job's own process, its heartbeat to the server runs there).
        step = partial(algo.step, clients=len(server.clients))
        try:
            params, note = await anyio.to_thread.run_sync(step, params, result, state)
        except NotEnoughUpdates as exc:  # too few usable updates: the model stays this round
            note = {"skipped": str(exc), **exc.note}
        result.updates = None  # spilled updates' mappings go
        metrics = result.mean_metrics()
        scores = await anyio.to_thread.run_sync(evaluate, rnd, params) if evaluate else {}
        validation = {str(k): float(v) for k, v in scores.items()}
        history.append(
            {
                "round": rnd,
                "metrics": metrics,
                "validation": validation,
                "responded": result.responded,
                "failed": sorted(result.failed),
                "why": dict(result.failed),  # each failed client's reason, as it said
                **note,
            }
        )
        improved = False
        if validation_key is not None and validation_key in validation:
            score = validation[validation_key]
            if best is None or score > best[0]:
                best = (score, rnd)
                best_params = params
                improved = True
        if folder is not None:
            mark = {"round": best[1], "score": best[0]} if best is not None else None
            saved = checkpoint.Checkpoint(rnd, params, history, mark, state)
            if improved:
                await checkpoint.save(
                    folder, "best", checkpoint.Checkpoint(rnd, params, history, mark)
                )
            await checkpoint.save(folder, "last", saved)
            if on_checkpoint is not None:
                on_checkpoint(rnd)
    meta: dict[str, Any] = {"history": history, "strategy": algo.describe()}
    if best is not None:
        meta["best"] = {"round": best[1], validation_key or "": best[0]}
        meta["best_params"] = best_params
    return FLModel(
        params=params,
        meta=meta,
        current_round=rounds - 1,
        total_rounds=rounds,
        metrics=history[-1]["metrics"] if history else {},
    )


__all__ = ["fedavg"]
