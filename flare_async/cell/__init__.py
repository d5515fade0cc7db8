"""The runtime (layer L3): the Cell, handler tables, dispatch and request/reply."""

from flare_async.cell._api import CellAPI, CellStatistics, StreamStatistics
from flare_async.cell._cell import BroadcastResults, Cell, Outcome
from flare_async.cell._handlers import Context, HandlerTable, Kind
from flare_async.cell._inline import INLINE_MAX, InlineStream
from flare_async.cell._links import Backoff, PeerVerifier
from flare_async.cell._payload import Payload
from flare_async.cell._sources import StreamSource
from flare_async.cell._stream_in import IncomingStream
from flare_async.cell._system import CellInfo, system_handlers

__all__ = [
    "Backoff",
    "BroadcastResults",
    "Cell",
    "CellAPI",
    "CellInfo",
    "CellStatistics",
    "Context",
    "HandlerTable",
    "INLINE_MAX",
    "IncomingStream",
    "InlineStream",
    "Kind",
    "Outcome",
    "Payload",
    "PeerVerifier",
    "StreamSource",
    "StreamStatistics",
    "system_handlers",
]
