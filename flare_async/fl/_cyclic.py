"""Cyclic training: the model visits the sites one after another, each trains it on its own data
and hands it on; no averaging.

Each round walks the sites in ``order``. With ``direct`` (the default) the model goes from one
site to the next *directly* (``fl/_handoff.py``: over a peer link where the sites have one,
else through the cells between them, which forward its frames undecoded): the server sends
the first site the model, each site's task names the site it hands its result to, the next
site's task names the site and digest its model comes from, and the last site of the round
sends the model back to the server, which then evaluates and checkpoints it. The server never
holds the model in between: it hears only where it went (the result's metrics, and a digest).

A site that fails its turn (crashed, unreachable, refused the model) is skipped: the model
it held, or was about to receive, is lost, and the round goes on from the last model the
server held (the round's start), which the history records (``lost``). A site whose handover
fails sends its model to the server instead, and the next site gets it from there.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np

from flare_async.codecs import as_numpy
from flare_async.fl import _checkpoint as checkpoint
from flare_async.fl._aggregate import to_dtype
from flare_async.fl._handoff import PASS_TO, TAKE_FROM, TAKE_SHA
from flare_async.fl._model import FLModel, ParamsType, params_format_of
from flare_async.fl._results import RoundFailed
from flare_async.fl._server import Rounds

Params = dict[str, np.ndarray]


async def cyclic(
    server: Rounds,
    initial: Mapping[str, Any],
    *,
    rounds: int,
    order: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    direct: bool = True,
    deadline: float = 60.0,
    evaluate: Callable[[int, Params], Mapping[str, float]] | None = None,
    checkpoints: str | os.PathLike[str] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> FLModel:
    """Cyclic weight transfer over ``order`` (default: the job's sites, sorted), ``rounds``
    times; with ``shuffle`` a new order each round (``seed``). ``direct=False`` sends every
    site's model back through the server (as FLARE's cyclic controller does).

    ``evaluate(round, params)`` scores the model at each round's end; with ``checkpoints``
    the model is saved then (``last.safetensors``) and a restarted job continues after the
    last finished round.

    Returns:
        the last model; ``meta["history"]``: per round, the order walked, each site's metrics,
        the sites that failed their turn (and why), whose progress was lost, validation.

    Raises:
        RoundFailed: a whole round in which no site trained the model.
    """
    if server.params_format is None:
        server.params_format = params_format_of(initial)
    params: Params = {k: np.asarray(as_numpy(v)) for k, v in initial.items()}
    del initial
    walk = list(order) if order is not None else sorted(server.clients)
    rng = random.Random(seed)
    history: list[dict[str, Any]] = []
    folder = Path(checkpoints) if checkpoints is not None else None
    first = 0
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        last = await anyio.to_thread.run_sync(checkpoint.load, folder, "last")
        if last is not None:
            params, history, first = last.params, last.history, last.round + 1
    for rnd in range(first, rounds):
        order = list(walk)
        if shuffle:  # each round's own order: a resumed job walks as the first one would
            rng.seed(f"{seed}:{rnd}")
            rng.shuffle(order)
        params, note = await _round(server, params, order, rnd, rounds, direct, deadline)
        scores = await anyio.to_thread.run_sync(evaluate, rnd, params) if evaluate else {}
        note["validation"] = {str(k): float(v) for k, v in scores.items()}
        history.append(note)
        if folder is not None:
            await checkpoint.save(folder, "last", checkpoint.Checkpoint(rnd, params, history))
            if on_checkpoint is not None:
                on_checkpoint(rnd)
    trained: list[dict[str, float]] = list(history[-1]["metrics"].values()) if history else []
    last_metrics = trained[-1] if trained else {}
    return FLModel(
        params=params,
        meta={"history": history, "strategy": {"name": "cyclic", "direct": direct}},
        current_round=rounds - 1,
        total_rounds=rounds,
        metrics=dict(last_metrics),
    )


async def _round(
    server: Rounds,
    params: Params,
    walk: list[str],
    rnd: int,
    rounds: int,
    direct: bool,
    deadline: float,
) -> tuple[Params, dict[str, Any]]:
    """One walk over the sites: the model the server holds at its end, and what happened."""
    holder, sha = "", ""  # the site that holds the model now (handed over), and its digest
    since: list[str] = []  # the sites whose training the server has not seen the result of
    metrics: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    lost: list[str] = []
    for k, site in enumerate(walk):
        headers = {TAKE_FROM: holder, TAKE_SHA: sha} if holder else {}
        if direct and k + 1 < len(walk):
            headers[PASS_TO] = walk[k + 1]
        task = FLModel(
            params={} if holder else params,
            current_round=rnd,
            total_rounds=rounds,
            meta={"cyclic_position": k},
        )
        try:
            result = await server.run_round(
                task, [site], deadline=deadline, headers=headers, collect="each"
            )
        except RoundFailed as exc:
            failed[site] = exc.failed.get(site, str(exc))
            lost.extend(since)  # what they trained never came back: from the server's again
            holder, sha, since = "", "", []
            continue
        ((_, update),) = list(result.updates or ())
        metrics[site] = dict(update.metrics)
        if "handed_to" in update.meta:
            holder, sha = site, str(update.meta.get("handoff_sha", ""))
            since.append(site)
            continue
        if update.params_type is ParamsType.DIFF and holder:
            failed[site] = "a DIFF result against a model the server never held"
            lost.extend([*since, site])
            holder, sha, since = "", "", []
            continue
        params = _applied(params, update)
        holder, sha, since = "", "", []
        if "handoff_failed" in update.meta:
            failed.setdefault(site, f"handover failed: {update.meta['handoff_failed']}")
    lost.extend(since)  # handed on to a site that then failed
    if not metrics:
        raise RoundFailed(f"round {rnd}: no site trained the model ({failed})", failed)
    return params, {
        "round": rnd,
        "order": walk,
        "metrics": metrics,
        "responded": [s for s in walk if s in metrics],
        "failed": sorted(failed),
        "why": failed,
        "lost": lost,
    }


def _applied(params: Params, update: FLModel) -> Params:
    """A site's result as the model: its FULL tensors, or the model plus its DIFF."""
    out = dict(params)
    for name, value in update.params.items():
        a = np.asarray(value)
        g = params.get(name)
        if update.params_type is ParamsType.DIFF and g is not None:
            out[name] = to_dtype(g + a, g.dtype)
        else:
            out[name] = a if g is None else to_dtype(a, g.dtype)
    return out


__all__ = ["cyclic"]
