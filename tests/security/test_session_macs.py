"""Session MACs (``security._sessions``): a first message to a peer is signed, what follows is
MAC'd with a key only the two ends can derive, and nothing a relay or another peer can do turns a
MAC into something the receiver accepts from the wrong sender, for the wrong receiver or with
other content. Audited commands stay signed.

The kits are real (one CA, P-256 keys); the messages are built and checked with the cell's own
``seal``/``check`` (``cell/_signing.py``), with a clock the test holds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flare_async import Cell, HandlerTable
from flare_async.cell import system_handlers
from flare_async.cell._signing import check, seal
from flare_async.errors import IntegrityError
from flare_async.security import (
    MessageSigning,
    SignatureVerifier,
    Signer,
    add_site,
    check_command,
    issue_certificate,
    load_ca,
    load_kit,
    write_certificate,
    write_private_key,
)
from flare_async.security._kits import Kit, Role
from flare_async.security._messages import AUDITED_CHANNELS
from flare_async.security._sessions import SALT, mac_key
from flare_async.testing import FaultyDriver
from flare_async.transport import MemoryNetwork
from flare_async.wire import Error, Frame, Reply, Request
from tests.security.test_signatures import NOW, RELAY, SITES, kits

A, B = SITES
S = "server"
T0 = NOW.timestamp()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kits(tmp_path_factory.mktemp("macs"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def signing(folder: Path, name: str, clock: Callable[[], float], **kw: Any) -> MessageSigning:
    ca = SignatureVerifier.from_kit(load_kit(folder / S))
    return MessageSigning(Signer(load_kit(folder / name)), ca, clock=clock, **kw)


def request(
    src: str,
    dst: str,
    body: bytes = b"hello",
    *,
    channel: str = "t",
    topic: str = "echo",
    headers: dict[str, str] | None = None,
    id: int = 1,
) -> Frame:
    return Frame(Request(id, src, dst, [src], None, dict(headers or {}), channel, topic), [body])


def reply(src: str, dst: str, corr: int, body: bytes = b"ok") -> Frame:
    return Frame(Reply(2, src, dst, [src], None, {}, corr), [body])


def sealed(signing: MessageSigning, frame: Frame) -> Frame:
    seal(signing, frame)
    return frame


def refused(signing: MessageSigning, frame: Frame) -> str:
    why = check(signing, frame)
    assert isinstance(why, IntegrityError), "accepted"
    return str(why)


def warm(a: MessageSigning, b: MessageSigning, src: str, dst: str) -> None:
    """``src`` asks ``dst`` (signed) and hears back (MAC'd): from now on both MAC."""
    first = sealed(a, request(src, dst))
    assert "sig.value" in first.header.headers
    assert check(b, first) is None
    answer = sealed(b, reply(dst, src, 1))
    assert "sig.mac" in answer.header.headers
    assert check(a, answer) is None


def with_headers(frame: Frame, **changes: str) -> Frame:
    h = frame.header
    return Frame(msgspec.structs.replace(h, headers={**h.headers, **changes}), frame.parts)


def der_of(kit: Kit) -> bytes:
    cert = x509.load_pem_x509_certificate(Path(kit.cert).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------- the protocol
def test_the_first_message_is_signed_and_everything_after_it_is_macd(folder: Path) -> None:
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    first = sealed(site, request(A, S))
    assert set(first.header.headers) == {"sig.fields", "sig.value", "sig.cert"}
    assert check(server, first) is None
    answer = sealed(server, reply(S, A, 1))
    h = answer.header.headers
    assert set(h) == {"sig.fields", "sig.mac", "sig.cert", "sig.to"}
    assert h["sig.to"] == hashlib.sha256(der_of(load_kit(folder / A))).hexdigest()
    assert check(site, answer) is None
    again = sealed(site, request(A, S, id=3))
    assert "sig.mac" in again.header.headers
    assert check(server, again) is None
    # Errors are MAC'd as well; a peer not heard from is signed to.
    err = Frame(Error(4, S, A, [S], None, {}, corr=3, status=5, message="no"))
    assert "sig.mac" in sealed(server, err).header.headers
    assert check(site, err) is None
    assert "sig.value" in sealed(server, request(S, B)).header.headers


def test_the_mac_is_what_the_spec_says(folder: Path) -> None:
    """An independent computation from docs/wire.md §8 (cryptography's primitives only)."""
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    frame = sealed(site, request(A, S, id=5))
    h = frame.header.headers
    site_kit, server_kit = load_kit(folder / A), load_kit(folder / S)
    key = serialization.load_pem_private_key(Path(server_kit.key).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    site_der = base64.b64decode(h["sig.cert"])
    assert site_der == der_of(site_kit)
    public = x509.load_der_x509_certificate(site_der).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    shared = key.exchange(ec.ECDH(), public)  # the receiver's side: ECDH(b, A)
    info = json.dumps(
        {
            "from": A,
            "from_cert": hashlib.sha256(site_der).hexdigest(),
            "to": S,
            "to_cert": hashlib.sha256(der_of(server_kit)).hexdigest(),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    assert SALT == b"flare-async sig.mac v1"
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=info).derive(shared)
    tag = hmac.new(k, h["sig.fields"].encode(), hashlib.sha256).digest()
    assert h["sig.mac"] == tag.hex()
    fields = json.loads(h["sig.fields"])
    assert (fields["src"], fields["dst"], fields["at"]) == (A, S, round(T0, 3))


def test_audited_commands_are_always_signed_and_never_taken_macd(folder: Path) -> None:
    """A MAC convinces only its receiver: job commands, kept in audit logs with their
    signature, stay signed; one that arrives MAC'd is refused by the cell and by
    ``check_command`` (which would otherwise put a MAC in the log as a signature)."""
    from flare_async.fl._jobs import CHANNEL  # noqa: PLC0415

    assert CHANNEL in AUDITED_CHANNELS
    clock = Clock()
    server, site = signing(folder, S, clock), signing(folder, A, clock)
    warm(server, site, S, A)
    start = sealed(server, request(S, A, b'{"id":"j1"}', channel="job", topic="start"))
    assert "sig.value" in start.header.headers  # signed, though the site's key is known
    assert check(site, start) is None
    value = check_command(
        site.verifier, start.header.headers, src=S, cell=S, dst=A, command="job/start",
        body=b'{"id":"j1"}', now=NOW,
    )  # fmt: skip
    assert value == start.header.headers["sig.value"]
    # A sender that MACs everything (a broken or hostile one): refused, and never audited.
    lax = signing(folder, S, clock, signed_channels=())
    warm(lax, site, S, A)
    macd = sealed(lax, request(S, A, b'{"id":"j1"}', channel="job", topic="start", id=9))
    assert "sig.mac" in macd.header.headers
    assert "audited" in refused(site, macd)
    with pytest.raises(IntegrityError, match="needs a signature"):
        check_command(
            site.verifier, macd.header.headers, src=S, cell=S, dst=A, command="job/start",
            body=b'{"id":"j1"}', now=NOW,
        )  # fmt: skip
    # Both a signature and a MAC: refused as well (which one would count?).
    both = with_headers(macd, **{"sig.value": start.header.headers["sig.value"]})
    assert "both" in refused(site, both)


# ---------------------------------------------------------------- hostile cases
@pytest.mark.parametrize(
    "change",
    ["payload", "topic", "dst", "header", "codec", "fields", "fields+payload", "mac", "to", "at"],
)
def test_a_relay_cannot_change_a_macd_message(folder: Path, change: str) -> None:
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    frame = sealed(site, request(A, S, b"rate=0.1", headers={"job": "j1"}, id=7))
    h = frame.header
    assert "sig.mac" in h.headers
    assert check(server, frame) is None
    fields = h.headers["sig.fields"]
    later = {**json.loads(fields), "at": T0 + 1}
    sha_new = hashlib.sha256(b"rate=9.9").hexdigest()
    changed = {
        "payload": Frame(h, [b"rate=9.9"]),
        "topic": Frame(msgspec.structs.replace(h, topic="stop"), frame.parts),
        "dst": Frame(msgspec.structs.replace(h, dst=B), frame.parts),
        "header": with_headers(frame, job="j2"),
        "codec": Frame(msgspec.structs.replace(h, codec="tensors"), frame.parts),
        "fields": with_headers(frame, **{"sig.fields": fields.replace("echo", "stop")}),
        "fields+payload": Frame(
            msgspec.structs.replace(
                h,
                headers={
                    **h.headers,
                    "sig.fields": fields.replace(hashlib.sha256(b"rate=0.1").hexdigest(), sha_new),
                },
            ),
            [b"rate=9.9"],
        ),
        "mac": with_headers(
            frame,
            **{"sig.mac": bytes(32).hex()},
        ),
        "to": with_headers(frame, **{"sig.to": "0" * 64}),
        "at": with_headers(frame, **{"sig.fields": json.dumps(later)}),
    }[change]
    why = refused(server, changed)
    expected = {
        "fields": "does not match",
        "fields+payload": "does not match",
        "mac": "does not match",
        "at": "does not match",
        "to": "MAC'd for certificate",
    }.get(change, "changed on the way")
    assert expected in why


def test_a_mac_made_with_another_pairs_or_directions_key_is_refused(folder: Path) -> None:
    clock = Clock()
    site_a, site_b, server = (signing(folder, n, clock) for n in (A, B, S))
    warm(site_a, server, A, S)
    warm(site_b, server, B, S)
    a_kit, b_kit, s_kit = (load_kit(folder / n) for n in (A, B, S))
    fp = {n: hashlib.sha256(der_of(k)).hexdigest() for n, k in ((A, a_kit), (B, b_kit), (S, s_kit))}

    def public(kit: Kit) -> ec.EllipticCurvePublicKey:
        key = x509.load_der_x509_certificate(der_of(kit)).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key

    frame = sealed(site_a, request(A, S, id=11))  # an honest A -> server MAC
    assert check(server, frame) is None
    data = frame.header.headers["sig.fields"].encode()
    keys = {
        "B -> server (another pair)": mac_key(Signer(b_kit), public(s_kit), S, fp[S]),
        "A -> B (another receiver)": mac_key(Signer(a_kit), public(b_kit), B, fp[B]),
        "server -> A (the other direction)": mac_key(Signer(s_kit), public(a_kit), A, fp[A]),
    }
    right = mac_key(Signer(a_kit), public(s_kit), S, fp[S])
    assert frame.header.headers["sig.mac"] == hmac.digest(right, data, "sha256").hex()
    for name, key in keys.items():
        tag = hmac.digest(key, data, "sha256").hex()
        assert "does not match" in refused(server, with_headers(frame, **{"sig.mac": tag})), name


def test_a_macd_message_replayed_to_another_destination_is_refused(folder: Path) -> None:
    clock = Clock()
    site, server, other = (
        signing(folder, A, clock),
        signing(folder, S, clock),
        signing(folder, B, clock),
    )
    warm(site, server, A, S)
    warm(site, other, A, B)
    frame = sealed(site, request(A, S, id=12))
    assert "sig.mac" in frame.header.headers
    to_b = Frame(msgspec.structs.replace(frame.header, dst=B), frame.parts)
    assert "MAC'd for certificate" in refused(other, to_b)  # made for the server's key
    b_fp = hashlib.sha256(der_of(load_kit(folder / B))).hexdigest()
    assert "does not match" in refused(other, with_headers(to_b, **{"sig.to": b_fp}))
    assert check(server, frame) is None  # where it was meant to go, it holds


def test_a_forged_certificate_is_refused_and_poisons_no_entry(folder: Path, tmp_path: Path) -> None:
    """``sig.cert`` of another CA (same name), expired, or naming another cell: refused; the
    receiver's entry for the name it claimed keeps the honest certificate (or stays absent)."""
    clock = Clock()
    site, server, other = (signing(folder, n, clock) for n in (A, S, B))
    warm(site, server, A, S)
    warm(site, other, A, B)
    assert other.sessions is not None
    known = other.sessions.for_sending(A, clock.now)
    assert known is not None
    honest = sealed(site, request(A, S, id=13))
    a_cert = honest.header.headers["sig.cert"]

    def cert_of(kit: Kit) -> str:
        return base64.b64encode(der_of(kit)).decode()

    foreign = load_kit(kits(tmp_path, "other") / A)  # A's name, another project's CA
    ca_dir = folder / "ca"
    ca = load_ca((ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes())
    old = issue_certificate(
        ca, A, Role.CLIENT, now=NOW - timedelta(days=30),
        not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1),
    )  # fmt: skip
    write_certificate(tmp_path / "old.pem", old.certificate)
    write_private_key(tmp_path / "old.key", old.private_key)
    expired = Kit(
        name=A, role=Role.CLIENT, cert=str(tmp_path / "old.pem"), key=str(tmp_path / "old.key"),
        ca=str(ca_dir / "ca.pem"),
    )  # fmt: skip
    forged = {
        "another CA": cert_of(foreign),
        "expired": cert_of(expired),
        "another name": cert_of(load_kit(folder / B)),
        "garbage": "!!!" + a_cert[3:],
        "missing": None,
    }
    for name, cert in forged.items():
        headers = {k: v for k, v in honest.header.headers.items() if k != "sig.cert"}
        if cert is not None:
            headers["sig.cert"] = cert
        bad = Frame(msgspec.structs.replace(honest.header, headers=headers), honest.parts)
        why = refused(server, bad)
        words = ("CA", "not valid", "signed with", "base64", "missing")
        assert any(w in why for w in words), (name, why)
    # Signed (not MAC'd) with the expired or foreign key: refused too, and nothing learned.
    for kit in (expired, foreign):
        liar = MessageSigning(Signer(kit), server.verifier, clock=clock)
        frame = sealed(liar, request(A, B, id=14))
        assert "sig.value" in frame.header.headers
        refused(other, frame)
        assert other.sessions.for_sending(A, clock.now) is known
    # B's valid certificate cannot speak for A: B's message claiming A is refused and the
    # server still MACs to A with A's certificate.
    b_signing = signing(folder, B, clock)
    posing = sealed(b_signing, request(B, S, id=15))
    posing = Frame(msgspec.structs.replace(posing.header, src=A), posing.parts)
    refused(server, posing)
    answer = sealed(server, reply(S, A, 13))
    assert answer.header.headers["sig.to"] == hashlib.sha256(base64.b64decode(a_cert)).hexdigest()
    assert check(site, answer) is None


def test_a_receiver_that_never_saw_the_sender_checks_the_carried_certificate(
    folder: Path,
) -> None:
    """The MAC key needs no state at the receiver: it derives it from the ``sig.cert`` the
    message carries, once the CA vouches for it. Without one, or with a cell that takes
    signatures only, a MAC'd message is refused."""
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    frame = sealed(site, request(A, S, id=16))
    fresh = signing(folder, S, clock)  # the server restarted with the same certificate
    assert fresh.sessions is not None
    assert len(fresh.sessions) == 0
    assert check(fresh, frame) is None
    stripped = {k: v for k, v in frame.header.headers.items() if k != "sig.cert"}
    bare = Frame(msgspec.structs.replace(frame.header, headers=stripped), frame.parts)
    assert "missing" in refused(signing(folder, S, clock), bare)
    strict = signing(folder, S, clock, session_macs=False)
    assert "signatures only" in refused(strict, frame)
    assert "sig.value" in sealed(strict, reply(S, A, 16)).header.headers


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sig.mac", "!" * 64),  # not hex
        ("sig.mac", "é" * 64),  # not ASCII
        ("sig.mac", "0" * 63),  # short
        ("sig.mac", "A" * 1_000_000),  # huge
        ("sig.mac", 12),  # not text
        ("sig.to", "z" * 64),  # not a fingerprint
        ("sig.to", "0" * 1_000_000),
        ("sig.cert", "A" * 1_000_000),
        ("sig.cert", b"bytes"),
        ("sig.fields", "{" * 1_000_000),
        ("sig.fields", None),
    ],
)
def test_malformed_signature_headers_are_refused_cleanly(
    folder: Path, key: str, value: object
) -> None:
    """Garbage in a ``sig.*`` header is an ``IntegrityError`` (answered, counted), never
    another exception that would reach the cell's receive loop, and never costly."""
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    frame = sealed(site, request(A, S, id=17))
    headers: dict[str, Any] = dict(frame.header.headers)
    if value is None:
        del headers[key]
    else:
        headers[key] = value
    bad = Frame(msgspec.structs.replace(frame.header, headers=headers), frame.parts)
    refused(server, bad)
    signed = sealed(site, request(A, B, id=18))  # the signature path: the same
    headers = dict(signed.header.headers)
    headers["sig.value" if key in ("sig.mac", "sig.to") else key] = value
    other = signing(folder, B, clock)
    refused(other, Frame(msgspec.structs.replace(signed.header, headers=headers), signed.parts))


@pytest.mark.parametrize("fields", [b"[1]", b"not json", b"[" * 20_000 + b"]" * 20_000])
def test_macd_fields_that_are_not_an_object_are_refused(folder: Path, fields: bytes) -> None:
    """Even with a MAC that holds (only a peer could make one), fields that are not a JSON
    object (or nest beyond the parser's depth) are an ``IntegrityError``."""
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    frame = sealed(site, request(A, S, id=19))
    s_kit = load_kit(folder / S)
    server_pub = x509.load_der_x509_certificate(der_of(s_kit)).public_key()
    assert isinstance(server_pub, ec.EllipticCurvePublicKey)
    key = mac_key(site.signer, server_pub, S, hashlib.sha256(der_of(s_kit)).hexdigest())
    tag = hmac.digest(key, fields, "sha256").hex()
    bad = with_headers(frame, **{"sig.fields": fields.decode(), "sig.mac": tag})
    assert "JSON" in refused(server, bad)


def test_the_caches_are_bounded_and_hold_only_verified_peers(folder: Path) -> None:
    clock = Clock()
    server = signing(folder, S, clock)
    assert server.sessions is not None
    server.sessions.capacity = 2
    for name in (A, B, RELAY):
        peer = signing(folder, name, clock)
        assert check(server, sealed(peer, request(name, S))) is None
    assert (len(server.sessions), server.sessions.certificates()) == (2, 2)
    assert server.sessions.for_sending(A, clock.now) is None  # the least recently heard left
    assert server.sessions.for_sending(RELAY, clock.now) is not None
    # Garbage certificates are refused before anything is kept.
    before = server.sessions.certificates()
    fresh = signing(folder, A, clock)
    for i in range(50):
        frame = sealed(fresh, request(A, S, id=i))
        refused(server, with_headers(frame, **{"sig.cert": base64.b64encode(bytes(i)).decode()}))
    assert server.sessions.certificates() == before


def test_a_macd_message_holds_300_s_and_not_a_moment_longer(folder: Path) -> None:
    """MAX_AGE at its edge, either way: a replay later than 300 s, or from a clock that far
    ahead, is refused; at exactly 300 s it holds."""
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    frame = sealed(site, request(A, S, id=30))
    assert "sig.mac" in frame.header.headers
    at = json.loads(frame.header.headers["sig.fields"])["at"]  # T0 to the millisecond
    for offset, holds in [(300.0, True), (300.001, False), (-300.0, True), (-300.001, False)]:
        clock.now = at + offset
        if holds:
            assert check(server, frame) is None, offset
        else:
            assert "not within 300 s" in refused(server, frame), offset


def test_a_peer_is_macd_to_for_exactly_60_s_after_it_was_heard(folder: Path) -> None:
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    heard = clock.now
    clock.now = heard + 60.0  # FRESH, at its edge: still MAC'd
    assert "sig.mac" in sealed(site, request(A, S, id=31)).header.headers
    clock.now = heard + 60.001
    assert "sig.value" in sealed(site, request(A, S, id=32)).header.headers


def test_a_peer_not_heard_from_is_signed_to_again(folder: Path) -> None:
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    assert "sig.mac" in sealed(site, request(A, S, id=20)).header.headers
    clock.now += 61  # FRESH (60 s) without a message from the server
    late = sealed(site, request(A, S, id=21))
    assert "sig.value" in late.header.headers
    assert check(server, late) is None


def test_a_receiver_with_a_new_certificate_refuses_then_is_learned(
    folder: Path, tmp_path: Path
) -> None:
    """B restarts with a new certificate: A's MAC for the old one is refused (``INTEGRITY``,
    saying why); the refusal carries B's new certificate, which A learns, so A's next message
    holds."""
    clock = Clock()
    copy = tmp_path / "kits"
    import shutil  # noqa: PLC0415

    shutil.copytree(folder, copy)
    site, old_b = signing(copy, A, clock), signing(copy, B, clock)
    warm(site, old_b, A, B)
    add_site(copy, B, "tls://127.0.0.1:19001", now=NOW, force=True)  # B's new kit
    new_b = signing(copy, B, clock)
    frame = sealed(site, request(A, B, id=22))
    assert "restarted with another" in refused(new_b, frame)
    err = sealed(new_b, Frame(Error(5, B, A, [B], None, {}, corr=22, status=9, message="no")))
    assert check(site, err) is None  # signed with B's new key; A now knows it
    again = sealed(site, request(A, B, id=23))
    assert "sig.mac" in again.header.headers
    assert check(new_b, again) is None


# ---------------------------------------------------------------- cells
@pytest.mark.anyio
async def test_cells_mac_after_the_first_exchange_and_catch_a_relay(folder: Path) -> None:
    """server -> relay -> site over memory: the first request is signed, the rest MAC'd; a
    relay that changes a MAC'd body or header is caught; job commands stay signed."""
    seen: list[Frame] = []

    def rewrite(frame: Frame) -> Frame:
        h = frame.header
        if isinstance(h, Request) and h.dst == A:
            seen.append(frame)
            if b"".join(bytes(p) for p in frame.parts) == b"evil":
                return Frame(h, (b"EVIL",))
            if h.headers.get("job") == "a":
                headers = {**h.headers, "job": "b"}
                return Frame(msgspec.structs.replace(h, headers=headers), frame.parts)
        return frame

    table = HandlerTable()

    @table.request("t", "echo")
    async def echo(ctx: Any, msg: Any) -> bytes:
        return msg.tobytes()

    @table.request("job", "ping")
    async def ping(ctx: Any, msg: Any) -> bytes:
        return b"pong"

    def make(name: str) -> MessageSigning:
        ca = SignatureVerifier.from_kit(load_kit(folder / S))
        return MessageSigning(Signer(load_kit(folder / name)), ca)

    net = MemoryNetwork()
    server = Cell(S, listen=["memory://server"], drivers=[net], signing=make(S))
    relay = Cell(
        RELAY,
        listen=[f"memory://{RELAY}"],
        parent="memory://server",
        drivers=[FaultyDriver(net, rewrite=rewrite)],
        handlers=[system_handlers()],
        signing=make(RELAY),
    )
    site = Cell(A, parent=f"memory://{RELAY}", drivers=[net], handlers=[table], signing=make(A))
    async with server, relay, site:
        await site.wait_parent()
        for i in range(3):
            assert (await server.request(A, "t", "echo", b"%d" % i)).tobytes() == b"%d" % i
        assert (await server.request(A, "job", "ping", b"")).tobytes() == b"pong"
        with pytest.raises(IntegrityError, match="changed on the way"):
            await server.request(A, "t", "echo", b"evil")
        with pytest.raises(IntegrityError, match="changed on the way"):
            await server.request(A, "t", "echo", b"x", headers={"job": "a"})
        assert (await server.request(A, "t", "echo", b"fine")).tobytes() == b"fine"
    kinds = ["sig.mac" in f.header.headers for f in seen]
    assert kinds == [False, True, True, False, True, True, True]
    assert site.statistics().bad_signatures == 2
    assert server.statistics().bad_signatures == 0


@pytest.mark.anyio
async def test_a_site_restarted_with_a_new_certificate_costs_one_refused_request(
    folder: Path, tmp_path: Path
) -> None:
    import shutil  # noqa: PLC0415

    copy = tmp_path / "kits"
    shutil.copytree(folder, copy)
    table = HandlerTable()

    @table.request("t", "echo")
    async def echo(ctx: Any, msg: Any) -> bytes:
        return msg.tobytes()

    def make(name: str) -> MessageSigning:
        ca = SignatureVerifier.from_kit(load_kit(copy / S))
        return MessageSigning(Signer(load_kit(copy / name)), ca)

    net = MemoryNetwork()
    server = Cell(S, listen=["memory://server"], drivers=[net], signing=make(S))
    site = Cell(A, parent="memory://server", drivers=[net], handlers=[table], signing=make(A))
    async with server, site:
        await site.wait_parent()
        for _ in range(2):
            assert (await server.request(A, "t", "echo", b"x")).tobytes() == b"x"
        add_site(copy, A, "tls://127.0.0.1:19001", now=NOW, force=True)
        site.signing = make(A)  # as a restart with the new kit would
        with pytest.raises(IntegrityError, match="restarted with another"):
            await server.request(A, "t", "echo", b"x")
        with anyio.fail_after(5):
            assert (await server.request(A, "t", "echo", b"y")).tobytes() == b"y"


def test_fields_of_is_message_fields() -> None:
    """The cell builds the fields itself (it runs twice per message); they must be exactly
    ``security.message_fields`` of the message, whatever its kind, headers and codec."""
    from flare_async.cell._signing import fields_of  # noqa: PLC0415
    from flare_async.security import message_fields, payload_digest  # noqa: PLC0415
    from flare_async.wire import Event  # noqa: PLC0415

    def meta(headers: dict[str, str], codec: str) -> str:
        text = json.dumps([headers, codec], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    sig = {"sig.mac": "m", "sig.to": "t", "sig.cert": "c", "sig.fields": "f", "sig.value": "v"}
    for headers in ({}, {"job": "j1"}, {**sig}, {**sig, "sig.job": "x"}):
        app = {k: v for k, v in headers.items() if k not in sig}
        for codec in ("", "tensors"):
            cases = [
                (
                    Request(1, A, S, [A], None, dict(headers), "c", "t", codec),
                    "request",
                    "c/t",
                    None,
                ),
                (Event(1, A, S, [A], None, dict(headers), "c", "t", codec), "event", "c/t", None),
                (Reply(1, A, S, [A], None, dict(headers), 7, codec), "reply", "reply", 7),
            ]
            for h, kind, topic, corr in cases:
                parts = [b"ab", b"cd"] if kind == "event" else [b"abcd"]
                expected = message_fields(
                    cell=A, dst=S, kind=kind, topic=topic, corr=corr,
                    digest=payload_digest(parts), meta=meta(app, codec),
                )  # fmt: skip
                assert fields_of(Frame(h, parts)) == expected
        err = Error(1, A, S, [A], None, dict(headers), corr=3, status=9, message="nope")
        assert fields_of(Frame(err)) == message_fields(
            cell=A, dst=S, kind="error", topic="error/9", corr=3,
            digest=payload_digest([b"nope"]), meta=meta(app, ""),
        )  # fmt: skip


def test_a_peer_cannot_mac_in_another_cells_name(folder: Path) -> None:
    """B holds a MAC key with the server; it MACs a message that says it comes from A, with
    its own (valid, known) certificate: refused, and the server's entry for A is not B's."""
    clock = Clock()
    site_a, site_b, server = (signing(folder, n, clock) for n in (A, B, S))
    warm(site_a, server, A, S)
    warm(site_b, server, B, S)
    assert site_b.sessions is not None
    to_server = site_b.sessions.for_sending(S, clock.now)
    assert to_server is not None
    frame = request(A, S, b"as A", id=30)
    fields = {**fields_of_frame(frame), "src": A, "at": round(clock.now, 3)}
    seal_as = site_b.sessions.mac(to_server, fields)  # B's key, B's certificate
    forged = with_headers(frame, **seal_as)
    assert "signed with" in refused(server, forged)
    assert server.sessions is not None
    peer = server.sessions.for_sending(A, clock.now)
    assert peer is not None
    assert peer.identity == A


def fields_of_frame(frame: Frame) -> dict[str, Any]:
    from flare_async.cell._signing import fields_of  # noqa: PLC0415

    return fields_of(frame)


def test_a_known_certificate_that_expired_is_refused(folder: Path) -> None:
    clock = Clock()
    site, server = signing(folder, A, clock), signing(folder, S, clock)
    warm(site, server, A, S)
    assert site.sessions is not None
    peer = site.sessions.for_sending(S, clock.now)
    assert peer is not None
    clock.now += 400 * 86400  # past both certificates (365 days)
    assert site.sessions.for_sending(S, clock.now) is None  # so the site would sign
    frame = request(A, S, id=31)
    fields = {**fields_of_frame(frame), "src": A, "at": round(clock.now, 3)}
    late = with_headers(frame, **site.sessions.mac(peer, fields))  # MAC'd all the same
    assert "not valid" in refused(server, late)


def test_only_a_peer_that_takes_macs_is_macd_to(folder: Path) -> None:
    """A cell says it takes MACs in what it signs (``"mac": "hmac-sha256"``, a field a receiver
    that predates MACs ignores); to a peer that never said so, every message stays signed."""
    clock = Clock()
    old = signing(folder, A, clock, session_macs=False)  # as a cell before issue 20 signs
    server = signing(folder, S, clock)
    first = sealed(old, request(A, S))
    assert "mac" not in json.loads(first.header.headers["sig.fields"])
    assert check(server, first) is None
    answer = sealed(server, reply(S, A, 1))
    assert "sig.value" in answer.header.headers  # not MAC'd: the old cell could not check it
    assert json.loads(answer.header.headers["sig.fields"])["mac"] == "hmac-sha256"
    assert check(old, answer) is None  # the extra field is ignored
    assert "sig.value" in sealed(old, request(A, S, id=2)).header.headers
    assert "sig.value" in sealed(server, reply(S, A, 2)).header.headers


def test_a_peer_that_stops_taking_macs_is_signed_to_again(folder: Path) -> None:
    """B restarts with MACs off: A's next MAC is refused ("signatures only"); B's signed error
    says nothing of MACs, so A forgets B's key and signs again."""
    clock = Clock()
    site, b = signing(folder, A, clock), signing(folder, B, clock)
    warm(site, b, A, B)
    strict = signing(folder, B, clock, session_macs=False)
    frame = sealed(site, request(A, B, id=40))
    assert "signatures only" in refused(strict, frame)
    err = sealed(strict, Frame(Error(6, B, A, [B], None, {}, corr=40, status=9, message="no")))
    assert check(site, err) is None
    again = sealed(site, request(A, B, id=41))
    assert "sig.value" in again.header.headers
    assert check(strict, again) is None
