"""The Client API for PyTorch Lightning, FLARE-shaped: ``patch(trainer)`` and the Lightning
loop of a FLARE script runs with its import line changed (``nvflare.client.lightning`` ->
``flare_async.client.lightning``)::

    import flare_async.client.lightning as flare

    flare.patch(trainer)                      # a callback that loads, trains and sends
    while flare.is_running():
        input_model = flare.receive()
        trainer.validate(model, datamodule=dm)  # the global model's metrics (model selection)
        trainer.fit(model, datamodule=dm)       # trains from the global model, sends the result

The callback loads each received model into the LightningModule when the first ``validate``
or ``fit`` of the round starts; the metrics of a ``validate`` go with the result; at the end of
``fit`` the module's ``state_dict`` is sent (FULL, weighted by the optimizer steps it took,
FLARE's ``NUM_STEPS_CURRENT_ROUND``), and the trainer is given the same number of epochs
again for the next round. Needs the ``lightning`` package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from flare_async.client import (
    AnalyticsDataType,
    FLModel,
    ParamsType,
    clear,
    get_config,
    get_job_id,
    get_site_name,
    get_task_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    send,
    system_info,
)
from flare_async.client import receive as _receive


@dataclass
class _Round:
    model: FLModel | None = None
    loaded: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    start_step: int = 0


_round = _Round()


def receive(timeout: float | None = None) -> FLModel | None:
    """The next task's model (see :func:`flare_async.client.receive`); the patched trainer
    loads it into the module when the round's first ``validate`` or ``fit`` starts."""
    model = _receive(timeout)
    if model is not None:
        _round.model, _round.loaded, _round.metrics = model, False, {}
    return model


class FLCallback(Callback):
    """Loads each received model, keeps the global model's validation metrics, sends the
    trained model at the end of ``fit``."""

    def __init__(self, *, load_state_dict_strict: bool = True) -> None:
        self.strict = load_state_dict_strict
        self.epochs_per_round: int | None = None

    def _load(self, pl_module: LightningModule) -> None:
        if _round.model is not None and not _round.loaded:
            pl_module.load_state_dict(_round.model.params, strict=self.strict)
            _round.loaded = True

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._load(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "validate":
            return
        _round.metrics = {str(k): float(v) for k, v in trainer.callback_metrics.items()}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._load(pl_module)
        if self.epochs_per_round is None:
            self.epochs_per_round = int(trainer.fit_loop.max_epochs or 1)
        _round.start_step = int(trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _round.model is None:
            return  # a fit outside the federation
        steps = int(trainer.global_step) - _round.start_step
        send(
            FLModel(
                params={k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                params_type=ParamsType.FULL,
                metrics=dict(_round.metrics),
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )
        _round.model = None
        # The next round's fit trains as many epochs again (a finished fit loop would skip).
        trainer.fit_loop.max_epochs = trainer.current_epoch + (self.epochs_per_round or 1)


def patch(trainer: Trainer, *, load_state_dict_strict: bool = True, **kwargs: Any) -> None:
    """Add the federation's callback to ``trainer`` (and check that the script runs under a
    site). FLARE's other keyword arguments are accepted and not needed."""
    del kwargs
    init()
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]  # set at runtime
    if not any(isinstance(cb, FLCallback) for cb in callbacks):
        callbacks.append(FLCallback(load_state_dict_strict=load_state_dict_strict))


__all__ = [
    "AnalyticsDataType",
    "FLCallback",
    "FLModel",
    "ParamsType",
    "clear",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "system_info",
]
