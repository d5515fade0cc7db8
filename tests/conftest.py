"""Test setup: every async test runs on asyncio and on trio with a virtual clock.

Trio's ``MockClock(autojump_threshold=0)`` jumps time forward the moment every task is
blocked, so timeouts, deadlines and backoff happen instantly and deterministically. Tests
about time override ``anyio_backend`` in their module to run on the virtual clock alone.
"""

from __future__ import annotations

from typing import Any

import pytest
from trio.testing import MockClock


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "trio":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return ("asyncio", {})
