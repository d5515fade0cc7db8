"""The hello exchange that opens every link: protocol version, identity and capabilities.

Both sides send a :class:`~flare_async.wire.Hello` as their first frame. The connector says what
it is to the acceptor (``child`` or ``peer``); the acceptor answers ``parent`` or ``peer``.
:func:`check_hello` is the pure decision each side applies to what it received.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final, Literal

import msgspec

from flare_async.errors import IdentityError, InvalidName, ProtocolError, VersionMismatch
from flare_async.routing import validate_name
from flare_async.wire._envelope import Hello
from flare_async.wire._frame import Limits

PROTOCOL_VERSION: Final = 1
MIN_PROTOCOL_VERSION: Final = 1

HELLO_LIMITS: Final = Limits(max_header=16 * 1024, max_frame=0, max_route=2)
"""What an accepting side reads before the peer's hello was accepted (docs/design.md §3): a
hello or a goodbye, both headers without a payload. A bigger announcement is a ProtocolError
and the link closes before a byte of it is read; the full limits apply after the hello."""
HELLO_BUFFER: Final = 16 * 1024 + 64
"""Read buffer of a link before its hello (grown to the full one once the hello is accepted)."""

Role = Literal["child", "parent", "peer"]


class Session(msgspec.Struct, frozen=True):
    """What a link agreed on in its hello exchange.

    Attributes:
        peer: the peer's cell name.
        role: what the peer is to us (``child``, ``parent`` or ``peer``).
        version: the protocol version both sides speak on this link.
        capabilities: features both sides support.
        peer_limits: limits to respect when sending to the peer.
        peer_heartbeat: the interval at which the peer pings when idle (0: never).
    """

    peer: str
    role: str
    version: int
    capabilities: frozenset[str]
    peer_limits: Limits
    peer_heartbeat: float


def make_hello(
    name: str,
    role: Role,
    limits: Limits,
    capabilities: frozenset[str] = frozenset(),
    heartbeat: float = 0.0,
) -> Hello:
    """The hello this side sends."""
    return Hello(
        name=name,
        version=PROTOCOL_VERSION,
        min_version=MIN_PROTOCOL_VERSION,
        role=role,
        capabilities=sorted(capabilities),
        max_header=limits.max_header,
        max_frame=limits.max_frame,
        heartbeat=heartbeat,
    )


@lru_cache(maxsize=64)
def _interned(common: frozenset[str]) -> frozenset[str]:
    """One object per set of common capabilities, not one per link (a relay of thousands of
    sites held thousands of equal sets). Keyed by the intersection, a subset of our own
    capabilities: never by what a peer sent, which may be as long as a header allows."""
    return common


def check_hello(local: Hello, remote: object, *, expect: Role) -> Session:
    """Decide whether to accept the peer's hello.

    Args:
        local: the hello this side sent.
        remote: the first header received on the link.
        expect: what the peer must be to us: ``child`` (we accepted a connection from below),
            ``parent`` (we connected up), or ``peer``.

    Raises:
        ProtocolError: the first frame is not a hello, or its limits are unusable.
        VersionMismatch: no protocol version in common.
        IdentityError: the peer's name or role does not fit where it connects.
    """
    if not isinstance(remote, Hello):
        raise ProtocolError(f"expected a hello as first frame, got {type(remote).__name__}")
    try:
        validate_name(remote.name)
    except InvalidName as exc:
        raise IdentityError(f"hello with an invalid name: {exc}") from None
    version = min(local.version, remote.version)
    if version < max(local.min_version, remote.min_version):
        raise VersionMismatch(
            f"{remote.name!r} speaks protocol {remote.min_version}..{remote.version}, "
            f"we speak {local.min_version}..{local.version}"
        )
    me, them = local.name, remote.name
    if remote.role != expect:
        raise IdentityError(f"{them!r} says it is our {remote.role!r}, expected {expect!r}")
    if them == me:
        raise IdentityError(f"{them!r} claims this cell's own name")
    if expect == "child" and not them.startswith(me + "."):
        raise IdentityError(f"{them!r} may not connect as a child of {me!r}: not below it")
    if expect == "parent" and not me.startswith(them + "."):
        raise IdentityError(f"{them!r} answered as our parent but {me!r} is not below it")
    if expect == "peer" and (me.startswith(them + ".") or them.startswith(me + ".")):
        raise IdentityError(f"{them!r} and {me!r} are in one branch: connect as parent/child")
    try:
        peer_limits = Limits(
            max_header=remote.max_header, max_frame=remote.max_frame, max_route=1024
        )
    except ValueError as exc:
        raise ProtocolError(f"hello from {them!r} announces unusable limits: {exc}") from None
    if remote.heartbeat < 0 or remote.heartbeat != remote.heartbeat:  # negative or NaN
        raise ProtocolError(f"hello from {them!r} announces a bad heartbeat {remote.heartbeat}")
    return Session(
        peer=them,
        role=expect,
        version=version,
        capabilities=_interned(frozenset(local.capabilities) & frozenset(remote.capabilities)),
        peer_limits=peer_limits,
        peer_heartbeat=remote.heartbeat,
    )
