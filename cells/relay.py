"""The relay role: a middle tier. It connects up to its parent, lets children connect to it,
and forwards whatever is not addressed to itself, payload untouched; with jobs, it folds its
subtree's signed results into one partial sum (``flare_async.fl.RelayAggregator``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from flare_async import Cell, Driver, HandlerTable, system_handlers
from flare_async.cli import RoleCell
from flare_async.security import Kit, Role


def build(
    name: str,
    *,
    parent: str,
    listen: Sequence[str],
    drivers: Iterable[Driver] = (),
    handlers: Iterable[HandlerTable] = (),
) -> Cell:
    """A relay cell: forwarding is built into every cell, so only ``sys`` is mounted by default."""
    return Cell(
        name,
        parent=parent,
        listen=listen,
        drivers=drivers,
        handlers=[system_handlers(), *handlers],
    )


def from_kit(
    kit: Kit,
    *,
    jobs: str | os.PathLike[str] | None = None,
    handlers: Iterable[HandlerTable] = (),
    on_event: Callable[..., None] | None = None,
    handshake_timeout: float = 10.0,
    heartbeat: float | None = 15.0,
) -> RoleCell:
    """The relay as ``flare-async run KIT --jobs DIR`` runs it: the kit's cell with, given
    ``jobs`` (its audit log there), the relay aggregator. The other arguments are
    ``RoleCell``'s.

    Raises:
        ConfigError: not a relay's kit.
    """
    return RoleCell(
        kit,
        role=Role.RELAY,
        jobs=jobs,
        handlers=handlers,
        on_event=on_event,
        handshake_timeout=handshake_timeout,
        heartbeat=heartbeat,
    )
