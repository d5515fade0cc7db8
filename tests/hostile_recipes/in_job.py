"""Recipes whose own code misbehaves where it runs: in the job's own process (issue 18,
defect 1). Each writes the id of the process it runs in to ``$FLARE_TEST_MARK`` (when set), at
import and when its ``evaluate`` is called."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

from flare_async.fl import FedAvgRecipe

SCRIPT = "tests._fl_scripts:add_site_weight"


def _mark(what: str) -> None:
    if os.environ.get("FLARE_TEST_MARK"):
        with Path(os.environ["FLARE_TEST_MARK"]).open("a") as f:
            f.write(f"{what} {os.getpid()}\n")


_mark("import")


def _recipe(evaluate: Any = None, rounds: int = 2) -> FedAvgRecipe:
    return FedAvgRecipe(initial={"w": np.zeros(3)}, script=SCRIPT, rounds=rounds, evaluate=evaluate)


def _aborts(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
    os.abort()


def _stops(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
    _mark("evaluate")
    os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, its event loop too
    return {}


def _raises(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
    raise ValueError("evaluate broke")


def _waits(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
    _mark("evaluate")
    threading.Event().wait()
    return {}


def _scores(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
    _mark("evaluate")
    return {"mean": float(params["w"].mean())}


def aborts() -> FedAvgRecipe:
    return _recipe(_aborts)


def stops() -> FedAvgRecipe:
    return _recipe(_stops)


def raises() -> FedAvgRecipe:
    return _recipe(_raises)


def waits() -> FedAvgRecipe:
    return _recipe(_waits)


def scores() -> FedAvgRecipe:
    return _recipe(_scores)
