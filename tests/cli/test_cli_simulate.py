"""``flare-async simulate`` (issue 21): recipes by module from the current folder or by file
path, ``--rounds`` reaching the recipe, progress a person can read (plain lines off a
terminal, a tqdm bar on one), JSON lines for scripts, and Ctrl-C as one line and status 130.
Real processes, as a person or a script runs them."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flare_async.cli._progress import (
    AboveBar,
    ProgressBar,
    RoundProgress,
    render_metrics,
    render_round,
)
from flare_async.streaming import Progress

RECIPE = """
import time

import numpy as np

import flare_async.client as flare
from flare_async.fl import FedAvgRecipe, FLModel

from helper import STEP  # a sibling module: the recipe's folder is on the path


def train() -> None:
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        time.sleep(float(flare.get_config().get("pause", 0.0)))
        flare.send(
            FLModel(
                params={k: np.asarray(v) + STEP for k, v in model.params.items()},
                meta={"num_samples": 1},
                metrics={"loss": 0.5},
            )
        )


def recipe(rounds: int = 15, pause: float = 0.0) -> FedAvgRecipe:
    def evaluate(rnd: int, params: dict) -> dict:
        print(f"recipe says round {rnd + 1}/{rounds}", flush=True)
        return {"accuracy": 0.25 * (rnd + 1)}

    return FedAvgRecipe(
        initial={"w": np.zeros(2)},
        script=train,
        rounds=rounds,
        evaluate=evaluate,
        validation_key="accuracy",
        config={"pause": pause},
    )


def slow() -> FedAvgRecipe:
    return recipe(rounds=10_000, pause=0.05)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with a recipe module (``mysim``) and the sibling module it imports."""
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "mysim.py").write_text(RECIPE)
    (folder / "helper.py").write_text("STEP = 1.0\n")
    return folder


def simulate(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # -P: nothing prepended to sys.path, as for the installed `flare-async` script, so the
    # current folder is on the path only if simulate puts it there.
    return subprocess.run(
        [sys.executable, "-P", "-m", "flare_async", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env=env,
    )


def events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_a_module_in_the_current_folder_loads_and_rounds_override_the_recipe(
    project: Path,
) -> None:
    done = simulate("mysim:recipe", "--rounds", "3", cwd=project)
    assert done.returncode == 0, done.stderr
    got = events(done.stdout)
    rounds = [e for e in got if e["event"] == "round"]
    assert [(e["round"], e["of"]) for e in rounds] == [(1, 3), (2, 3), (3, 3)]
    assert rounds[-1]["validation"] == {"accuracy": 0.75}
    assert got[-1]["event"] == "done"
    # The recipe function got rounds=3 too: what it prints agrees with what ran.
    assert "recipe says round 3/3" in done.stdout
    assert "/15" not in done.stdout


def test_a_recipe_file_path_loads_with_its_sibling_imports(project: Path, tmp_path: Path) -> None:
    done = simulate(str(project / "mysim.py") + ":recipe", "--rounds", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [e["round"] for e in events(done.stdout) if e["event"] == "round"] == [1, 2]
    # NAME defaults to recipe.
    plain = simulate("proj/mysim.py", "--rounds", "1", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    missing = simulate("proj/nope.py:recipe", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        "flare-async simulate: error: no such file: proj/nope.py (in recipe 'proj/nope.py:recipe')"
    ]


@pytest.mark.slow  # each site its own process
def test_a_recipe_file_runs_with_sites_in_their_own_processes(
    project: Path, tmp_path: Path
) -> None:
    done = simulate(str(project / "mysim.py"), "--rounds", "2", "--processes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rounds = [e for e in events(done.stdout) if e["event"] == "round"]
    assert [(e["round"], e["responded"]) for e in rounds] == [(1, 2), (2, 2)]


def test_progress_off_a_terminal_is_one_plain_line_per_round(project: Path) -> None:
    done = simulate("mysim:recipe", "--rounds", "3", "--clients", "3", cwd=project)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["round 1/3", "round 2/3", "round 3/3"]
    assert all("sites 3/3" in line and "elapsed" in line for line in lines)
    assert "left" in lines[0]
    assert "accuracy=0.5 loss=0.5" in lines[1]


def test_json_gives_json_lines_only(project: Path) -> None:
    done = simulate("mysim:recipe", "--rounds", "2", "--json", cwd=project)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = [x for x in done.stdout.splitlines() if not x.startswith("recipe says")]
    assert [json.loads(x)["event"] for x in lines] == ["round", "round", "done"]
    assert json.loads(lines[-1])["best"] == {"round": 1, "accuracy": 0.5}


def test_ctrl_c_is_one_line_and_status_130(project: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "flare_async", "simulate", "mysim:slow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=project,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        while first and not first.startswith("{"):  # the recipe's own print comes first
            first = proc.stdout.readline()
        assert json.loads(first)["round"] == 1  # the first round's line: the run is under way
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.splitlines() == ["flare-async simulate: interrupted"], err
    assert '"event": "done"' not in out


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_is_redrawn_and_other_lines_go_above_it() -> None:
    out = Tty()
    with RoundProgress(3, out=out) as progress:
        progress.update(1, responded=4, expected=4, metrics={"accuracy": 0.5})
        AboveBar(out).write("a log line\n")
        progress.update(2, responded=3, expected=4, failed=["server.site-2"])
    text = out.getvalue()
    assert "\r" in text
    assert "round 2/3" in text
    assert "sites 4/4  accuracy=0.5" in text
    assert "sites 3/4  failed: server.site-2" in text
    before, after = text.split("a log line\n")
    assert before.endswith("\r")  # the bar cleared before the line
    assert "round 1/3" in after  # the bar drawn again below the line


def test_plain_round_lines_estimate_what_is_left() -> None:
    now = [100.0]
    out = io.StringIO()
    progress = RoundProgress(4, out=out, clock=lambda: now[0])
    now[0] = 110.0
    progress.update(1, responded=2, expected=2, metrics={"loss": 0.123456})
    now[0] = 120.0
    progress.update(2, responded=1, expected=2, failed=["server.site-1"])
    assert out.getvalue().splitlines() == [
        "round 1/4  sites 2/2  00:10 elapsed  00:30 left  loss=0.1235",
        "round 2/4  sites 1/2  00:20 elapsed  00:20 left  failed: server.site-1",
    ]
    assert render_round(
        3, None, responded=5, expected=None, elapsed=1, remaining=None, metrics={}
    ) == ("round 3  sites 5  00:01 elapsed")


def test_a_stream_bar_on_a_terminal_is_tqdm() -> None:
    out = Tty()
    bar = ProgressBar(out, "model.bin", every=0.0)
    bar.update(Progress("x", 1, 512 << 20, 1 << 30, 1.0, float(512 << 20)))
    bar.finish()
    text = out.getvalue()
    assert "model.bin" in text
    assert "50%" in text
    assert "512M/1.00G" in text


def test_a_last_partial_line_goes_out_when_the_stream_above_the_bars_closes() -> None:
    out = io.StringIO()
    above = AboveBar(out)
    above.write("whole\npart")
    assert out.getvalue() == "whole\n"  # a partial line waits for its end
    above.close()
    assert out.getvalue() == "whole\npart"
    above.close()
    assert out.getvalue() == "whole\npart"  # once


def test_metrics_of_any_kind_render_and_a_resumed_job_estimates_from_its_own_rounds() -> None:
    assert render_metrics({"acc": 0.912345, "note": "best", "n": 3, "x": None}) == (
        "acc=0.9123 note=best n=3 x=None"
    )
    now = [0.0]
    out = io.StringIO()
    progress = RoundProgress(10, out=out, first=6, clock=lambda: now[0])  # 6 done before
    now[0] = 20.0
    progress.update(8, responded=1, expected=1)  # 2 rounds here in 20 s: 2 left, 20 s
    assert out.getvalue() == "round 8/10  sites 1/1  00:20 elapsed  00:20 left\n"
