"""Streaming: objects of any size as chunks under credit-based flow control.

``_flow`` holds the two ends' credit arithmetic and verdicts, sans-IO (pure, like ``wire``);
``_send_state`` and ``_recv_state`` the protocol around it as explicit state machines, with
their transition tables (``SenderMachine``, ``ReceiverMachine``; shared parts in ``_state``),
also pure; ``_io`` the sources, the shared chunk log fan-out sends from, and the SHA-256
computed off the event loop; ``_progress`` the progress reports. The cell
(``flare_async.cell``) drives them.
"""

from flare_async.streaming._flow import (
    DEFAULT_CHUNK,
    DEFAULT_WINDOW,
    LARGE_CHUNK,
    LARGE_FROM,
    MAX_WINDOW,
    EndVerdict,
    ReceiverFlow,
    SenderFlow,
    Verdict,
    negotiate,
    pick_chunk,
)
from flare_async.streaming._io import (
    ChunkLog,
    ChunkSource,
    Digest,
    StreamSource,
    checksum,
    open_source,
)
from flare_async.streaming._progress import Progress, ProgressMeter

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_WINDOW",
    "LARGE_CHUNK",
    "LARGE_FROM",
    "MAX_WINDOW",
    "ChunkLog",
    "ChunkSource",
    "Digest",
    "EndVerdict",
    "Progress",
    "ProgressMeter",
    "ReceiverFlow",
    "SenderFlow",
    "StreamSource",
    "Verdict",
    "checksum",
    "negotiate",
    "open_source",
    "pick_chunk",
]
