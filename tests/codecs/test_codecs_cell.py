"""Codecs on the fabric: chosen per message, advertised in the hello, carried by requests and
streams; a stream of tensors saved as it arrives is a safetensors file that maps back."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from flare_async import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.codecs import CodecRegistry, TensorCodec, decode
from flare_async.errors import BadRequest, DecodeError
from tests.streaming.test_streams import chain

pytestmark = pytest.mark.anyio


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "layer.w": rng.standard_normal((64, 48)).astype(np.float32),
        "layer.b": rng.standard_normal(48).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
    }


async def test_a_request_carries_quantized_tensors_and_the_reply_is_encoded_too() -> None:
    table = HandlerTable()

    @table.request("model", "scale")
    async def scale(ctx: Context, msg: Payload) -> Payload:
        tensors = ctx.cell.decode(msg)  # a DecodeError goes back as BadRequest
        return ctx.cell.encode({k: v * 2 for k, v in tensors.items()}, "tensors")

    async with chain(["server", "server.e"], table) as (server, edge):
        assert "q8" in server.peer_codecs("server.e")
        assert "tensors" in edge.peer_codecs("server")
        reply = await server.request("server.e", "model", "scale", server.encode(weights(), "q8"))
        assert reply.codec == "tensors"
        out = server.decode(reply)
        w = weights()
        assert out["steps"] == 14  # integers pass through quantization untouched
        assert (
            np.abs(out["layer.w"] - 2 * w["layer.w"]).max() <= 2 * np.abs(w["layer.w"]).max() / 127
        )
        with pytest.raises(BadRequest, match="no codec"):
            await server.request("server.e", "model", "scale", Payload(b"x", codec="zip"))
        with pytest.raises(BadRequest, match="shorter than its length prefix"):
            await server.request("server.e", "model", "scale", Payload(b"x", codec="tensors"))


def test_a_channel_can_name_its_codec() -> None:
    cell = Cell("server", codecs=CodecRegistry(per_channel={"fl": "nf4"}))
    assert cell.encode(weights(), channel="fl").codec == "nf4"
    assert cell.encode(weights(), channel="other").codec == "tensors"
    assert cell.encode(weights(), "q8", channel="fl").codec == "q8"


async def test_a_cell_speaks_only_the_codecs_it_was_given() -> None:
    async with chain(
        ["server", "server.e"], HandlerTable(), codecs=CodecRegistry([TensorCodec()])
    ) as (server, _):
        assert server.peer_codecs("server.e") == {"tensors"}
        with pytest.raises(DecodeError):
            server.encode(weights(), "nf4")


async def test_a_stream_of_tensors_saved_is_a_safetensors_file(tmp_path: Path) -> None:
    table = HandlerTable()
    target = tmp_path / "global.safetensors"

    @table.stream("model", "push")
    async def push(ctx: Context, stream: IncomingStream) -> bytes:
        await stream.save(target)
        return stream.codec.encode()

    async with chain(["server", "server.e"], table) as (server, _):
        payload = server.encode(weights(), "tensors")
        reply = await server.stream(
            "server.e", "model", "push", list(payload.parts), codec=payload.codec
        )
    assert reply.tobytes() == b"tensors"
    with target.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        out, _ = decode(m)
        assert all(np.array_equal(out[k], v) for k, v in weights().items())
        del out
