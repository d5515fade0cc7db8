"""Codecs (layer L1, pure): tensors without copies, and quantization on the CPU.

* ``tensors``: ``{name: array}`` in the safetensors layout; numpy arrays and torch tensors
  (torch imported only when given one); bf16 stays bf16; zero-copy for contiguous tensors.
* ``fp16``, ``bf16``: casts of float tensors; ``q8``: blockwise absmax int8; ``nf4``, ``fp4``:
  blockwise 4-bit, two codes per byte, rounded stochastically (unbiased) by default.
  Decoding restores each tensor's dtype and shape.

A payload names its codec (``Payload.codec``); ``Cell.encode`` / ``Cell.decode`` use the cell's
:class:`CodecRegistry`, which the cell advertises in its hello (``codec:<name>``).
"""

from flare_async.codecs._kernels import (
    FP4_BOUND,
    FP4_STOCHASTIC_BOUND,
    INT8_BOUND,
    LUT_RESOLUTION,
    NF4_BOUND,
    NF4_STOCHASTIC_BOUND,
)
from flare_async.codecs._quant import QuantCodec, dequantize
from flare_async.codecs._registry import Codec, CodecRegistry, TensorCodec, default_codecs
from flare_async.codecs._tensors import (
    MAX_HEADER,
    as_numpy,
    decode,
    dtype_name,
    dtype_named,
    encode,
    tensor_layout,
    to_torch,
)

__all__ = [
    "FP4_BOUND",
    "FP4_STOCHASTIC_BOUND",
    "INT8_BOUND",
    "LUT_RESOLUTION",
    "MAX_HEADER",
    "NF4_BOUND",
    "NF4_STOCHASTIC_BOUND",
    "Codec",
    "CodecRegistry",
    "QuantCodec",
    "TensorCodec",
    "as_numpy",
    "decode",
    "default_codecs",
    "dequantize",
    "dtype_name",
    "dtype_named",
    "encode",
    "tensor_layout",
    "to_torch",
]
