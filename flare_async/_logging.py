"""Logging: the one module that imports structlog (ARCHITECTURE §1, §10).

Library code asks :func:`get_logger` for a logger and binds context (cell, peer, message) to
it. Composition roots (L5) call :func:`configure` once: JSON lines rendered with orjson for
production, a readable console format for terminals. Until something configures structlog,
loggers write warnings and errors to stderr only, so library use never prints to stdout.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

__all__ = ["configure", "get_logger"]

_FALLBACK: Any = None


def _fallback() -> Any:
    global _FALLBACK  # noqa: PLW0603 - one lazily built default, never mutated after
    if _FALLBACK is None:
        _FALLBACK = structlog.wrap_logger(
            structlog.PrintLogger(sys.stderr),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso"),
                structlog.dev.ConsoleRenderer(
                    colors=False, exception_formatter=structlog.dev.plain_traceback
                ),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        )
    return _FALLBACK


def get_logger(**bind: Any) -> Any:
    """A structlog bound logger with ``bind`` as context."""
    if structlog.is_configured():
        return structlog.get_logger("flare_async").bind(**bind)
    return _fallback().bind(**bind)


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(
    *, json: bool = False, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Configure structlog for a process (call from a composition root only).

    Args:
        json: JSON lines (production) instead of the console format.
        level: lowest level written.
        stream: where to write; stderr by default, so stdout stays free for results.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
