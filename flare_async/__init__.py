"""flare_async: an asynchronous runtime and SDK for federated learning.

One kind of participant, the :class:`Cell`; a routed message fabric with request/reply, events
and broadcast through relays of any depth; transports from in-process memory to mTLS sockets.
"""

from flare_async import errors
from flare_async.cell import (
    Backoff,
    BroadcastResults,
    Cell,
    CellStatistics,
    Context,
    HandlerTable,
    IncomingStream,
    Outcome,
    Payload,
    system_handlers,
)
from flare_async.routing import CellName
from flare_async.streaming import Progress
from flare_async.transport import Driver, Link, Listener, MemoryNetwork
from flare_async.wire import Limits

__version__ = "0.1.0"

__all__ = [
    # the participant
    "Cell",
    "HandlerTable",
    "Context",
    "Payload",
    "BroadcastResults",
    "Outcome",
    "CellStatistics",
    "Backoff",
    "system_handlers",
    # streams
    "IncomingStream",
    "Progress",
    "CellName",
    "Limits",
    # transports
    "Driver",
    "Link",
    "Listener",
    "MemoryNetwork",
    # errors live in their own module: flare_async.errors
    "errors",
    "__version__",
]
