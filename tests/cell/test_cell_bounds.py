"""Numbers a cell takes, at their edges: call timeouts and the relay backlog's limits."""

from __future__ import annotations

import math

import pytest

from flare_async import Cell, MemoryNetwork, errors
from flare_async.cell._backlog import BACKLOG_PEERS, DEFAULT_BACKLOG, Backlogs
from flare_async.cell._router import Router
from flare_async.wire import Limits

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("timeout", [math.nan, True, False, "1", [1]])
async def test_a_timeout_that_is_not_a_number_of_seconds_is_refused(timeout: object) -> None:
    net = MemoryNetwork()
    async with Cell("server", listen=["memory://server"], drivers=[net]) as cell:
        with pytest.raises(errors.ConfigError):
            await cell.request("server", "t", "x", b"", timeout=timeout)
        with pytest.raises(errors.ConfigError):
            await cell.send_event("server", "t", "x", b"", timeout=timeout)


@pytest.mark.parametrize("timeout", [0, -1.0, -math.inf])
async def test_a_request_with_no_time_left_fails_before_it_is_sent(timeout: float) -> None:
    net = MemoryNetwork()
    async with Cell("server", listen=["memory://server"], drivers=[net]) as cell:
        with pytest.raises(errors.DeadlineExceeded):
            await cell.request("server", "t", "x", b"", timeout=timeout)
        assert cell.statistics().pending_requests == 0


def test_the_backlog_limits_by_default_and_at_their_edges() -> None:
    router = Router(
        "server", Limits(), signing=None, accept=None, on_link=None, seed=0, dead_after=45.0
    )
    assert router.backlogs.limit == DEFAULT_BACKLOG == 16 << 20
    assert router.backlogs.total == BACKLOG_PEERS * DEFAULT_BACKLOG == 256 << 20
    assert Backlogs("x", float, bool, None, None, limit=1).limit == 1  # type: ignore[arg-type]
    for bad in (0, -1, math.nan):
        with pytest.raises(errors.ConfigError):
            Backlogs("x", float, bool, None, None, limit=bad)  # type: ignore[arg-type]
