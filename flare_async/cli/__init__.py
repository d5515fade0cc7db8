"""The ``flare-async`` command line (layer L5, a composition root), and the cells a startup
kit describes for programs of your own: ``cell_from_kit`` (the cell alone),
``edge_client_from_kit``, and ``RoleCell`` (the cell with its role's part in FL jobs, exactly as
``flare-async run --jobs`` and the repo's ``cells/`` build it)."""

from flare_async.cli._kit import cell_from_kit, edge_client_from_kit
from flare_async.cli._main import main
from flare_async.cli._roles import RoleCell

__all__ = ["RoleCell", "cell_from_kit", "edge_client_from_kit", "main"]
