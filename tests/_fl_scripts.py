"""Training scripts the FL tests run as subprocesses (``MODULE:FUNCTION``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import flare_async.client as flare
from flare_async.fl import (
    CyclicRecipe,
    FedAvgRecipe,
    FedOpt,
    FLModel,
    Robust,
    RobustAggregation,
    SwarmRecipe,
)


def add_site_weight() -> None:
    """Site i adds (i + 1) to every parameter and reports i + 1 samples (as in test_fl)."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        print(f"site {i} trained round {model.current_round}", flush=True)
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


def secure_dropout_recipe() -> FedAvgRecipe:
    """Two secure rounds of ``dies_at_site_3`` on a 16-value model (a majority of 3 unmasks)."""
    return FedAvgRecipe(
        initial={"w": np.zeros(16)},
        script="tests._fl_scripts:dies_at_site_3",
        rounds=2,
        secure=True,
        min_responses=2,
        deadline=30,
    )


def gated() -> None:
    """``add_site_weight``, but from round 1 on a site answers only once the file named by
    ``FLARE_TEST_GATE`` exists (the test opens the gate when it is ready)."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    gate = Path(os.environ["FLARE_TEST_GATE"])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        while (model.current_round or 0) >= 1 and not gate.exists():
            time.sleep(0.02)
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": i + 1}))


def gated_recipe() -> FedAvgRecipe:
    return FedAvgRecipe(
        initial={"w": np.zeros(3)}, script="tests._fl_scripts:gated", rounds=3, deadline=120
    )


def hangs() -> None:
    """Takes its task and never answers (a job to abort)."""
    flare.init()
    flare.receive()
    while True:
        time.sleep(1)


def hanging_recipe() -> FedAvgRecipe:
    return FedAvgRecipe(
        initial={"w": np.zeros(3)}, script="tests._fl_scripts:hangs", rounds=1, deadline=600
    )


def big_update() -> None:
    """Sites send 12 MB results (folded through spill files); site 3's process dies once half
    of its upload has reached the server (a peer that disappears mid-stream)."""
    from flare_async.fl._client import current_runtime  # noqa: PLC0415 - test-only hook

    flare.init()
    i = int(flare.get_config()["site_index"])
    if flare.get_site_name().endswith("site-3"):
        cell = current_runtime().cell  # type: ignore[attr-defined]
        stream = cell.stream

        async def dying_stream(*args: object, **kwargs: object) -> object:
            def progress(p: object) -> None:
                if p.done >= 6 << 20:  # type: ignore[attr-defined]
                    os._exit(1)

            return await stream(*args, progress=progress, **kwargs)

        cell.stream = dying_stream
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": i + 1}))


async def add_site_weight_async() -> None:
    """``add_site_weight`` as an async script, with the awaitable Client API."""
    import anyio  # noqa: PLC0415

    flare.init()
    i = int(flare.get_config()["site_index"])
    while (model := await flare.receive_async()) is not None:
        await anyio.lowlevel.checkpoint()  # the script's own loop runs
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        await flare.send_async(FLModel(params=params, meta={"num_samples": i + 1}))


def broken_at_import() -> None:
    """Site 2's script fails before its first task (a module it needs is missing)."""
    if flare.get_site_name().endswith("site-2"):
        import missing_module_for_the_test  # type: ignore[import-not-found] # noqa: F401, PLC0415
    add_site_weight()


def slow_site_weight() -> None:
    """``add_site_weight``, but each answer takes 1.5 s (time to cut a link mid-round)."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        time.sleep(1.5)
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": i + 1}))


def slow_recipe() -> FedAvgRecipe:
    """Four slow rounds that go on with one answer after a 20 s deadline (a site cut off)."""
    return FedAvgRecipe(
        initial={"w": np.zeros(3)},
        script="tests._fl_scripts:slow_site_weight",
        rounds=4,
        min_responses=1,
        deadline=20,
    )


def garbles_its_metrics() -> None:
    """A worker script that writes malformed tracked values to its site, then good ones."""
    from flare_async.fl._client import current_runtime  # noqa: PLC0415

    runtime: Any = current_runtime()
    flare.init()
    while flare.is_running():
        model = flare.receive()
        runtime._write("metrics", [b'{"not": "a list"}'])
        runtime._write("metrics", [b"[1, 2]"])
        runtime._write("metrics", [b'[{"key": "", "value": "x"}]'])  # the server refuses it
        flare.log("good", 1.0, step=model.current_round)
        flare.send(FLModel(params=dict(model.params)))


def gated_fedopt_recipe() -> FedAvgRecipe:
    """``gated_recipe`` under FedOpt (Adam): its moments must survive a server restart."""
    return FedAvgRecipe(
        initial={"w": np.zeros(3)},
        script="tests._fl_scripts:gated",
        rounds=3,
        deadline=120,
        strategy=FedOpt(optimizer="adam", lr=0.5),
    )


def evaluating() -> None:
    """``add_site_weight`` for training; for ``validate`` site i scores a model ``sum(w) + i``;
    for ``submit_model`` it sends its own model (the last it trained: the received one + i + 1)."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    mine: dict[str, Any] | None = None
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if flare.is_evaluate():
            score = float(sum(np.asarray(v).sum() for v in model.params.values())) + i
            flare.send(FLModel(metrics={"score": score}))
            continue
        if flare.is_submit_model():
            flare.send(FLModel(params=mine if mine is not None else dict(model.params)))
            continue
        mine = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=mine, meta={"num_samples": i + 1}))


def robust_eval_recipe() -> FedAvgRecipe:
    """Two rounds under the coordinate-wise median, then cross-site evaluation."""
    return FedAvgRecipe(
        initial={"w": np.zeros(3)},
        script="tests._fl_scripts:evaluating",
        rounds=2,
        strategy=Robust(RobustAggregation("median")),
        cross_site_eval=True,
    )


def visits() -> None:
    """Adds 1 to the counter of its own index (the model's path shows in it)."""

    def respond(i: int, model: FLModel) -> FLModel:
        counts = np.array(model.params["visits"], copy=True)
        counts[i] += 1
        return FLModel(params={"visits": counts})

    answer_tasks(respond)


def cyclic_recipe() -> CyclicRecipe:
    """Two cyclic rounds over two sites: the model handed from one to the other."""
    return CyclicRecipe(
        initial={"visits": np.zeros(2)}, script="tests._fl_scripts:visits", rounds=2
    )


def swarm_recipe() -> SwarmRecipe:
    """Three swarm rounds of ``add_site_weight`` over two sites (5/3 a round: w = 5)."""
    return SwarmRecipe(
        initial={"w": np.zeros(3)}, script="tests._fl_scripts:add_site_weight", rounds=3
    )


def gated_swarm_recipe() -> SwarmRecipe:
    """``gated`` as a swarm of 4 rounds: from round 1 on the sites wait for the test's gate."""
    return SwarmRecipe(
        initial={"w": np.zeros(3)}, script="tests._fl_scripts:gated", rounds=4, deadline=60
    )


def answer_tasks(respond: Callable[[int, FLModel], FLModel]) -> None:
    """A site's script: each task answered with ``respond(site_index, task)`` (which may raise:
    the script fails, as a training loop that breaks does)."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        flare.send(respond(i, task))
