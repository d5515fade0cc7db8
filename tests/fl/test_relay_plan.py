"""A relay's plan for a task (``fl/expect``) is a typed struct decoded once: a plan that does
not fit (an unknown field, a deadline that is not a finite number of seconds in range, sites
not below the relay) is refused by name, and nothing is armed."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from flare_async import Cell, MemoryNetwork, errors
from flare_async.fl import RelayAggregator
from flare_async.fl._results import RelayPlan
from flare_async.fl._signed import CHANNEL

pytestmark = pytest.mark.anyio

GOOD = {"task": "j:0:1:ab", "deadline": 5.0, "sites": ["server.r.s1"], "secure": ""}


@pytest.mark.parametrize(
    ("plan", "why"),
    [
        ({**GOOD, "deadline": math.nan}, "JSON is malformed"),  # NaN is no JSON
        ({**GOOD, "deadline": math.inf}, "JSON is malformed"),
        ({**GOOD, "deadline": 0.0}, "deadline must be within"),
        ({**GOOD, "deadline": -1.0}, "deadline must be within"),
        ({**GOOD, "deadline": 8 * 86400.0}, "deadline must be within"),
        ({**GOOD, "deadline": "5"}, r"Expected `float`, got `str` - at `\$.deadline`"),
        ({**GOOD, "sites": "server.r.s1"}, r"at `\$.sites`"),
        ({**GOOD, "run": "rm -rf /"}, "unknown field `run`"),
        ({k: v for k, v in GOOD.items() if k != "task"}, "missing required field `task`"),
        ({**GOOD, "sites": ["server.other"]}, "only for cells below it"),
        ({**GOOD, "sites": []}, "only for cells below it"),
    ],
)
async def test_a_plan_that_does_not_fit_is_refused_by_name(plan: dict[str, Any], why: str) -> None:
    net = MemoryNetwork()
    server = Cell("server", listen=["memory://server"], drivers=[net])
    relay = Cell("server.r", parent="memory://server", drivers=[net])
    aggregator = RelayAggregator(relay)
    relay.mount(aggregator.handlers())
    async with server, relay:
        await relay.wait_parent()
        body = json.dumps(plan, allow_nan=True).encode()
        with pytest.raises(errors.BadRequest, match=why):
            await server.request("server.r", CHANNEL, "expect", body, timeout=5)
        assert aggregator._open == {}
        good = json.dumps(GOOD).encode()
        await server.request("server.r", CHANNEL, "expect", good, timeout=5)
        assert list(aggregator._open) == [GOOD["task"]]


def test_a_plan_below_has_less_time_and_the_same_rest() -> None:
    plan = RelayPlan(task="t", deadline=10.0, sites=["a.b"], secure="s")
    below = plan.below()
    assert (below.deadline, below.task, below.sites, below.secure) == (9.0, "t", ["a.b"], "s")
