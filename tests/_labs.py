"""A user's own package, written for a test into a folder of its own (on no process's path
but the packing one's): what jobs that ship their code (``fl/_artifact.py``) carry."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TRAIN = """
import numpy as np
import flare_async.client as flare
from flare_async.fl import FedAvgRecipe, FLModel
from {package}.steps import STEP


def train() -> None:
    # Every parameter plus STEP, one sample.
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        params = {{k: np.asarray(v) + STEP for k, v in model.params.items()}}
        flare.send(FLModel(params=params, meta={{"num_samples": 1}}))


def recipe() -> FedAvgRecipe:
    return FedAvgRecipe(initial={{"w": np.zeros({size})}}, script="{package}:train", rounds=2)
"""


def train_package(
    package: str, *, step: float = 0.5, size: int = 4, more: str = ""
) -> dict[str, str]:
    """The files of ``package``: ``train`` adds ``step`` to every parameter, ``recipe`` runs two
    rounds of it on ``size`` zeros; ``more`` is appended to its ``__init__.py``."""
    return {
        f"{package}/__init__.py": TRAIN.format(package=package, size=size) + more,
        f"{package}/steps.py": f"STEP = {step}\n",
    }


@contextmanager
def own_package(
    folder: Path, files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """``folder`` holding ``files`` (relative path -> text); afterwards this process's path,
    ``PYTHONPATH`` (packing puts the folder first on both) and modules are as before."""
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    tops = {name.split("/", 1)[0].removesuffix(".py") for name in files}
    saved = list(sys.path)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    try:
        yield folder
    finally:
        sys.path[:] = saved
        for name in [m for m in sys.modules if m.split(".")[0] in tops]:
            del sys.modules[name]
