"""The server role: the root of the tree. Children connect to its listen URLs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flare_async import Cell, Driver, HandlerTable, system_handlers


def build(
    name: str = "server",
    *,
    listen: Sequence[str],
    drivers: Iterable[Driver] = (),
    handlers: Iterable[HandlerTable] = (),
) -> Cell:
    """A root cell with the ``sys`` handlers and ``handlers`` mounted."""
    return Cell(name, listen=listen, drivers=drivers, handlers=[system_handlers(), *handlers])
