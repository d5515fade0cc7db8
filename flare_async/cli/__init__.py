"""The ``flare-async`` command line (layer L5, a composition root), and the cells a startup
kit describes (``cell_from_kit``, ``edge_client_from_kit``) for programs of your own."""

from flare_async.cli._kit import cell_from_kit, edge_client_from_kit
from flare_async.cli._main import main

__all__ = ["cell_from_kit", "edge_client_from_kit", "main"]
