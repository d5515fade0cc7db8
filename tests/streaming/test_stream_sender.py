"""The cell's sending end (``cell/_stream_out.StreamSender``) against a scripted port: the
frames it sends for what the receiver answers, with the timing of each answer chosen here."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import anyio
import pytest

from flare_async.cell._sources import ChunkLog, open_source
from flare_async.cell._stream_out import StreamOptions, StreamSender
from flare_async.wire import Frame, StreamAck, StreamData, StreamDone, StreamEnd, originate

pytestmark = pytest.mark.anyio

C = 4096
W = 4 * C
SID = 7
DST = "server.e"


class Quiet:
    def info(self, *args: Any, **kwargs: Any) -> None: ...

    def warning(self, *args: Any, **kwargs: Any) -> None: ...


class ScriptedPort:
    """Records what the sender sends; the send of the chunk at ``hold_at`` waits for
    :attr:`release` (as a full link would), so answers can come in meanwhile."""

    name = "server"
    log = Quiet()

    def __init__(self, hold_at: int) -> None:
        self.hold_at = hold_at
        self.holding = anyio.Event()
        self.release = anyio.Event()
        self.sent: list[Frame] = []
        self.posted: list[Frame] = []
        self._id = 0

    def clock(self) -> float:
        return anyio.current_time()

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def random(self) -> float:
        return 0.5

    def post(self, frame: Frame) -> None:
        self.posted.append(frame)

    async def send(self, frame: Frame, deadline: float = math.inf) -> None:
        self.sent.append(frame)
        h = frame.header
        if isinstance(h, StreamData) and h.offset == self.hold_at and not self.release.is_set():
            self.holding.set()
            await self.release.wait()

    def offsets(self) -> list[int]:
        return [f.header.offset for f in self.sent if isinstance(f.header, StreamData)]


def answer(kind: type[StreamAck | StreamDone], **fields: Any) -> tuple[Any, Frame]:
    h = originate(kind, 1, DST, "server", sid=SID, **fields)
    return h, Frame(h)


async def test_a_chunk_whose_send_returns_after_a_rewind_is_not_skipped() -> None:
    """The receiver lost the chunk at C and asks for everything from there while the chunk at
    2C is still being sent: the sender goes back to C. Before the state machines, the send of
    2C returning moved the sender on from the rewound offset (to 2C), so the chunk at C went
    again only after a probe interval (the receiver ignores chunks past a gap it reported)."""
    port = ScriptedPort(hold_at=2 * C)
    data = bytes(range(256)) * (4 * C // 256)
    log = ChunkLog(open_source(data), C, W, None)
    while await log.fill():
        pass
    opts = StreamOptions(
        "t",
        "collect",
        chunk=C,
        window=W,
        digest=False,
        sha256="",
        idle=60.0,
        probe=5.0,
        codec="",
        headers={},
        progress=None,
    )
    sender = StreamSender(port, Counter(), DST, SID, log, opts)  # type: ignore[arg-type]
    log.watch(sender)

    async def no_digest() -> str:
        return ""

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.run, no_digest)
        await anyio.wait_all_tasks_blocked()
        sender.on_answer(*answer(StreamAck, committed=0, limit=W, chunk=C, window=W))
        with anyio.fail_after(1):  # well before the probe interval
            await port.holding.wait()  # 0 and C went; 2C is on its way
            sender.on_answer(*answer(StreamAck, committed=C, limit=W + C, resend=True))
            port.release.set()
            await anyio.wait_all_tasks_blocked()
            assert port.offsets() == [0, C, 2 * C, C, 2 * C, 3 * C]
            assert isinstance(port.sent[-1].header, StreamEnd)
            sender.on_answer(*answer(StreamAck, committed=4 * C, limit=5 * C))
            sender.on_answer(*answer(StreamDone, sha256="", received=4 * C))
    assert sender.reply is not None
    assert sender.error is None
    assert not port.posted  # no abort
