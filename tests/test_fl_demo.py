"""The main demo, small: FedAvg on digits across 4 non-IID simulated sites learns, and quantized
model traffic (int8, NF4, both ways) ends within one point of full precision."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fedavg_digits import run

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_quantized_traffic_ends_within_a_point_of_full_precision() -> None:
    full = await run(rounds=8, codec="tensors", quiet=True)
    assert full > 0.9
    for codec in ("q8", "nf4"):
        acc = await run(rounds=8, codec=codec, quiet=True)
        assert abs(acc - full) <= 0.01, (codec, acc, full)
