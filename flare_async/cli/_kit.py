"""Cells from startup kits: the kit says who the cell is (name, role), where it listens and
which parent it dials; its certificate, key and CA make the mutual-TLS contexts, and every link
is checked against the certificate presented on it (:func:`kit_verifier`). Shared by ``flare-async
run`` (``_run``), ``send`` and ``job`` (the admin's cell)."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from flare_async._spec import load_object
from flare_async.cell import Cell, HandlerTable, PeerVerifier, system_handlers
from flare_async.errors import ConfigError, IdentityError
from flare_async.fl import EdgeClient
from flare_async.routing import CellName
from flare_async.security import (
    Identity,
    Kit,
    MessageSigning,
    Role,
    SignatureVerifier,
    Signer,
    admin_cell_name,
    check_claim,
    client_context,
    identity_from_certificate,
    server_context,
)
from flare_async.transport import Driver, Link, TcpDriver
from flare_async.wire import Session


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed (the process's machine-readable event stream)."""
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


def kit_verifier(kit: Kit, admins: dict[str, Identity] | None = None) -> PeerVerifier:
    """Check each link's peer certificate against the name and place it claims.

    A child must hold a certificate for exactly the name it claims, directly below this cell
    (its name's parent is this cell's name: ``server.relay-1.site-1`` links only to
    ``server.relay-1``), and be a client or relay; a parent must be the server or a relay (a
    client certificate cannot act as one); a direct peer must be a cell of the project. With
    ``admins`` (the server), an admin certificate may connect as a child under its session name
    (:func:`admin_cell_name`); the session name is recorded in ``admins`` with the admin's
    identity (name and organisation).
    """

    def verify(link: Link, session: Session) -> None:
        der = link.extra().peer_certificate
        if not der:
            raise IdentityError(f"{session.peer!r} presented no certificate on {link.peer_address}")
        identity = identity_from_certificate(der)
        if session.role == "child" and identity.role is Role.ADMIN and admins is not None:
            expected = admin_cell_name(kit.name, identity.name)
            if session.peer != expected:
                raise IdentityError(
                    f"admin {identity.name!r} must connect as {expected!r}, not {session.peer!r}"
                )
            admins[session.peer] = identity
        elif session.role == "child":
            check_claim(identity, session.peer, Role.CLIENT, below=kit.name)
            # The name places a cell in the tree: its parent is its name's prefix, the cell its
            # kit dials. A valid certificate must not let it skip that cell (and its policy).
            parent = str(CellName(session.peer).parent)
            if parent != kit.name:
                raise IdentityError(
                    f"{session.peer!r} may link only directly below {parent!r}, not {kit.name!r}",
                    peer=identity.name,
                )
        elif session.role == "parent":
            acting = identity.role if identity.role in (Role.SERVER, Role.RELAY) else Role.RELAY
            check_claim(identity, session.peer, acting)
            if kit.parent_name is not None and session.peer != kit.parent_name:
                raise IdentityError(
                    f"expected parent {kit.parent_name!r}, the certificate is {session.peer!r}"
                )
        else:
            check_claim(identity, session.peer, Role.CLIENT)

    return verify


def kit_contexts(kit: Kit) -> tuple[ssl.SSLContext | None, ssl.SSLContext]:
    """A kit's TLS contexts: to listen with (a kit that listens: a server's or relay's) and to
    dial with (``Cell(server_tls=, client_tls=)``)."""
    return (server_context(kit) if kit.listen else None), client_context(kit)


def kit_drivers(kit: Kit) -> list[Driver]:
    """The network drivers of a kit's cell: tls:// and wss:// with the kit's TLS contexts
    (plain tcp:// and ws:// stay available for closed test networks). A :class:`Cell` needs
    none of them given: with :func:`kit_contexts` it makes those its URLs need."""
    from flare_async.transport import WebSocketDriver  # noqa: PLC0415 - aiohttp: on use

    server_tls, client_tls = kit_contexts(kit)
    return [
        TcpDriver(server_tls=server_tls, client_tls=client_tls),
        WebSocketDriver(server_ssl=server_tls, client_ssl=client_tls),
    ]


def load_handlers(spec: str) -> HandlerTable:
    """``module:name`` -> the :class:`HandlerTable` it names (or a function returning one).

    Raises:
        ConfigError: the module or name does not exist, or is not a handler table.
    """
    target = load_object(spec, "--handlers")
    table = target() if callable(target) and not isinstance(target, HandlerTable) else target
    if not isinstance(table, HandlerTable):
        raise ConfigError(f"--handlers {spec!r} is a {type(table).__name__}, not a HandlerTable")
    return table


def cell_from_kit(
    kit: Kit,
    *,
    handlers: Iterable[HandlerTable] = (),
    heartbeat: float | None = 15.0,
    handshake_timeout: float = 10.0,
    admins: dict[str, Identity] | None = None,
    on_link: Callable[[str, str, bool], None] | None = None,
    accept: Callable[[str, str, str], bool] | None = None,
    on_refused: Callable[[str, str, str, str], None] | None = None,
) -> Cell:
    """The cell a kit describes, with the ``sys`` handlers and ``handlers`` mounted.

    Args:
        admins: (the server) admit admin sessions and keep who is behind each (see
            :func:`kit_verifier`); an entry leaves when its link goes down.
        on_link: also called on every link change, after the event line is written.
        accept: which origins may send which channels/topics here (a site's policy).
        on_refused: called for every message refused for its signature (``(identity, cell,
            topic, reason)``): every message a kit's cell sends is signed, and every one it
            receives is checked (``security.MessageSigning``).
    """
    if kit.role is Role.ADMIN:
        raise IdentityError(f"{kit.name!r} is an admin kit: admins are not cells")

    def link_changed(peer: str, role: str, up: bool) -> None:
        emit("link-up" if up else "link-down", cell=kit.name, peer=peer, role=role)
        if not up and admins is not None:
            admins.pop(peer, None)
        if on_link is not None:
            on_link(peer, role, up)

    def identity_of(cell: str) -> str:
        """Admin sessions sign with their admin's certificate; every other cell with its own."""
        admin = admins.get(cell) if admins is not None else None
        return admin.name if admin is not None else cell

    server_tls, client_tls = kit_contexts(kit)
    return Cell(
        kit.name,
        listen=list(kit.listen),
        parent=kit.parent,
        server_tls=server_tls,  # the drivers its URLs need, built in (ws only where used)
        client_tls=client_tls,
        handlers=[system_handlers(), *handlers],
        verify_peer=kit_verifier(kit, admins),
        heartbeat=heartbeat,
        handshake_timeout=handshake_timeout,
        on_link=link_changed,
        accept=accept,
        signing=MessageSigning(
            Signer(kit),
            SignatureVerifier.from_kit(kit),
            identity_of=identity_of,
            on_refused=on_refused,
        ),
    )


def edge_client_from_kit(kit: Kit, server: str = "server", **options: Any) -> EdgeClient:
    """An intermittent edge client as a kit describes it: it visits its kit's parent URL
    (``wss://`` through a proxy) with the kit's certificate, signs every message and every
    result, and takes only tasks signed by the server (the project CA).

    ``options`` go to :class:`~flare_async.fl.EdgeClient` (config, codec, timeouts...).

    Raises:
        IdentityError: the kit is not a client's, or names no parent.
    """
    if kit.role is not Role.CLIENT or kit.parent is None:
        raise IdentityError(f"{kit.name!r} is not a client kit with a parent to visit")
    verifier = SignatureVerifier.from_kit(kit)
    return EdgeClient(
        kit.name,
        kit.parent,
        server,
        drivers=kit_drivers(kit),
        verify_peer=kit_verifier(kit),
        signing=MessageSigning(Signer(kit), verifier),
        signer=Signer(kit),
        task_verifier=verifier,
        **options,
    )
