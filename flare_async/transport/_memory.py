"""The ``memory://`` driver: links between cells of one process.

A first-class transport, not a test double: the simulator runs whole federations on it, and it
passes the same conformance suite as the network drivers. Headers are really encoded and
decoded (so limits, validation and isolation match the network), while payload buffers are
handed over by reference as read-only views: a 1 GiB model crosses a memory link without a copy.
Senders must not modify a payload buffer after sending it.

A :class:`MemoryNetwork` is an address space (no process-wide state): cells that should reach
each other are given the same instance as their ``memory`` driver.
"""

from __future__ import annotations

import itertools
import weakref
from urllib.parse import urlsplit

from anyio import current_time
from anyio.lowlevel import checkpoint

from flare_async._concurrency import Channel, ChannelClosed
from flare_async.errors import (
    ConfigError,
    ConnectError,
    LinkBroken,
    LinkClosed,
    ProtocolError,
    TransportError,
)
from flare_async.transport._base import Driver, Link, LinkStatistics, Listener
from flare_async.wire import (
    Buffer,
    Frame,
    Limits,
    decode_frame,
    encode_head,
    payload_size,
)

_Item = tuple[bytes, tuple[Buffer, ...]]


class _Pipe:
    """One direction of a memory link: a bounded queue and a flag telling a break apart."""

    __slots__ = ("__weakref__", "broken", "other", "queue")

    def __init__(self, size: int) -> None:
        self.queue: Channel[_Item] = Channel(size)
        self.broken = False
        self.other: _Pipe | None = None
        """The opposite direction of the same link."""

    def break_(self) -> None:
        self.broken = True
        self.queue.close()
        self.queue.clear()


class _Totals:
    """Counters shared by every link of one network."""

    __slots__ = ("bytes", "frames")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0


class MemoryLink(Link):
    """One end of an in-process link. Create links through :class:`MemoryNetwork`."""

    def __init__(
        self,
        tx: _Pipe,
        rx: _Pipe,
        local_address: str,
        peer_address: str,
        limits: Limits,
        totals: _Totals | None = None,
    ) -> None:
        self._totals = totals or _Totals()
        self._tx = tx
        self._rx = rx
        self.local_address = local_address
        self.peer_address = peer_address
        self.limits = limits
        self.peer_limits = limits
        self._closed = False
        self._frames_in = 0
        self._frames_out = 0
        self._bytes_in = 0
        self._bytes_out = 0

    def _head(self, frame: Frame) -> bytes:
        if self._closed:
            raise LinkClosed("link was closed by this side")
        if self._tx.broken:
            raise LinkBroken("memory link broke")
        return encode_head(frame.stamp(current_time), payload_size(frame.parts), self.peer_limits)

    def _send_failed(self) -> TransportError:
        if self._tx.broken:
            return LinkBroken("memory link broke")
        if self._closed:
            return LinkClosed("link was closed by this side")
        return LinkClosed("peer closed the link")

    def try_send(self, frame: Frame) -> bool:
        head = self._head(frame)
        try:
            sent = self._tx.queue.put_nowait((head, frame.parts))
        except ChannelClosed:
            raise self._send_failed() from None
        if sent:
            self._count_out(len(head) + payload_size(frame.parts))
        return sent

    def _count_out(self, nbytes: int) -> None:
        self._frames_out += 1
        self._bytes_out += nbytes
        self._totals.frames += 1
        self._totals.bytes += nbytes

    async def send(self, frame: Frame) -> None:
        try:
            head = self._head(frame)
            while not self._tx.queue.put_nowait((head, frame.parts)):
                await self._tx.queue.room()
                head = self._head(frame)  # the budget left after the wait
        except ChannelClosed:
            raise self._send_failed() from None
        except (LinkClosed, LinkBroken):
            await checkpoint()
            raise
        self._count_out(len(head) + payload_size(frame.parts))

    async def receive(self) -> Frame:
        queue = self._rx.queue
        try:
            # Not get_nowait() first: its WouldBlock would stay alive, with its traceback,
            # for as long as the link is idle (100,000 simulated sites hold one each).
            head, parts = queue.get_nowait() if len(queue) else await queue.get()
        except ChannelClosed:
            if self._rx.broken:
                raise LinkBroken("memory link broke") from None
            if self._closed:
                raise LinkClosed("link was closed by this side") from None
            raise LinkClosed("peer closed the link") from None
        try:
            header, _ = decode_frame(head, self.limits, payload_size=payload_size(parts))
        except ProtocolError as exc:
            raise type(exc)(str(exc), peer=self.peer_address) from None
        self._frames_in += 1
        self._bytes_in += len(head) + payload_size(parts)
        if len(parts) == 1:
            return Frame(header, (memoryview(parts[0]).toreadonly(),))
        return Frame(header, tuple([memoryview(p).toreadonly() for p in parts]))

    async def aclose(self) -> None:
        self._closed = True
        self._tx.queue.close()
        self._rx.queue.close()
        self._rx.queue.clear()
        await checkpoint()

    def abort(self) -> None:
        """Break the link as a crash or network fault would: both ends see ``LinkBroken``."""
        # Breaking our sending direction is enough for the peer's receive; breaking both
        # makes every later operation on either end fail too.
        self._tx.break_()
        self._rx.break_()

    def statistics(self) -> LinkStatistics:
        return LinkStatistics(
            frames_sent=self._frames_out,
            frames_received=self._frames_in,
            bytes_sent=self._bytes_out,
            bytes_received=self._bytes_in,
            send_queue_used=len(self._tx.queue),
            send_queue_size=self._tx.queue.size,
        )


class _MemoryListener(Listener):
    def __init__(
        self, network: MemoryNetwork, address: str, url: str, limits: Limits, backlog: int
    ) -> None:
        self.url = url
        self.limits = limits
        self._network = network
        self._address = address
        self._backlog: Channel[MemoryLink] = Channel(backlog)
        self.wires: weakref.WeakSet[_Pipe] = weakref.WeakSet()
        """One pipe per accepted link (its upward direction), while either end lives."""

    def offer(self, link: MemoryLink, up: _Pipe) -> None:
        try:
            offered = self._backlog.put_nowait(link)
        except ChannelClosed:
            raise ConnectError(f"{self.url}: listener is closed") from None
        if not offered:
            raise ConnectError(f"{self.url}: accept backlog is full")
        self.wires.add(up)

    async def accept(self) -> Link:
        try:
            return await self._backlog.get()
        except ChannelClosed:
            raise LinkClosed(f"listener {self.url} is closed") from None

    async def aclose(self) -> None:
        self._network._forget(self._address, self)
        self._backlog.close()
        for pending in self._backlog.clear():
            pending.abort()
        await checkpoint()


class MemoryNetwork(Driver):
    """An in-process address space serving ``memory://ADDRESS`` URLs.

    Args:
        queue_size: frames each direction of a link buffers before ``send`` waits.
        backlog: links a listener holds before they are accepted; beyond it connects fail.
    """

    schemes = ("memory",)

    def __init__(self, *, queue_size: int = 64, backlog: int = 128) -> None:
        if queue_size < 1 or backlog < 1:
            raise ConfigError("queue_size and backlog must be at least 1")
        self.queue_size = queue_size
        self.backlog = backlog
        self._listeners: dict[str, _MemoryListener] = {}
        self._ids = itertools.count(1)
        self._totals = _Totals()

    def statistics(self) -> LinkStatistics:
        """Frames and bytes sent on every link of this network so far."""
        return LinkStatistics(frames_sent=self._totals.frames, bytes_sent=self._totals.bytes)

    @staticmethod
    def _address(url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigError(f"{url!r} is not a memory:// URL")
        address = parts.netloc + parts.path
        if not address:
            raise ConfigError(f"{url!r} names no address")
        return address

    async def listen(self, url: str, *, limits: Limits) -> Listener:
        address = self._address(url)
        await checkpoint()
        if address in self._listeners:
            raise ConnectError(f"memory://{address} is already listened on")
        listener = _MemoryListener(self, address, f"memory://{address}", limits, self.backlog)
        self._listeners[address] = listener
        return listener

    async def connect(self, url: str, *, limits: Limits) -> Link:
        address = self._address(url)
        await checkpoint()
        listener = self._listeners.get(address)
        if listener is None:
            raise ConnectError(f"nothing listens on memory://{address}")
        up, down = _Pipe(self.queue_size), _Pipe(self.queue_size)
        up.other = down
        local = f"memory-client-{next(self._ids)}"
        client = MemoryLink(up, down, local, f"memory://{address}", limits, self._totals)
        server = MemoryLink(down, up, f"memory://{address}", local, listener.limits, self._totals)
        listener.offer(server, up)
        return client

    def sever(self, url: str) -> int:
        """Break every link accepted on ``url``'s listener, as if its host crashed.

        Returns:
            how many links were broken.
        """
        listener = self._listeners.get(self._address(url))
        if listener is None:
            return 0
        count = 0
        for up in list(listener.wires):
            if not up.broken:
                count += 1
            up.break_()
            if up.other is not None:
                up.other.break_()
        return count

    def _forget(self, address: str, listener: _MemoryListener) -> None:
        if self._listeners.get(address) is listener:
            del self._listeners[address]
