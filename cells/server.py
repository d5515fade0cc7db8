"""The server role: the root of the tree. Children connect to its listen URLs; with jobs, it
runs the job service (``flare_async.fl.JobManager``) for the admins its kit's ``admins.toml``
names (``flare_async.fl.AdminRights``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from flare_async import Cell, Driver, HandlerTable, system_handlers
from flare_async.cli import RoleCell
from flare_async.security import Kit, Role


def build(
    name: str = "server",
    *,
    listen: Sequence[str],
    drivers: Iterable[Driver] = (),
    handlers: Iterable[HandlerTable] = (),
) -> Cell:
    """A root cell with the ``sys`` handlers and ``handlers`` mounted."""
    return Cell(name, listen=listen, drivers=drivers, handlers=[system_handlers(), *handlers])


def from_kit(
    kit: Kit,
    *,
    jobs: str | os.PathLike[str] | None = None,
    handlers: Iterable[HandlerTable] = (),
    on_event: Callable[..., None] | None = None,
    handshake_timeout: float = 10.0,
    heartbeat: float | None = 15.0,
) -> RoleCell:
    """The server as ``flare-async run KIT --jobs DIR`` runs it: the kit's cell with, given
    ``jobs``, the job service keeping its jobs there. The other arguments are
    ``RoleCell``'s.

    Raises:
        ConfigError: not a server's kit.
    """
    return RoleCell(
        kit,
        role=Role.SERVER,
        jobs=jobs,
        handlers=handlers,
        on_event=on_event,
        handshake_timeout=handshake_timeout,
        heartbeat=heartbeat,
    )
