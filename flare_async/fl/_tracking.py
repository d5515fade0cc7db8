"""Values a training script tracks (``flare.log``, the writers of
:mod:`flare_async.client.tracking`), on their way from the script to the server.

A record is one value: ``{"key", "value", "step", "type", "time"}`` (the server adds
``"site"``). Scalars are floats (a NaN or infinite loss travels as the string ``"nan"``,
``"inf"``, ``"-inf"``: the stored lines stay strict JSON); text, parameters and tags are
strings. The site batches the records its script made since the last batch into one
``fl/metrics`` request to the server (before each result, so a round's values are stored by
the time its result counts, and at once when the script logs while nothing is sending); the
server checks each batch (:func:`check_batch`) and keeps them per job, site, key and step.
"""

from __future__ import annotations

import enum
import json
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

MAX_KEY = 256
"""Longest key, in characters."""
MAX_TEXT = 4096
"""Longest text value, in characters."""
MAX_BATCH = 10_000
"""Most records in one batch."""
MAX_PER_SITE = 1_000_000
"""Most records the server keeps per job and site (the rest are counted and dropped)."""
MAX_WAITING = 100_000
"""Most records a site holds while the server cannot be reached (the oldest are dropped)."""


class AnalyticsDataType(enum.StrEnum):
    """What a tracked value is (FLARE's names)."""

    SCALAR = "SCALAR"
    SCALARS = "SCALARS"
    METRIC = "METRIC"
    METRICS = "METRICS"
    TEXT = "TEXT"
    PARAMETER = "PARAMETER"
    PARAMETERS = "PARAMETERS"
    TAG = "TAG"
    TAGS = "TAGS"


_NUMERIC = frozenset({"SCALAR", "METRIC"})
_STRING = frozenset({"TEXT", "PARAMETER", "TAG"})
_PLURAL = {"SCALARS": "SCALAR", "METRICS": "METRIC", "PARAMETERS": "PARAMETER", "TAGS": "TAG"}


def _number(value: Any) -> float | str:
    x = float(value)
    return x if math.isfinite(x) else str(x)


def records(
    key: str, value: Any, data_type: AnalyticsDataType | str = "SCALAR", step: int | None = None
) -> list[dict[str, Any]]:
    """The records one call makes (a plural type: one per entry of ``value``, a dict, named
    ``key/entry`` as TensorBoard's ``add_scalars`` does; ``key`` empty: just ``entry``).

    Raises:
        TypeError / ValueError: a value that does not fit its type, a bad key or step.
    """
    kind = AnalyticsDataType(str(getattr(data_type, "value", data_type)).upper()).value
    if kind in _PLURAL:
        if not isinstance(value, Mapping):
            raise TypeError(f"a {kind} value is a dict of name to value, not {type(value)}")
        single = _PLURAL[kind]
        return [
            rec
            for name, v in value.items()
            for rec in records(f"{key}/{name}" if key else str(name), v, single, step)
        ]
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise ValueError(f"a key is a string of 1 to {MAX_KEY} characters, not {key!r:.80}")
    if step is not None and (isinstance(step, bool) or int(step) != step):
        raise ValueError(f"a step is an integer, not {step!r}")
    out: float | str
    if kind in _NUMERIC:
        if isinstance(value, bool) or (
            not isinstance(value, int | float) and not hasattr(value, "__float__")
        ):
            raise TypeError(f"a {kind} value is a number, not {type(value).__name__}")
        out = _number(value)
    else:
        out = str(value)[:MAX_TEXT]
    return [
        {
            "key": key,
            "value": out,
            "step": None if step is None else int(step),
            "type": kind,
            "time": round(time.time(), 3),
        }
    ]


class MetricsBuffer:
    """Records made by a script (any thread) until the site sends them: at most
    ``MAX_WAITING`` (past that the oldest go, counted in ``dropped``)."""

    def __init__(self, limit: int = MAX_WAITING) -> None:
        self._lock = threading.Lock()
        self._items: list[dict[str, Any]] = []
        self.limit = limit
        self.dropped = 0

    def add(self, recs: list[dict[str, Any]]) -> bool:
        """Keep ``recs``; True if the buffer was empty (a flush should be started)."""
        with self._lock:
            was_empty = not self._items
            self._items.extend(recs)
            self._trim()
            return was_empty and bool(recs)

    def take(self, limit: int = MAX_BATCH) -> list[dict[str, Any]]:
        with self._lock:
            out, self._items = self._items[:limit], self._items[limit:]
            return out

    def put_back(self, recs: list[dict[str, Any]]) -> None:
        """Records a send did not deliver, first in line again."""
        with self._lock:
            self._items[:0] = recs
            self._trim()

    def _trim(self) -> None:
        over = len(self._items) - self.limit
        if over > 0:
            del self._items[:over]
            self.dropped += over

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def check_batch(body: bytes) -> list[dict[str, Any]]:
    """The records of a batch a site sent, checked (nothing a site sends is trusted).

    Raises:
        ValueError / TypeError: not a list of well-formed records, or too many.
    """
    doc = json.loads(body)
    if not isinstance(doc, list) or len(doc) > MAX_BATCH:
        raise ValueError(f"a batch is a list of at most {MAX_BATCH} records")
    out = []
    for rec in doc:
        if not isinstance(rec, dict):
            raise TypeError("a record is an object")
        kind = str(rec.get("type", "SCALAR"))
        if kind not in _NUMERIC | _STRING:
            raise ValueError(f"unknown record type {kind!r:.40}")
        value = rec.get("value")
        if kind in _NUMERIC and isinstance(value, str):
            value = float(value)  # "nan", "inf" (anything else fails here)
        checked = records(str(rec.get("key", "")), value, kind, rec.get("step"))[0]
        t = rec.get("time")
        if isinstance(t, int | float) and math.isfinite(t):
            checked["time"] = float(t)
        out.append(checked)
    return out


__all__ = [
    "MAX_BATCH",
    "MAX_PER_SITE",
    "AnalyticsDataType",
    "MetricsBuffer",
    "check_batch",
    "records",
]
