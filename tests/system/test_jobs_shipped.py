"""A job that brings its own code, on a real deployment (issue 21): the server and two sites are
OS processes started in a folder of their own, with nothing of the repo or of the job on their
path (only the installed environment), over mutual TLS; the admin packs the job from its own
folder with the CLI (``job export``, ``job submit``), as a user ships a job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from flare_async.codecs import decode
from flare_async.security import provision
from flare_async.testing import free_ports
from tests._labs import train_package
from tests._procs import Proc

pytestmark = pytest.mark.slow  # every cell an OS process

ADMIN = "alice@example.org"
SITES = ["server.site-1", "server.site-2"]
GATED = """

def gated() -> None:
    # As train, but from round 1 on only once the file FLARE_TEST_GATE names exists.
    import os, time
    from pathlib import Path
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        while model.current_round > 0 and not Path(os.environ["FLARE_TEST_GATE"]).exists():
            time.sleep(0.05)
        params = {k: np.asarray(v) + STEP for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": 1}))


def gated_recipe() -> FedAvgRecipe:
    return FedAvgRecipe(
        initial={"w": np.zeros(4)}, script="deploylab:gated", rounds=3, deadline=120
    )
"""


class Shipped:
    def __init__(self, root: Path) -> None:
        (port,) = free_ports(1)
        clients = "".join(
            f'[[clients]]\nname = "{s}"\nparent = "tls://127.0.0.1:{port}"\n' for s in SITES
        )
        (root / "project.toml").write_text(
            f'project = "shipped"\norg = "example.org"\n'
            f'[server]\nlisten = ["tls://127.0.0.1:{port}"]\n{clients}'
            f'[[admins]]\nname = "{ADMIN}"\nparent = "tls://127.0.0.1:{port}"\n'
        )
        self.kits = root / "kits"
        provision(root / "project.toml", self.kits, now=datetime.now(UTC))
        self.lab = root / "lab"  # the admin's own folder, the only place the code is
        for name, text in train_package("deploylab", more=GATED).items():
            (self.lab / name).parent.mkdir(parents=True, exist_ok=True)
            (self.lab / name).write_text(text)
        self.root = root
        self.gate = root / "gate"
        os.environ["FLARE_TEST_GATE"] = str(self.gate)  # the cells inherit it (see fixture)
        elsewhere = root / "elsewhere"  # where the cells run: no repo, no job code
        elsewhere.mkdir()
        self.procs = {
            name: Proc(
                name,
                self.kits / name,
                root / f"{name}.log",
                ["--jobs", str(root / "jobs" / name)],
                cwd=elsewhere,
                repo_on_path=False,
            )
            for name in ["server", *SITES]
        }
        self.procs["server"].wait_all("site-registered", "site", SITES)

    def job(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(
            [sys.executable, "-m", "flare_async", "job", "--kit", str(self.kits / ADMIN), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
            check=False,
            cwd=self.lab,
        )

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            proc.stop()


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shipped]:
    monkeypatch.setenv("FLARE_TEST_GATE", "")  # restored afterwards; Shipped sets it
    d = Shipped(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def test_sites_that_never_saw_the_code_run_a_job_that_ships_it(shipped: Shipped) -> None:
    done = shipped.job("submit", "deploylab:recipe", "--wait", "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    rec = json.loads(done.stdout.splitlines()[-1])
    assert rec["state"] == "finished"
    assert rec["sites"] == SITES
    assert rec["code"]
    # What a person follows meanwhile (stderr is no terminal here: one line a round).
    assert "round 2/2" in done.stderr
    assert "sites 2/2" in done.stderr
    job = shipped.root / "jobs" / "server" / rec["id"]
    tensors, _ = decode((job / "checkpoints" / "last.safetensors").read_bytes())
    assert np.allclose(tensors["w"], 1.0)  # two rounds of the shipped STEP
    for site in SITES:
        shipped.procs[site].wait_for("job-ended", job=rec["id"])
        assert not (shipped.root / "jobs" / site / rec["id"] / "code").exists()
    # What the CLI says when there is nothing to do: one line, the cause, status 1.
    aborted = shipped.job("abort", rec["id"])
    assert aborted.returncode == 1
    assert aborted.stderr.strip().splitlines() == [
        f"flare-async job abort: error: BadRequest: job {rec['id']} already finished: "
        "nothing to abort (reported by server)"
    ]
    typo = shipped.job("submit", "deploylab:recipe", "--sites", "server.sitee-1")
    assert typo.returncode == 1
    shipping, error = typo.stderr.strip().splitlines()  # what it packed, then why not
    assert shipping.startswith("shipping 2 files")
    assert error.startswith("flare-async job submit: error: BadRequest: job refused: ")
    assert "no site 'server.sitee-1' ever registered" in error


def test_an_exported_job_is_submitted_as_exported_and_refused_once_edited(
    shipped: Shipped,
) -> None:
    out = shipped.root / "exported"
    exported = shipped.job("export", "deploylab:recipe", str(out))
    assert exported.returncode == 0, exported.stderr
    assert f"signed by {ADMIN}" in exported.stdout
    assert json.loads((out / "manifest.json").read_text())["admin"] == ADMIN
    shutil.rmtree(shipped.lab / "deploylab")  # the export stands on its own
    done = shipped.job("submit", str(out), "--wait", "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["state"] == "finished"
    (out / "code" / "deploylab" / "steps.py").write_text("STEP = 1000\n")
    edited = shipped.job("submit", str(out))
    assert edited.returncode != 0
    assert "changed after signing" in edited.stderr
    assert len(edited.stderr.strip().splitlines()) == 1


def test_a_job_running_when_everything_stops_is_interrupted_then_resumed(
    shipped: Shipped,
) -> None:
    """As ``up`` stops a deployment (SIGTERM to every cell) while a job runs: every process
    exits promptly (a site with a job in hand too), the job is kept ``interrupted``, and the
    next start resumes it from its checkpoint to its end."""
    submitted = shipped.job("submit", "deploylab:gated_recipe")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout.splitlines()[-1])["id"]
    shipped.procs["server"].wait_for("job-round", job=job, round=0, timeout=120)
    for name in ["server", *SITES]:
        assert shipped.procs[name].stop() == 0, shipped.procs[name].log.read_text()[-2000:]
    kept = json.loads((shipped.root / "jobs" / "server" / job / "job.json").read_text())
    assert kept["state"] == "interrupted"
    assert kept["rounds_done"] == 1
    shipped.gate.write_text("open")
    for proc in shipped.procs.values():
        proc.restart()
    shipped.procs["server"].wait_for("job-state", job=job, state="finished", timeout=120)
    done = json.loads(shipped.job("status", job).stdout)
    assert done["attempt"] == 2
    assert done["rounds_done"] == 3
