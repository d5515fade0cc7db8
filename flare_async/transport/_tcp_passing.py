"""Passing a large payload through a raw asyncio link unread (``os.splice``, on Linux): what a
relay's links add to reading and writing (the ``Splicing`` capability). The reading and writing
are :mod:`flare_async.transport._tcp_asyncio`'s, whose link this is the base of."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from flare_async.errors import LinkBroken
from flare_async.transport import _splice
from flare_async.transport._base import Link
from flare_async.transport._tcp_base import error_reason
from flare_async.transport._tcp_raw import RawTcpLink
from flare_async.wire import Buffer, Envelope, Frame, Passing


class PassingTcpLink(RawTcpLink):
    """The splicing half of the asyncio raw link: a frame its reader hands out as
    :class:`~flare_async.wire.Passing` (header read, payload still in the socket) is moved on
    to another link, taken whole, or dropped."""

    _passing: Passing | None
    """Handed out by ``receive()``, its payload not yet moved (the reading link sets it)."""
    _rx_error: BaseException | None

    def _set_lowat(self, owed: int) -> None:
        """Wake the reader once ``owed`` bytes can be read (the reading link's)."""
        raise NotImplementedError

    # ------------------------------------------------------- passing through (os.splice)
    @property
    def splices(self) -> bool:
        """Whether frames can pass through this link without being read (on Linux): see
        :meth:`send_passing`."""
        return _splice.SPLICE

    def pass_through(self, decide: Callable[[Envelope, int], bool] | None) -> bool:
        if not _splice.SPLICE:
            return False
        self._conn.pass_through = decide
        return True

    async def take_passing(self, passing: Passing) -> Frame:
        if passing is not self._passing:
            raise RuntimeError("not this link's passing frame")
        first = memoryview(passing.parts[0])
        payload = await self._move_passing(
            lambda: _splice.take(
                self._sock, first, passing.owed, self._await_payload, self._conn.passed
            )
        )
        return Frame(passing.header, (payload,))

    async def send_passing(self, frame: Frame, passing: Passing, src: Link) -> None:
        if not (isinstance(src, PassingTcpLink) and src._passing is passing and _splice.SPLICE):
            raise RuntimeError("send_passing needs the passing frame of a splicing link")
        size = passing.payload_len
        head = self._conn.head(frame.header, size)  # FrameTooLarge before any I/O
        try:
            chain = _splice.PipeChain(_splice.PIPES)
        except OSError:  # out of descriptors or pipe memory: read it through, as without
            whole = await src.take_passing(passing)
            await self.send(Frame(frame.header, whole.parts, frame.expires))
            return
        try:
            rest = await src._move_passing(
                lambda: _splice.gather(
                    src._sock, chain, passing.owed, src._await_payload, src._conn.passed
                )
            )
            async with self._send_lock:
                self._check_usable()
                if frame.expires is not None:  # the budget left now that the link is ours
                    head = self._conn.head(frame.stamp(self._clock), size)
                await self._write_passing([head, *frame.parts], chain, rest)
            self._conn.count_frame(len(head) + size)
            src._passed += 1
        finally:
            chain.release()  # a pipe a failed forward left bytes in is closed

    async def _write_passing(
        self, segments: list[Buffer], chain: _splice.PipeChain, rest: memoryview | None
    ) -> None:
        wrote = False
        try:
            await self._write(segments)
            wrote = True
            await _splice.flush(chain, self._sock, self._wait_to_finish)
            if rest is not None:
                await self._write([rest], begun=True)
        except OSError as exc:
            self._mark_broken(f"send failed: {error_reason(exc)}")
            raise LinkBroken(self._broken or "") from None
        except BaseException:
            if wrote and self._broken is None:
                self._cut_short()  # part of the frame is on the wire
            raise

    async def _move_passing(self, move: Callable[[], Any]) -> Any:
        """Run ``move`` (which takes the passing payload out of the socket); then the link
        reads frames again. A socket failure breaks this link."""
        self._check_usable()
        try:
            result = await move()
        except (EOFError, OSError) as exc:
            self._mark_broken(f"connection failed: {error_reason(exc)}")
            self._rx_error = LinkBroken(self._broken or "")
            raise LinkBroken(f"link from {self.peer_address} broke: {self._broken}") from None
        self._passing = None
        self._set_lowat(0)
        return result

    async def _await_payload(self) -> None:
        self._set_lowat(self._conn.owed)
        await self._wait(anyio.wait_readable)

    async def _discard_passing(self) -> None:
        """The passing frame was not forwarded: read its payload and drop it."""
        if self._rx_error is not None:
            raise self._rx_error
        owed = self._conn.owed
        await self._move_passing(
            lambda: _splice.discard(self._sock, owed, self._await_payload, self._conn.passed)
        )
