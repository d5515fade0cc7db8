"""Golden frames: the byte-level examples of docs/wire.md, kept as bytes in tests/golden.

Each ``tests/golden/NAME.bin`` is one whole frame (prefix, header, payload). The spec shows
every one of them in a fenced block whose info string is ``text golden=NAME``, either as an
annotated listing (hex bytes, then a comment after two or more spaces) or as a
``hexdump -C`` listing; the tests read the bytes back out of the spec and compare, so the spec
and the files cannot drift apart. Each frame is then decoded with the real decoder and compared
with the message the spec describes (:func:`messages`), and that message is encoded again and
must give the same bytes: the encoder is deterministic (see docs/wire.md, "Determinism").

The spec's tables (tags, field order and defaults, statuses) are checked against the code too.

Regenerate after a deliberate wire change (then paste the listings into docs/wire.md)::

    .venv/bin/python tests/wire/test_wire_golden.py write   # the deterministic frames
    .venv/bin/python tests/wire/test_wire_golden.py sign    # signed_request.bin + signing-ca.pem
    .venv/bin/python tests/wire/test_wire_golden.py doc     # the listings for docs/wire.md

``sign`` makes a new CA and key and signs again (ECDSA signatures are randomized), so its bytes
change every time; the other frames only change with the wire.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import crc32c
import msgspec
import pytest

from flare_async.cell._signing import check, fields_of, seal
from flare_async.errors import FrameTooLarge, IntegrityError, ProtocolError, Status
from flare_async.security import (
    Kit,
    MessageSigning,
    Role,
    SignatureVerifier,
    Signer,
    create_ca,
    issue_certificate,
)
from flare_async.security._signing import canonical
from flare_async.wire import (
    HELLO_LIMITS,
    MAGIC,
    PREFIX,
    PREFIX_SIZE,
    STREAM_KINDS,
    WIRE_VERSION,
    Bye,
    Connection,
    Envelope,
    Error,
    Event,
    Frame,
    Hello,
    Limits,
    Ping,
    Pong,
    Reply,
    Request,
    Routed,
    StreamAbort,
    StreamAck,
    StreamData,
    StreamDone,
    StreamEnd,
    StreamOpen,
    check_hello,
    decode_frame,
    decode_header,
    encode_head,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
SPEC = ROOT / "docs" / "wire.md"
CA_FILE = GOLDEN / "signing-ca.pem"

KINDS: tuple[type[Any], ...] = (
    Request,
    Event,
    Reply,
    Error,
    Hello,
    Ping,
    Pong,
    Bye,
    *STREAM_KINDS,
)
TAGS: dict[type[Any], int] = {
    Request: 1,
    Event: 2,
    Reply: 3,
    Error: 4,
    Hello: 10,
    Ping: 11,
    Pong: 12,
    Bye: 13,
    StreamOpen: 20,
    StreamData: 21,
    StreamAck: 22,
    StreamEnd: 23,
    StreamAbort: 24,
    StreamDone: 25,
}
"""The tag numbers as the spec states them (written out, not read from the code)."""

# ---------------------------------------------------------------- the spec's examples
SITE, SERVER = "server.site-1", "server"
SITE_ID = 0x1F3A5C7E9B01  # a cell's message ids count up from a random 48-bit start
SERVER_ID = 0xA0C42E186D33
SID = SITE_ID + 3
DATA = b"hello world"
SHA = "sha256:" + hashlib.sha256(DATA).hexdigest()  # a digest travels in text form
CRC = 0xC99465AA  # CRC-32C of DATA
AT = 1767225600.125  # when the signed request was signed (2026-01-01T00:00:00.125Z)


def _from_site(msg_id: int) -> dict[str, Any]:
    return {"id": msg_id, "src": SITE, "dst": SERVER, "route": [SITE], "budget": None}


def _from_server(msg_id: int) -> dict[str, Any]:
    return {"id": msg_id, "src": SERVER, "dst": SITE, "route": [SERVER], "budget": None}


def messages() -> dict[str, tuple[Envelope, bytes]]:
    """Every example of the spec but the signed request: its header and its payload."""
    return {
        "hello_child": (
            Hello(SITE, 1, 1, "child", ["codec:tensors"], 65536, 67108864, 15.0),
            b"",
        ),
        "hello_parent": (
            Hello(SERVER, 1, 1, "parent", ["codec:q8", "codec:tensors"], 65536, 67108864, 15.0),
            b"",
        ),
        "request": (
            Request(
                **{**_from_site(SITE_ID), "budget": 30.0},
                headers={},
                channel="jobs",
                topic="status",
                codec="",
            ),
            b"j-1",
        ),
        "reply": (
            Reply(**{**_from_server(SERVER_ID), "budget": 29.875}, headers={}, corr=SITE_ID),
            b"running",
        ),
        "error": (
            Error(
                **_from_server(SERVER_ID + 1),
                headers={},
                corr=SITE_ID,
                status=2,
                message="no request handler for jobs/status",
            ),
            b"",
        ),
        "event": (
            Event(
                **_from_site(SITE_ID + 2),
                headers={"job": "j-1"},
                channel="metrics",
                topic="loss",
            ),
            b"0.25",
        ),
        "ping": (Ping(seq=1), b""),
        "pong": (Pong(seq=1), b""),
        "bye": (Bye(reason="cell shutting down"), b""),
        "stream_open": (
            StreamOpen(
                **_from_site(SITE_ID + 4),
                headers={},
                channel="files",
                topic="upload",
                sid=SID,
                size=len(DATA),
                codec="",
                sha256=SHA,
                chunk=1 << 20,
                window=16 << 20,
                digest_alg="sha256",
            ),
            b"",
        ),
        "stream_ack": (
            StreamAck(
                **_from_server(SERVER_ID + 2),
                headers={},
                sid=SID,
                committed=0,
                limit=16 << 20,
                chunk=1 << 20,
                window=16 << 20,
            ),
            b"",
        ),
        "stream_data": (
            StreamData(**_from_site(SITE_ID + 5), headers={}, sid=SID, offset=0, crc=CRC),
            DATA,
        ),
        "stream_end": (
            StreamEnd(**_from_site(SITE_ID + 6), headers={}, sid=SID, size=len(DATA), sha256=SHA),
            b"",
        ),
        "stream_done": (
            StreamDone(
                **_from_server(SERVER_ID + 4), headers={}, sid=SID, sha256=SHA, received=len(DATA)
            ),
            b"stored",
        ),
        "stream_abort": (
            StreamAbort(
                **_from_server(SERVER_ID + 3),
                headers={},
                sid=SID,
                status=9,
                message="the chunk at 0 B failed its check 4 times in a row",
                sender=SITE,
            ),
            b"",
        ),
    }


def encode(header: Envelope, payload: bytes) -> bytes:
    """One frame as the real sending path writes it (``Connection.send``'s segments)."""
    segments = Connection().send(header, (payload,) if payload else ())
    return b"".join(bytes(s) for s in segments)


def receive(data: bytes, limits: Limits | None = None) -> list[Frame]:
    """Every frame the real receiving path makes of ``data``."""
    conn = Connection(limits)
    conn.receive_data(data)
    frames = []
    while isinstance(ev := conn.next_event(), Frame):
        frames.append(ev)
    return frames


def golden(name: str) -> bytes:
    return (GOLDEN / f"{name}.bin").read_bytes()


# ---------------------------------------------------------------- reading the spec
_BLOCK = re.compile(r"^```text golden=([\w-]+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HEXDUMP = re.compile(r"([0-9a-f]{8})  ((?:[0-9a-f]{2} {1,2})*[0-9a-f]{2}) *(?:  \|.*\|)?")
_ANNOTATED = re.compile(r" *((?:[0-9a-f]{2} )*[0-9a-f]{2})(?: {2,}\S.*)?")


def block_bytes(body: str) -> bytes:
    """The bytes of one listing: ``hexdump -C`` lines, or annotated lines (hex bytes, then a
    comment after two or more spaces); lines starting with ``--`` are section titles."""
    out = bytearray()
    for line in body.splitlines():
        if not line.strip() or line.lstrip().startswith("--"):
            continue
        if m := _HEXDUMP.fullmatch(line):
            assert int(m[1], 16) == len(out), f"offset {m[1]} after {len(out)} bytes: {line!r}"
            out += bytes.fromhex(m[2])
        elif m := _ANNOTATED.fullmatch(line):
            out += bytes.fromhex(m[1])
        else:
            raise AssertionError(f"not a byte listing line: {line!r}")
    return bytes(out)


def spec_blocks() -> list[tuple[str, bytes]]:
    return [(m[1], block_bytes(m[2])) for m in _BLOCK.finditer(SPEC.read_text())]


def spec_table(title: str) -> list[list[str]]:
    """The rows of the first table after the heading ``title`` (cells stripped, no header)."""
    text = SPEC.read_text()
    start = text.index(f"\n{title}\n")
    rows: list[list[str]] = []
    for line in text[start + len(title) + 2 :].splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])  # a cell may hold "\|"
            rows.append([c.strip() for c in cells])
        elif rows:
            break
    assert len(rows) > 2, f"no table after {title!r}"
    return rows[2:]  # past the header and the |---| line


# ---------------------------------------------------------------- spec and bytes agree
def test_every_golden_frame_is_shown_in_the_spec_byte_for_byte() -> None:
    shown = spec_blocks()
    names = {name for name, _ in shown}
    files = {p.stem for p in GOLDEN.glob("*.bin")}
    assert names == files, (
        f"in the spec only: {names - files}; in tests/golden only: {files - names}"
    )
    for name, data in shown:
        assert data == golden(name), f"docs/wire.md shows other bytes than {name}.bin"


def test_the_golden_frames_cover_every_kind_of_header() -> None:
    kinds = {type(receive(p.read_bytes())[0].header) for p in GOLDEN.glob("*.bin")}
    assert kinds == set(KINDS)
    assert set(KINDS) == set(TAGS)


@pytest.mark.parametrize("name", sorted(messages()))
def test_a_golden_frame_decodes_to_the_message_the_spec_describes(name: str) -> None:
    header, payload = messages()[name]
    data = golden(name)
    [frame] = receive(data)
    assert type(frame.header) is type(header)
    assert frame.header == header
    assert bytes(frame.parts[0]) == payload
    # The prefix, read by hand as the spec lays it out.
    magic, version, flags, header_len, payload_len = struct.unpack(">2sBBIQ", data[:16])
    assert (magic, version, flags) == (b"\xfa\x5c", 1, 0)
    assert 16 + header_len + payload_len == len(data)
    assert payload_len == len(payload)
    # The header is a msgpack array: [tag, field, field, ...], every field present.
    raw = msgspec.msgpack.decode(data[16 : 16 + header_len])
    assert isinstance(raw, list)
    assert raw[0] == TAGS[type(header)]
    assert raw[1:] == [getattr(header, f) for f in header.__struct_fields__]
    # The whole-buffer decoder (one WebSocket message) agrees.
    decoded, start = decode_frame(data, Limits())
    assert decoded == header
    assert data[start:] == payload


@pytest.mark.parametrize("name", sorted(messages()))
def test_encoding_the_spec_message_gives_the_golden_bytes(name: str) -> None:
    header, payload = messages()[name]
    assert encode(header, payload) == golden(name)
    assert encode_head(header, len(payload), Limits()) + payload == golden(name)


def test_frames_back_to_back_on_one_byte_stream_are_read_one_by_one() -> None:
    names = sorted(messages())
    stream = b"".join(golden(n) for n in names)
    frames = receive(stream)
    assert [f.header for f in frames] == [messages()[n][0] for n in names]


# ---------------------------------------------------------------- the spec's tables
def test_the_tag_table_is_the_code() -> None:
    rows = spec_table("### Tags")
    table = {row[2].strip("`"): int(row[0]) for row in rows}
    assert table == {cls.__name__: tag for cls, tag in TAGS.items()}
    for cls, tag in TAGS.items():
        assert cls.__struct_config__.tag == tag, cls.__name__


def _field_rows(title: str) -> list[tuple[int, str, str]]:
    return [(int(r[0]), r[1].strip("`"), r[3].strip("`")) for r in spec_table(title)]


def _default(field: msgspec.structs.FieldInfo) -> str:
    return "—" if field.default is msgspec.NODEFAULT else json.dumps(field.default)


def test_the_field_tables_are_the_code() -> None:
    routed = _field_rows("#### Routed fields (positions 1-6)")
    base = msgspec.structs.fields(Request)[:6]
    assert [(i, n) for i, n, _ in routed] == [(i, f.name) for i, f in enumerate(base, 1)]
    assert all(d == "—" for _, _, d in routed)
    for cls in KINDS:
        fields = msgspec.structs.fields(cls)
        own = fields[6:] if issubclass(cls, Routed) else fields
        first = 7 if issubclass(cls, Routed) else 1
        rows = _field_rows(f"#### `{cls.__name__}` (tag {TAGS[cls]})")
        want = [(i, f.name, _default(f)) for i, f in enumerate(own, first)]
        assert rows == want, cls.__name__


def test_the_status_table_is_the_code() -> None:
    rows = spec_table("### Statuses")
    assert {int(r[0]): r[1].strip("`") for r in rows} == {s.value: s.name for s in Status}


# ---------------------------------------------------------------- what the examples show
def test_the_two_hellos_make_a_session_both_ways() -> None:
    child = receive(golden("hello_child"), HELLO_LIMITS)[0].header
    parent = receive(golden("hello_parent"))[0].header
    assert isinstance(child, Hello)
    assert isinstance(parent, Hello)
    at_server = check_hello(parent, child, expect="child")
    at_site = check_hello(child, parent, expect="parent")
    assert at_server.version == at_site.version == 1
    assert at_server.capabilities == at_site.capabilities == {"codec:tensors"}
    assert at_site.peer_limits == Limits(max_header=65536, max_frame=64 << 20, max_route=1024)


def test_the_chunk_crc_is_crc32c_of_the_payload_alone() -> None:
    [frame] = receive(golden("stream_data"))
    h = frame.header
    assert isinstance(h, StreamData)
    payload = bytes(frame.parts[0])
    assert h.crc == crc32c.crc32c(payload) == crc32c_reference(payload) == CRC
    assert crc32c_reference(b"123456789") == 0xE3069283  # the standard check value
    [end] = receive(golden("stream_end"))
    assert isinstance(end.header, StreamEnd)
    assert end.header.sha256 == "sha256:" + hashlib.sha256(payload).hexdigest()


def test_the_whole_object_crc32c_of_the_spec_combines_the_chunk_crcs() -> None:
    from flare_async.streaming import CrcDigest, crc32c_combine  # noqa: PLC0415

    assert f"{crc32c_reference(DATA):08x}" == "c99465aa"  # the spec's value for DATA
    for cut in range(len(DATA) + 1):
        a, b = DATA[:cut], DATA[cut:]
        assert crc32c_combine(crc32c_reference(a), crc32c_reference(b), len(b)) == CRC
    digest = CrcDigest()
    assert digest.hexdigest() == "crc32c:00000000"  # the empty object
    digest.add(5, 6, crc32c_reference(DATA[5:]))  # out of order: held until the gap fills
    digest.add(0, 5, crc32c_reference(DATA[:5]))
    assert digest.hexdigest() == "crc32c:c99465aa"


def crc32c_reference(data: bytes) -> int:
    """CRC-32C as the spec defines it, bit by bit (reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------- the signed request
def _signing() -> MessageSigning:
    verifier = SignatureVerifier(CA_FILE.read_bytes())
    # Only checking here: the signer is never used.
    return MessageSigning(cast(Any, None), verifier, clock=lambda: AT + 60)


def test_the_signed_request_verifies_as_the_spec_says() -> None:
    [frame] = receive(golden("signed_request"))
    h = frame.header
    assert isinstance(h, Request)
    plain, payload = messages()["request"]
    assert msgspec.structs.replace(h, headers={}) == plain
    assert bytes(frame.parts[0]) == payload
    assert list(h.headers) == ["sig.fields", "sig.value", "sig.cert"]
    meta = hashlib.sha256(b'[{},""]').hexdigest()
    fields = {
        "at": AT,
        "cell": SITE,
        "dst": SERVER,
        "kind": "request",
        "meta": meta,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "src": SITE,
        "topic": "jobs/status",
    }
    assert h.headers["sig.fields"].encode() == canonical(fields)
    shown = SPEC.read_text()  # the listing of §13.6 (its bytes are checked as a golden block)
    assert f'\\"meta\\":\\"{meta}\\"' in shown
    assert f'\\"sha256\\":\\"{fields["sha256"]}\\"' in shown
    for key in ("sig.value", "sig.cert"):
        value = h.headers[key]
        assert f'"{key}":' in shown
        assert f'"{value[:20]}...{value[-12:]}"' in shown, key
    assert fields_of(frame) | {"src": SITE, "at": AT} == fields
    assert check(_signing(), frame) is None
    # Deterministic re-encoding of what was decoded.
    assert encode(h, payload) == golden("signed_request")


@pytest.mark.parametrize(
    "change",
    ["payload", "topic", "dst", "headers", "codec", "late"],
)
def test_the_signed_request_fails_once_changed(change: str) -> None:
    [frame] = receive(golden("signed_request"))
    h = frame.header
    assert isinstance(h, Request)
    parts: tuple[Any, ...] = frame.parts
    signing = _signing()
    if change == "payload":
        parts = (b"j-2",)
    elif change == "topic":
        h = msgspec.structs.replace(h, topic="stop")
    elif change == "dst":
        h = msgspec.structs.replace(h, dst="server.site-2")
    elif change == "headers":
        h = msgspec.structs.replace(h, headers={**h.headers, "job": "j-9"})
    elif change == "codec":
        h = msgspec.structs.replace(h, codec="tensors")
    else:
        signing.clock = lambda: AT + 301  # past MAX_AGE (300 s)
    assert isinstance(check(signing, Frame(h, parts)), IntegrityError)


# ---------------------------------------------------------------- receiver rules of the spec
def _frame(
    header: bytes, payload: bytes = b"", *, version: int = WIRE_VERSION, flags: int = 0
) -> bytes:
    return PREFIX.pack(MAGIC, version, flags, len(header), len(payload)) + header + payload


def _header_of(name: str) -> bytes:
    data = golden(name)
    (header_len,) = struct.unpack_from(">I", data, 4)
    return data[PREFIX_SIZE : PREFIX_SIZE + header_len]


def test_unknown_trailing_fields_are_ignored_and_missing_defaults_filled() -> None:
    header = _header_of("request")
    assert header[0] == 0x9A  # array of 10: the tag and 9 fields
    assert header.endswith(b"\xa6status\xa0")  # ..., topic, codec
    longer = b"\x9c" + header[1:] + b"\xa3new\x07"  # two fields a newer peer appended
    assert decode_header(longer, Limits()) == messages()["request"][0]
    shorter = b"\x99" + header[1:-1]  # without the trailing codec (default "")
    assert decode_header(shorter, Limits()) == messages()["request"][0]
    with pytest.raises(ProtocolError, match="at least length 9"):
        decode_header(b"\x98" + header[1:-8], Limits())  # topic (no default) is missing too


@pytest.mark.parametrize(
    "header",
    [
        b"\x92\x63\x01",  # unknown tag 99
        b"\x92\x0b\xa1x",  # Ping with a string seq
        b"\x81\x00\x0b",  # a map, not an array
        b"\x92\x0b\x01\xc0",  # trailing bytes after the array
    ],
)
def test_a_malformed_header_is_a_protocol_error(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        receive(_frame(header))


def test_the_prefix_is_checked_before_the_body() -> None:
    ping = _header_of("ping")
    with pytest.raises(ProtocolError, match="magic"):
        receive(b"\xfa\x5d" + _frame(ping)[2:])
    with pytest.raises(ProtocolError, match="version 2"):
        receive(_frame(ping, version=2))
    with pytest.raises(ProtocolError, match="empty header"):
        receive(_frame(b""))
    assert receive(_frame(ping, flags=0x80))[0].header == Ping(seq=1)  # flags: not checked
    with pytest.raises(FrameTooLarge):  # refused from the prefix alone: no body follows
        receive(PREFIX.pack(MAGIC, 1, 0, 64 * 1024 + 1, 0))
    with pytest.raises(FrameTooLarge):
        receive(PREFIX.pack(MAGIC, 1, 0, 3, (64 << 20) + 1))


def test_before_the_hello_only_a_small_frame_without_payload_is_read() -> None:
    assert receive(golden("hello_child"), HELLO_LIMITS)[0].header == messages()["hello_child"][0]
    assert receive(golden("bye"), HELLO_LIMITS)[0].header == Bye(reason="cell shutting down")
    with pytest.raises(FrameTooLarge):
        receive(golden("request"), HELLO_LIMITS)  # has a payload
    with pytest.raises(FrameTooLarge):
        receive(PREFIX.pack(MAGIC, 1, 0, 16 * 1024 + 1, 0), HELLO_LIMITS)


@pytest.mark.parametrize(
    "budget", [b"\xcb\x7f\xf8" + bytes(6), b"\xcb\x7f\xf0" + bytes(6)]
)  # NaN, inf
def test_a_budget_that_is_not_finite_is_a_protocol_error(budget: bytes) -> None:
    header = _header_of("request")
    at = header.index(b"\xcb\x40\x3e")  # budget 30.0
    with pytest.raises(ProtocolError, match="not a finite number"):
        receive(_frame(header[:at] + budget + header[at + 9 :]))


def test_an_integer_budget_is_read_as_seconds() -> None:
    header = _header_of("request")
    at = header.index(b"\xcb\x40\x3e")
    [frame] = receive(_frame(header[:at] + b"\x1e" + header[at + 9 :]))
    assert frame.header == messages()["request"][0]


# ---------------------------------------------------------------- regenerating
WIDTH = 9
"""Bytes per line of an annotated listing."""


def _mp_head(b: bytes, i: int) -> tuple[str, Any, int]:
    """One msgpack item's head at ``i``: (kind, value or length, end of the head)."""
    t = b[i]
    fixed = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    if t <= 0x7F or t >= 0xE0:
        return "int", t if t <= 0x7F else t - 256, i + 1
    if t in fixed:
        n = fixed[t]
        return "int", int.from_bytes(b[i + 1 : i + 1 + n], signed=t >= 0xD0), i + 1 + n
    if t == 0xC0:
        return "nil", None, i + 1
    if t in (0xC2, 0xC3):
        return "bool", t == 0xC3, i + 1
    if t == 0xCB:
        return "float", struct.unpack_from(">d", b, i + 1)[0], i + 9
    if 0xA0 <= t <= 0xBF:
        return "str", t & 0x1F, i + 1
    if t in (0xD9, 0xDA, 0xDB):
        n = {0xD9: 1, 0xDA: 2, 0xDB: 4}[t]
        return "str", int.from_bytes(b[i + 1 : i + 1 + n]), i + 1 + n
    if 0x90 <= t <= 0x9F:
        return "array", t & 0x0F, i + 1
    if t in (0xDC, 0xDD):
        n = 2 if t == 0xDC else 4
        return "array", int.from_bytes(b[i + 1 : i + 1 + n]), i + 1 + n
    if 0x80 <= t <= 0x8F:
        return "map", t & 0x0F, i + 1
    raise ValueError(f"msgpack type 0x{t:02x} is not used by the examples")


def annotate(data: bytes) -> str:
    """An annotated listing of one frame, as docs/wire.md shows them."""
    lines: list[str] = []

    def emit(chunk: bytes, depth: int, note: str) -> None:
        for k in range(0, len(chunk), WIDTH):
            hexes = " ".join(f"{x:02x}" for x in chunk[k : k + WIDTH])
            text = "  " * depth + hexes
            lines.append(f"{text:<34}{note}".rstrip() if k == 0 else text)

    def short(value: Any) -> str:
        text = json.dumps(value) if isinstance(value, str | bool) or value is None else repr(value)
        text = "nil" if value is None else text
        return text if len(text) <= 48 else text[:44] + '..."'

    def item(i: int, depth: int, label: str) -> int:
        kind, arg, j = _mp_head(data, i)
        if kind == "str":
            end: int = j + arg
            emit(data[i:end], depth, f"{label}{short(data[j:end].decode())}")
            return end
        if kind == "array":
            emit(data[i:j], depth, f"{label}array of {arg}")
            for n in range(arg):
                j = item(j, depth + 1, f"[{n}] ")
            return j
        if kind == "map":
            emit(data[i:j], depth, f"{label}map of {arg}")
            for _ in range(arg):
                j = item(j, depth + 1, "key ")
                j = item(j, depth + 1, "value ")
            return j
        emit(data[i:j], depth, f"{label}{short(arg)}")
        return j

    _, version, flags, header_len, payload_len = PREFIX.unpack_from(data)
    emit(data[0:2], 0, "magic")
    emit(data[2:3], 0, f"frame-layout version {version}")
    emit(data[3:4], 0, f"flags {flags}")
    emit(data[4:8], 0, f"header length = {header_len}")
    emit(data[8:16], 0, f"payload length = {payload_len}")
    lines.append(f"-- header: msgpack, {header_len} bytes --")
    header = decode_header(data[16 : 16 + header_len], Limits())
    cls = type(header)
    names = list(cls.__struct_fields__)
    kind, count, j = _mp_head(data, 16)
    assert kind == "array"
    fields = f"{len(names)} field{'s' if len(names) > 1 else ''}"
    emit(data[16:j], 0, f"array of {count}: the tag, then {fields}")
    emit(data[j : j + 1], 1, f"tag {data[j]}: {cls.__name__}")
    j += 1
    for name in names:
        value = getattr(header, name)
        label = f"{name} = "
        if name == "crc":
            label += f"0x{value:08x} = "
        elif name == "status":
            label += f"{Status(value).name} = "
        j = item(j, 1, label)
    if payload_len:
        lines.append(f"-- payload: {payload_len} bytes --")
        emit(data[j:], 0, short(data[j:].decode()))
    return "\n".join(lines)


def hexdump(data: bytes) -> str:
    """``hexdump -C`` without the closing offset line."""
    lines = []
    for k in range(0, len(data), 16):
        row = data[k : k + 16]
        left = " ".join(f"{x:02x}" for x in row[:8])
        right = " ".join(f"{x:02x}" for x in row[8:])
        text = "".join(chr(x) if 32 <= x < 127 else "." for x in row)
        lines.append(f"{k:08x}  {left:<23}  {right:<23}  |{text}|")
    return "\n".join(lines)


def _sign() -> None:
    """A new CA and a client certificate for SITE, and the request signed by it at AT."""
    now = datetime.fromtimestamp(AT, UTC)
    ca = create_ca("wire spec CA", now=now, days=3650)
    cert = issue_certificate(ca, SITE, "client", now=now, days=3650)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "cert.pem").write_bytes(cert.certificate_pem())
        (folder / "key.pem").write_bytes(cert.private_key_pem())
        (folder / "ca.pem").write_bytes(ca.certificate_pem())
        kit = Kit(
            name=SITE,
            role=Role.CLIENT,
            cert=str(folder / "cert.pem"),
            key=str(folder / "key.pem"),
            ca=str(folder / "ca.pem"),
        )
        signing = MessageSigning(
            Signer(kit), SignatureVerifier(ca.certificate_pem()), clock=lambda: AT
        )
        header, payload = messages()["request"]
        header = msgspec.structs.replace(header, headers={})
        frame = Frame(header, (payload,))
        seal(signing, frame)
        (GOLDEN / "signed_request.bin").write_bytes(encode(frame.header, payload))
    CA_FILE.write_bytes(ca.certificate_pem())


def main(argv: list[str]) -> None:
    GOLDEN.mkdir(exist_ok=True)
    what = argv[0] if argv else "doc"
    if what == "write":
        for name, (header, payload) in messages().items():
            (GOLDEN / f"{name}.bin").write_bytes(encode(header, payload))
    elif what == "sign":
        _sign()
    else:
        for path in sorted(GOLDEN.glob("*.bin")):
            data = path.read_bytes()
            body = hexdump(data) if path.stem == "signed_request" else annotate(data)
            print(f"```text golden={path.stem}\n{body}\n```\n")


if __name__ == "__main__":
    main(sys.argv[1:])
