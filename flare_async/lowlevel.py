"""The face for people who extend the fabric: driver authors and codec authors.

Users of flare_async need none of this (``flare_async``, ``flare_async.fl`` and
``flare_async.client`` are theirs; see docs/design.md, "Public faces"). A transport implements
:class:`Driver`, :class:`Listener` and :class:`Link`, which move whole :class:`Frame` objects
(a link may also offer the capabilities :class:`PushDelivery` and :class:`Splicing`);
a byte-stream transport cuts bytes into frames with the sans-IO :class:`Connection`, a
message-based one writes ``encode_head`` + payload per message and reads them back with
``decode_frame``. A codec is anything that has the shape of :class:`Codec`, registered in a cell's
:class:`CodecRegistry`. The stream pieces are the sans-IO ends of a stream (the state machines
:class:`SenderMachine` and :class:`ReceiverMachine` with their actions, the credit, resending,
checksums) that the cell executes, for work on the stream protocol itself.

Everything here is re-exported from the layer packages, unchanged: ``flare_async.transport``,
``flare_async.wire``, ``flare_async.codecs``, ``flare_async.streaming``, whose own faces hold the
rest (every message kind, the hello, the quantization kernels...). The errors a driver raises
(``LinkClosed``, ``LinkBroken``, ``FrameTooLarge``, ``ConnectError``, ``DecodeError``...) are in
:mod:`flare_async.errors`; the conformance suite a driver must pass and fault injection are in
:mod:`flare_async.testing`. Nothing inside the package imports this module.
"""

from flare_async.codecs import Codec, CodecRegistry, TensorCodec, default_codecs
from flare_async.streaming import (
    DEFAULT_CHUNK,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    Ack,
    AskResend,
    Committed,
    Deliver,
    EndVerdict,
    Probe,
    ReceiverAction,
    ReceiverComplete,
    ReceiverFlow,
    ReceiverMachine,
    ReceiverState,
    Rewind,
    SendData,
    SendEnd,
    SenderAction,
    SenderBackoff,
    SenderDone,
    SenderFlow,
    SenderMachine,
    SenderState,
    SendOpen,
    StreamFail,
    StreamWait,
    Verdict,
    checksum,
    negotiate,
    pick_chunk,
    receiver_idle,
)
from flare_async.transport import (
    Admission,
    Driver,
    DriverRegistry,
    Link,
    LinkFacts,
    LinkStatistics,
    Listener,
    PushDelivery,
    Splicing,
    url_scheme,
)
from flare_async.wire import (
    EOF,
    HELLO_BUFFER,
    HELLO_LIMITS,
    NEED_DATA,
    PREFIX_SIZE,
    Buffer,
    Connection,
    Envelope,
    Frame,
    Limits,
    Passing,
    decode_frame,
    encode_head,
    payload_size,
)

__all__ = [
    # drivers: the interfaces a transport implements, and how a cell picks one by URL scheme
    "Driver",
    "Listener",
    "Link",
    "LinkFacts",
    "LinkStatistics",
    "PushDelivery",
    "Splicing",
    "Admission",
    "DriverRegistry",
    "url_scheme",
    # frames: what a link carries, and the sans-IO framing of a byte stream
    "Frame",
    "Passing",
    "Envelope",
    "Buffer",
    "Limits",
    "HELLO_LIMITS",
    "HELLO_BUFFER",
    "Connection",
    "NEED_DATA",
    "EOF",
    "PREFIX_SIZE",
    "encode_head",
    "decode_frame",
    "payload_size",
    # codecs
    "Codec",
    "CodecRegistry",
    "TensorCodec",
    "default_codecs",
    # streams: the protocol as sans-IO state machines and the actions they return
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
    # streams: the sans-IO flow of one stream, its sources and its checks
    "SenderFlow",
    "ReceiverFlow",
    "Verdict",
    "EndVerdict",
    "negotiate",
    "pick_chunk",
    "DEFAULT_CHUNK",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "checksum",
]
