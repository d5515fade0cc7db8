"""Checks a received model must pass before it is used, whoever sent it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flare_async.fl._model import FLModel


def misfit(params: Mapping[str, Any], model: FLModel) -> str:
    """Why ``model`` cannot stand for (or change) the model ``params`` ("" if it can): it must
    carry every tensor of ``params``, no other, each of its shape. The model in hand is the
    template: no sender (the first to answer, say) decides what the others' must look like."""
    if set(model.params) != set(params):
        extra = sorted(set(model.params) - set(params))[:3]
        missing = sorted(set(params) - set(model.params))[:3]
        return f"does not carry the model's tensors (missing {missing}, extra {extra})"
    for name, value in model.params.items():
        if np.shape(value) != np.shape(params[name]):
            return f"tensor {name!r:.80} has shape {np.shape(value)}, not {np.shape(params[name])}"
    return ""


__all__ = ["misfit"]
