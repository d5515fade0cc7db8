"""The edge role: a site. It connects to its parent and runs the site's handlers; with jobs, it
runs the server's jobs in training processes of its own (``flare_async.fl.SiteJobs``) under the
privacy policy of its kit's ``policy.toml`` (``flare_async.fl.load_policy``), which also decides
what the cell accepts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from flare_async import Cell, Driver, HandlerTable, system_handlers
from flare_async.cli import RoleCell
from flare_async.security import Kit, Role


def build(
    name: str,
    *,
    parent: str,
    drivers: Iterable[Driver] = (),
    handlers: Iterable[HandlerTable] = (),
) -> Cell:
    """An edge cell with the ``sys`` handlers and the site's ``handlers`` mounted."""
    return Cell(name, parent=parent, drivers=drivers, handlers=[system_handlers(), *handlers])


def from_kit(
    kit: Kit,
    *,
    jobs: str | os.PathLike[str] | None = None,
    handlers: Iterable[HandlerTable] = (),
    on_event: Callable[..., None] | None = None,
    handshake_timeout: float = 10.0,
    heartbeat: float | None = 15.0,
) -> RoleCell:
    """The site as ``flare-async run KIT --jobs DIR`` runs it: the kit's cell with, given
    ``jobs`` (its jobs' logs there), the site's job runner and policy. The other arguments
    are ``RoleCell``'s.

    Raises:
        ConfigError: not a site's (client's) kit.
    """
    return RoleCell(
        kit,
        role=Role.CLIENT,
        jobs=jobs,
        handlers=handlers,
        on_event=on_event,
        handshake_timeout=handshake_timeout,
        heartbeat=heartbeat,
    )
