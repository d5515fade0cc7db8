"""End-to-end signatures with real certificates: what a relay can no longer do unseen.

The kits are provisioned for the test (a real CA, real ECDSA keys). The FL test runs the server,
a relay and two sites as cells over ``memory://``; the relay's link to the server goes through a
driver that tampers the way a hostile relay would: it changes bytes of a site's result and
fixes the chunk CRCs (and strips the announced digest), or it puts an earlier round's signature
on a new result (a replay). The server must reject exactly that site's result, by name, keep it
out of the sum, and the round must complete with the other site.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import flare_async.client as flare
from flare_async import Cell, HandlerTable
from flare_async.cell import system_handlers
from flare_async.cell._inline import INLINE_HEADER, InlineInfo
from flare_async.errors import IntegrityError, Unreachable
from flare_async.fl import ClientRuntime, FLModel, FLServer, fedavg
from flare_async.fl._secagg import SecAggClient
from flare_async.fl._secure import SecureSite
from flare_async.security import (
    MESSAGE_MAX_AGE,
    MessageSigning,
    SignatureVerifier,
    Signer,
    check_command,
    load_kit,
    message_fields,
    payload_digest,
    provision,
)
from flare_async.streaming import checksum
from flare_async.testing import FaultyDriver
from flare_async.transport import MemoryNetwork
from flare_async.wire import Frame, Request, StreamData, StreamEnd, StreamOpen

RELAY = "server.relay-1"
SITES = [f"{RELAY}.site-1", f"{RELAY}.site-2"]
NOW = datetime.now(UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # training scripts in threads, real time


def kits(root: Path, project: str = "sig") -> Path:
    spec = root / f"{project}.toml"
    spec.write_text(f"""
project = "{project}"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:19000"]
[[relays]]
name = "{RELAY}"
parent = "tls://127.0.0.1:19000"
listen = ["tls://127.0.0.1:19001"]
[[clients]]
name = "{SITES[0]}"
parent = "tls://127.0.0.1:19001"
[[clients]]
name = "{SITES[1]}"
parent = "tls://127.0.0.1:19001"
""")
    provision(spec, root / project, now=NOW)
    return root / project


def test_a_signature_binds_origin_fields_and_certificate(tmp_path: Path) -> None:
    folder = kits(tmp_path)
    site = load_kit(folder / SITES[0])
    verifier = SignatureVerifier.from_kit(load_kit(folder / "server"))
    fields = {"src": SITES[0], "dst": "server", "task": "j:1:1", "sha256": "ab" * 32}
    headers = Signer(site).sign(fields)
    assert verifier.verify(headers, src=SITES[0], expect=fields, now=NOW) == fields
    with pytest.raises(IntegrityError, match="changed on the way"):
        verifier.verify(headers, src=SITES[0], expect={**fields, "task": "j:2:1"}, now=NOW)
    with pytest.raises(IntegrityError, match="signed with"):
        verifier.verify(headers, src=SITES[1], expect=fields, now=NOW)  # site-1's, as site-2
    with pytest.raises(IntegrityError, match="not valid"):
        verifier.verify(headers, src=SITES[0], expect=fields, now=NOW + timedelta(days=400))
    forged = {**headers, "sig.fields": headers["sig.fields"].replace("j:1:1", "j:2:1")}
    with pytest.raises(IntegrityError, match="does not match"):
        verifier.verify(forged, src=SITES[0], expect={}, now=NOW)
    with pytest.raises(IntegrityError, match="not signed"):
        verifier.verify({}, src=SITES[0], expect={}, now=NOW)
    other = load_kit(kits(tmp_path, "other") / SITES[0])  # same name, another project's CA
    with pytest.raises(IntegrityError, match="CA"):
        verifier.verify(Signer(other).sign(fields), src=SITES[0], expect=fields, now=NOW)
    with pytest.raises(ValueError, match="cannot sign for"):
        Signer(site).sign({**fields, "src": SITES[1]})


def test_a_signed_message_binds_its_cell_topic_destination_body_answer_and_time(
    tmp_path: Path,
) -> None:
    folder = kits(tmp_path)
    ca = SignatureVerifier.from_kit(load_kit(folder / "server"))
    t0 = NOW.timestamp()
    server = MessageSigning(Signer(load_kit(folder / "server")), ca, clock=lambda: t0)
    site = MessageSigning(Signer(load_kit(folder / SITES[0])), ca, clock=lambda: t0 + 10)
    body = b'{"id": "j1"}'

    def fields(
        kind: str = "request",
        cell: str = "server",
        dst: str = SITES[0],
        topic: str = "job/start",
        corr: int | None = None,
        meta: str = "m",
        payload: bytes = body,
    ) -> dict[str, Any]:
        digest = payload_digest([payload])
        return message_fields(
            cell=cell, dst=dst, kind=kind, topic=topic, corr=corr, digest=digest, meta=meta
        )

    headers = server.sign(fields())
    site.verify(headers, fields())
    assert (
        check_command(
            ca, headers, src="server", cell="server", dst=SITES[0], command="job/start",
            body=body, now=NOW,
        )
        == headers["sig.value"]
    )  # fmt: skip
    bad: list[tuple[dict[str, Any], str]] = [
        (fields(topic="job/abort"), "changed on the way"),
        (fields(dst=SITES[1]), "changed on the way"),
        (fields(payload=b"{}"), "changed on the way"),
        (fields(kind="event"), "changed on the way"),
        (fields(meta="other"), "changed on the way"),
        (fields(cell=SITES[1]), "signed with"),
    ]
    for changed, why in bad:
        with pytest.raises(IntegrityError, match=why):
            site.verify(headers, changed)
    with pytest.raises(IntegrityError, match="not signed"):
        site.verify({}, fields())
    late = MessageSigning(site.signer, ca, clock=lambda: t0 + MESSAGE_MAX_AGE + 1)
    with pytest.raises(IntegrityError, match="replay"):
        late.verify(headers, fields())
    # An answer is bound to the request it answers.
    answer = {"kind": "reply", "cell": SITES[0], "dst": "server", "topic": "reply"}
    reply = site.sign(fields(**answer, corr=7, payload=b"ok"))
    server.verify(reply, fields(**answer, corr=7, payload=b"ok"))
    with pytest.raises(IntegrityError, match="changed on the way"):
        server.verify(reply, fields(**answer, corr=8, payload=b"ok"))


def test_every_application_header_is_signed_whatever_its_name(tmp_path: Path) -> None:
    """Only the signature's three headers are left out of what it covers: a relay that changes
    (or adds) an application header named ``sig.something`` is caught like any other."""
    from flare_async.cell._signing import check, seal  # noqa: PLC0415 - the cell's own part

    folder = kits(tmp_path)
    ca = SignatureVerifier.from_kit(load_kit(folder / "server"))
    server = MessageSigning(Signer(load_kit(folder / "server")), ca)
    site = MessageSigning(Signer(load_kit(folder / SITES[0])), ca)

    def request(headers: dict[str, str]) -> Frame:
        h = Request(1, "server", SITES[0], ["server"], None, headers, "job", "start")
        return Frame(h, [b"{}"])

    frame = request({"sig.job": "j1", "job": "j1"})
    seal(server, frame)
    assert check(site, frame) is None
    for key, value in [("sig.job", "j2"), ("sig.extra", "x"), ("job", "j2")]:
        changed = request({**frame.header.headers, key: value})
        assert "changed on the way" in str(check(site, changed))


@pytest.mark.anyio
async def test_cells_that_sign_refuse_a_changed_forged_or_unsigned_message(
    tmp_path: Path,
) -> None:
    """server -> relay -> site over the memory transport, every cell signing with its kit; the
    relay rewrites one request body on the way; a cell without a kit cannot get a request in."""
    folder = kits(tmp_path)
    ca = SignatureVerifier.from_kit(load_kit(folder / "server"))

    def signing(name: str) -> MessageSigning:
        return MessageSigning(Signer(load_kit(folder / name)), ca)

    def rewrite(frame: Frame) -> Frame:
        h = frame.header
        if isinstance(h, Request) and h.topic == "echo" and bytes(frame.parts[0]) == b"evil":
            return Frame(h, (b"EVIL",))
        if isinstance(h, Request) and h.headers.get("job") == "a":  # sent on for another job
            return Frame(msgspec.structs.replace(h, headers={**h.headers, "job": "b"}), frame.parts)
        return frame

    table = HandlerTable()

    @table.request("t", "echo")
    async def echo(ctx: Any, msg: Any) -> bytes:
        return msg.tobytes()

    net = MemoryNetwork()
    server = Cell("server", listen=["memory://server"], drivers=[net], signing=signing("server"))
    relay = Cell(
        RELAY,
        listen=[f"memory://{RELAY}"],
        parent="memory://server",
        drivers=[FaultyDriver(net, rewrite=rewrite)],
        handlers=[system_handlers()],
        signing=signing(RELAY),
    )
    site = Cell(
        SITES[0],
        parent=f"memory://{RELAY}",
        drivers=[net],
        handlers=[table],
        signing=signing(SITES[0]),
    )
    stranger = Cell(SITES[1], parent=f"memory://{RELAY}", drivers=[net])  # no kit, no signing
    async with server, relay, site, stranger:
        await site.wait_parent()
        await stranger.wait_parent()
        assert (await server.request(SITES[0], "t", "echo", b"fine")).tobytes() == b"fine"
        with pytest.raises(IntegrityError, match="changed on the way"):
            await server.request(SITES[0], "t", "echo", b"evil")
        with pytest.raises(IntegrityError, match="changed on the way"):
            await server.request(SITES[0], "t", "echo", b"x", headers={"job": "a"})
        with pytest.raises(IntegrityError, match="not signed"):
            await stranger.request(SITES[0], "t", "echo", b"hi")
        # the relay's own messages are signed too: its answers for the path verify
        with pytest.raises(Unreachable):
            await server.request(f"{RELAY}.nobody", "t", "echo", b"x")
        assert site.statistics().bad_signatures == 3
        assert server.statistics().bad_signatures == 0


def add_weight() -> None:
    i = int(flare.get_config()["site_index"])
    while (model := flare.receive()) is not None:
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": i + 1}))


class HostileRelay:
    """Rewrites what the relay forwards (see the module text)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.results: list[int] = []  # site-1's result streams, in order
        self.first_signature: dict[str, str] | None = None
        self.tampered = 0
        self.seen = b""
        self.task_sid: int | None = None

    def _task(self, frame: Frame) -> Frame:
        h = frame.header
        if isinstance(h, StreamOpen) and h.topic == "task" and h.dst == SITES[0]:
            if self.task_sid is None:
                self.task_sid = h.sid
                return Frame(msgspec.structs.replace(h, sha256="", digest=False), frame.parts)
            return frame
        if getattr(h, "sid", None) != self.task_sid or getattr(h, "dst", None) != SITES[0]:
            return frame
        if isinstance(h, StreamEnd):
            return Frame(msgspec.structs.replace(h, sha256=""), frame.parts)
        if isinstance(h, StreamData) and h.offset == 0 and frame.parts:
            data = bytearray(frame.parts[0])
            data[-1] ^= 0xFF
            self.tampered += 1
            return Frame(msgspec.structs.replace(h, crc=checksum(data)), (bytes(data),))
        return frame

    def _inline(self, frame: Frame) -> Frame:
        """The same tampering with a small result sent whole in one request."""
        h = frame.header
        assert isinstance(h, Request)
        if h.topic != "result" or h.src != SITES[0] or self.mode not in ("bytes", "replay"):
            return frame
        self.results.append(h.id)
        info = msgspec.json.decode(h.headers[INLINE_HEADER], type=InlineInfo)
        if self.mode == "bytes" and len(self.results) == 1:
            data = bytearray(b"".join(bytes(p) for p in frame.parts))
            data[-1] ^= 0xFF  # a tensor value; and no digest to compare with on the way
            info = msgspec.structs.replace(info, sha256="")
            self.tampered += 1
        elif self.mode == "replay":
            if self.first_signature is None:
                self.first_signature = dict(info.trailer)
                return frame
            self.tampered += 1  # round 1: round 0's signature on round 1's result
            info = msgspec.structs.replace(info, trailer=self.first_signature)
            data = bytearray(b"".join(bytes(p) for p in frame.parts))
        else:
            return frame
        headers = {**h.headers, INLINE_HEADER: msgspec.json.encode(info).decode()}
        return Frame(msgspec.structs.replace(h, headers=headers), (bytes(data),))

    def __call__(self, frame: Frame) -> Frame:
        h = frame.header
        if self.mode == "task":  # changes the model it passes down to site-1, once
            return self._task(frame)
        if self.mode == "start":  # changes the script of the job the server starts on site-1
            if isinstance(h, Request) and h.topic == "start" and h.dst == SITES[0]:
                body = b"".join(bytes(p) for p in frame.parts)
                self.tampered += 1
                return Frame(h, (body.replace(b"add_site_weight", b"dies_at_site_3"),))
            return frame
        if self.mode == "snoop":  # reads everything site-1 sends up, changes nothing
            if isinstance(h, StreamData) and h.src == SITES[0]:
                self.seen += b"".join(bytes(p) for p in frame.parts)
            return frame
        if isinstance(h, Request) and INLINE_HEADER in h.headers:
            return self._inline(frame)
        if isinstance(h, StreamOpen) and h.topic == "result" and h.src == SITES[0]:
            self.results.append(h.sid)
            if self.mode == "bytes" and len(self.results) == 1:
                # round 0: nobody may check the digest on the way
                return Frame(msgspec.structs.replace(h, sha256="", digest=False), frame.parts)
            return frame
        if not self.results or getattr(h, "sid", None) != self.results[-1]:
            return frame
        if self.mode == "bytes" and len(self.results) == 1:
            if isinstance(h, StreamEnd):  # no digest to compare with either
                return Frame(msgspec.structs.replace(h, sha256=""), frame.parts)
            if isinstance(h, StreamData) and h.offset == 0 and frame.parts:
                data = bytearray(frame.parts[0])
                data[-1] ^= 0xFF  # the last byte of the first chunk: a tensor value
                self.tampered += 1
                return Frame(msgspec.structs.replace(h, crc=checksum(data)), (bytes(data),))
        if self.mode == "replay" and isinstance(h, StreamEnd):
            signature = {k: v for k, v in h.headers.items() if k.startswith("sig.")}
            if self.first_signature is None:
                self.first_signature = signature  # round 0: let it through, keep it
                return frame
            self.tampered += 1  # round 1: round 0's signature on round 1's result
            headers = {**h.headers, **self.first_signature}
            return Frame(msgspec.structs.replace(h, headers=headers), frame.parts)
        return frame


@pytest.mark.anyio
@pytest.mark.parametrize("inline_max", [0, None], ids=["streamed", "whole"])
@pytest.mark.parametrize("mode", ["bytes", "replay"])
async def test_a_tampering_relay_is_caught_and_the_round_goes_on(
    tmp_path: Path, mode: str, inline_max: int | None
) -> None:
    folder = kits(tmp_path)
    net = MemoryNetwork()
    hostile = HostileRelay(mode)
    rejected: list[tuple[str, str, str]] = []
    rounds: list[Any] = []
    server_cell = Cell("server", listen=["memory://server"], drivers=[net])
    server = FLServer(
        server_cell,
        SITES,
        job="j",
        verifier=SignatureVerifier.from_kit(load_kit(folder / "server")),
        on_reject=lambda *r: rejected.append(r),
        on_round=rounds.append,
    )
    server_cell.mount(server.handlers())
    relay = Cell(
        RELAY,
        listen=[f"memory://{RELAY}"],
        parent="memory://server",
        drivers=[FaultyDriver(net, rewrite=hostile)],
        handlers=[system_handlers()],
    )
    runtimes = []
    for i, name in enumerate(SITES):
        cell = Cell(name, parent=f"memory://{RELAY}", drivers=[net], inline_max=inline_max)
        runtime = ClientRuntime(
            cell, "server", config={"site_index": i}, signer=Signer(load_kit(folder / name))
        )
        cell.mount(runtime.handlers())
        runtimes.append(runtime)
    async with server_cell, relay, runtimes[0].cell, runtimes[1].cell:
        for r in runtimes:
            await r.cell.wait_parent()
        async with anyio.create_task_group() as tg:
            for r in runtimes:
                tg.start_soon(r.run_script, add_weight)
            out = await fedavg(
                server, {"w": np.zeros(64, np.float32)}, rounds=2, min_responses=1, deadline=10
            )
            for r in runtimes:
                r.stop()
    assert hostile.tampered >= 1
    bad = 0 if mode == "bytes" else 1  # the round the relay tampered with
    assert rounds[bad].responded == [SITES[1]]
    assert "IntegrityError" in rounds[bad].failed[SITES[0]]
    assert [(site, why.split(":")[0]) for site, _, why in rejected] == [
        (SITES[0], "IntegrityError")
    ]
    # Only untampered results are in the model: site-2 adds 2 in the tampered round.
    expected = {"bytes": 2 + (1 + 4) / 3, "replay": (1 + 4) / 3 + 2}[mode]
    assert np.allclose(out.params["w"], expected)


def test_a_payload_sealed_for_the_server_opens_only_there(tmp_path: Path) -> None:
    from flare_async.security import Decryptor, encrypt_for  # noqa: PLC0415

    folder = kits(tmp_path)
    server_cert = load_kit(folder / "server").cert
    der = x509.load_pem_x509_certificate(Path(server_cert).read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    secret = np.arange(100_000, dtype=np.float64).tobytes()
    sealed = encrypt_for(der, [secret[:12345], secret[12345:]], block=65536)
    assert secret[1000:1064] not in b"".join(sealed)  # what a relay sees
    opened = b"".join(Decryptor(load_kit(folder / "server")).decrypt(sealed))
    assert opened == secret
    with pytest.raises(IntegrityError, match="does not open"):
        list(Decryptor(load_kit(folder / SITES[0])).decrypt(sealed))  # another key
    damaged = list(sealed)
    damaged[3] = damaged[3][:-1] + bytes([damaged[3][-1] ^ 1])
    with pytest.raises(IntegrityError, match="block 2"):
        list(Decryptor(load_kit(folder / "server")).decrypt(damaged))
    path, out = tmp_path / "sealed.bin", tmp_path / "opened.bin"
    path.write_bytes(b"".join(sealed))
    Decryptor(load_kit(folder / "server")).decrypt_file(path, out)
    assert out.read_bytes() == secret


def test_advertised_secagg_keys_are_signed_and_a_swapped_key_is_caught(tmp_path: Path) -> None:
    """The server relays every site's secure-aggregation keys to the others; a server or relay
    that swaps a site's keys for its own (to unmask that site) is caught by the other sites."""
    folder = kits(tmp_path)
    verifier = SignatureVerifier.from_kit(load_kit(folder / "server"))
    sites = {name: SecureSite(Signer(load_kit(folder / name)), verifier) for name in SITES}
    adv = {
        name: sites[name].handle(
            {"session": "s1", "step": "keys", "id": i + 1, "layout": [["w", [4]]], "scale": 2.0}
        )
        for i, name in enumerate(SITES)
    }
    public = {
        str(i + 1): [adv[n]["cipher"], adv[n]["mask"], n, adv[n]["sig"]]
        for i, n in enumerate(SITES)
    }

    def share(keys: dict[str, list[Any]]) -> dict[str, Any]:
        return sites[SITES[0]].handle(
            {"session": "s1", "step": "share", "keys": keys, "threshold": 2}
        )

    evil = SecAggClient(2, 5).advertise()
    evil_keys = [base64.b64encode(evil.cipher).decode(), base64.b64encode(evil.mask).decode()]
    with pytest.raises(IntegrityError, match="changed on the way"):
        share({**public, "2": [*evil_keys, SITES[1], adv[SITES[1]]["sig"]]})
    with pytest.raises(IntegrityError, match="without a signature"):
        share({**public, "2": public["2"][:2]})
    with pytest.raises(IntegrityError, match="signed with"):  # site-2's keys posing as site-1's
        share({**public, "2": [*public["2"][:2], SITES[0], adv[SITES[1]]["sig"]]})
    assert set(share(public)) == {"2"}  # the honest keys: a share for the other site
