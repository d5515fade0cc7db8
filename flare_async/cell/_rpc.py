"""Outstanding requests of a cell: one waiter per request id, resolved by a reply or an error."""

from __future__ import annotations

from collections.abc import Iterator

from flare_async._concurrency import Signal
from flare_async.cell._payload import Payload
from flare_async.errors import DeadlineExceeded, FlareError


class Waiter:
    """One outstanding request: who we asked, which link it left on, and the outcome."""

    __slots__ = ("done", "dst", "error", "reply", "topic", "via")

    def __init__(self, dst: str, topic: str) -> None:
        self.dst = dst
        self.topic = topic
        self.via: object | None = None
        self.done = Signal()
        self.reply: Payload | None = None
        self.error: FlareError | None = None

    def resolve(self, reply: Payload) -> None:
        if not self.done.is_set:
            self.reply = reply
            self.done.set()

    def fail(self, error: FlareError) -> None:
        if not self.done.is_set:
            self.error = error
            self.done.set()

    @property
    def live(self) -> bool:
        return not self.done.is_set

    def expire(self) -> None:
        self.fail(DeadlineExceeded(f"no reply from {self.dst} to {self.topic} before the deadline"))


class PendingTable:
    """Request id -> :class:`Waiter`. Bounded by the callers' own concurrency and deadlines:
    an entry lives exactly as long as the ``request`` call that made it."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: dict[int, Waiter] = {}

    def add(self, msg_id: int, waiter: Waiter) -> None:
        self._waiters[msg_id] = waiter

    def pop(self, msg_id: int) -> Waiter | None:
        return self._waiters.pop(msg_id, None)

    def get(self, msg_id: int) -> Waiter | None:
        return self._waiters.get(msg_id)

    def via(self, link_owner: object) -> Iterator[Waiter]:
        """Waiters whose request left through ``link_owner``."""
        return (w for w in list(self._waiters.values()) if w.via is link_owner)

    def all(self) -> Iterator[Waiter]:
        return iter(list(self._waiters.values()))

    def __len__(self) -> int:
        return len(self._waiters)
