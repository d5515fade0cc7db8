"""``FLModel``: what a workflow and a training script exchange, and how it travels.

On the wire an ``FLModel`` is one payload in the tensor layout of :mod:`flare_async.codecs`
(any of its codecs: ``tensors``, or a quantized one chosen per job): the parameters are the
tensors, and everything else (params type, metrics, meta, rounds) is JSON in the layout's
metadata under ``flare.model``. So a model on the wire is also a ``.safetensors`` file.
"""

from __future__ import annotations

import dataclasses
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
from flare_async.fl._keys import SCAFFOLD_CONTROL, SCAFFOLD_CTRL_DIFF, SCAFFOLD_CTRL_GLOBAL

MODEL_KEY = "flare.model"


class ParamsType(enum.StrEnum):
    """What ``FLModel.params`` holds: whole weights, or the change since the model received.

    A string enum, as FLARE's: ``FLModel(params_type="FULL")`` is ``ParamsType.FULL``."""

    FULL = "FULL"
    DIFF = "DIFF"


@dataclass
class FLModel:
    """A model, or an update to one, with what goes with it.

    Attributes:
        params: tensors by name (numpy arrays; torch tensors are accepted when sending). A
            result may carry some of the model's tensors only: the others stay as they were.
        params_type: FULL weights or a DIFF against the model the client received.
        metrics: numbers to report (``{"accuracy": 0.93}``).
        meta: anything JSON-able. The result's weight in FedAvg, FedBuff and relays' sums:
            ``meta["num_samples"]`` if present, else ``meta["NUM_STEPS_CURRENT_ROUND"]``
            (NVIDIA FLARE's ``FLMetaKey.NUM_STEPS_CURRENT_ROUND``), else 1; a weight that is
            not a finite non-negative number fails the site.
        current_round / total_rounds: where the job stands.
    """

    params: dict[str, Any] = field(default_factory=dict)
    params_type: ParamsType = ParamsType.FULL
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    current_round: int | None = None
    total_rounds: int | None = None
    start_round: int = 0
    optimizer_params: dict[str, Any] | None = None
    """Kept on the site (FLARE's field, for scripts that set it): not sent."""

    def __post_init__(self) -> None:
        # FLARE scripts pass None for empty fields and the params type as a string.
        given: Any = self  # what was passed, whatever the annotations say
        if given.params is None:
            self.params = {}
        if given.metrics is None:
            self.metrics = {}
        if given.meta is None:
            self.meta = {}
        kind = given.params_type
        if kind is None:
            self.params_type = ParamsType.FULL
        elif not isinstance(kind, ParamsType):
            try:
                self.params_type = ParamsType(str(kind).upper())
            except ValueError:
                raise ValueError(f"params_type must be FULL or DIFF, not {kind!r}") from None

    def summary(self) -> dict[str, Any]:
        """What the model holds, without its tensors (for printing)."""
        return {
            "params_type": self.params_type.value,
            "params": len(self.params),
            "metrics": self.metrics,
            "meta": self.meta,
            "current_round": self.current_round,
            "total_rounds": self.total_rounds,
        }


def model_parts(
    model: FLModel,
    codecs: CodecRegistry,
    codec: str = "tensors",
    params_format: str | None = None,
) -> list[Buffer]:
    """The payload parts of ``model`` in ``codec`` (parameters not copied where avoidable).

    ``params_format`` (``numpy`` or ``torch``) says in which framework the receiving script
    gets the parameters; by default the framework of ``model.params`` themselves.

    Raises:
        CodecError: a parameter that cannot travel; DecodeError: no such codec.
    """
    info = {
        "params_type": model.params_type.value,
        "metrics": model.metrics,
        "meta": model.meta,
        "current_round": model.current_round,
        "total_rounds": model.total_rounds,
        "start_round": model.start_round,
        "format": params_format or params_format_of(model.params),
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
            start_round=int(info.get("start_round") or 0),
        )
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise DecodeError(f"not a model payload: {exc!r}") from None


NUMPY = "numpy"
TORCH = "torch"
FORMATS = (NUMPY, TORCH)


def params_format_of(params: Mapping[str, Any]) -> str:
    """``torch`` if any parameter is a torch tensor, else ``numpy``."""
    for value in params.values():
        if type(value).__module__.startswith("torch"):
            return TORCH
    return NUMPY


def wire_format(parts: Sequence[Buffer] | Buffer) -> str:
    """The framework a model payload asks its script to get its parameters in (``numpy`` for
    payloads that do not say)."""
    try:
        view = memoryview(parts if isinstance(parts, bytes | bytearray | memoryview) else parts[0])
        info = json.loads(_header_meta(view).get(MODEL_KEY, "{}"))
        fmt = str(info.get("format") or NUMPY)
    except (ValueError, TypeError, IndexError, AttributeError):
        return NUMPY
    return fmt if fmt in FORMATS else NUMPY


def script_format(config: Mapping[str, Any], server: str, sent: str | None) -> str:
    """The framework a script gets its parameters in: its config's ``params_format``, else
    torch if the server's model or the script's last result was torch, else numpy."""
    forced = config.get("params_format")
    if forced is not None:
        return str(forced)
    return TORCH if TORCH in (server, sent) else NUMPY


def to_framework(params: dict[str, Any], fmt: str, *, share: bool = True) -> dict[str, Any]:
    """``params`` as ``fmt`` wants them: numpy arrays, or torch tensors (sharing the received
    bytes when ``share`` and the buffer is writable, else copied; bfloat16 kept)."""
    if fmt != TORCH:
        return {k: as_numpy(v) for k, v in params.items()}
    import torch  # noqa: PLC0415 - torch only for scripts that use it

    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            out[name] = value
            continue
        a = np.asarray(value)
        if not a.flags.writeable:
            a = _writable(a) if share else a.copy()
        if a.dtype.name == "bfloat16":
            out[name] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(a)
    return out


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` made writable in place (a view of our own received buffer), else a copy."""
    try:
        a.flags.writeable = True
    except ValueError:  # the bytes are read-only (an immutable buffer, a mapped file)
        return a.copy()
    return a


def copy_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Writable numpy copies (decoded payloads are read-only views)."""
    return {k: np.array(as_numpy(v), copy=True) for k, v in params.items()}


__all__ = [
    "FLModel",
    "ParamsType",
    "copy_params",
    "encode",
    "model_from_parts",
    "model_parts",
    "params_format_of",
    "script_format",
    "to_framework",
    "wire_format",
]


def controls_to_meta(model: FLModel) -> FLModel:
    """A task as a script sees it: SCAFFOLD's control tensors (``scaffold.c/NAME`` on the
    wire) moved into ``meta["scaffold_c_global"]``, as FLARE's scripts read them."""
    names = [k for k in model.params if k.startswith(SCAFFOLD_CONTROL)]
    if names:
        model.meta[SCAFFOLD_CTRL_GLOBAL] = {
            k[len(SCAFFOLD_CONTROL) :]: model.params.pop(k) for k in names
        }
    return model


def controls_from_meta(model: FLModel) -> FLModel:
    """A result as it travels: ``meta["scaffold_c_diff"]`` (a FLARE script's control change,
    by tensor name; torch or numpy) moved into ``scaffold.c/NAME`` float32 tensors (the meta
    is JSON on the wire). The script's own model is not changed.

    Raises:
        TypeError: ``scaffold_c_diff`` is not a mapping of names to arrays.
    """
    diff = model.meta.get(SCAFFOLD_CTRL_DIFF)
    if SCAFFOLD_CTRL_GLOBAL in model.meta and diff is None:  # the task's meta sent back as is
        meta = {k: v for k, v in model.meta.items() if k != SCAFFOLD_CTRL_GLOBAL}
        return dataclasses.replace(model, meta=meta)
    if diff is None:
        return model
    if not isinstance(diff, Mapping):
        raise TypeError(f"meta[{SCAFFOLD_CTRL_DIFF!r}] is not a mapping of tensor names to arrays")
    params = dict(model.params)
    for name, value in diff.items():
        params[SCAFFOLD_CONTROL + str(name)] = np.asarray(as_numpy(value), dtype=np.float32)
    drop = (SCAFFOLD_CTRL_DIFF, SCAFFOLD_CTRL_GLOBAL)
    meta = {k: v for k, v in model.meta.items() if k not in drop}
    return dataclasses.replace(model, params=params, meta=meta, params_type=model.params_type)
