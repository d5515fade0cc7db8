"""The main demo, small: FedAvg on digits across 4 non-IID simulated sites learns, and quantized
model traffic (int8, NF4, both ways) ends within one point of full precision."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

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


@pytest.mark.slow  # the demo over more rounds
async def test_nf4_traffic_ends_within_a_point_of_full_precision_over_more_rounds() -> None:
    # 12 rounds, seeds 1-3: NF4 rounded to the nearest code in blocks of 256 (the codec until
    # stochastic rounding) ended 1.3-2 points under full precision (seed 1: 95.8% against
    # 97.8%): every round's small changes to the weights were rounded away on the way back.
    # With the default (stochastic) rounding a single run varies with the order results
    # arrive in (seed 3: 95.3-97.1% over 4 runs against 96.9%), so the claim is on the mean:
    # two runs a seed, against one full-precision run a seed (deterministic).
    seeds = (1, 2, 3)
    full = [await run(rounds=12, codec="tensors", quiet=True, seed=s) for s in seeds]
    nf4 = [await run(rounds=12, codec="nf4", quiet=True, seed=s) for s in seeds for _ in (0, 1)]
    assert sum(full) / len(full) - sum(nf4) / len(nf4) <= 0.01, (nf4, full)
