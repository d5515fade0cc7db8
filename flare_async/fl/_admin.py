"""The admin protocol's request bodies (channel ``job``, JSON), as typed structs decoded once.

A body that does not fit its struct (not JSON, a field of the wrong type, an unknown field) is a
``BadRequest`` that names the field, before the job service acts on any of it::

    submit    {"recipe": "MODULE:NAME", "overrides": {...}, "sites": ["server.site-1", ...],
               "code": {...}}   the job's own code, signed (fl/_artifact.py); absent: the
                                recipe is installed on the server and the sites
    status    {"id": JOB}            abort, download: the same
    logs      {"id": JOB, "site": ""}   a site's training logs, or (no site) the job's events
    metrics   {"id": JOB, "site": "", "key": "", "limit": 10000}   limit clamped to 1..100,000
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from flare_async.cell import Payload
from flare_async.errors import BadRequest

T = TypeVar("T", bound=msgspec.Struct)

METRICS_LIMIT = 100_000
"""The most tracked values one ``metrics`` request returns."""


class Submit(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    recipe: str
    overrides: dict[str, Any] = msgspec.field(default_factory=dict)
    sites: list[str] = msgspec.field(default_factory=list)
    code: dict[str, Any] | None = None


class JobRef(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str


class Logs(JobRef, frozen=True):
    site: str = ""


class Metrics(JobRef, frozen=True):
    site: str = ""
    key: str = ""
    limit: int = 10_000

    @property
    def clamped(self) -> int:
        return min(max(1, self.limit), METRICS_LIMIT)


def decode_as(msg: Payload, kind: type[T]) -> T:
    """``msg``'s JSON body as ``kind``.

    Raises:
        BadRequest: not JSON, or not a ``kind`` (the message names the field).
    """
    try:
        return msgspec.json.decode(msg.tobytes() or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"a {kind.__name__.lower()} request that does not fit: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"not JSON: {exc}") from None


__all__ = ["METRICS_LIMIT", "JobRef", "Logs", "Metrics", "Submit", "decode_as"]
