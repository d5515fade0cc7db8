"""Codecs by name: what a cell can encode and decode, advertised in its hello."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from flare_async.codecs._quant import QuantCodec
from flare_async.codecs._tensors import Buffer
from flare_async.codecs._tensors import decode as decode_tensors
from flare_async.codecs._tensors import encode as encode_tensors
from flare_async.errors import ConfigError, DecodeError


class Codec(Protocol):
    """Object -> buffers (the first holds the meta) and back."""

    name: str

    def encode(self, obj: Any) -> list[Buffer]:
        """The parts to send: meta first, then data buffers (views where possible).

        Raises:
            CodecError: an object this codec cannot carry.
        """
        ...

    def decode(self, parts: Sequence[Buffer] | Buffer) -> Any:
        """The object back from its parts (or one buffer holding them all).

        Raises:
            DecodeError: bytes that do not decode.
        """
        ...


class TensorCodec:
    """``tensors``: a dict of numpy arrays or torch tensors, lossless, zero-copy on encode."""

    name = "tensors"

    def encode(self, obj: Any) -> list[Buffer]:
        return encode_tensors(obj)

    def decode(self, parts: Sequence[Buffer] | Buffer) -> Any:
        return decode_tensors(parts)[0]


def default_codecs() -> list[Codec]:
    """``tensors``, and the lossy ``fp16``, ``bf16``, ``q8``, ``nf4``, ``fp4``."""
    return [TensorCodec(), *(QuantCodec(s) for s in ("fp16", "bf16", "q8", "nf4", "fp4"))]


_DEFAULTS: dict[str, Codec] = {c.name: c for c in default_codecs()}
"""The default codecs, shared by every registry made without codecs of its own (they keep no
state): 10,000 simulated cells each held six codec objects and their strings before."""
_DEFAULT_CAPABILITIES = frozenset(f"codec:{n}" for n in _DEFAULTS)


class CodecRegistry:
    """The codecs one cell speaks, by name (``""`` is raw bytes, always)."""

    def __init__(
        self, codecs: Iterable[Codec] | None = None, *, per_channel: Mapping[str, str] | None = None
    ) -> None:
        if codecs is None:  # one set for every registry: the codecs keep no state
            self._codecs = _DEFAULTS
        else:
            self._codecs = {}
            for codec in codecs:
                if not codec.name or codec.name in self._codecs:
                    raise ConfigError(f"codec name {codec.name!r} is empty or given twice")
                self._codecs[codec.name] = codec
        self.per_channel = dict(per_channel or {})
        """The codec to use for a channel when a caller names none (e.g. ``{"fl": "q8"}``)."""
        for channel, name in self.per_channel.items():
            if name not in self._codecs:
                raise ConfigError(f"channel {channel!r} is set to unknown codec {name!r}")

    def choose(self, channel: str | None, default: str = "tensors") -> str:
        """The codec for ``channel``: its configured one, else ``default``."""
        return self.per_channel.get(channel, default) if channel is not None else default

    @property
    def names(self) -> list[str]:
        return sorted(self._codecs)

    def capabilities(self) -> frozenset[str]:
        """What the hello advertises: ``codec:<name>`` per codec."""
        if self._codecs is _DEFAULTS:
            return _DEFAULT_CAPABILITIES
        return frozenset(f"codec:{n}" for n in self._codecs)

    def get(self, name: str) -> Codec:
        """Raises: DecodeError: no such codec here."""
        codec = self._codecs.get(name)
        if codec is None:
            raise DecodeError(f"no codec {name!r} here (have: {', '.join(self.names)})")
        return codec
