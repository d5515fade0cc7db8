"""A round's kept results: in memory up to the bound, mapped from spill files beyond it (the
same values either way), the bound's edges, a weight that is not one refused, and the packing
a job's process gets them in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flare_async.errors import DecodeError
from flare_async.fl import FLModel, ParamsType
from flare_async.fl._updates import Updates, _resident, pack, unpack


def model(i: int, n: int = 1000) -> FLModel:
    return FLModel(
        params={"w": np.full(n, float(i), np.float32), "b": np.arange(3) + i},
        params_type=ParamsType.DIFF if i % 2 else ParamsType.FULL,
        meta={"num_samples": i + 1},
        metrics={"loss": 0.5 * i},
    )


def nbytes(m: FLModel) -> int:
    return sum(np.asarray(v).nbytes for v in m.params.values())


@pytest.mark.parametrize("kept_in_memory", [0, 1, 2, 3])
def test_past_the_bound_results_go_to_spill_files(tmp_path: Path, kept_in_memory: int) -> None:
    """A bound of exactly k results' bytes keeps k in memory; the rest are mapped from files
    (removed at once: the mapping holds them), with the same values, types and metadata."""
    one = nbytes(model(0))
    kept = Updates(tmp_path, memory_bound=kept_in_memory * one)
    for i in range(3):
        kept.add(f"site-{i}", model(i))
    assert kept.spilled == 3 - kept_in_memory
    assert kept.in_memory == kept_in_memory * one
    assert list(tmp_path.iterdir()) == []  # unlinked: only the mappings hold the pages
    for i, (site, got) in enumerate(kept):
        want = model(i)
        assert site == f"site-{i}"
        for name, value in want.params.items():
            np.testing.assert_array_equal(got.params[name], value)
        assert got.params_type is want.params_type
        assert got.meta == want.meta
        assert got.metrics == want.metrics
        resident = sum(_resident(np.asarray(v)) for v in got.params.values())
        assert resident == (nbytes(want) if i < kept_in_memory else 0)
    assert kept.weights() == [1.0, 2.0, 3.0]


def test_the_default_bound_keeps_a_small_round_in_memory(tmp_path: Path) -> None:
    kept = Updates(tmp_path)
    kept.add("site-1", model(1))
    assert (kept.spilled, kept.in_memory) == (0, nbytes(model(1)))


@pytest.mark.parametrize("weight", [-1, float("nan"), float("inf"), "3", True])
def test_a_result_whose_weight_is_not_one_is_refused(tmp_path: Path, weight: object) -> None:
    kept = Updates(tmp_path)
    with pytest.raises(ValueError, match="weight"):
        kept.add("site-1", FLModel(params={"w": np.zeros(2)}, meta={"num_samples": weight}))
    assert len(kept) == 0


def test_a_round_packed_for_the_job_process_unpacks_as_it_was(tmp_path: Path) -> None:
    kept = Updates(tmp_path)
    for i in range(3):
        kept.add(f"site-{i}", model(i))
    back = unpack(pack(kept))
    assert back.sites == kept.sites
    for a, b in zip(back.models, kept.models, strict=True):
        assert a.params_type is b.params_type
        assert a.meta == b.meta
        for name in b.params:
            np.testing.assert_array_equal(a.params[name], b.params[name])
    with pytest.raises(DecodeError, match="not a round's updates"):
        unpack(FLModel(params={"0:w": np.zeros(1)}, meta={"flare.each": [{"site": "s"}]}))
