"""Training scripts named so that another process can run them (``MODULE:FUNCTION``)."""

from __future__ import annotations

from collections.abc import Callable

from flare_async._spec import load_object
from flare_async.errors import ConfigError


def script_spec(script: Callable[[], object] | str) -> str:
    """``MODULE:FUNCTION`` naming ``script`` (see :meth:`FedAvgRecipe.script_spec`)."""
    if isinstance(script, str):
        return script
    module, name = getattr(script, "__module__", None), getattr(script, "__qualname__", "")
    spec = f"{module}:{name}"
    if not module or module == "__main__" or "<" in name or "." in name:
        raise ConfigError(
            f"the training script {spec} cannot run in its own process: it must be a "
            "module-level function of an importable module (or a 'MODULE:FUNCTION' string)"
        )
    try:
        found = load_object(spec, "training script")
    except ConfigError as exc:
        raise ConfigError(f"the training script {spec} cannot be imported by name: {exc}") from None
    if found is not script:
        raise ConfigError(f"{spec} names another object than the recipe's training script")
    return spec


__all__ = ["script_spec"]
