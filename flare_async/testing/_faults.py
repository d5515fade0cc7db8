"""A driver that damages chosen frames on their way out, for testing what the runtime does
with bad bytes: ``FaultyDriver(MemoryNetwork(), corrupt=...)``.

It wraps any driver. Every frame a wrapped link sends is offered to ``corrupt``; when it
returns True, one byte in the middle of the frame's payload is flipped — in a copy, so the
sender's own buffers (which ``memory://`` hands over by reference) stay intact. Everything
else is passed through untouched (sends all take the waiting path, so ``corrupt`` sees each
frame exactly once and may count).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from flare_async.transport import (
    Admission,
    Driver,
    Link,
    LinkFacts,
    LinkStatistics,
    Listener,
    PushDelivery,
)
from flare_async.wire import Frame, Limits

FramePredicate = Callable[[Frame], bool]


def flip_one_byte(frame: Frame) -> Frame:
    """A copy of ``frame`` with one payload byte inverted (the frame as is if it has none)."""
    parts = list(frame.parts)
    for i, part in enumerate(parts):
        if len(part):
            damaged = bytearray(part)
            damaged[len(damaged) // 2] ^= 0xFF
            parts[i] = bytes(damaged)
            return Frame(frame.header, tuple(parts), frame.expires)
    return frame


FrameRewrite = Callable[[Frame], Frame]


class _FaultyLink(Link):
    def __init__(
        self,
        inner: Link,
        corrupt: FramePredicate,
        drop: FramePredicate,
        rewrite: FrameRewrite | None = None,
    ) -> None:
        self._inner = inner
        self._rewrite = rewrite
        self._corrupt = corrupt
        self._drop = drop
        self.dropped = 0
        self.local_address = inner.local_address
        self.peer_address = inner.peer_address
        self.limits = inner.limits
        self.damaged = 0

    @property
    def peer_limits(self) -> Limits:
        return self._inner.peer_limits

    @peer_limits.setter
    def peer_limits(self, value: Limits) -> None:
        self._inner.peer_limits = value

    def _filter(self, frame: Frame) -> Frame:
        if self._rewrite is not None:
            expires = frame.expires
            frame = self._rewrite(frame)
            frame.expires = expires if frame.expires is None else frame.expires
        if self._corrupt(frame):
            self.damaged += 1
            return flip_one_byte(frame)
        return frame

    async def send(self, frame: Frame) -> None:
        if self._drop(frame):
            self.dropped += 1  # lost on the way, as a link going down would lose it
            return
        await self._inner.send(self._filter(frame))

    def try_send(self, frame: Frame) -> bool:
        return False  # every frame goes through send(): ``corrupt`` sees each exactly once

    def deliver_to(self, on_frame: Callable[[Frame], bool] | None) -> bool:
        inner = self._inner
        return isinstance(inner, PushDelivery) and inner.deliver_to(on_frame)

    async def receive(self) -> Frame:
        return await self._inner.receive()

    async def aclose(self) -> None:
        await self._inner.aclose()

    def abort(self) -> None:
        self._inner.abort()

    def hello_done(self) -> None:
        self._inner.hello_done()

    def extra(self) -> LinkFacts:
        return self._inner.extra()

    def statistics(self) -> LinkStatistics:
        inner = self._inner.statistics()
        return msgspec.structs.replace(inner, damaged=self.damaged, dropped=self.dropped)


class _FaultyListener(Listener):
    def __init__(
        self,
        inner: Listener,
        corrupt: FramePredicate,
        drop: FramePredicate,
        rewrite: FrameRewrite | None = None,
    ) -> None:
        self._rewrite = rewrite
        self._inner = inner
        self._corrupt = corrupt
        self._drop = drop
        self.url = inner.url

    async def accept(self) -> Link:
        return _FaultyLink(await self._inner.accept(), self._corrupt, self._drop, self._rewrite)

    def guard(self, admission: Admission) -> bool:
        return self._inner.guard(admission)

    async def aclose(self) -> None:
        await self._inner.aclose()


class FaultyDriver(Driver):
    """Wraps ``inner``; frames for which ``corrupt(frame)`` is True get one byte flipped, and
    frames for which ``drop(frame)`` is True are lost (never sent).

    ``corrupt`` sees every frame every wrapped link sends (both ends: links it connects and
    links it accepts), so it can pick by kind, offset or count. ``rewrite``, if given, sees
    each first and returns the frame to send instead: a relay that tampers on purpose (fixing
    up the CRCs of what it changed, which ``corrupt`` does not).
    """

    def __init__(
        self,
        inner: Driver,
        *,
        corrupt: FramePredicate = lambda frame: False,
        drop: FramePredicate = lambda frame: False,
        rewrite: FrameRewrite | None = None,
    ) -> None:
        self.inner = inner
        self.rewrite = rewrite
        self.corrupt = corrupt
        self.drop = drop
        self.schemes = inner.schemes

    def _corrupt_now(self, frame: Frame) -> bool:
        return self.corrupt(frame)

    def _drop_now(self, frame: Frame) -> bool:
        return self.drop(frame)

    async def connect(self, url: str, *, limits: Limits) -> Link:
        link = await self.inner.connect(url, limits=limits)
        return _FaultyLink(link, self._corrupt_now, self._drop_now, self.rewrite)

    async def listen(self, url: str, *, limits: Limits) -> Listener:
        listener = await self.inner.listen(url, limits=limits)
        return _FaultyListener(listener, self._corrupt_now, self._drop_now, self.rewrite)


__all__ = ["FaultyDriver", "FramePredicate", "FrameRewrite", "flip_one_byte"]
