"""The ``flare-async`` command line (layer L5, a composition root)."""

from flare_async.cli._main import main

__all__ = ["main"]
