"""Large models: results folded from spill files a tensor at a time, the accumulator's
precision, and a site that disappears halfway through its upload."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flare_async.fl import ParamsType, WeightedSum, fedavg, simulate
from flare_async.fl._results import SPILL_AT

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
N = 3_000_000  # 12 MB of float32: past SPILL_AT


def spilled(folder: Path) -> list[Path]:
    return list(folder.glob("flare-result-*"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # site processes and real time


def test_float32_models_sum_in_float32_unless_asked_for_float64() -> None:
    rng = np.random.default_rng(1)
    updates = [(rng.standard_normal(1000).astype(np.float32), float(n)) for n in (3, 1, 7, 2)]
    reference = sum(u.astype(np.float64) * n for u, n in updates) / 13
    native, wide = WeightedSum(), WeightedSum(precision="float64")
    for u, n in updates:
        native.add({"w": u}, n, ParamsType.FULL)
        wide.add({"w": u}, n, ParamsType.FULL)
    assert native.partial().params["w"].dtype == np.float32  # one float32 model of memory
    assert wide.partial().params["w"].dtype == np.float64
    assert np.allclose(native.mean()["w"], reference, rtol=1e-6, atol=1e-6)
    assert np.allclose(wide.mean_of("w"), reference, rtol=0, atol=1e-12)
    # bf16/fp16 updates sum in float32, not in their own dtype
    half = WeightedSum()
    half.add({"w": np.full(4, 0.1, np.float16)}, 1.0, ParamsType.FULL)
    assert half.partial().params["w"].dtype == np.float32


async def test_large_results_fold_from_spill_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert N * 4 > SPILL_AT
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    out = await simulate(
        lambda s: fedavg(s, {"w": np.zeros(N, np.float32)}, rounds=2),
        "tests._fl_scripts:add_site_weight",
        clients=3,
    )
    step = (1 + 4 + 9) / 6
    assert out.params["w"].dtype == np.float32
    assert np.allclose(out.params["w"][[0, N // 2, N - 1]], 2 * step)
    assert not spilled(tmp_path)  # spill files removed


@pytest.mark.slow  # site processes, a large upload
async def test_a_site_that_dies_mid_upload_leaves_the_round_to_the_rest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    rounds: list[Any] = []
    out = await simulate(
        lambda s: fedavg(s, {"w": np.zeros(N, np.float32)}, rounds=1, min_responses=3, deadline=10),
        "tests._fl_scripts:big_update",
        clients=4,
        processes=True,
        on_round=rounds.append,
    )
    (r,) = rounds
    assert sorted(r.responded) == ["server.site-1", "server.site-2", "server.site-4"]
    assert "server.site-3" in r.failed
    # Only whole results are in the sum: sites 1, 2, 4 (weights 1, 2, 4, each adds its own).
    assert np.allclose(out.params["w"][[0, N - 1]], (1 + 4 + 16) / 7)
    assert not spilled(tmp_path)  # the half upload is gone too
