"""``FLModel``: what a workflow and a training script exchange, and how it travels.

On the wire an ``FLModel`` is one payload in the tensor layout of :mod:`flare_async.codecs`
(any of its codecs: ``tensors``, or a quantized one chosen per job): the parameters are the
tensors, and everything else (params type, metrics, meta, rounds) is JSON in the layout's
metadata under ``flare.model``. So a model on the wire is also a ``.safetensors`` file.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flare_async.codecs import CodecRegistry, as_numpy, decode
from flare_async.codecs._quant import QUANT_KEY, dequantize
from flare_async.codecs._tensors import Buffer, encode
from flare_async.errors import DecodeError

MODEL_KEY = "flare.model"


class ParamsType(enum.Enum):
    """What ``FLModel.params`` holds: whole weights, or the change since the model received."""

    FULL = "FULL"
    DIFF = "DIFF"


@dataclass
class FLModel:
    """A model, or an update to one, with what goes with it.

    Attributes:
        params: tensors by name (numpy arrays; torch tensors are accepted when sending).
        params_type: FULL weights or a DIFF against the model the client received.
        metrics: numbers to report (``{"accuracy": 0.93}``).
        meta: anything JSON-able; ``meta["num_samples"]`` weights the client in FedAvg.
        current_round / total_rounds: where the job stands.
    """

    params: dict[str, Any] = field(default_factory=dict)
    params_type: ParamsType = ParamsType.FULL
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    current_round: int | None = None
    total_rounds: int | None = None


def model_parts(model: FLModel, codecs: CodecRegistry, codec: str = "tensors") -> list[Buffer]:
    """The payload parts of ``model`` in ``codec`` (parameters not copied where avoidable).

    Raises:
        CodecError: a parameter that cannot travel; DecodeError: no such codec.
    """
    info = {
        "params_type": model.params_type.value,
        "metrics": model.metrics,
        "meta": model.meta,
        "current_round": model.current_round,
        "total_rounds": model.total_rounds,
    }
    parts = codecs.get(codec).encode(model.params)
    # Re-encode the header with our metadata beside the codec's own (the data parts stay).
    tensors_meta = _header_meta(parts[0])
    tensors_meta[MODEL_KEY] = json.dumps(info)
    header = _with_meta(parts[0], tensors_meta)
    return [header, *parts[1:]]


def _header_meta(header: Buffer) -> dict[str, str]:
    view = memoryview(header).cast("B")
    hlen = int.from_bytes(view[:8], "little")
    doc = json.loads(bytes(view[8 : 8 + hlen]))
    meta: dict[str, str] = doc.get("__metadata__", {})
    return dict(meta)


def _with_meta(header: Buffer, meta: dict[str, str]) -> bytes:
    view = memoryview(header).cast("B")
    hlen = int.from_bytes(view[:8], "little")
    doc = json.loads(bytes(view[8 : 8 + hlen]))
    doc["__metadata__"] = meta
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text


def model_from_parts(parts: Sequence[Buffer] | Buffer) -> FLModel:
    """The ``FLModel`` a payload carries (quantized parameters are restored).

    Raises:
        DecodeError: not a model payload.
    """
    tensors, meta = decode(parts)
    if QUANT_KEY in meta:
        tensors = dequantize(tensors, meta)
    try:
        info = json.loads(meta[MODEL_KEY])
        return FLModel(
            params=dict(tensors),
            params_type=ParamsType(info["params_type"]),
            metrics={str(k): float(v) for k, v in info["metrics"].items()},
            meta=dict(info["meta"]),
            current_round=info["current_round"],
            total_rounds=info["total_rounds"],
        )
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise DecodeError(f"not a model payload: {exc!r}") from None


def copy_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Writable numpy copies (decoded payloads are read-only views)."""
    return {k: np.array(as_numpy(v), copy=True) for k, v in params.items()}


__all__ = ["FLModel", "ParamsType", "copy_params", "encode", "model_from_parts", "model_parts"]
