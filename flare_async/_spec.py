"""``MODULE:NAME`` specs: how the CLI and worker processes name Python objects to load."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
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


def importable(spec: str, root: Path | None = None) -> str:
    """``spec`` as ``MODULE:NAME``, its module importable here and in child processes: ``root``
    (default: the current folder) first on the path, as ``python -m`` has it; for
    ``path/to/file.py[:NAME]`` the file's folder instead, and the module named after the file.

    Raises:
        ConfigError: no such file, a file name that is no module name, a file that does not
            import, or whose name another module already has.
    """
    root = Path.cwd() if root is None else root
    where, colon, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not where.endswith(".py"):
        on_path(root.resolve())
        return spec
    file = root / where
    if not file.is_file():
        raise ConfigError(f"no such file: {where} (in recipe {spec!r})")
    file = file.resolve()
    module = file.stem
    if not module.isidentifier():
        raise ConfigError(f"{file.name}: a recipe file's name must be a Python identifier")
    on_path(file.parent)
    try:
        loaded = sys.modules.get(module) or importlib.import_module(module)
    except (ImportError, SyntaxError) as exc:
        raise ConfigError(f"cannot load {file}: {exc}") from exc
    origin = getattr(loaded, "__file__", None)
    if origin is None or Path(origin).resolve() != file:
        raise ConfigError(
            f"{file.name}: the module name {module!r} is already another module's "
            f"({origin or 'built in'}); rename the file"
        )
    return f"{module}{colon}{name}"


def on_path(folder: Path) -> None:
    """``folder`` first on this process's import path and its children's (``PYTHONPATH``)."""
    text = str(folder)
    if text in sys.path:
        sys.path.remove(text)
    sys.path.insert(0, text)
    importlib.invalidate_caches()
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if text not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([text, *parts])
