"""Who a certificate says its holder is, and what that holder may claim to be.

A participant certificate names its holder in two ``uniformResourceIdentifier`` entries of its
SubjectAlternativeName::

    urn:flare-async:cell:<name>     the cell name (or, for role admin, the admin's name)
    urn:flare-async:role:<role>     server, relay, client or admin

The subject's CN repeats the name for people reading the certificate, but it is never used to
decide anything: it is limited to 64 characters (RFC 5280), so a deep cell name does not fit, and
a CN is easy to confuse with a host name. A certificate without both URIs is refused
(:class:`~flare_async.errors.IdentityError`), with no fallback to the CN.

Only call :func:`identity_from_certificate` on a certificate that was verified against the
project's CA, i.e. the peer certificate of a completed mutual-TLS handshake made with
:func:`~flare_async.security.server_context` / :func:`~flare_async.security.client_context`.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Final

import msgspec
from cryptography import x509
from cryptography.x509.oid import NameOID

from flare_async.errors import IdentityError, InvalidName
from flare_async.routing import CellName, validate_name

__all__ = [
    "ALLOWED_ACTS",
    "ADMIN_NAME_PATTERN",
    "NAME_URI_PREFIX",
    "ROLE_URI_PREFIX",
    "Identity",
    "Role",
    "check_claim",
    "identity_from_certificate",
    "validate_participant_name",
]

NAME_URI_PREFIX: Final = "urn:flare-async:cell:"
ROLE_URI_PREFIX: Final = "urn:flare-async:role:"

#: Admin names are not cell names: they may look like e-mail addresses (``admin@example.org``).
ADMIN_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")


class Role(enum.StrEnum):
    """What a participant is. Server, relay and client are cells; an admin is a person."""

    SERVER = "server"
    RELAY = "relay"
    CLIENT = "client"
    ADMIN = "admin"


#: The roles a certificate of each role may act as. A relay also dials up to its own parent
#: like a client does; nothing else may act beyond its certificate, and an admin is never a cell.
ALLOWED_ACTS: Final[dict[Role, frozenset[Role]]] = {
    Role.SERVER: frozenset({Role.SERVER}),
    Role.RELAY: frozenset({Role.RELAY, Role.CLIENT}),
    Role.CLIENT: frozenset({Role.CLIENT}),
    Role.ADMIN: frozenset({Role.ADMIN}),
}


class Identity(msgspec.Struct, frozen=True):
    """A participant as its certificate names it.

    Attributes:
        name: the cell name (``server.relay-1.site-1``), or the admin's name for role admin.
        role: what the certificate allows its holder to be.
        org: the organisation (the subject's O; empty when the certificate has none).
    """

    name: str
    role: Role
    org: str = ""


def validate_participant_name(name: str, role: Role | str) -> str:
    """Return ``name`` if it is valid for ``role``.

    Cells (server, relay, client) use cell names (:func:`flare_async.routing.validate_name`);
    admins use :data:`ADMIN_NAME_PATTERN`.

    Raises:
        InvalidName: the name breaks the rule for its role.
        ValueError: ``role`` is not a :class:`Role`.
    """
    if Role(role) is Role.ADMIN:
        if not isinstance(name, str) or not ADMIN_NAME_PATTERN.fullmatch(name):
            raise InvalidName(
                f"admin name {name!r:.80} must match [A-Za-z0-9][A-Za-z0-9_.@+-]{{0,127}}"
            )
        return name
    validate_name(name)
    if any(part.startswith(ADMIN_CELL_PREFIX) for part in name.split(".")):
        raise InvalidName(f"cell name {name!r:.80}: parts starting {ADMIN_CELL_PREFIX!r} are kept")
    return name


ADMIN_CELL_PREFIX: Final = "_admin-"
"""Cell names of admin sessions start so; no provisioned cell may use it."""


def admin_cell_name(server: str, admin: str) -> str:
    """The cell name an admin's session takes below ``server``: ``server._admin-<name>-<hash>``.

    Admin names may hold characters cell names may not (``admin@example.org``); the readable
    part keeps the allowed ones and a hash of the full name keeps two admins apart.
    """
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", admin)[:40]
    digest = hashlib.sha256(admin.encode()).hexdigest()[:8]
    return f"{server}.{ADMIN_CELL_PREFIX}{slug}-{digest}"


def identity_from_certificate(cert: x509.Certificate | bytes) -> Identity:
    """Read the :class:`Identity` from a participant certificate.

    Args:
        cert: a parsed certificate, or its DER bytes (what ``getpeercert(binary_form=True)``
            and anyio's ``TLSAttribute.peer_certificate_binary`` give), or PEM bytes.

    Raises:
        IdentityError: the bytes are not a certificate, or it lacks exactly one name URI and
            one role URI, or the role is unknown, or the name is invalid for the role.
    """
    if isinstance(cert, bytes | bytearray | memoryview):
        data = bytes(cert)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise IdentityError(f"not a certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            f"certificate {_describe(cert)} has no SubjectAlternativeName, so no identity"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    names = [u[len(NAME_URI_PREFIX) :] for u in uris if u.startswith(NAME_URI_PREFIX)]
    roles = [u[len(ROLE_URI_PREFIX) :] for u in uris if u.startswith(ROLE_URI_PREFIX)]
    if len(names) != 1 or len(roles) != 1:
        raise IdentityError(
            f"certificate {_describe(cert)} must carry exactly one {NAME_URI_PREFIX}<name> and "
            f"one {ROLE_URI_PREFIX}<role> URI, found {len(names)} and {len(roles)}"
        )
    try:
        role = Role(roles[0])
    except ValueError:
        raise IdentityError(
            f"certificate {_describe(cert)} has unknown role {roles[0]!r:.40}"
        ) from None
    try:
        name = validate_participant_name(names[0], role)
    except InvalidName as exc:
        raise IdentityError(f"certificate {_describe(cert)}: {exc}") from None
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org = orgs[0].value if orgs else ""
    return Identity(name, role, org if isinstance(org, str) else org.decode("utf-8", "replace"))


def check_claim(
    identity: Identity,
    claimed_name: str,
    acting_as: Role | str,
    *,
    below: str | None = None,
) -> None:
    """Check that a peer holding ``identity`` may call itself ``claimed_name`` as ``acting_as``.

    The rules: the claimed name must be the certificate's name (no cell can use another's
    name); the certificate's role must allow ``acting_as`` (:data:`ALLOWED_ACTS`: a client
    certificate cannot act as relay or server, an admin certificate cannot act as any cell);
    and, when ``below`` is given (the accepting cell's own name), a cell's claimed name must lie
    strictly below it in the tree (admins are not in the tree; ``below`` does not apply to
    them).

    Raises:
        IdentityError: any rule is broken; the message says which.
    """
    try:
        act = Role(acting_as)
    except ValueError:
        raise IdentityError(
            f"{claimed_name!r:.80} claims unknown role {acting_as!r:.40}", peer=identity.name
        ) from None
    if claimed_name != identity.name:
        raise IdentityError(
            f"claims to be {claimed_name!r:.80} but its certificate is for {identity.name!r}",
            peer=identity.name,
        )
    if act not in ALLOWED_ACTS[identity.role]:
        what = "any cell" if identity.role is Role.ADMIN else act.value
        raise IdentityError(
            f"a {identity.role.value} certificate cannot act as {what}", peer=identity.name
        )
    if (
        below is not None
        and act is not Role.ADMIN
        and not CellName(below).is_ancestor_of(claimed_name)
    ):
        raise IdentityError(
            f"{claimed_name!r:.80} is not below {below!r}, so it cannot connect here",
            peer=identity.name,
        )


def _describe(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else ""
    return f"(CN={cn!r:.80}, serial {cert.serial_number:x})"
