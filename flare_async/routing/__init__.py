"""Cell names and the per-hop routing rule (ARCHITECTURE §2). Pure, synchronous code."""

from flare_async.routing._names import MAX_DEPTH, MAX_PART, CellName, validate_name
from flare_async.routing._router import LOCAL, PARENT, check_route, next_hop

__all__ = [
    "LOCAL",
    "MAX_DEPTH",
    "MAX_PART",
    "PARENT",
    "CellName",
    "check_route",
    "next_hop",
    "validate_name",
]
