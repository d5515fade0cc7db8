"""Streaming: objects of any size as chunks under credit-based flow control.

``_flow`` holds the two ends' credit arithmetic and verdicts, sans-IO (pure, like ``wire``);
``_send_state`` and ``_recv_state`` the protocol around it as explicit state machines, with
their transition tables (``SenderMachine``, ``ReceiverMachine``; shared parts in ``_state``),
also pure; ``_progress`` the progress reports. The whole package is pure (no I/O, no threads,
no waiting, no clock: time comes in as an argument). The cell (``flare_async.cell``:
``_stream_out``, ``_stream_in``) executes the machines: it turns frames into their events and
their actions into frames, waits and errors; the I/O half (sources, the shared chunk log
fan-out sends from, the SHA-256 computed off the event loop) is ``cell/_sources.py``.

The actions' names say whose they are where a bare word would be ambiguous: ``Sender*`` and
``Receiver*`` for one end's, ``Stream*`` for those both ends return (``StreamWait``,
``StreamFail``).
"""

from flare_async.streaming._digest import ALGORITHMS as DIGESTS
from flare_async.streaming._digest import (
    BLAKE3,
    CRC32C,
    CRYPTOGRAPHIC,
    SHA256,
    CrcDigest,
    check_algorithm,
    crc32c_combine,
    format_digest,
    normalize_digest,
    parse_digest,
)
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
    checksum,
    negotiate,
    pick_chunk,
)
from flare_async.streaming._progress import Progress, ProgressMeter
from flare_async.streaming._recv_state import (
    Ack,
    AskResend,
    Deliver,
    ReceiverAction,
    ReceiverComplete,
    ReceiverMachine,
    ReceiverState,
    receiver_idle,
)
from flare_async.streaming._send_state import (
    Committed,
    Probe,
    Rewind,
    SendData,
    SendEnd,
    SenderAction,
    SenderBackoff,
    SenderDone,
    SenderMachine,
    SenderState,
    SendOpen,
)
from flare_async.streaming._state import StreamFail, StreamWait

__all__ = [
    # the protocol as state machines, and the actions they return (the cell carries them out)
    "SenderMachine",
    "SenderState",
    "SenderAction",
    "SendOpen",
    "Probe",
    "SendData",
    "SendEnd",
    "SenderBackoff",
    "Rewind",
    "Committed",
    "SenderDone",
    "ReceiverMachine",
    "ReceiverState",
    "ReceiverAction",
    "Ack",
    "AskResend",
    "Deliver",
    "ReceiverComplete",
    "StreamWait",
    "StreamFail",
    "receiver_idle",
    # credit arithmetic, chunk checksums, progress
    "DEFAULT_CHUNK",
    "DEFAULT_WINDOW",
    "LARGE_CHUNK",
    "LARGE_FROM",
    "MAX_WINDOW",
    "EndVerdict",
    "Progress",
    "ProgressMeter",
    "ReceiverFlow",
    "SenderFlow",
    "Verdict",
    "checksum",
    "negotiate",
    "pick_chunk",
    # whole-object digests: names, text form, CRC-32C combined from the chunks'
    "BLAKE3",
    "CRC32C",
    "CRYPTOGRAPHIC",
    "DIGESTS",
    "SHA256",
    "CrcDigest",
    "check_algorithm",
    "crc32c_combine",
    "format_digest",
    "normalize_digest",
    "parse_digest",
]
