"""The project's certificate authority and the participant certificates it issues.

Keys are ECDSA on P-256, signatures SHA-256. The CA is a self-signed root with
``BasicConstraints(ca=True, path_length=0)``: it signs participant certificates directly and
nothing it signs can be a CA. A participant certificate binds a name and a role
(see :mod:`flare_async.security._identity`) and, for servers and relays, the host names and
addresses they are reached at. Servers and relays get ``serverAuth`` and ``clientAuth`` (a relay
accepts its children and dials its parent); clients and admins get ``clientAuth`` only, so a
client certificate cannot serve a TLS listener.

There is no clock here: every function that needs the time takes ``now``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flare_async.errors import ConfigError
from flare_async.security._identity import (
    NAME_URI_PREFIX,
    ROLE_URI_PREFIX,
    Role,
    validate_participant_name,
)

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CERT_DAYS",
    "CertificateAuthority",
    "IssuedCertificate",
    "canonical_host",
    "create_ca",
    "issue_certificate",
    "load_ca",
    "write_certificate",
    "write_file",
    "write_private_key",
]

DEFAULT_CA_DAYS: Final = 3650
DEFAULT_CERT_DAYS: Final = 365
#: Certificates start this long before ``now`` so that a peer whose clock is a little behind
#: still accepts a freshly issued certificate.
CLOCK_SKEW: Final = timedelta(minutes=10)
_CN_MAX: Final = 64  # RFC 5280 ub-common-name; cryptography enforces it
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True)
class _KeyPair:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        """The certificate in PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        """The private key in unencrypted PKCS#8 PEM. Secret: write it with mode 0600."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class CertificateAuthority(_KeyPair):
    """The project's root CA: its self-signed certificate and its private key.

    The key signs every participant certificate; keep it off the machines that run cells.
    """


@dataclass(frozen=True)
class IssuedCertificate(_KeyPair):
    """A participant certificate and the private key it certifies."""


def create_ca(
    name: str,
    *,
    now: datetime,
    org: str = "",
    days: int = DEFAULT_CA_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> CertificateAuthority:
    """Create a self-signed root CA with a new P-256 key.

    Args:
        name: the CA's common name (for people), e.g. ``"two-tier root CA"``.
        now: the current time (timezone-aware).
        org: the organisation that runs the project (subject O), if any.
        days: validity from ``now`` when ``not_after`` is not given.
        not_before, not_after: explicit validity bounds (timezone-aware).

    Raises:
        ConfigError: naive datetimes, or an empty validity window.
    """
    start, end = _validity(now, days, not_before, not_after)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _subject(name, org)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def issue_certificate(
    ca: CertificateAuthority,
    name: str,
    role: Role | str,
    *,
    now: datetime,
    org: str = "",
    hosts: Iterable[str] = (),
    days: int = DEFAULT_CERT_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> IssuedCertificate:
    """Issue a participant certificate, with a new P-256 key, signed by ``ca``.

    Args:
        ca: the issuing CA.
        name: the cell name, or the admin's name for role admin.
        role: server, relay, client or admin.
        now: the current time (timezone-aware).
        org: the participant's organisation (subject O).
        hosts: host names and IP addresses a server or relay is reached at (DNS and IP SANs);
            clients and admins listen nowhere and take none.
        days: validity from ``now`` when ``not_after`` is not given.
        not_before, not_after: explicit validity bounds; a ``not_after`` in the past makes an
            expired certificate (for tests).

    Raises:
        InvalidName: the name does not fit the role's naming rule.
        ConfigError: unknown role, bad host, hosts on a client or admin, bad validity.
    """
    try:
        role = Role(role)
    except ValueError:
        raise ConfigError(
            f"unknown role {role!r:.40}; expected one of {', '.join(r.value for r in Role)}"
        ) from None
    validate_participant_name(name, role)
    host_list = list(dict.fromkeys(hosts))
    if host_list and role not in (Role.SERVER, Role.RELAY):
        raise ConfigError(f"{name}: only server and relay certificates carry host names")
    start, end = _validity(now, days, not_before, not_after)
    key = ec.generate_private_key(ec.SECP256R1())
    general_names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(NAME_URI_PREFIX + name),
        x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role.value),
    ]
    general_names += [_host_name(host) for host in host_list]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in (Role.SERVER, Role.RELAY):
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(name, org))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.private_key, hashes.SHA256())
    )
    return IssuedCertificate(cert, key)


def load_ca(cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
    """Rebuild a :class:`CertificateAuthority` from its PEM certificate and key.

    Raises:
        ConfigError: not PEM, not a P-256 key, not a CA certificate, or the key does not
            belong to the certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an elliptic-curve key")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError("the CA certificate is not a CA (BasicConstraints ca=False or missing)")
    if cert.public_key() != key.public_key():
        raise ConfigError("the CA key does not belong to the CA certificate")
    return CertificateAuthority(cert, key)


def write_certificate(path: Path, cert: x509.Certificate, *, overwrite: bool = False) -> None:
    """Write ``cert`` as PEM, mode 0644.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    write_file(path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=overwrite)


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey, *, overwrite: bool = False
) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600 (owner read/write only).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(path, data, 0o600, overwrite=overwrite)


def write_file(path: Path, data: bytes, mode: int, *, overwrite: bool = False) -> None:
    """Create ``path`` with exactly ``mode`` and write ``data`` to it.

    The file is always created anew (``O_CREAT | O_EXCL``), never reused, so a key never lands
    in a pre-existing file with looser permissions and a symlink at ``path`` is not followed.
    With ``overwrite`` an existing file is removed first.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    if overwrite:
        path.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # the umask may have taken bits away from a public file
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _validity(
    now: datetime, days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    for label, value in (("now", now), ("not_before", not_before), ("not_after", not_after)):
        if value is not None and value.utcoffset() is None:
            raise ConfigError(f"{label} must be timezone-aware, got {value!r}")
    start = not_before if not_before is not None else now - CLOCK_SKEW
    end = not_after if not_after is not None else now + timedelta(days=days)
    if end <= start:
        raise ConfigError(f"empty validity: not_after {end} is not after not_before {start}")
    return start, end


def _subject(name: str, org: str) -> x509.Name:
    # The CN is for people only (identity comes from the SAN URIs); it must fit 64 characters.
    cn = name if len(name) <= _CN_MAX else name[: _CN_MAX - 3] + "..."
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def canonical_host(host: str) -> str:
    """``host`` as it goes into a certificate: an IP address in its canonical form (brackets
    dropped), or a DNS name lower-cased without a trailing dot.

    Raises:
        ConfigError: neither an IP address nor a valid DNS host name.
    """
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not isinstance(host, str) or not _HOST.fullmatch(host):
        raise ConfigError(f"{host!r:.80} is neither an IP address nor a DNS host name")
    return host.rstrip(".").lower()


def _host_name(host: str) -> x509.GeneralName:
    canonical = canonical_host(host)
    try:
        return x509.IPAddress(ipaddress.ip_address(canonical))
    except ValueError:
        return x509.DNSName(canonical)
