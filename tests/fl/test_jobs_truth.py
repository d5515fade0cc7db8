"""What the admin is told about a job (issue 21), on the in-process deployment of
``test_jobs.py``: a site's own error, an unknown site named at once, an abort of an ended job
refused, and a job the server's stop interrupted resumes when it starts again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flare_async import errors
from flare_async.fl._artifact import pack_job
from tests._labs import own_package
from tests.fl.test_jobs import SITES, deployment

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # real job and training processes

FAILING = """
import numpy as np
import flare_async.client as flare
from flare_async.fl import FedAvgRecipe


def train() -> None:
    flare.init()
    flare.receive()
    if flare.get_site_name().endswith("site-2"):
        raise ValueError("the labels file is empty")
    raise KeyError("no column 'age' in site-1's table")


def recipe() -> FedAvgRecipe:
    return FedAvgRecipe(initial={"w": np.zeros(2)}, script="truthlab:train", rounds=1)


def missing() -> FedAvgRecipe:
    return FedAvgRecipe(initial={"w": np.zeros(2)}, script="truthlab.nowhere:train", rounds=1)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with own_package(tmp_path / "lab", {"truthlab/__init__.py": FAILING}, monkeypatch) as folder:
        yield folder


async def test_the_admin_sees_each_sites_own_error(
    tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = pack_job("truthlab:recipe", None, root=lab)
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": code.recipe, "code": code.to_wire()})
        await d.events.wait("job-state", job=rec["id"], state="failed")
        done = await d.call("status", {"id": rec["id"]})
    assert "KeyError" in done["site_errors"][SITES[0]]
    assert "no column 'age'" in done["site_errors"][SITES[0]]
    assert "ValueError: the labels file is empty" in done["site_errors"][SITES[1]]
    assert "the labels file is empty" in done["error"]  # the job's error names both sites
    assert "no column" in done["error"]


async def test_a_script_module_that_is_missing_is_named(
    tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = pack_job("truthlab:missing", None, root=lab)
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": code.recipe, "code": code.to_wire()})
        await d.events.wait("job-state", job=rec["id"], state="failed")
        done = await d.call("status", {"id": rec["id"]})
    for site in SITES:
        assert "truthlab.nowhere" in done["site_errors"][site]
    assert "truthlab.nowhere" in done["error"]


async def test_an_unknown_site_is_named_at_once_and_an_ended_job_is_not_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        body = {"recipe": "tests._fl_scripts:small_recipe", "sites": [SITES[0], "server.sitee-2"]}
        with pytest.raises(errors.BadRequest, match=r"no site 'server\.sitee-2' ever registered"):
            await d.call("submit", body)
        assert not d.server.jobs  # nothing was queued
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-state", job=rec["id"], state="finished")
        with pytest.raises(errors.BadRequest, match=f"job {rec['id']} already finished"):
            await d.call("abort", {"id": rec["id"]})
        assert (await d.call("status", {"id": rec["id"]}))["state"] == "finished"


async def test_a_job_the_servers_stop_interrupts_resumes_when_it_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "gate"
    monkeypatch.setenv("FLARE_TEST_GATE", str(gate))
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:gated_recipe"})
        await d.events.wait("job-round", job=rec["id"], round=0)
        running = await d.call("status", {"id": rec["id"]})
        assert running["rounds"] == 3  # what `job wait` counts towards
        assert running["responded"] == 2
    # The deployment stopped with the job between its rounds.
    kept = json.loads((tmp_path / "jobs" / rec["id"] / "job.json").read_text())
    assert kept["state"] == "interrupted"
    assert kept["error"] == "the server stopped during the job"
    gate.write_text("open")
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        await d.events.wait("job-state", job=rec["id"], state="finished")
        done = await d.call("status", {"id": rec["id"]})
    assert done["attempt"] == 2
    assert done["rounds_done"] == 3
    assert done["error"] == ""
