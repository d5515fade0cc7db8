"""The algorithms as jobs on a real deployment (every cell its own OS process, mTLS, the
admin CLI): FedOpt's server state survives the server being killed mid job, and a robust
rule with cross-site evaluation runs through the job's own process, its matrix in the job's
record and ``job status --matrix``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flare_async.codecs import decode
from tests._procs import ROOT
from tests.system.test_jobs_deploy import SITES, Deployment

pytestmark = pytest.mark.slow


@pytest.fixture
def d(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    """test_jobs_deploy's deployment: server, relay, two sites, each its own process."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FLARE_TEST_GATE", str(tmp_path / "gate"))
    deployment = Deployment(tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop()


def swarm_rounds(d: Deployment, job: str) -> list[int]:
    """The swarm rounds the server has records of (``job metrics``)."""
    listed = d.job("metrics", job, "--json").stdout.splitlines()
    recs = [json.loads(x) for x in listed if x.strip()]
    return sorted(r["step"] for r in recs if r.get("key") == "swarm/responded")


def adam(rounds: int, reset_after: int | None = None) -> np.ndarray:
    """FedOpt-Adam (lr 0.5, betas 0.9 / 0.99, tau 1e-3) where every round's mean is the model
    + 5/3 (sites add 1 and 2, weights 1 and 2); ``reset_after``: the moments lost then."""
    x, m, v = np.zeros(3), np.zeros(3), np.full(3, 1e-6)
    for r in range(rounds):
        if r == reset_after:
            m, v = np.zeros(3), np.full(3, 1e-6)
        d = np.full(3, 5.0 / 3.0)
        m = 0.9 * m + 0.1 * d
        v = 0.99 * v + 0.01 * d * d
        x = x + 0.5 * m / (np.sqrt(v) + 1e-3)
    return x


def test_fedopt_moments_survive_the_server_killed_mid_job(d: Deployment, tmp_path: Path) -> None:
    server = d.procs["server"]
    job = json.loads(d.job("submit", "tests._fl_scripts:gated_fedopt_recipe").stdout)["id"]
    server.wait_for("job-checkpoint", job=job, round=0)  # round 1 is gated: it cannot end
    server.proc.kill()
    server.proc.wait()
    server.restart()
    server.wait_all("site-registered", "site", SITES)
    server.wait_for("job-state", job=job, state="running", attempt=2)
    (tmp_path / "gate").touch()
    server.wait_for("job-state", job=job, state="finished", timeout=120)
    folder = tmp_path / "jobs" / "server" / job / "checkpoints"
    tensors, _ = decode((folder / "last.safetensors").read_bytes())
    np.testing.assert_allclose(tensors["w"], adam(3), rtol=1e-9)
    # Moments lost at the restart would have given another model: the check can tell.
    assert not np.allclose(adam(3), adam(3, reset_after=1), rtol=1e-3)
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.safetensors",
        "last.state-2.safetensors",
    ]


def test_a_robust_job_with_cross_site_evaluation(d: Deployment) -> None:
    done = d.job("submit", "tests._fl_scripts:robust_eval_recipe", "--wait", "--timeout", "120")
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    assert final["rounds_done"] == 2  # the evaluation's tasks are not rounds
    cross = final["report"]["cross_site"]
    # Median of two sites = their plain mean: the global model is 1.5 a round -> w = 3.
    # Site i's own model: the round-1 model (1.5) + i + 1; site j scores sum(w) + j.
    assert cross["models"] == ["global", *SITES]
    assert cross["sites"] == SITES
    expect = {"global": 3 * 3.0, SITES[0]: 3 * 2.5, SITES[1]: 3 * 3.5}
    for model, total in expect.items():
        for j, site in enumerate(SITES):
            assert cross["metrics"][model][site] == {"score": total + j}
    assert cross["failed"] == {}
    matrix = d.job("status", final["id"], "--matrix")
    assert matrix.returncode == 0, matrix.stderr
    lines = matrix.stdout.splitlines()
    assert lines[0].split() == ["score", "site-1", "site-2"]
    assert lines[1].split() == ["global", "9", "10"]
    assert lines[2].split() == ["site-1", "7.5", "8.5"]


def test_a_cyclic_job_hands_the_model_from_site_to_site(d: Deployment, tmp_path: Path) -> None:
    """The two sites sit below one relay: the handover goes site -> relay -> site, signed
    with the task, the server hearing only where it went."""
    done = d.job("submit", "tests._fl_scripts:cyclic_recipe", "--wait", "--timeout", "120")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout.splitlines()[-1])["id"]
    folder = tmp_path / "jobs" / "server" / job / "checkpoints"
    tensors, meta = decode((folder / "last.safetensors").read_bytes())
    np.testing.assert_array_equal(tensors["visits"], [2, 2])
    history = json.loads(meta["flare.checkpoint"])["history"]
    # No handover failed (a failed one sends the model to the server, saying so in "why").
    assert [h["why"] for h in history] == [{}, {}]
    assert [h["lost"] for h in history] == [[], []]


def test_a_swarm_job_runs_its_rounds_among_the_sites(d: Deployment, tmp_path: Path) -> None:
    """The sites aggregate in turn (through their relay: no peer links here), the server
    starting the job and keeping what the last aggregator offered it."""
    done = d.job("submit", "tests._fl_scripts:swarm_recipe", "--wait", "--timeout", "120")
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    job = final["id"]
    assert final["rounds_done"] == 3  # the swarm's one task ends with its last round
    folder = tmp_path / "jobs" / "server" / job / "checkpoints"
    tensors, meta = decode((folder / "last.safetensors").read_bytes())
    np.testing.assert_allclose(tensors["w"], 5.0)
    history = json.loads(meta["flare.checkpoint"])["history"]
    assert history[-1]["members"] == SITES
    assert swarm_rounds(d, job) == [0, 1, 2]  # each round's aggregator recorded it


def test_a_swarm_job_finishes_with_the_server_killed(d: Deployment, tmp_path: Path) -> None:
    """The server is killed once the sites hold round 1 (gated): they finish the 4 rounds
    among themselves (through their relay), each keeping the final model in its job folder."""
    server = d.procs["server"]
    job = json.loads(d.job("submit", "tests._fl_scripts:gated_swarm_recipe").stdout)["id"]
    deadline = time.monotonic() + 60
    while not swarm_rounds(d, job):  # round 0 recorded at the server: round 1 is gated
        assert time.monotonic() < deadline, "the swarm's round 0 never reached the server"
        time.sleep(0.2)
    server.proc.kill()
    server.proc.wait()
    (tmp_path / "gate").touch()
    for site in SITES:
        assert d.procs[site].wait_for("job-ended", job=job, timeout=120)["outcome"] == "finished"
        folder = tmp_path / "jobs" / site / job
        tensors, _ = decode((folder / "swarm_final.safetensors").read_bytes())
        np.testing.assert_allclose(tensors["w"], 4 * 5 / 3)  # 5/3 a round, 4 rounds
