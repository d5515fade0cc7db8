"""The whole-object digest of a stream: each algorithm gives the value an independent library
computes, the default costs no pass over the bytes yet still catches a changed object, and a
sender or relay that names an unknown, malformed or (where a signature rests on it) weak digest
is refused by name."""

from __future__ import annotations

import hashlib
import itertools
import random
from typing import Any

import blake3
import crc32c
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flare_async import MemoryNetwork
from flare_async.cell._stream_api import stream_digest
from flare_async.errors import BadRequest, ConfigError, ProtocolError, StreamCorrupted
from flare_async.streaming import CrcDigest, crc32c_combine, normalize_digest, parse_digest
from flare_async.testing import FaultyDriver
from flare_async.wire import Frame, StreamEnd, StreamOpen
from tests.streaming.test_streams import CHUNK, WINDOW, Sink, chain, pattern, receiver_table

pytestmark = pytest.mark.anyio


def expected(algorithm: str, data: bytes) -> str:
    if algorithm == "crc32c":
        return f"crc32c:{crc32c.crc32c(data):08x}"
    if algorithm == "blake3":
        return f"blake3:{blake3.blake3(data).hexdigest()}"
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# ---------------------------------------------------------------- the arithmetic
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=6))
def test_combined_chunk_crcs_are_the_crc_of_the_whole(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [(a, data[a:b]) for a, b in itertools.pairwise(bounds)]
    digest = CrcDigest()
    for offset, chunk in random.Random(len(data)).sample(chunks, len(chunks)):  # any order
        digest.add(offset, len(chunk), crc32c.crc32c(chunk))
    digest.add(0, len(chunks[0][1]) if chunks else 0, 12345)  # a repeat changes nothing
    assert digest.nbytes == len(data)
    assert digest.hexdigest() == f"crc32c:{crc32c.crc32c(data):08x}"


def test_combining_at_the_edges_of_the_lengths() -> None:
    a, b = pattern(5, seed=1), pattern(1 << 22, seed=2)
    assert crc32c_combine(crc32c.crc32c(a), 0, 0) == crc32c.crc32c(a)  # nothing appended
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)
    assert crc32c_combine(0, crc32c.crc32c(b), len(b)) == crc32c.crc32c(b)  # after nothing
    big = (1 << 40) + 3  # a length past 32 bits: the shift is a power of x, not a loop
    assert 0 <= crc32c_combine(0xFFFFFFFF, 0, big) <= 0xFFFFFFFF


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("a" * 64, ("sha256", "a" * 64)),  # bare hex: SHA-256, as before the name
        ("blake3:" + "0" * 64, ("blake3", "0" * 64)),
        ("crc32c:0000abcd", ("crc32c", "0000abcd")),
    ],
)
def test_a_digest_in_text_form_parses(text: str, want: tuple[str, str]) -> None:
    assert parse_digest(text) == want
    assert normalize_digest(text) == ":".join(want)


@pytest.mark.parametrize(
    "text",
    [
        "md5:" + "0" * 32,  # unknown algorithm
        "crc32c:abc",  # short
        "crc32c:0000ABCD",  # uppercase
        "blake3:" + "g" * 64,  # not hex
        "sha256:" + "0" * 65,  # long
        "0" * 63,  # a bare hex of another length
        ":" + "0" * 64,
        "x" * 10_000,
    ],
)
def test_a_malformed_digest_is_a_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_digest(text)


def test_the_sender_picks_the_digest_from_its_options() -> None:
    assert stream_digest(True, sealed=False) == "crc32c"  # the default: free
    assert stream_digest(True, sealed=True) == "blake3"  # signed: cryptographic
    assert stream_digest(False, sealed=True) == "blake3"  # a seal implies one
    assert stream_digest(False, sealed=False) == ""
    assert stream_digest("sha256", sealed=True) == "sha256"
    assert stream_digest(True, sealed=False, known="b" * 64) == "sha256"  # the known one's
    for bad in [
        lambda: stream_digest("crc32c", sealed=True),
        lambda: stream_digest("md5", sealed=False),
        lambda: stream_digest("blake3", sealed=False, known="c" * 64),
        lambda: stream_digest(True, sealed=False, known="not a digest"),
    ]:
        with pytest.raises(ConfigError):
            bad()


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("algorithm", ["crc32c", "blake3", "sha256"])
@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 5])
async def test_each_algorithm_gives_the_libraries_value(algorithm: str, size: int) -> None:
    sink = Sink()
    data = pattern(size, seed=size)
    async with chain(["server", "server.r", "server.r.e"], receiver_table(sink)) as (s, *_):
        reply = await s.stream(
            "server.r.e", "t", "collect", data, chunk=CHUNK, window=WINDOW, digest=algorithm
        )
    received, digest = reply.tobytes().decode().split()
    assert (int(received), digest) == (size, expected(algorithm, data))


async def test_a_known_digest_is_checked_in_its_own_algorithm() -> None:
    data = pattern(2 * CHUNK + 1, seed=3)
    async with chain(["server", "server.e"], receiver_table(Sink())) as (server, _):
        for algorithm in ["blake3", "sha256", "crc32c"]:
            known = expected(algorithm, data)
            reply = await server.stream(
                "server.e", "t", "collect", data, chunk=CHUNK, window=WINDOW, sha256=known
            )
            assert reply.tobytes().decode().split()[1] == known
            wrong = expected(algorithm, data + b"!")
            with pytest.raises(StreamCorrupted, match="does not match its digest"):
                await server.stream(
                    "server.e", "t", "collect", data, chunk=CHUNK, window=WINDOW, sha256=wrong
                )


def _rewriting(change: Any) -> FaultyDriver:
    """A memory network whose links let ``change`` rewrite every frame: a hostile relay."""

    def rewrite(frame: Frame) -> Frame:
        h = change(frame.header)
        return Frame(h, frame.parts, frame.expires) if h is not frame.header else frame

    return FaultyDriver(MemoryNetwork(), rewrite=rewrite)


async def test_the_default_digest_catches_an_object_changed_on_the_way() -> None:
    """The end digest differs from the object the receiver assembled: the stream fails.
    (The default is not cryptographic: a hostile relay could fix both; a signed stream uses
    BLAKE3, see the last test.)"""
    data = pattern(4 * CHUNK, seed=9)

    def change(h: Any) -> Any:
        if isinstance(h, StreamEnd) and h.sha256.startswith("crc32c:"):
            return msgspec.structs.replace(h, sha256=expected("crc32c", data + b"x"))
        return h

    async with chain(["server", "server.e"], receiver_table(Sink()), _rewriting(change)) as (
        server,
        _,
    ):
        with pytest.raises(StreamCorrupted, match="does not match its digest"):
            await server.stream("server.e", "t", "collect", data, chunk=CHUNK, window=WINDOW)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: msgspec.structs.replace(h, digest_alg="md5"), "unknown digest algorithm"),
        (lambda h: msgspec.structs.replace(h, sha256="sha256:zz"), "lowercase hex"),
        (
            lambda h: msgspec.structs.replace(h, digest_alg="blake3", sha256="a" * 64),
            "announces blake3 but a sha256 digest",
        ),
    ],
)
async def test_a_malformed_digest_in_an_open_is_refused_by_name(change: Any, message: str) -> None:
    def rewrite_open(h: Any) -> Any:
        return change(h) if isinstance(h, StreamOpen) else h

    async with chain(["server", "server.e"], receiver_table(Sink()), _rewriting(rewrite_open)) as (
        server,
        edge,
    ):
        with pytest.raises(BadRequest, match=message):
            await server.stream("server.e", "t", "collect", b"abc", chunk=CHUNK, window=WINDOW)
        assert edge.statistics().streams.receiving == 0  # nothing left open


async def test_a_malformed_end_digest_fails_the_stream_not_the_link() -> None:
    changed: list[int] = []

    def change(h: Any) -> Any:
        if isinstance(h, StreamEnd) and not changed:
            changed.append(h.sid)
            return msgspec.structs.replace(h, sha256="crc32c:" + "\u00e9" * 8)
        return h

    driver = _rewriting(change)
    async with chain(["server", "server.e"], receiver_table(Sink()), driver) as (server, _):
        with pytest.raises(BadRequest, match="lowercase hex"):
            await server.stream("server.e", "t", "collect", b"abc", chunk=CHUNK, window=WINDOW)
        assert changed
        reply = await server.stream("server.e", "t", "collect", b"ok", chunk=CHUNK, window=WINDOW)
        assert reply.tobytes().decode().split()[1] == expected("crc32c", b"ok")


async def test_a_topic_that_requires_a_digest_gets_a_cryptographic_one() -> None:
    """``require_digest``: a relay (or sender) that downgrades the digest to the CRC, or drops
    it, does not get a CRC-only check past a receiver that will check a signature over it."""
    sink = Sink()
    data = pattern(2 * CHUNK, seed=5)
    downgrade: dict[str, bool] = {"on": False}

    def change(h: Any) -> Any:
        if downgrade["on"] and isinstance(h, StreamOpen):
            return msgspec.structs.replace(h, digest_alg="crc32c")
        return h

    async with chain(["server", "server.e"], receiver_table(sink), _rewriting(change)) as (
        server,
        edge,
    ):
        edge.require_digest("t", "collect")
        with pytest.raises(BadRequest, match="requires a cryptographic digest"):
            await server.stream("server.e", "t", "collect", data, chunk=CHUNK, digest="crc32c")
        downgrade["on"] = True
        with pytest.raises(BadRequest, match="requires a cryptographic digest"):
            await server.stream("server.e", "t", "collect", data, chunk=CHUNK, digest="blake3")
        downgrade["on"] = False
        # No digest asked: the receiver computes BLAKE3 itself.
        reply = await server.stream("server.e", "t", "collect", data, chunk=CHUNK, digest=False)
        assert reply.tobytes().decode().split()[1] == expected("blake3", data)
        assert edge.statistics().streams.receiving == 0
