"""Transports (layer L2): the driver interface, the cell's scheme registry, and drivers.

This is the only layer where sockets and aiohttp live. ``WebSocketDriver`` is imported on first
use: aiohttp adds about 30 MiB to a process, which a cell that never speaks ws:// (most of the
ones a simulation runs) should not pay.
"""

from typing import TYPE_CHECKING, Any

from flare_async.transport._base import (
    Admission,
    Driver,
    Link,
    LinkFacts,
    LinkStatistics,
    Listener,
    PushDelivery,
    Splicing,
)
from flare_async.transport._memory import MemoryLink, MemoryNetwork
from flare_async.transport._registry import DriverRegistry, url_scheme
from flare_async.transport._tcp import TcpDriver
from flare_async.transport._tcp_base import TcpLink

if TYPE_CHECKING:
    from flare_async.transport._ws import WebSocketDriver


def __getattr__(name: str) -> Any:
    if name == "WebSocketDriver":
        from flare_async.transport._ws import WebSocketDriver  # noqa: PLC0415 - see above

        return WebSocketDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Admission",
    "Driver",
    "DriverRegistry",
    "Link",
    "LinkFacts",
    "LinkStatistics",
    "Listener",
    "MemoryLink",
    "MemoryNetwork",
    "PushDelivery",
    "Splicing",
    "TcpDriver",
    "TcpLink",
    "WebSocketDriver",
    "url_scheme",
]
