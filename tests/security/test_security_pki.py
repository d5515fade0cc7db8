"""Certificates, identities, claims and mutual TLS, with real keys and real handshakes.

Handshakes run over ``ssl.MemoryBIO`` pairs in this thread: the bytes each side writes are
handed to the other until both finish or one fails. No sockets, no threads, no sleeps.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flare_async.errors import ConfigError, IdentityError, InvalidName
from flare_async.security import (
    CertificateAuthority,
    Identity,
    Kit,
    Role,
    check_claim,
    client_context,
    create_ca,
    identity_from_certificate,
    issue_certificate,
    load_ca,
    peer_identity,
    server_context,
    write_certificate,
    write_private_key,
)

# The real clock (OpenSSL checks validity against it in the handshakes), to the second as
# certificates store it.
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return create_ca("test root CA", now=NOW, org="example.org")


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return create_ca("someone else's CA", now=NOW)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# ------------------------------------------------------------------------------------ the CA
def test_ca_is_a_self_signed_p256_root_that_issues_directly(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    ca.certificate.verify_directly_issued_by(ca.certificate)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    assert isinstance(ca.private_key.curve, ec.SECP256R1)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "example.org"
    assert cert.not_valid_after_utc - NOW == timedelta(days=3650)


def test_load_ca_round_trips_and_refuses_mismatches(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    again = load_ca(ca.certificate_pem(), ca.private_key_pem())
    assert again.certificate == ca.certificate
    assert again.private_key.public_key() == ca.private_key.public_key()
    with pytest.raises(ConfigError, match="does not belong"):
        load_ca(ca.certificate_pem(), other_ca.private_key_pem())
    leaf = issue_certificate(ca, "server", "server", now=NOW)
    with pytest.raises(ConfigError, match="not a CA"):
        load_ca(leaf.certificate_pem(), leaf.private_key_pem())
    with pytest.raises(ConfigError, match="cannot load"):
        load_ca(b"not pem", ca.private_key_pem())


# ------------------------------------------------------------------------- participant certs
@pytest.mark.parametrize(
    ("role", "server_auth"),
    [("server", True), ("relay", True), ("client", False), ("admin", False)],
)
def test_issued_certificate_chains_to_the_ca_and_carries_name_and_role(
    ca: CertificateAuthority, role: str, server_auth: bool
) -> None:
    name = "admin@example.org" if role == "admin" else "server.eu.site-3"
    hosts = ["localhost", "127.0.0.1", "::1"] if server_auth else []
    issued = issue_certificate(ca, name, role, now=NOW, org="hospital-a", hosts=hosts)
    cert = issued.certificate
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "hospital-a"
    san = _san(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:flare-async:cell:{name}",
        f"urn:flare-async:role:{role}",
    ]
    assert san.get_values_for_type(x509.DNSName) == (["localhost"] if server_auth else [])
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == (
        ["127.0.0.1", "::1"] if server_auth else []
    )
    expected = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server_auth:
        expected.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    assert _eku(cert) == expected
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False
    assert isinstance(issued.private_key.curve, ec.SECP256R1)
    assert cert.public_key() == issued.private_key.public_key()
    assert identity_from_certificate(cert) == Identity(name, Role(role), "hospital-a")


def test_a_certificate_from_another_ca_does_not_chain(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    foreign = issue_certificate(other_ca, "server.eu", "relay", now=NOW, hosts=["localhost"])
    foreign.certificate.verify_directly_issued_by(other_ca.certificate)
    with pytest.raises(ValueError, match="subject does not match"):
        foreign.certificate.verify_directly_issued_by(ca.certificate)
    # A look-alike CA with the same subject but its own key: the signature gives it away.
    lookalike = create_ca("someone else's CA", now=NOW)
    assert lookalike.certificate.subject == other_ca.certificate.subject
    with pytest.raises(InvalidSignature):
        foreign.certificate.verify_directly_issued_by(lookalike.certificate)


def test_validity_window_is_configurable_and_can_be_in_the_past(ca: CertificateAuthority) -> None:
    default = issue_certificate(ca, "server", Role.SERVER, now=NOW).certificate
    assert default.not_valid_before_utc == NOW - timedelta(minutes=10)
    assert default.not_valid_after_utc == NOW + timedelta(days=365)
    short = issue_certificate(ca, "server", Role.SERVER, now=NOW, days=2).certificate
    assert short.not_valid_after_utc == NOW + timedelta(days=2)
    expired = issue_certificate(
        ca,
        "server.a",
        "client",
        now=NOW,
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    ).certificate
    assert expired.not_valid_after_utc < NOW
    assert expired.not_valid_before_utc == NOW - timedelta(days=30)


def test_bad_validity_and_naive_times_are_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(ConfigError, match="timezone-aware"):
        issue_certificate(ca, "server", "server", now=datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match="empty validity"):
        issue_certificate(ca, "server", "server", now=NOW, not_after=NOW - timedelta(hours=1))
    with pytest.raises(ConfigError, match="empty validity"):
        create_ca("x", now=NOW, days=-1)


def test_names_roles_and_hosts_are_checked(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidName):
        issue_certificate(ca, "server..eu", "client", now=NOW)
    with pytest.raises(InvalidName):
        issue_certificate(ca, "admin@example.org", "client", now=NOW)  # not a cell name
    with pytest.raises(InvalidName):
        issue_certificate(ca, "../etc", "admin", now=NOW)
    with pytest.raises(ConfigError, match="unknown role"):
        issue_certificate(ca, "server", "root", now=NOW)
    with pytest.raises(ConfigError, match="only server and relay"):
        issue_certificate(ca, "server.a", "client", now=NOW, hosts=["localhost"])
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS"):
        issue_certificate(ca, "server", "server", now=NOW, hosts=["bad_host!"])


def test_a_deep_name_is_cut_in_the_cn_but_whole_in_the_identity(ca: CertificateAuthority) -> None:
    name = ".".join(["server", *(f"level-{i:02d}-{'x' * 20}" for i in range(5))])
    assert len(name) > 64
    cert = issue_certificate(ca, name, "client", now=NOW).certificate
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert len(cn) == 64
    assert identity_from_certificate(cert).name == name


# ------------------------------------------------------------------------------- key files
@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_key_files_are_0600_and_never_reused(tmp_path: Path, ca: CertificateAuthority) -> None:
    key_path = tmp_path / "key.pem"
    cert_path = tmp_path / "cert.pem"
    write_private_key(key_path, ca.private_key)
    write_certificate(cert_path, ca.certificate)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert loaded.public_key() == ca.private_key.public_key()
    with pytest.raises(FileExistsError):
        write_private_key(key_path, ca.private_key)
    # An existing file with loose permissions is replaced, not reused.
    key_path.chmod(0o666)
    write_private_key(key_path, ca.private_key, overwrite=True)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # A symlink planted at the key's path is not followed.
    target = tmp_path / "elsewhere"
    link = tmp_path / "planted.pem"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_private_key(link, ca.private_key)
    assert not target.exists()


# ------------------------------------------------------------------------------ identities
def _bare_certificate(ca: CertificateAuthority, san: list[x509.GeneralName] | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.eu")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca.private_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_identity_reads_der_pem_and_parsed_certificates(ca: CertificateAuthority) -> None:
    issued = issue_certificate(ca, "server.eu", "relay", now=NOW, org="eu", hosts=["localhost"])
    der = issued.certificate.public_bytes(serialization.Encoding.DER)
    expected = Identity("server.eu", Role.RELAY, "eu")
    assert identity_from_certificate(der) == expected
    assert identity_from_certificate(issued.certificate_pem()) == expected
    assert identity_from_certificate(issued.certificate) == expected


@pytest.mark.parametrize(
    ("san", "match"),
    [
        (None, "no SubjectAlternativeName"),
        ([x509.DNSName("server.eu")], "exactly one"),  # the CN is never used instead
        ([x509.UniformResourceIdentifier("urn:flare-async:cell:server.eu")], "exactly one"),
        (
            [
                x509.UniformResourceIdentifier("urn:flare-async:cell:server.eu"),
                x509.UniformResourceIdentifier("urn:flare-async:cell:server.us"),
                x509.UniformResourceIdentifier("urn:flare-async:role:relay"),
            ],
            "exactly one",
        ),
        (
            [
                x509.UniformResourceIdentifier("urn:flare-async:cell:server.eu"),
                x509.UniformResourceIdentifier("urn:flare-async:role:root"),
            ],
            "unknown role",
        ),
        (
            [
                x509.UniformResourceIdentifier("urn:flare-async:cell:server..eu"),
                x509.UniformResourceIdentifier("urn:flare-async:role:relay"),
            ],
            "must match",
        ),
    ],
)
def test_certificates_without_a_proper_identity_are_refused(
    ca: CertificateAuthority, san: list[x509.GeneralName] | None, match: str
) -> None:
    with pytest.raises(IdentityError, match=match):
        identity_from_certificate(_bare_certificate(ca, san))


def test_garbage_is_not_a_certificate() -> None:
    with pytest.raises(IdentityError, match="not a certificate"):
        identity_from_certificate(b"\x30\x03\x02\x01\x00")


# ----------------------------------------------------------------------------------- claims
def test_claims_that_match_the_certificate_pass() -> None:
    check_claim(Identity("server", Role.SERVER), "server", "server")
    check_claim(Identity("server.eu", Role.RELAY), "server.eu", Role.RELAY)
    check_claim(Identity("server.eu", Role.RELAY), "server.eu", "client", below="server")
    check_claim(Identity("server.eu.site-1", Role.CLIENT), "server.eu.site-1", "client")
    check_claim(
        Identity("server.eu.site-1", Role.CLIENT), "server.eu.site-1", "client", below="server"
    )
    check_claim(Identity("admin-1", Role.ADMIN), "admin-1", "admin", below="server")


@pytest.mark.parametrize(
    ("identity", "claimed", "acting_as", "below", "match"),
    [
        (Identity("server.eu.site-1", Role.CLIENT), "server.eu.site-2", "client", None,
         "claims to be 'server.eu.site-2' but its certificate is for 'server.eu.site-1'"),
        (Identity("server.eu.site-1", Role.CLIENT), "server.eu.site-1", "relay", None,
         "a client certificate cannot act as relay"),
        (Identity("server.eu.site-1", Role.CLIENT), "server.eu.site-1", "server", None,
         "a client certificate cannot act as server"),
        (Identity("server.eu", Role.RELAY), "server.eu", "server", None,
         "a relay certificate cannot act as server"),
        (Identity("admin-1", Role.ADMIN), "admin-1", "client", None,
         "an? admin certificate cannot act as any cell"),
        (Identity("admin-1", Role.ADMIN), "admin-1", "relay", None, "cannot act as any cell"),
        (Identity("admin-1", Role.ADMIN), "admin-1", "server", None, "cannot act as any cell"),
        (Identity("server.eu.site-1", Role.CLIENT), "server.eu.site-1", "root", None,
         "unknown role"),
        (Identity("server.us.site-1", Role.CLIENT), "server.us.site-1", "client", "server.eu",
         "is not below 'server.eu'"),
        (Identity("server.eu", Role.RELAY), "server.eu", "client", "server.eu",
         "is not below"),
    ],
)  # fmt: skip
def test_claims_beyond_the_certificate_are_refused(
    identity: Identity, claimed: str, acting_as: str, below: str | None, match: str
) -> None:
    with pytest.raises(IdentityError, match=match) as info:
        check_claim(identity, claimed, acting_as, below=below)
    assert info.value.peer == identity.name


# ------------------------------------------------------------------------------------- TLS
def _kit(
    tmp_path: Path,
    ca: CertificateAuthority,
    name: str,
    role: str,
    *,
    hosts: tuple[str, ...] = (),
    trust: CertificateAuthority | None = None,
    **validity: datetime,
) -> Kit:
    """A kit on disk with a certificate from ``ca`` that trusts ``trust`` (default ``ca``)."""
    folder = tmp_path / f"{name}-{os.urandom(4).hex()}"
    folder.mkdir()
    issued = issue_certificate(ca, name, role, now=NOW, hosts=hosts, **validity)
    write_certificate(folder / "cert.pem", issued.certificate)
    write_private_key(folder / "key.pem", issued.private_key)
    write_certificate(folder / "ca.pem", (trust or ca).certificate)
    return Kit(
        name=name,
        role=Role(role),
        cert=str(folder / "cert.pem"),
        key=str(folder / "key.pem"),
        ca=str(folder / "ca.pem"),
    )


class HandshakeFailed(Exception):
    def __init__(self, side: str, error: ssl.SSLError) -> None:
        super().__init__(f"{side}: {error}")
        self.side = side
        self.error = error


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two in-memory endpoints; then send one message each way."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=hostname)
    done = {"client": False, "server": False}
    ends = {"client": client, "server": server}
    for _ in range(16):
        for side, end in ends.items():
            if not done[side]:
                try:
                    end.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    raise HandshakeFailed(side, exc) from exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()) and not (s_in.pending or c_in.pending):
            break
    assert all(done.values()), done
    # TLS 1.3 lets the client finish before the server has judged its certificate: data
    # moving both ways proves that both sides accepted.
    try:
        client.write(b"hello server")
        s_in.write(c_out.read())
        assert server.read(64) == b"hello server"
        server.write(b"hello client")
        c_in.write(s_out.read())
        assert client.read(64) == b"hello client"
    except ssl.SSLError as exc:
        raise HandshakeFailed("after handshake", exc) from exc
    return server, client


def test_mutual_tls_succeeds_and_each_side_learns_the_others_identity(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    relay = _kit(tmp_path, ca, "server.eu", "relay", hosts=("localhost", "127.0.0.1"))
    site = _kit(tmp_path, ca, "server.eu.site-1", "client")
    for host in ("localhost", "127.0.0.1"):
        server, client = _handshake(server_context(relay), client_context(site), host)
        assert server.version() == "TLSv1.3"
        assert peer_identity(server) == Identity("server.eu.site-1", Role.CLIENT)
        assert peer_identity(client) == Identity("server.eu", Role.RELAY)
        check_claim(peer_identity(server), "server.eu.site-1", "client", below="server.eu")


def test_tls_1_2_still_works_with_ecdhe_aead(tmp_path: Path, ca: CertificateAuthority) -> None:
    relay = _kit(tmp_path, ca, "server.eu", "relay", hosts=("localhost",))
    site = _kit(tmp_path, ca, "server.eu.site-1", "client")
    client_ctx = client_context(site)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, _ = _handshake(server_context(relay), client_ctx, "localhost")
    assert server.version() == "TLSv1.2"
    cipher = server.cipher()
    assert cipher is not None
    assert cipher[0].startswith("ECDHE-ECDSA-")
    assert peer_identity(server).name == "server.eu.site-1"


def test_contexts_require_certificates_and_tls_1_2(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    relay = _kit(tmp_path, ca, "server.eu", "relay", hosts=("localhost",))
    for ctx in (server_context(relay), client_context(relay)):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_TICKET
    assert client_context(relay).check_hostname
    # The project's CA is the only trust anchor: nothing from the system store.
    for ctx in (server_context(relay), client_context(relay)):
        anchors = ctx.get_ca_certs(binary_form=True)
        assert [x509.load_der_x509_certificate(a) for a in anchors] == [ca.certificate]


def test_a_client_certificate_from_another_ca_is_refused_by_the_server(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    relay = _kit(tmp_path, ca, "server.eu", "relay", hosts=("localhost",))
    intruder = _kit(tmp_path, other_ca, "server.eu.site-1", "client", trust=ca)
    with pytest.raises(HandshakeFailed) as info:
        _handshake(server_context(relay), client_context(intruder), "localhost")
    assert info.value.side == "server"
    assert isinstance(info.value.error, ssl.SSLCertVerificationError)


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    impostor = _kit(tmp_path, other_ca, "server.eu", "relay", hosts=("localhost",), trust=ca)
    site = _kit(tmp_path, ca, "server.eu.site-1", "client")
    with pytest.raises(HandshakeFailed) as info:
        _handshake(server_context(impostor), client_context(site), "localhost")
    assert info.value.side == "client"
    assert isinstance(info.value.error, ssl.SSLCertVerificationError)


def test_the_client_checks_the_host_name_against_the_sans(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    relay = _kit(tmp_path, ca, "server.eu", "relay", hosts=("localhost",))
    site = _kit(tmp_path, ca, "server.eu.site-1", "client")
    for wrong in ("127.0.0.1", "server.eu", "fl.example.org"):
        with pytest.raises(HandshakeFailed) as info:
            _handshake(server_context(relay), client_context(site), wrong)
        assert info.value.side == "client"
        assert "mismatch" in str(info.value.error)


def test_an_expired_certificate_fails_the_handshake(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    relay = _kit(tmp_path, ca, "server.eu", "relay", hosts=("localhost",))
    past = {"not_before": NOW - timedelta(days=30), "not_after": NOW - timedelta(days=1)}
    stale = _kit(tmp_path, ca, "server.eu.site-1", "client", **past)
    with pytest.raises(HandshakeFailed) as info:
        _handshake(server_context(relay), client_context(stale), "localhost")
    assert info.value.side == "server"
    assert "expired" in str(info.value.error)


def test_a_client_kit_cannot_serve_tls(tmp_path: Path, ca: CertificateAuthority) -> None:
    site = _kit(tmp_path, ca, "server.eu.site-1", "client")
    relay = _kit(tmp_path, ca, "server.eu", "relay", hosts=("localhost",))
    with pytest.raises(ConfigError, match="only servers and relays"):
        server_context(site)
    # Even built by hand, a context serving a client certificate is refused by the dialler:
    # the certificate lacks serverAuth.
    by_hand = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    by_hand.load_cert_chain(site.cert, site.key)
    with pytest.raises(HandshakeFailed) as info:
        _handshake(by_hand, client_context(relay), "localhost")
    assert info.value.side == "client"


def test_unreadable_kit_files_are_a_config_error(tmp_path: Path) -> None:
    kit = Kit(
        name="server",
        role=Role.SERVER,
        cert=str(tmp_path / "nope.pem"),
        key=str(tmp_path / "nope.key"),
        ca=str(tmp_path / "ca.pem"),
    )
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        server_context(kit)
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        client_context(kit)


def test_peer_identity_before_the_handshake_is_an_identity_error(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    site = _kit(tmp_path, ca, "server.eu.site-1", "client")
    obj = client_context(site).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    with pytest.raises(IdentityError, match="handshake"):
        peer_identity(obj)
