"""The edge role: a site. It connects to its parent and runs the site's handlers."""

from __future__ import annotations

from collections.abc import Iterable

from flare_async import Cell, Driver, HandlerTable, system_handlers


def build(
    name: str,
    *,
    parent: str,
    drivers: Iterable[Driver] = (),
    handlers: Iterable[HandlerTable] = (),
) -> Cell:
    """An edge cell with the ``sys`` handlers and the site's ``handlers`` mounted."""
    return Cell(name, parent=parent, drivers=drivers, handlers=[system_handlers(), *handlers])
