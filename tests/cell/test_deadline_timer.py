"""The per-cell deadline heap: what finished leaves it soon (its waiters must not pile up for
the garbage collector), and what is still live expires on time, in order."""

from __future__ import annotations

from flare_async.cell._deadlines import DeadlineTimer


class Item:
    def __init__(self, name: str, expired: list[str]) -> None:
        self.name = name
        self.live = True
        self._expired = expired

    def expire(self) -> None:
        self._expired.append(self.name)


def test_finished_entries_leave_the_heap_and_live_ones_expire_in_order() -> None:
    now = [0.0]
    timer = DeadlineTimer(lambda: now[0])
    expired: list[str] = []
    live = [Item(f"live{i}", expired) for i in range(20)]
    for i, item in enumerate(live):
        timer.add(100.0 + i, item)
    most = 0
    for i in range(20_000):  # requests that finish long before their 30 s deadline
        done = Item(f"done{i}", expired)
        timer.add(30.0 + i * 1e-3, done)
        done.live = False
        most = max(most, len(timer))
    assert most <= 600  # never thousands of finished entries (20 live, 20,000 finished)
    now[0] = 109.5
    assert timer._expire_due() == 110.0  # the next live deadline
    assert expired == [f"live{i}" for i in range(10)]  # in deadline order, the finished never
    now[0] = 1000.0
    assert timer._expire_due() == float("inf")
    assert expired == [f"live{i}" for i in range(20)]
    assert len(timer) == 0
