"""The per-hop routing rule (ARCHITECTURE §2).

Every hop decides from names alone:

1. the destination is this cell            -> deliver locally (:data:`LOCAL`);
2. a directly connected cell (a child, or an optional peer) whose name is the destination or
   an ancestor of it                       -> send there; the deepest such name wins;
3. otherwise, if the destination lies below this cell, it does not exist (nothing connected
   leads there): :class:`~flare_async.errors.Unreachable`, answered at once;
4. otherwise up to the parent (:data:`PARENT`); a root with nowhere to go answers ``Unreachable``.

There is no global routing table to keep in sync. Loops and excess hops are caught by
:func:`check_route`, because every hop appends itself to the message's bounded route list.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Final

from flare_async.errors import Unreachable

LOCAL: Final = ""
"""Returned by :func:`next_hop` when the message is for this cell."""
PARENT: Final = "^"
"""Returned by :func:`next_hop` when the message goes up to the parent."""


def next_hop(me: str, dst: str, connected: Container[str], has_parent: bool) -> str:
    """Decide where a message for ``dst`` goes next from the cell ``me``.

    Args:
        me: this cell's name.
        dst: the destination's name (already validated).
        connected: names of directly connected non-parent cells (children and peers).
        has_parent: whether this cell has a live link to its parent.

    Returns:
        :data:`LOCAL`, :data:`PARENT`, or the name of the connected cell to send to.

    Raises:
        Unreachable: nothing leads to ``dst`` from here.
    """
    if dst == me:
        return LOCAL
    below_me = dst.startswith(me) and dst[len(me) : len(me) + 1] == "."
    name = dst
    while True:
        if name in connected:
            return name
        cut = name.rfind(".")
        if cut < 0:
            break
        name = name[:cut]
        if below_me and len(name) <= len(me):
            break
    if below_me:
        raise Unreachable(f"no cell named {dst!r} is connected below {me!r}")
    if has_parent:
        return PARENT
    raise Unreachable(f"no route to {dst!r}: {me!r} is a root with no link leading there")


def check_route(me: str, route: Sequence[str], max_route: int) -> None:
    """Refuse a message that already passed through ``me`` or has used up its hops.

    Raises:
        Unreachable: a loop (``me`` is on the route) or the hop limit is reached.
    """
    if me in route:
        raise Unreachable(f"routing loop: {me!r} is already on the route {list(route)!r}")
    if len(route) >= max_route:
        raise Unreachable(f"hop limit of {max_route} reached at {me!r}")
