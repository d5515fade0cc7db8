"""Training scripts in the shape of NVIDIA FLARE's Client API examples (hello-numpy, hello-pt,
PyTorch Lightning), changed only in their import lines, run in the simulator and as jobs on a
deployment; their tracked values reach the server."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flare_async.fl import FLModel, simulate
from tests.nvflare_shaped import hello_numpy, recipes
from tests.system.test_jobs_deploy import SITES, Deployment

pytestmark = pytest.mark.anyio
HERE = Path(__file__).resolve().parents[1] / "nvflare_shaped"
SCRIPTS = ["hello_numpy.py", "hello_pt.py", "hello_lightning.py"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # scripts run in worker threads and processes: real clocks


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_scripts_use_flare_async_only_in_their_import_lines(name: str) -> None:
    """Each mention of flare_async is an import FLARE's script has with ``nvflare`` in its
    place; the rest of the script is FLARE's API."""
    tree = ast.parse((HERE / name).read_text())
    doc = tree.body[0]
    assert isinstance(doc, ast.Expr)  # the docstring: says what was ported, not code
    lines = (HERE / name).read_text().splitlines()[doc.end_lineno or 0 :]
    ours = [line for line in lines if "flare_async" in line]
    allowed = re.compile(
        r"^(import flare_async\.client(\.lightning)? as flare"
        r"|from flare_async\.client\.tracking import \w+(, \w+)*)$"
    )
    assert ours, name
    assert all(allowed.match(line) for line in ours), ours
    flare_names = {"FLModel", "init", "system_info", "is_running", "receive", "send", "log"}
    used = set(re.findall(r"flare\.(\w+)", "\n".join(lines)))
    assert used <= flare_names | {
        "get_site_name",
        "get_config",
        "is_evaluate",
        "patch",
    }


async def run(recipe: Any, *, threads: bool = False) -> tuple[FLModel, list[dict[str, Any]]]:
    tracked: list[dict[str, Any]] = []
    script = hello_numpy.main if threads else recipe.script
    final = await simulate(
        recipe.run,
        script,
        clients=2,
        config=recipe.config,
        on_metrics=lambda site, recs: tracked.extend(recs),
    )
    return final, tracked


@pytest.mark.parametrize("threads", [True, False], ids=["in-threads", "in-processes"])
async def test_hello_numpy_runs_in_the_simulator(threads: bool) -> None:
    final, tracked = await run(recipes.hello_numpy(), threads=threads)
    start = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    assert np.array_equal(final.params["numpy_key"], start + 3)
    assert final.params["numpy_key"].dtype == np.float32
    steps = sorted((r["site"], r["step"]) for r in tracked if r["key"] == "accuracy")
    assert steps == [(s, r) for s in ("server.site-1", "server.site-2") for r in range(3)]


@pytest.mark.slow  # trains a torch model
async def test_hello_pt_trains_in_the_simulator() -> None:
    final, tracked = await run(recipes.hello_pt())
    history = final.meta["history"]
    assert history[-1]["metrics"]["accuracy"] > 0.85  # the global model of the last round
    assert final.params["bn.num_batches_tracked"].dtype == np.int64
    losses = [r for r in tracked if r["key"] == "loss_for_each_batch"]
    assert {r["site"] for r in losses} == {"server.site-1", "server.site-2"}
    assert all(isinstance(r["value"], float) and r["step"] >= 0 for r in losses)


@pytest.mark.slow  # trains a torch model
async def test_hello_lightning_trains_in_the_simulator() -> None:
    final, _ = await run(recipes.hello_lightning())
    history = final.meta["history"]
    assert history[-1]["metrics"]["val_acc_epoch"] > 0.85  # after one round of training
    assert set(final.params) == {f"model.{k}" for k in recipes.initial_pt()}


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from tests._procs import ROOT  # noqa: PLC0415

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.slow  # a deployment, three jobs
@pytest.mark.timeout(400)
def test_the_scripts_run_as_jobs_with_their_metrics_at_the_server(deployment: Deployment) -> None:
    d = deployment
    # A script failing at import on one site: the job fails at once, saying why (the round's
    # deadline is 600 s).
    broken = d.job("submit", "tests.nvflare_shaped.recipes:broken", "--wait", "--timeout", "120")
    assert broken.returncode == 1, broken.stderr
    rec = json.loads(broken.stdout.splitlines()[-1])
    assert rec["state"] == "failed"
    why = rec["site_errors"][SITES[1]]
    assert "ModuleNotFoundError" in why
    assert "missing_module_for_the_test" in why
    assert "missing_module_for_the_test" in rec["error"]
    assert f"job {rec['id']} failed: " in broken.stderr  # job wait says why, site by site
    assert f"  {SITES[1]}: " in broken.stderr
    ended = d.procs[SITES[1]].wait_for("job-ended", job=rec["id"])
    assert ended["outcome"].startswith("failed: training script failed: ModuleNotFoundError")

    done = d.job("submit", "tests.nvflare_shaped.recipes:hello_pt", "--wait", "--timeout", "170")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout.splitlines()[-1])
    assert job["state"] == "finished"
    assert job["metrics"]["accuracy"] > 0.85
    shown = d.job("metrics", job["id"], "--key", "loss_for_each_batch", "--json")
    assert shown.returncode == 0, shown.stderr
    recs = [json.loads(line) for line in shown.stdout.splitlines()]
    assert {r["site"] for r in recs} == set(SITES)
    assert all(r["key"] == "loss_for_each_batch" for r in recs)
    table = d.job("metrics", job["id"], "--site", SITES[0])
    assert table.returncode == 0, table.stderr
    assert f"{SITES[0]}  loss_for_each_batch  " in table.stdout


async def test_a_flare_scaffold_script_runs_unchanged_under_the_scaffold_strategy() -> None:
    """FLARE's SCAFFOLD scripts read the control variate from ``meta["scaffold_c_global"]`` and
    send their change in ``meta["scaffold_c_diff"]``: the Client API moves them to and from the
    wire's ``scaffold.c/NAME`` tensors. After round 0 the server's control is the sites' mean
    change (equal step counts: a plain mean), and round 1's scripts see exactly it."""
    import torch  # noqa: PLC0415 - only this test needs it

    from flare_async.fl import FedAvgRecipe, Scaffold  # noqa: PLC0415
    from tests.nvflare_shaped import scaffold_pt  # noqa: PLC0415

    scaffold_pt.SEEN.clear()
    initial = torch.nn.Linear(3, 1).state_dict()
    recipe = FedAvgRecipe(initial=initial, script=scaffold_pt.main, rounds=2, strategy=Scaffold())
    await recipe.simulate(clients=2)
    first = [s for s in scaffold_pt.SEEN if s["round"] == 0]
    second = [s for s in scaffold_pt.SEEN if s["round"] == 1]
    assert len(first) == len(second) == 2
    for s in first:  # round 0: the control starts at zero
        assert all(np.allclose(np.asarray(v), 0) for v in s["global"].values())
    for key in ("weight", "bias"):
        want = np.mean([s["delta"][key] for s in first], axis=0)
        for s in second:
            np.testing.assert_allclose(np.asarray(s["global"][key]), want, rtol=1e-5, atol=1e-6)
        assert np.abs(want).max() > 1e-3  # a real change, not zeros passing for one
