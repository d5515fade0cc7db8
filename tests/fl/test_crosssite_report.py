"""A job's end report comes from the job's own process (an admin's code runs there): the
server keeps only what is well formed, bounded, and finite."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import flare_async.client as flare
from flare_async.fl import FLModel, cross_site_eval, simulate
from flare_async.fl._crosssite import MAX_ENTRIES, MAX_NAME, checked_report, render_matrix
from tests._fl_scripts import answer_tasks


def good() -> dict[str, Any]:
    return {
        "cross_site": {
            "models": ["global", "server.site-1"],
            "sites": ["server.site-1"],
            "metrics": {"global": {"server.site-1": {"acc": 0.5}}},
            "failed": {"server.site-1": {"submit_model": "no model"}},
        }
    }


def test_a_well_formed_report_is_kept_as_it_is() -> None:
    assert checked_report(good()) == good()


@pytest.mark.parametrize("doc", [None, [], "x", {"cross_site": []}, {"other": {}}])
def test_what_is_no_report_is_none(doc: Any) -> None:
    assert checked_report(doc) == {}


def test_values_that_are_not_finite_numbers_and_names_that_are_not_text_go() -> None:
    doc = good()
    cs = doc["cross_site"]
    cs["models"] += [7, None]
    cs["metrics"]["global"]["server.site-1"] |= {
        "nan": float("nan"),
        "inf": float("inf"),
        "text": "0.9",
        "flag": True,
    }
    cs["failed"]["server.site-1"]["x"] = {"deep": ["structure"] * 10_000}
    kept = checked_report(doc)["cross_site"]
    assert kept["models"] == ["global", "server.site-1"]
    assert kept["metrics"]["global"]["server.site-1"] == {"acc": 0.5}
    assert len(kept["failed"]["server.site-1"]["x"]) <= 2000  # its text, cut


def test_sizes_are_bounded() -> None:
    doc = good()
    cs = doc["cross_site"]
    cs["sites"] = ["s" * (MAX_NAME + 50)] + [f"site-{i}" for i in range(MAX_ENTRIES + 10)]
    cs["metrics"] = {f"m{i}": {} for i in range(MAX_ENTRIES + 10)}
    kept = checked_report(doc)["cross_site"]
    assert len(kept["sites"]) == MAX_ENTRIES
    assert len(kept["sites"][0]) == MAX_NAME
    assert len(kept["metrics"]) == MAX_ENTRIES


def test_the_matrix_prints_a_row_per_scored_model_and_a_dash_where_a_site_gave_none() -> None:
    doc = good()["cross_site"]
    doc["sites"].append("server.site-2")
    text = render_matrix(doc)
    assert text.splitlines() == [
        "acc     " + "site-1".rjust(12) + "site-2".rjust(12),
        "global  " + "0.5".rjust(12) + "-".rjust(12),
    ]
    assert render_matrix({"sites": [], "metrics": {}}) == "(no metrics)"


def submits_a_misfit() -> None:
    """Site 1 submits a model of other shapes; every site scores a model by its sum."""

    def respond(i: int, task: FLModel) -> FLModel:
        if flare.is_evaluate():
            return FLModel(metrics={"sum": float(np.asarray(task.params["w"]).sum())})
        if flare.is_submit_model():
            w = np.zeros(5) if i == 0 else np.asarray(task.params["w"]) + i
            return FLModel(params={"w": w})
        return FLModel(params={"w": np.asarray(task.params["w"]) + 1})

    answer_tasks(respond)


@pytest.mark.anyio
async def test_a_submitted_model_that_does_not_fit_is_refused_not_evaluated() -> None:
    """Site 1's model would reach every site as a task: it is refused, said why, and the
    others' models (and the global one) are scored everywhere."""
    out = await simulate(
        lambda s: cross_site_eval(s, {"w": np.zeros(3)}), submits_a_misfit, clients=2
    )
    assert out["models"] == ["global", "server.site-2"]
    assert "does not fit" in out["failed"]["server.site-1"]["submit_model"]
    assert out["metrics"]["server.site-2"] == {
        "server.site-1": {"sum": 3.0},
        "server.site-2": {"sum": 3.0},
    }


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
