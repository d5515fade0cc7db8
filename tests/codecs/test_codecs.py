"""Codecs: tensors round-trip bit-exactly without copies, quantization stays within its stated
bounds, and bytes that do not hold together are a DecodeError, never a crash or a wrong shape."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flare_async.codecs import (
    FP4_BOUND,
    FP4_STOCHASTIC_BOUND,
    INT8_BOUND,
    LUT_RESOLUTION,
    NF4_BOUND,
    NF4_STOCHASTIC_BOUND,
    CodecRegistry,
    QuantCodec,
    _kernels,
    decode,
    encode,
    to_torch,
)
from flare_async.errors import CodecError, DecodeError

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "<u8", "<u4", "<u2", "u1", "?"]


def blob(parts: list) -> bytes:
    return b"".join(bytes(p) for p in parts)


@settings(max_examples=150, deadline=None)
@given(
    arrays=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
        hnp.arrays(
            dtype=st.sampled_from(DTYPES).map(np.dtype),
            shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        ),
        max_size=5,
    ),
    big_endian=st.booleans(),
    strided=st.booleans(),
)
def test_every_dtype_and_shape_round_trips_bit_exactly(
    arrays: dict[str, np.ndarray], big_endian: bool, strided: bool
) -> None:
    given_arrays = {}
    for name, array in arrays.items():
        a = array
        if big_endian and a.dtype.itemsize > 1:
            a = a.astype(a.dtype.newbyteorder(">"))
        if strided and a.ndim and a.shape[-1] > 1:
            a = a[..., ::2]  # not contiguous
        given_arrays[name] = a
    out, meta = decode(blob(encode(given_arrays, {"round": "7"})))
    assert meta == {"round": "7"}
    assert list(out) == list(given_arrays)
    for name, a in given_arrays.items():
        b = out[name]
        assert b.shape == a.shape
        assert b.dtype == a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        assert b.tobytes() == a.astype(b.dtype).tobytes()  # bit for bit (NaNs included)
        assert not b.flags.writeable


def test_contiguous_tensors_are_not_copied_on_encode() -> None:
    a = np.arange(1 << 16, dtype=np.float32)
    header, view = encode({"a": a})
    assert isinstance(view, memoryview)
    assert np.shares_memory(np.frombuffer(view, np.uint8), a)
    out, _ = decode([header, view])
    assert np.array_equal(out["a"], a)


def test_bf16_stays_bf16_bit_for_bit_from_torch_and_numpy() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(33, 7).to(torch.bfloat16)
    n = np.arange(10, dtype=np.float32).astype(BF16)
    out, _ = decode(blob(encode({"t": t, "n": n})))
    assert out["t"].dtype == BF16
    assert np.array_equal(out["t"].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(out["n"].view(np.uint16), n.view(np.uint16))
    back = to_torch(out)
    assert back["t"].dtype == torch.bfloat16
    assert torch.equal(back["t"], t)


def test_the_layout_is_a_safetensors_file(tmp_path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {
        "w": np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32),
        "i": np.arange(5, dtype=np.int64),
    }
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob(encode(arrays)))
    loaded = safetensors_numpy.load_file(str(path))
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        out, _ = decode(m)  # mapped back, no copy
        assert np.array_equal(out["w"], arrays["w"])
        del out


@pytest.mark.parametrize("value", [np.array(["a"]), np.array([1 + 2j]), "text", {"x": 1}])
def test_what_cannot_travel_is_a_codec_error(value: object) -> None:
    with pytest.raises(CodecError):
        encode({"x": value})


def _header(d: dict) -> bytes:
    text = json.dumps(d).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00",
        struct.pack("<Q", 1 << 40) + b"{}",
        struct.pack("<Q", 3) + b"{}x",
        _header([]),  # type: ignore[arg-type]
        _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}) + b"\0" * 4,
        _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}) + b"\0" * 4,
        _header({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4,
        _header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}) + b"\0" * 4,
        _header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}) + b"\0" * 8,
        _header(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            }
        )
        + b"\0" * 4,
        _header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 6,
        _header({"__metadata__": {"k": 1}}),
        _header({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}) + b"\0" * 4,
    ],
)
def test_malformed_layouts_are_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


BOUNDS = {
    ("q8", "nearest"): INT8_BOUND,
    ("nf4", "nearest"): NF4_BOUND + LUT_RESOLUTION,
    ("fp4", "nearest"): FP4_BOUND + LUT_RESOLUTION,
    ("nf4", "stochastic"): NF4_STOCHASTIC_BOUND + LUT_RESOLUTION,
    ("fp4", "stochastic"): FP4_STOCHASTIC_BOUND + LUT_RESOLUTION,
}


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(sorted(BOUNDS)),
    block=st.sampled_from([16, 64, 100, 128, 256]),
    n=st.integers(1024, 5000),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
)
def test_blockwise_quantization_error_stays_within_its_bound(
    scheme: tuple[str, str], block: int, n: int, scale: float, seed: int, dtype: type
) -> None:
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(dtype)
    x[::97] = 0.0
    codec = QuantCodec(scheme[0], block=block, rounding=scheme[1])
    out = codec.decode(blob(codec.encode({"x": x.reshape(-1, 1) if n % 2 else x})))["x"]
    assert out.dtype == x.dtype
    y = out.reshape(-1).astype(np.float64)
    xf = x.astype(np.float64)
    pad = -n % block
    err = np.abs(np.pad(y - xf, (0, pad))).reshape(-1, block).max(axis=1)
    absmax = np.abs(np.pad(xf, (0, pad))).reshape(-1, block).max(axis=1)
    # the bound, plus one step of the original dtype at the block's absmax (the dequantized
    # value is rounded back to that dtype: it matters for float16 subnormals)
    ulp = np.spacing(absmax.astype(dtype)).astype(np.float64)
    tolerance = absmax * (BOUNDS[scheme] + 2**-20) + ulp
    assert (err <= tolerance).all()
    assert (y[xf == 0] == 0).all()  # zeros stay zeros, whatever the rounding


def test_casts_and_what_passes_through() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4096).astype(np.float32)
    small = rng.standard_normal(10).astype(np.float32)
    ints = np.arange(5000, dtype=np.int32)
    for scheme, rel in (("fp16", 2**-11), ("bf16", 2**-8)):
        codec = QuantCodec(scheme)
        out = codec.decode(blob(codec.encode({"x": x, "small": small, "ints": ints})))
        assert out["x"].dtype == np.float32
        assert np.all(np.abs(out["x"] - x) <= rel * np.abs(x) + 1e-30)
        assert np.array_equal(out["small"], small)  # too small to gain: untouched
        assert np.array_equal(out["ints"], ints)  # not float: untouched
    bf = x.astype(BF16)
    codec = QuantCodec("bf16")
    out = codec.decode(blob(codec.encode({"bf": bf})))
    assert np.array_equal(out["bf"].view(np.uint16), bf.view(np.uint16))  # bf16 in, bf16 out


def test_quantized_layouts_that_do_not_hold_together_are_decode_errors() -> None:
    codec = QuantCodec("q8")
    x = np.random.default_rng(2).standard_normal(2048).astype(np.float32)
    parts = codec.encode({"x": x})
    out, meta = decode(blob(parts))
    plan = json.loads(meta["flare.quant"])
    plan["x"]["block"] = 64  # scales no longer match
    bad = encode(dict(out), {"flare.quant": json.dumps(plan)})
    with pytest.raises(DecodeError, match="scales"):
        codec.decode(blob(bad))
    plan["x"] = {"scheme": "q8", "dtype": "I32", "shape": [2048], "block": 256}
    with pytest.raises(DecodeError, match="dtype"):
        codec.decode(blob(encode(dict(out), {"flare.quant": json.dumps(plan)})))
    with pytest.raises(DecodeError):
        codec.decode(blob(encode(dict(out), {"flare.quant": "not json"})))
    truncated = blob(parts)[:-100]
    with pytest.raises(DecodeError):
        codec.decode(truncated)


def test_registry() -> None:
    reg = CodecRegistry()
    assert reg.names == ["bf16", "fp16", "fp4", "nf4", "q8", "tensors"]
    assert "codec:q8" in reg.capabilities()
    with pytest.raises(DecodeError, match="no codec"):
        reg.get("zip")


@pytest.mark.parametrize("scheme", ["q8", "nf4", "fp4"])
def test_non_finite_tensors_travel_unquantized(scheme: str) -> None:
    x = np.random.default_rng(5).standard_normal(4096).astype(np.float32)
    x[1000] = np.nan
    y = x.copy()
    y[7] = np.inf
    codec = QuantCodec(scheme)
    out = codec.decode(blob(codec.encode({"x": x, "y": y})))
    assert np.array_equal(out["x"], x, equal_nan=True)
    assert np.array_equal(out["y"], y, equal_nan=True)


def test_edge_values_never_crash_or_turn_to_inf() -> None:
    tiny = np.full(1024, 1e-38, dtype=np.float32) * np.where(np.arange(1024) % 2, 1, -1)
    for scheme in ("q8", "nf4", "fp4"):
        codec = QuantCodec(scheme)
        out = codec.decode(blob(codec.encode({"t": tiny})))["t"]
        assert np.abs(out - tiny).max() <= 1e-30  # stored as zeros, by the stated rule
    big = np.full(2048, 1e5, dtype=np.float32)
    codec = QuantCodec("fp16")
    assert np.array_equal(codec.decode(blob(codec.encode({"b": big})))["b"], big)


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}).encode(),
    ],
)
def test_hostile_headers_are_decode_errors(header: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def quantized(codec: QuantCodec, tensors: dict[str, np.ndarray]) -> tuple[dict, set[str]]:
    """Decoded tensors, and the names the codec quantized (those in its metadata)."""
    parts = blob(codec.encode(tensors))
    return codec.decode(parts), set(json.loads(decode(parts)[1]["flare.quant"]))


@pytest.mark.parametrize("scheme", ["q8", "nf4", "fp4"])
def test_which_tensors_are_quantized(scheme: str) -> None:
    rng = np.random.default_rng(3)
    codec = QuantCodec(scheme)
    f32 = rng.standard_normal(4096).astype(np.float32)
    tensors = {
        "empty": np.zeros((0, 64), dtype=np.float32),
        "below": f32[:1023].copy(),  # one under min_elements: a bias, a norm
        "at": f32[:1024].reshape(32, 32).copy(),  # exactly min_elements: quantized
        "ints": np.arange(4096, dtype=np.int64),
        "bools": np.arange(4096) % 3 == 0,
        "f16": f32.astype(np.float16),
        "bf16": f32.astype(BF16),
        "f64": f32.astype(np.float64),
        "nan": np.where(np.arange(4096) == 9, np.nan, f32),
        "inf": np.where(np.arange(4096) == 4095, -np.inf, f32),
    }
    out, planned = quantized(codec, tensors)
    assert planned == {"at", "f16", "bf16", "f64"}
    for name in ("empty", "below", "ints", "bools", "nan", "inf"):
        assert out[name].dtype == tensors[name].dtype
        assert out[name].tobytes() == tensors[name].tobytes()  # as it was, NaN and inf included
    bound = BOUNDS[scheme, codec.rounding] + 2**-10  # + a step of bf16 and f16 at the absmax
    for name in ("at", "f16", "bf16", "f64"):
        x = tensors[name]
        assert out[name].dtype == x.dtype
        assert out[name].shape == x.shape
        err = np.abs(out[name].astype(np.float64) - x.astype(np.float64))
        assert err.max() <= bound * np.abs(x.astype(np.float64)).max()
    smaller = QuantCodec(scheme, min_elements=1023)
    assert "below" in quantized(smaller, {"below": tensors["below"]})[1]


def test_rounding_defaults_and_what_is_refused() -> None:
    assert [QuantCodec(s).rounding for s in ("q8", "nf4", "fp4")] == [
        "nearest",
        "stochastic",
        "stochastic",
    ]
    assert [QuantCodec(s).block for s in ("q8", "nf4", "fp4")] == [256, 128, 128]
    with pytest.raises(ValueError, match="rounding"):
        QuantCodec("q8", rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        QuantCodec("nf4", rounding="up")


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_stochastic_rounding_is_unbiased_where_nearest_is_not(scheme: str) -> None:
    # every value halfway-ish between two codes (absmax 1 per block): nearest sends the same
    # code for all of them, stochastic rounding sends a mix that averages to the value
    book = np.unique(_kernels.CODEBOOKS[scheme])
    lo, hi = book[-4], book[-3]
    target = lo + 0.3 * (hi - lo)
    x = np.full(1 << 16, target, dtype=np.float32)
    x[::128] = 1.0
    rest = np.arange(x.size) % 128 != 0
    nearest = QuantCodec(scheme, rounding="nearest")
    near = nearest.decode(blob(nearest.encode({"x": x})))["x"][rest]
    assert np.all(near == lo)
    codec = QuantCodec(scheme)
    out = codec.decode(blob(codec.encode({"x": x})))["x"][rest]
    assert set(np.unique(out)) == {lo, hi}
    assert abs(out.mean() - target) <= 0.01 * (hi - lo)


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_small_changes_to_a_decoded_model_survive_encoding_again(scheme: str) -> None:
    # What a site does each round: decode the global model, train it a little, send it back.
    # Nearest rounding gives back the codes it received (the training is lost); stochastic
    # rounding carries the change on average, and an untouched tensor encodes back to itself.
    rng = np.random.default_rng(4)
    codec = QuantCodec(scheme)
    received = codec.decode(blob(codec.encode({"w": rng.standard_normal(1 << 16)})))["w"]
    again = blob(codec.encode({"w": received}))
    assert again == blob(codec.encode({"w": received.copy()}))  # deterministic
    assert np.array_equal(codec.decode(again)["w"], received)
    absmax = np.repeat(np.abs(received).reshape(-1, codec.block).max(axis=1), codec.block)
    keep = np.abs(received) < absmax  # each block's absmax stays where it was
    delta = np.where(keep, 0.01 * absmax, 0.0)  # under half of any gap
    nearest = QuantCodec(scheme, rounding="nearest")
    assert np.array_equal(
        nearest.decode(blob(nearest.encode({"w": received + delta})))["w"], received
    )
    sent = codec.decode(blob(codec.encode({"w": received + delta})))["w"]
    moved = (sent - received)[keep].mean()
    assert abs(moved - delta[keep].mean()) <= 0.05 * delta[keep].mean()


def test_the_old_layout_and_bytes_are_still_made_and_read() -> None:
    # blocks of 256 rounded to the nearest code were the 4-bit defaults until stochastic
    # rounding: those settings give the same bytes as then, and today's defaults decode them
    x = (np.random.default_rng(7).standard_normal(3000) * 0.05).astype(np.float32)
    digests = {
        "q8": "acadce56f005f39b2e05cbffbad404b7cef8ec8e11d094d51d3c1d7907458c8c",
        "nf4": "3613d6353a402a109e9e262f268ec021f6d609c9827533c184f7e2edfb67fada",
        "fp4": "1f84adbbffa4d1a39d30a0b1dbc47500e9048552b305c2ce21b0f680667998c0",
    }
    for scheme, digest in digests.items():
        old = QuantCodec(scheme, block=256, rounding="nearest")
        data = blob(old.encode({"w": x}))
        assert hashlib.sha256(data).hexdigest() == digest
        assert np.array_equal(QuantCodec(scheme).decode(data)["w"], old.decode(data)["w"])
