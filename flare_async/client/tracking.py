"""Experiment tracking from a training script, FLARE-shaped: the writers of
``nvflare.client.tracking`` (TensorBoard-, MLflow- and Weights & Biases-shaped), whose values
travel to the server as they are logged and are kept there per job, site, key and step
(``flare-async job metrics JOB``)::

    from flare_async.client.tracking import SummaryWriter

    writer = SummaryWriter()
    writer.add_scalar("loss", 0.25, global_step=10)
    writer.add_scalars("acc", {"train": 0.9, "val": 0.8}, global_step=10)  # acc/train, acc/val

Nothing is written on the site: writers of TensorBoard or MLflow files at the server are the
server's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flare_async.fl._client import current_runtime
from flare_async.fl._tracking import AnalyticsDataType, records


def _track(key: str, value: Any, kind: AnalyticsDataType, step: int | None = None) -> None:
    current_runtime().track(records(key, value, kind, step))


class SummaryWriter:
    """TensorBoard's ``SummaryWriter`` calls, sent to the server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs  # a log dir and the like: the server decides where values go

    def add_scalar(
        self, tag: str, scalar: float, global_step: int | None = None, **kwargs: Any
    ) -> None:
        _track(tag, scalar, AnalyticsDataType.SCALAR, global_step)

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: Mapping[str, float],
        global_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        _track(main_tag, dict(tag_scalar_dict), AnalyticsDataType.SCALARS, global_step)

    def add_text(
        self, tag: str, text_string: str, global_step: int | None = None, **kwargs: Any
    ) -> None:
        _track(tag, text_string, AnalyticsDataType.TEXT, global_step)

    def flush(self) -> None:
        """Values are sent as they are logged (and before each result at the latest)."""

    def close(self) -> None:
        """Nothing to close."""


class MLflowWriter:
    """MLflow's logging calls, sent to the server."""

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        _track(key, value, AnalyticsDataType.METRIC, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _track("", dict(metrics), AnalyticsDataType.METRICS, step)

    def log_param(self, key: str, value: Any) -> None:
        _track(key, value, AnalyticsDataType.PARAMETER)

    def log_params(self, values: Mapping[str, Any]) -> None:
        _track("", dict(values), AnalyticsDataType.PARAMETERS)

    def log_text(self, text: str, artifact_file_path: str) -> None:
        _track(artifact_file_path, text, AnalyticsDataType.TEXT)

    def set_tag(self, key: str, tag: Any) -> None:
        _track(key, tag, AnalyticsDataType.TAG)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _track("", dict(tags), AnalyticsDataType.TAGS)


class WandBWriter:
    """Weights & Biases' ``log`` call, sent to the server."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _track("", dict(metrics), AnalyticsDataType.METRICS, step)


__all__ = ["MLflowWriter", "SummaryWriter", "WandBWriter"]
