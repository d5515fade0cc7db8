"""The project file, provisioning, and startup kits.

A project file (TOML) lists the participants::

    project = "two-tier"          # required
    org = "example.org"           # default organisation for entries without one

    [server]
    name = "server"               # the default
    listen = ["tls://127.0.0.1:18010", "wss://127.0.0.1:18443/flare"]
    hosts = ["fl.example.org"]    # optional: more names the server is reached at

    [[relays]]
    name = "server.relay-1"
    parent = "tls://127.0.0.1:18010"   # a listen URL (or a `hosts` alias) of the parent
    listen = ["tls://127.0.0.1:18011"]

    [[clients]]
    name = "server.relay-1.site-1"
    org = "hospital-a"
    parent = "tls://127.0.0.1:18011"

    [[admins]]
    name = "admin@example.org"
    parent = "tls://127.0.0.1:18010"   # optional: defaults to the server's first listen URL

A parent URL is matched against the ``listen`` URLs of the server and relays: same scheme, port
and path, and a host that is the listen URL's host or one of that participant's ``hosts``
(``hosts`` is how a cell that binds ``0.0.0.0`` says where it is reached). Every relay and
client name must lie directly below its parent's name (``server.relay-1.site-1`` under
``server.relay-1``): a cell accepts a child link only from a certificate so named. Listen URLs
are ``tls://HOST:PORT`` or ``wss://HOST:PORT/PATH``: provisioning is for mutual TLS.

:func:`provision` writes, under the output folder::

    ca/ca.pem        the CA certificate (public; also in every kit)
    ca/ca.key        the CA private key (secret, mode 0600, in no kit: keep it offline)
    ca/issued.toml   the record of every certificate issued (append-only; used by add_site)
    <name>/          one startup kit per participant:
        cert.pem     its certificate
        key.pem      its private key (secret, mode 0600)
        ca.pem       the CA certificate, its only trust anchor
        kit.toml     a :class:`Kit`: name, role, org, parent URL, listen URLs, file names

:func:`add_site` issues one more kit later from the saved CA, touching no existing kit.

File I/O happens here only because the caller names the files; nothing reads the environment
or a default location, and there is no clock: ``now`` is always an argument.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from flare_async.errors import ConfigError, IdentityError
from flare_async.routing import CellName
from flare_async.security._identity import (
    Identity,
    Role,
    identity_from_certificate,
    validate_participant_name,
)
from flare_async.security._pki import (
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    CertificateAuthority,
    IssuedCertificate,
    canonical_host,
    create_ca,
    issue_certificate,
    load_ca,
    write_certificate,
    write_file,
    write_private_key,
)
from flare_async.security._tree import expand_tree

__all__ = [
    "CA_DIR",
    "KIT_FILE",
    "LISTEN_SCHEMES",
    "AdminSpec",
    "ClientSpec",
    "Kit",
    "Project",
    "RelaySpec",
    "ServerSpec",
    "add_site",
    "load_kit",
    "load_project",
    "provision",
]

CA_DIR: Final = "ca"
KIT_FILE: Final = "kit.toml"
ISSUED_FILE: Final = "issued.toml"
LISTEN_SCHEMES: Final = frozenset({"tls", "wss"})
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", "*"})
_PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# ------------------------------------------------------------------------------------- schema
class ServerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[server]`` in the project file."""

    name: str = "server"
    org: str | None = None
    listen: tuple[str, ...]
    hosts: tuple[str, ...] = ()


class RelaySpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[relays]]`` entry."""

    name: str
    org: str | None = None
    parent: str
    listen: tuple[str, ...]
    hosts: tuple[str, ...] = ()


class ClientSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[clients]]`` entry."""

    name: str
    org: str | None = None
    parent: str


class AdminSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[admins]]`` entry. Admins are people, not cells; ``parent`` is where they
    connect (default: the server's first listen URL)."""

    name: str
    org: str | None = None
    parent: str | None = None


class Project(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A project file, as written (see :func:`load_project` for the checks)."""

    project: str
    org: str | None = None
    server: ServerSpec
    relays: tuple[RelaySpec, ...] = ()
    clients: tuple[ClientSpec, ...] = ()
    admins: tuple[AdminSpec, ...] = ()


class Kit(msgspec.Struct, frozen=True, kw_only=True):
    """A participant's startup kit (``kit.toml``).

    Attributes:
        name: the cell name (or admin name).
        role: server, relay, client or admin.
        org: the organisation in the certificate.
        project: the project it belongs to.
        parent: the URL to connect to (``None`` for the server).
        parent_name: the name the certificate at ``parent`` must carry (check it after the
            handshake: the host name check alone cannot tell two cells on one host apart).
        listen: the URLs to listen on (servers and relays).
        cert, key, ca: the certificate, private key and CA certificate files; relative to
            the kit folder in ``kit.toml``, absolute in a kit from :func:`load_kit`.
    """

    name: str
    role: Role
    org: str = ""
    project: str = ""
    parent: str | None = None
    parent_name: str | None = None
    listen: tuple[str, ...] = ()
    cert: str = "cert.pem"
    key: str = "key.pem"
    ca: str = "ca.pem"

    @property
    def identity(self) -> Identity:
        """The identity its certificate carries."""
        return Identity(self.name, self.role, self.org)


class _Issued(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of ``ca/issued.toml``."""

    name: str
    role: Role
    org: str = ""
    parent: str | None = None
    parent_name: str | None = None
    listen: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    serial: str = ""
    not_after: str = ""


class _Registry(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    org: str = ""
    participants: tuple[_Issued, ...] = ()


@dataclass(frozen=True)
class _Endpoint:
    scheme: str
    host: str
    port: int
    path: str

    def reached_as(self, url: _Endpoint, hosts: Iterable[str]) -> bool:
        if (url.scheme, url.port, url.path) != (self.scheme, self.port, self.path):
            return False
        return url.host == self.host or url.host in hosts


# ------------------------------------------------------------------------------ project file
def load_project(path: str | Path) -> Project:
    """Read and check a project file.

    Raises:
        ConfigError: unreadable, not TOML, wrong shape, or a rule broken (names, URLs,
            parents, duplicates); the message names the file and the entry.
    """
    path = Path(path)
    try:
        raw = expand_tree(tomllib.loads(path.read_text(encoding="utf-8")))
        project = msgspec.convert(raw, Project)
    except OSError as exc:
        raise ConfigError(f"cannot read project file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        _plan(project)
    except ConfigError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return project


def _plan(project: Project) -> list[_Issued]:
    """The participants to issue, checked; parents resolved; ``hosts`` become SAN hosts."""
    if not _PROJECT_NAME.fullmatch(project.project):
        raise ConfigError(
            f"project name {project.project!r:.80} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"
        )
    default_org = project.org or ""
    entries: list[_Issued] = []
    server = project.server
    entries.append(_listener(server.name, Role.SERVER, server.org, default_org, server, None))
    listeners = [entries[0]]
    relay_entries = [
        _listener(r.name, Role.RELAY, r.org, default_org, r, r.parent) for r in project.relays
    ]
    listeners += relay_entries
    _check_listen_unique(listeners)
    for entry in relay_entries:
        entries.append(_with_parent(entry, listeners))
    for client in project.clients:
        validate_participant_name(client.name, Role.CLIENT)
        entry = _Issued(name=client.name, role=Role.CLIENT, org=client.org or default_org)
        entries.append(
            _with_parent(msgspec.structs.replace(entry, parent=client.parent), listeners)
        )
    for admin in project.admins:
        validate_participant_name(admin.name, Role.ADMIN)
        parent = admin.parent if admin.parent is not None else server.listen[0]
        entry = _Issued(name=admin.name, role=Role.ADMIN, org=admin.org or default_org)
        entries.append(_with_parent(msgspec.structs.replace(entry, parent=parent), listeners))
    _check_unique(entries)
    return entries


def _listener(
    name: str,
    role: Role,
    org: str | None,
    default_org: str,
    spec: ServerSpec | RelaySpec,
    parent: str | None,
) -> _Issued:
    validate_participant_name(name, role)
    if not spec.listen:
        raise ConfigError(f"{role.value} {name!r} must listen on at least one URL")
    listen = tuple(spec.listen)
    endpoints = [_endpoint(url, f"{name} listen") for url in listen]
    hosts = [e.host for e in endpoints if e.host not in _WILDCARD_HOSTS]
    hosts += [_host(h, f"{name} hosts") for h in spec.hosts]
    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise ConfigError(
            f"{role.value} {name!r} listens on wildcard addresses only; add "
            "hosts = [...] with the names or addresses it is reached at"
        )
    return _Issued(
        name=name,
        role=role,
        org=org or default_org,
        parent=parent,
        listen=listen,
        hosts=tuple(hosts),
    )


def _with_parent(entry: _Issued, listeners: Sequence[_Issued]) -> _Issued:
    """Resolve ``entry.parent`` (a URL) to the listener serving it; check the name rule."""
    assert entry.parent is not None
    url = _endpoint(entry.parent, f"{entry.name} parent")
    matches = [
        candidate
        for candidate in listeners
        if any(
            _endpoint(listen, candidate.name).reached_as(url, candidate.hosts)
            for listen in candidate.listen
        )
    ]
    if not matches:
        raise ConfigError(
            f"{entry.name!r}: parent URL {entry.parent!r} is not a listen URL of the server or "
            "of any relay (same scheme, host, port and path; or a host from their `hosts`)"
        )
    if len(matches) > 1:
        names = ", ".join(repr(m.name) for m in matches)
        raise ConfigError(f"{entry.name!r}: parent URL {entry.parent!r} is ambiguous: {names}")
    parent = matches[0]
    if entry.role is not Role.ADMIN and CellName(entry.name).parent != CellName(parent.name):
        # Cells link only to the cell their name's prefix names (cli kit_verifier): a kit
        # dialling an ancestor further up would never be let in.
        raise ConfigError(
            f"{entry.name!r} must be named directly below its parent {parent.name!r} "
            f"(e.g. {parent.name}.{CellName(entry.name).leaf})"
        )
    return msgspec.structs.replace(entry, parent_name=parent.name)


def _check_listen_unique(listeners: Iterable[_Issued]) -> None:
    # Two cells may bind the same wildcard address on different machines, but a concrete
    # address names one listener, or parent URLs could not tell them apart.
    owner: dict[_Endpoint, str] = {}
    for entry in listeners:
        for url in entry.listen:
            endpoint = _endpoint(url, f"{entry.name} listen")
            if endpoint.host in _WILDCARD_HOSTS:
                continue
            if endpoint in owner:
                raise ConfigError(
                    f"listen URL {url!r} is used by both {owner[endpoint]!r} and {entry.name!r}"
                )
            owner[endpoint] = entry.name


def _check_unique(entries: Iterable[_Issued]) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        # Kits are folders named after their participant: refuse names that only differ by
        # case (one folder on case-insensitive file systems) and the CA's folder.
        key = entry.name.casefold()
        if key == CA_DIR:
            raise ConfigError(f"{entry.name!r} is reserved for the CA's folder")
        if key in seen:
            raise ConfigError(
                f"participant name {entry.name!r} is used twice"
                + ("" if seen[key] == entry.name else f" (as {seen[key]!r}, differing by case)")
            )
        seen[key] = entry.name


def _endpoint(url: str, what: str) -> _Endpoint:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{what}: bad URL {url!r:.200}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in LISTEN_SCHEMES:
        raise ConfigError(
            f"{what}: URL {url!r:.200} must use tls:// or wss:// (provisioning is for mutual TLS)"
        )
    if not parts.hostname or port is None or port == 0:
        raise ConfigError(f"{what}: URL {url!r:.200} needs a host and a fixed port")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"{what}: URL {url!r:.200} may not carry user, query or fragment")
    if scheme == "tls" and parts.path not in ("", "/"):
        raise ConfigError(f"{what}: tls:// URL {url!r:.200} takes no path")
    path = (parts.path or "/") if scheme == "wss" else ""
    return _Endpoint(scheme, _host(parts.hostname, what), port, path)


def _host(host: str, what: str) -> str:
    if host in _WILDCARD_HOSTS:
        return host
    try:
        return canonical_host(host)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


# ------------------------------------------------------------------------------- provisioning
def provision(
    project_path: str | Path,
    out_dir: str | Path,
    *,
    now: datetime,
    days: int = DEFAULT_CERT_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> list[Kit]:
    """Create the project's CA and one startup kit per participant under ``out_dir``.

    Everything is checked, and every certificate issued, before anything is written.

    Args:
        project_path: the project file.
        out_dir: where ``ca/`` and the kits go (created if missing).
        now: the current time (timezone-aware); certificates start a little before it.
        days: validity of participant certificates; ``ca_days`` that of the CA.
        force: overwrite an existing ``ca/`` and kits. This makes a new CA, so every kit must
            be redistributed; to add a participant use :func:`add_site` instead.

    Returns:
        The kits written, with absolute paths, in project order.

    Raises:
        ConfigError: a bad project file, or ``out_dir`` already holds a CA or a kit of the same
            name and ``force`` is false.
    """
    project = load_project(project_path)
    entries = _plan(project)
    out = Path(out_dir)
    if not force:
        taken = [n for n in [CA_DIR, *(e.name for e in entries)] if (out / n).exists()]
        if taken:
            raise ConfigError(
                f"{out} already holds {', '.join(taken)}; use add_site to add a participant, "
                "or force to re-provision everything (a new CA: every kit must be redistributed)"
            )
    ca = create_ca(f"{project.project} root CA", now=now, org=project.org or "", days=ca_days)
    issued = [_issue(ca, entry, now=now, days=days) for entry in entries]

    out.mkdir(parents=True, exist_ok=True)
    ca_dir = out / CA_DIR
    ca_dir.mkdir(mode=0o700, exist_ok=True)
    write_certificate(ca_dir / "ca.pem", ca.certificate, overwrite=force)
    write_private_key(ca_dir / "ca.key", ca.private_key, overwrite=force)
    registry = [
        "# Every certificate this CA issued, oldest first. add_site appends to this file; it is\n"
        "# the provisioner's record and part of no kit.\n",
        _toml({"project": project.project, "org": project.org or ""}),
    ]
    kits = []
    for entry, cert in zip(entries, issued, strict=True):
        kit, record = _write_kit(out, ca, entry, cert, project.project, force=force)
        kits.append(kit)
        registry.append(record)
    write_file(ca_dir / ISSUED_FILE, "".join(registry).encode(), 0o644, overwrite=force)
    return kits


def add_site(
    out_dir: str | Path,
    name: str,
    parent_url: str | None,
    org: str | None = None,
    role: Role | str = Role.CLIENT,
    *,
    now: datetime,
    listen: Sequence[str] = (),
    hosts: Sequence[str] = (),
    days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
) -> Kit:
    """Issue one more kit from the CA that :func:`provision` saved in ``out_dir/ca``.

    No existing kit is read or changed; ``ca/issued.toml`` gets one entry appended.

    Args:
        out_dir: the folder :func:`provision` wrote.
        name: the new participant's name, below its parent's name.
        parent_url: a listen URL of the server or of a relay issued from this CA (for an
            admin, ``None`` means the server's first listen URL).
        org: its organisation (default: the project's).
        role: ``client`` (default), ``relay`` (then ``listen`` is required) or ``admin``.
        now: the current time (timezone-aware).
        listen, hosts: a relay's listen URLs and extra host names.
        days: validity of the certificate.
        force: replace a kit of the same name (a new key; the old certificate stays valid
            until it expires, as there is no revocation yet).

    Returns:
        The new kit, with absolute paths.

    Raises:
        ConfigError: no CA in ``out_dir``, a bad name, role, URL or parent, or the name is
            already issued and ``force`` is false.
    """
    out = Path(out_dir)
    ca_dir = out / CA_DIR
    try:
        ca = load_ca((ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes())
        registry = msgspec.convert(
            tomllib.loads((ca_dir / ISSUED_FILE).read_text(encoding="utf-8")), _Registry
        )
    except OSError as exc:
        raise ConfigError(
            f"{out} holds no provisioned CA (run provision first): {exc.strerror or exc}"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{ca_dir / ISSUED_FILE}: {exc}") from None
    try:
        role = Role(role)
    except ValueError:
        raise ConfigError(f"unknown role {role!r:.40}") from None
    if role is Role.SERVER:
        raise ConfigError("a project has one server; add a client, relay or admin")
    # A re-issue (force) appends a second entry for a name; the last one counts.
    issued = {previous.name: previous for previous in registry.participants}
    if role is Role.RELAY:
        spec = RelaySpec(name=name, parent="", listen=tuple(listen), hosts=tuple(hosts))
        entry = _listener(name, role, org, registry.org, spec, None)
    else:
        if listen or hosts:
            raise ConfigError(f"a {role.value} listens nowhere; listen and hosts are for relays")
        validate_participant_name(name, role)
        entry = _Issued(name=name, role=role, org=org or registry.org)
    listeners = [p for p in issued.values() if p.role in (Role.SERVER, Role.RELAY)]
    if parent_url is None:
        servers = [p for p in listeners if p.role is Role.SERVER]
        if role is not Role.ADMIN or not servers:
            raise ConfigError(f"{name!r} needs a parent URL")
        parent_url = servers[0].listen[0]
    entry = _with_parent(msgspec.structs.replace(entry, parent=parent_url), listeners)
    _check_unique([*(p for p in issued.values() if p.name != name), entry])
    if role is Role.RELAY:
        _check_listen_unique([*(p for p in listeners if p.name != name), entry])
    if not force:
        if name in issued:
            raise ConfigError(f"{name!r} was already issued a kit; force replaces it (new key)")
        if (out / name).exists():
            raise ConfigError(f"{out / name} already exists; force overwrites it")
    cert = _issue(ca, entry, now=now, days=days)
    kit, record = _write_kit(out, ca, entry, cert, registry.project, force=force)
    with (ca_dir / ISSUED_FILE).open("a", encoding="utf-8") as f:
        f.write(record)
    return kit


def _issue(
    ca: CertificateAuthority, entry: _Issued, *, now: datetime, days: int
) -> IssuedCertificate:
    san_hosts = entry.hosts if entry.role in (Role.SERVER, Role.RELAY) else ()
    return issue_certificate(
        ca, entry.name, entry.role, now=now, org=entry.org, hosts=san_hosts, days=days
    )


def _write_kit(
    out: Path,
    ca: CertificateAuthority,
    entry: _Issued,
    issued: IssuedCertificate,
    project: str,
    *,
    force: bool,
) -> tuple[Kit, str]:
    """Write ``entry``'s kit; returns the kit (absolute paths) and its ``ca/issued.toml``
    record. ``kit.toml`` is written last: a kit without it is visibly incomplete."""
    kit_dir = out / entry.name
    kit_dir.mkdir(mode=0o700, exist_ok=force)
    kit = Kit(
        name=entry.name,
        role=entry.role,
        org=entry.org,
        project=project,
        parent=entry.parent,
        parent_name=entry.parent_name,
        listen=entry.listen,
    )
    write_certificate(kit_dir / kit.cert, issued.certificate, overwrite=force)
    write_private_key(kit_dir / kit.key, issued.private_key, overwrite=force)
    write_certificate(kit_dir / kit.ca, ca.certificate, overwrite=force)
    text = (
        f"# flare_async startup kit for {entry.name} ({entry.role.value}) of project {project}.\n"
        f"# {kit.key} is secret: it never leaves this participant.\n"
        + _toml(msgspec.to_builtins(kit))
    )
    write_file(kit_dir / KIT_FILE, text.encode(), 0o644, overwrite=force)
    record = msgspec.structs.replace(
        entry,
        serial=f"{issued.certificate.serial_number:x}",
        not_after=issued.certificate.not_valid_after_utc.isoformat(),
    )
    return _absolute(kit, kit_dir), "\n[[participants]]\n" + _toml(msgspec.to_builtins(record))


# ----------------------------------------------------------------------------------- kits
def load_kit(path: str | Path, *, now: datetime | None = None) -> Kit:
    """Read a startup kit (its folder or its ``kit.toml``) and check it.

    The file names are resolved against the kit folder (absolute names stay as they are). The
    certificate must name the kit's participant and role, and the key must belong to it.

    Args:
        path: the kit folder or its ``kit.toml``.
        now: when given, also refuse a certificate that is expired or not valid yet.

    Raises:
        ConfigError: a missing or malformed file, or a certificate that does not fit.
    """
    path = Path(path)
    kit_file = path / KIT_FILE if path.is_dir() else path
    try:
        kit = msgspec.convert(tomllib.loads(kit_file.read_text(encoding="utf-8")), Kit)
    except OSError as exc:
        raise ConfigError(f"cannot read kit {kit_file}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{kit_file}: {exc}") from None
    try:
        validate_participant_name(kit.name, kit.role)
    except ConfigError as exc:
        raise ConfigError(f"{kit_file}: {exc}") from None
    kit = _absolute(kit, kit_file.parent)
    try:
        cert_pem = Path(kit.cert).read_bytes()
        key_pem = Path(kit.key).read_bytes()
        Path(kit.ca).read_bytes()
    except OSError as exc:
        raise ConfigError(f"kit {kit_file}: {exc.strerror or exc}: {exc.filename}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        identity = identity_from_certificate(cert)
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, IdentityError) as exc:
        raise ConfigError(f"kit {kit_file}: {exc}") from None
    if (identity.name, identity.role) != (kit.name, kit.role):
        raise ConfigError(
            f"kit {kit_file} is for {kit.role.value} {kit.name!r} but its certificate is for "
            f"{identity.role.value} {identity.name!r}"
        )
    if key.public_key() != cert.public_key():
        raise ConfigError(f"kit {kit_file}: {kit.key} does not belong to {kit.cert}")
    if now is not None and not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise ConfigError(
            f"kit {kit_file}: the certificate is valid from {cert.not_valid_before_utc} to "
            f"{cert.not_valid_after_utc}, not at {now}"
        )
    return kit


def _absolute(kit: Kit, base: Path) -> Kit:
    base = base.absolute()
    return msgspec.structs.replace(
        kit,
        cert=str(base / kit.cert),
        key=str(base / kit.key),
        ca=str(base / kit.ca),
    )


# ------------------------------------------------------------------------------ tiny TOML
def _toml(table: Mapping[str, object]) -> str:
    """Key/value lines for a flat table of strings, integers, booleans and lists of strings.

    ``None`` and empty strings are left out (the readers' defaults stand for them).
    """
    lines = []
    for key, value in table.items():
        if value is None or value == "":
            continue
        lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
