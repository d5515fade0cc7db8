"""Identities, certificates, startup kits and mutual-TLS contexts (ARCHITECTURE §9).

Layer L1: pure and synchronous (no event loop, no sockets, no logging, no clock: ``now`` is an
argument). The only package that imports ``cryptography``.

- :func:`provision` turns a project file into a CA and one startup kit per participant;
  :func:`add_site` issues one more kit later; :func:`load_kit` reads one.
- :func:`server_context` / :func:`client_context` build mutual-TLS contexts from a kit.
- :func:`identity_from_certificate` / :func:`peer_identity` read who the peer is after the
  handshake; :func:`check_claim` decides whether it may use the name and role it claims.
"""

from flare_async.security._audit import GENESIS, AuditLog, AuditReport, verify_audit
from flare_async.security._e2e import Decryptor, encrypt_for
from flare_async.security._identity import (
    ADMIN_CELL_PREFIX,
    ALLOWED_ACTS,
    Identity,
    Role,
    admin_cell_name,
    check_claim,
    identity_from_certificate,
    validate_participant_name,
)
from flare_async.security._kits import (
    CA_DIR,
    KIT_FILE,
    AdminSpec,
    ClientSpec,
    Kit,
    Project,
    RelaySpec,
    ServerSpec,
    add_site,
    load_kit,
    load_project,
    provision,
)
from flare_async.security._messages import MAX_AGE as MESSAGE_MAX_AGE
from flare_async.security._messages import (
    MessageSigning,
    check_command,
    message_fields,
    payload_digest,
)
from flare_async.security._pki import (
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    CertificateAuthority,
    IssuedCertificate,
    create_ca,
    issue_certificate,
    load_ca,
    write_certificate,
    write_private_key,
)
from flare_async.security._signing import SignatureVerifier, Signer
from flare_async.security._tls import client_context, peer_identity, server_context

__all__ = [
    "MESSAGE_MAX_AGE",
    "MessageSigning",
    "check_command",
    "message_fields",
    "payload_digest",
    # signatures and end-to-end encryption
    "Decryptor",
    "SignatureVerifier",
    "encrypt_for",
    "Signer",
    # audit
    "GENESIS",
    "AuditLog",
    "AuditReport",
    "verify_audit",
    # identities
    "ADMIN_CELL_PREFIX",
    "Identity",
    "admin_cell_name",
    "Role",
    "ALLOWED_ACTS",
    "identity_from_certificate",
    "check_claim",
    "validate_participant_name",
    # certificates
    "CertificateAuthority",
    "IssuedCertificate",
    "create_ca",
    "issue_certificate",
    "load_ca",
    "write_certificate",
    "write_private_key",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CERT_DAYS",
    # project files and kits
    "Project",
    "ServerSpec",
    "RelaySpec",
    "ClientSpec",
    "AdminSpec",
    "Kit",
    "load_project",
    "provision",
    "add_site",
    "load_kit",
    "CA_DIR",
    "KIT_FILE",
    # TLS
    "server_context",
    "client_context",
    "peer_identity",
]
