"""The relay role: a middle tier. It connects up to its parent, lets children connect to it,
and forwards whatever is not addressed to itself, payload untouched."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flare_async import Cell, Driver, HandlerTable, system_handlers


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
