"""Jobs that bring their own code (``fl/_artifact.py``) on the in-process deployment of
``test_jobs.py``: the server's job process and every site's training process load the job's
package from the shipped copy only (it is on no one's path), sites check it themselves, and a
site's policy or the admin's rights can refuse it, saying why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flare_async import errors
from flare_async.cell import Payload
from flare_async.codecs import decode
from flare_async.fl._artifact import JobCode, pack_job
from flare_async.fl._jobs import AdminRights
from flare_async.fl._privacy import policy_from_dict
from tests._labs import own_package, train_package
from tests.fl.test_jobs import SITES, audit_entries, deployment

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # real job and training processes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The admin's folder with the package ``shippedlab``, on no other process's path."""
    files = train_package("shippedlab", step=0.25, size=3)
    with own_package(tmp_path / "lab", files, monkeypatch) as folder:
        yield folder


def submit_body(code: JobCode) -> dict[str, Any]:
    return {"recipe": code.recipe, "code": code.to_wire()}


async def test_a_job_runs_its_shipped_code_on_the_server_and_every_site(
    tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = pack_job("shippedlab:recipe", None, root=lab)
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", submit_body(code))
        assert rec["code"] == code.digest
        await d.events.wait("job-state", job=rec["id"], state="finished")
        ended = await d.events.wait("job-ended", count=2, job=rec["id"])
        assert {e["outcome"] for e in ended} == {"finished"}
    job = tmp_path / "jobs" / rec["id"]
    tensors, _ = decode((job / "checkpoints" / "last.safetensors").read_bytes())
    assert np.allclose(tensors["w"], 0.5)  # two rounds of the shipped STEP
    assert JobCode.read(job / "artifact").digest == code.digest
    for site in SITES:
        folder = tmp_path / "sites" / site / rec["id"]
        assert (folder / "worker.log").exists()
        assert not (folder / "code").exists()  # removed with the job


async def test_a_site_refuses_code_changed_on_the_way_to_it(
    tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = pack_job("shippedlab:recipe", None, root=lab)
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        to_site = d.server._to_site

        async def tamper(site: str, topic: str, body: bytes, *, timeout: float) -> Payload:
            if topic == "start" and site == SITES[0]:
                doc = json.loads(body)
                doc["code"]["files"]["shippedlab/steps.py"] = "U1RFUCA9IDEwMDAK"  # STEP = 1000
                body = json.dumps(doc).encode()
            return await to_site(site, topic, body, timeout=timeout)

        monkeypatch.setattr(d.server, "_to_site", tamper)
        rec = await d.call("submit", submit_body(code))
        await d.events.wait("job-state", job=rec["id"], state="finished")
        done = await d.call("status", {"id": rec["id"]})
    assert done["sites"] == [SITES[1]]  # the job ran on the site that got it intact
    assert "changed after signing" in done["site_errors"][SITES[0]]
    refused = [
        e
        for e in audit_entries(tmp_path / "sites" / SITES[0] / "audit.jsonl")
        if e["event"] == "job-refused"
    ]
    assert refused
    assert "steps.py" in refused[0]["why"]
    assert not (tmp_path / "sites" / SITES[0] / rec["id"] / "code").exists()


async def test_a_site_runs_shipped_code_only_under_the_script_it_was_packed_for(
    tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = pack_job("shippedlab:recipe", None, root=lab)
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        to_site = d.server._to_site

        async def other_script(site: str, topic: str, body: bytes, *, timeout: float) -> Payload:
            if topic == "start" and site == SITES[0]:
                doc = json.loads(body)
                doc["script"] = "tests._fl_scripts:add_site_weight"  # allowed by the policy
                body = json.dumps(doc).encode()
            return await to_site(site, topic, body, timeout=timeout)

        monkeypatch.setattr(d.server, "_to_site", other_script)
        rec = await d.call("submit", submit_body(code))
        await d.events.wait("job-state", job=rec["id"], state="finished")
        done = await d.call("status", {"id": rec["id"]})
    assert done["sites"] == [SITES[1]]
    assert "packed for 'shippedlab:train'" in done["site_errors"][SITES[0]]


async def test_a_sites_policy_refuses_shipped_code_and_the_job_says_why(
    tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = pack_job("shippedlab:recipe", None, root=lab)
    policies = {
        SITES[0]: policy_from_dict({"jobs": {"custom_code": False}}),
        SITES[1]: policy_from_dict({"jobs": {"packages": ["other_*"]}}),
    }
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch, policies) as d:
        rec = await d.call("submit", submit_body(code))
        await d.events.wait("job-state", job=rec["id"], state="failed")
        done = await d.call("status", {"id": rec["id"]})
    assert done["sites"] == []
    assert "custom_code = false" in done["site_errors"][SITES[0]]
    assert "no shipped package 'shippedlab'" in done["site_errors"][SITES[1]]
    assert "0 of 2 sites started the job" in done["error"]


async def test_an_admin_without_the_code_right_cannot_ship_code(
    tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = pack_job("shippedlab:recipe", None, root=lab)
    rights = AdminRights({"*": frozenset({"submit", "view"})})
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch, rights=rights) as d:
        with pytest.raises(errors.Unauthorized, match="the right 'code'"):
            await d.call("submit", submit_body(code))
        body = {**submit_body(code), "recipe": "tests._fl_scripts:small_recipe"}
        rights.rights["*"] = frozenset({"submit", "code", "view"})  # type: ignore[index]
        with pytest.raises(errors.BadRequest, match="code is for 'shippedlab:recipe'"):
            await d.call("submit", body)
    assert not any((tmp_path / "jobs").glob("*/artifact"))
