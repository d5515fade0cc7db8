"""Mutual-TLS contexts built from a startup kit, and the peer's identity after a handshake.

Both sides require a certificate from the other (``CERT_REQUIRED``) and trust exactly one
anchor, the project's CA from the kit (never the system store). TLS 1.2 is the minimum (with
ECDHE and AEAD ciphers only) and 1.3 is preferred; session tickets are off (links are long-lived,
resumption buys nothing and would keep ticket keys in memory).

Host names: the client context checks that the server's certificate names the host it dialled.
The caller passes the URL's host as ``server_hostname`` (``SSLContext.wrap_socket``,
``wrap_bio``) or ``hostname`` (anyio's ``TLSStream.wrap``); an IP literal is matched against the
certificate's IP SANs, a name against its DNS SANs, never against the CN. Provisioning puts every
host a server or relay listens on, plus its ``hosts``, into its certificate.

The handshake proves the peer holds a certificate from the project's CA; *which* participant it
is comes from :func:`peer_identity` (or :func:`~flare_async.security.identity_from_certificate`
on the DER bytes), to be checked against the hello with
:func:`~flare_async.security.check_claim`.
"""

from __future__ import annotations

import ssl
from typing import Final

from flare_async.errors import ConfigError, IdentityError
from flare_async.security._identity import Identity, Role, identity_from_certificate
from flare_async.security._kits import Kit

__all__ = ["TLS12_CIPHERS", "client_context", "peer_identity", "server_context"]

#: Cipher suites allowed when TLS 1.2 is negotiated (TLS 1.3 suites are all AEAD with ECDHE).
TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(kit: Kit) -> ssl.SSLContext:
    """A context for the accepting side of mutual TLS, from a server's or relay's kit.

    Raises:
        ConfigError: the kit is not a server's or relay's (its certificate lacks serverAuth),
            or its files cannot be loaded.
    """
    if kit.role not in (Role.SERVER, Role.RELAY):
        raise ConfigError(
            f"kit {kit.name!r} is a {kit.role.value} kit; only servers and relays accept TLS"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, kit)
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def client_context(kit: Kit) -> ssl.SSLContext:
    """A context for the connecting side of mutual TLS, from any participant's kit.

    Host-name checking is on: pass the URL's host as ``server_hostname`` when wrapping.

    Raises:
        ConfigError: the kit's files cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(ctx, kit)
    ctx.check_hostname = True
    ctx.hostname_checks_common_name = False
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def peer_identity(conn: ssl.SSLObject | ssl.SSLSocket) -> Identity:
    """The identity in the peer's certificate, after a completed handshake.

    Raises:
        IdentityError: no peer certificate (handshake not done) or it names no identity.
    """
    try:
        der = conn.getpeercert(binary_form=True)
    except ValueError:  # "handshake not done yet"
        der = None
    if not der:
        raise IdentityError("the TLS peer presented no certificate (handshake not complete?)")
    return identity_from_certificate(der)


def _common(ctx: ssl.SSLContext, kit: Kit) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_cert_chain(kit.cert, kit.key)
        ctx.load_verify_locations(cafile=kit.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files of kit {kit.name!r}: {exc}") from None
