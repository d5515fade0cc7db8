"""Recipes: a job as data (workflow settings + client script + config), runnable in the
simulator (``recipe.simulate(...)``, ``flare-async simulate MODULE:RECIPE``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flare_async.fl._model import FLModel
from flare_async.fl._server import RoundResult
from flare_async.fl._simulator import simulate
from flare_async.fl._workflows import fedavg


@dataclass
class FedAvgRecipe:
    """FedAvg as a job.

    Attributes:
        initial: the initial model's parameters (or a function returning them).
        script: the client's training script: a function (run in a worker thread) or
            ``"MODULE:FUNCTION"`` (run in its own process per site).
        rounds / fraction / min_clients / min_responses / deadline: see ``fedavg``.
        config: what each site's ``get_config()`` returns (with ``site_index``).
        codec: how models travel both ways (``tensors``, ``fp16``, ``bf16``, ``q8``, ``nf4``,
            ``fp4``).
        evaluate / validation_key: server-side validation and best-round selection.
        checkpoints: a folder for ``last`` / ``best`` checkpoints (and resuming).
    """

    initial: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
    script: Callable[[], object] | str
    rounds: int = 5
    fraction: float = 1.0
    min_clients: int = 1
    min_responses: int | None = None
    deadline: float = 60.0
    config: dict[str, Any] = field(default_factory=dict)
    codec: str = "tensors"
    evaluate: Callable[[int, dict[str, np.ndarray]], Mapping[str, float]] | None = None
    validation_key: str | None = None
    checkpoints: str | None = None

    async def simulate(
        self,
        clients: int = 2,
        *,
        relays: int = 0,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> FLModel:
        """Run the job in the simulator (one process; scripts in threads or processes)."""
        initial = self.initial() if callable(self.initial) else self.initial
        result: FLModel = await simulate(
            lambda server: fedavg(
                server,
                initial,
                rounds=self.rounds,
                fraction=self.fraction,
                min_clients=self.min_clients,
                min_responses=self.min_responses,
                deadline=self.deadline,
                evaluate=self.evaluate,
                validation_key=self.validation_key,
                checkpoints=self.checkpoints,
            ),
            self.script,
            clients=clients,
            relays=relays,
            config=self.config,
            codec=self.codec,
            on_round=on_round,
        )
        return result
