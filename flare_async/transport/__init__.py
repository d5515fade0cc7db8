"""Transports (layer L2): the driver interface, the cell's scheme registry, and drivers.

This is the only layer where sockets and aiohttp live.
"""

from flare_async.transport._base import Driver, Link, Listener
from flare_async.transport._memory import MemoryLink, MemoryNetwork
from flare_async.transport._registry import DriverRegistry, url_scheme
from flare_async.transport._tcp import TcpDriver, TcpLink
from flare_async.transport._ws import WebSocketDriver

__all__ = [
    "Driver",
    "DriverRegistry",
    "Link",
    "Listener",
    "MemoryLink",
    "MemoryNetwork",
    "TcpDriver",
    "TcpLink",
    "WebSocketDriver",
    "url_scheme",
]
