"""``MODULE:NAME`` specs: how the CLI and worker processes name Python objects to load."""

from __future__ import annotations

import importlib
from typing import Any

from flare_async.errors import ConfigError


def load_object(spec: str, what: str, default: str | None = None) -> Any:
    """The object ``MODULE:NAME`` names (``MODULE`` alone means ``MODULE:default``).

    Raises:
        ConfigError: a malformed spec, a module that does not import, a name it lacks.
    """
    module_name, _, attr = spec.partition(":")
    attr = attr or (default or "")
    if not module_name or not attr:
        raise ConfigError(f"{what} {spec!r}: expected MODULE:NAME")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the {what} {spec!r}: {exc}") from None
