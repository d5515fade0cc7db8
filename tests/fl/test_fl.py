"""Federated learning: FedAvg's arithmetic against numpy, partial sums, the Client API in
simulated sites, and rounds with crashed, hung and unreachable clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import flare_async.client as flare
from flare_async.codecs import CodecRegistry, decode
from flare_async.fl import (
    FLModel,
    FLServer,
    ParamsType,
    RoundFailed,
    RoundMismatch,
    WeightedSum,
    fedavg,
    simulate,
)
from flare_async.fl._aggregate import COUNT_KEY, WEIGHT_KEY
from flare_async.fl._model import model_from_parts, model_parts

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from workflow_cyclic import main as cyclic_example_main

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # scripts run in worker threads: real clocks


def blob(parts: list[Any]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def test_a_model_travels_with_its_metrics_meta_and_rounds() -> None:
    m = FLModel(
        params={"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3)},
        params_type=ParamsType.DIFF,
        metrics={"loss": 0.25},
        meta={"num_samples": 12, "note": "x"},
        current_round=4,
        total_rounds=9,
    )
    back = model_from_parts(blob(model_parts(m, CodecRegistry())))
    assert back.params_type is ParamsType.DIFF
    assert back.metrics == {"loss": 0.25}
    assert back.meta == {"num_samples": 12, "note": "x"}
    assert (back.current_round, back.total_rounds) == (4, 9)
    assert np.array_equal(back.params["w"], m.params["w"])
    q = model_from_parts(blob(model_parts(m, CodecRegistry(), "q8")))
    assert q.params["w"].dtype == np.float32
    assert np.abs(q.params["w"] - m.params["w"]).max() <= 5 / 254 + 1e-6


def test_weighted_sum_and_partial_sums_equal_the_flat_mean() -> None:
    rng = np.random.default_rng(0)
    updates = [
        ({"w": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)}, float(n))
        for n in (3, 1, 7, 2, 5, 4)
    ]
    flat = WeightedSum()
    for params, n in updates:
        flat.add(params, n, ParamsType.FULL)
    reference = {k: sum(p[k] * n for p, n in updates) / sum(n for _, n in updates) for k in "wb"}
    # two relays with three clients each, then the server merges their partial sums
    top = WeightedSum()
    for group in (updates[:3], updates[3:]):
        relay = WeightedSum()
        for params, n in group:
            relay.add(params, n, ParamsType.FULL)
        top.merge(relay.partial())
    for k in "wb":
        assert np.allclose(flat.mean()[k], reference[k], rtol=0, atol=1e-12)
        assert np.allclose(top.mean()[k], flat.mean()[k], rtol=0, atol=1e-12)
    assert top.count == 6
    with pytest.raises(RoundMismatch):  # some tensors only is fine, another shape is not
        flat.add({"w": np.zeros((5, 4))}, 1.0, ParamsType.FULL)
    with pytest.raises(RoundMismatch):
        flat.add(updates[0][0], 1.0, ParamsType.DIFF)
    with pytest.raises(ValueError):
        flat.add(updates[0][0], float("nan"), ParamsType.FULL)


def updating_script(kind: ParamsType) -> Any:
    """Site i adds (i + 1) to every parameter and reports i + 1 samples."""

    def script() -> None:
        flare.init()
        i = flare.get_config()["site_index"]
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            delta = {k: np.full_like(v, i + 1) for k, v in model.params.items()}
            params = (
                delta
                if kind is ParamsType.DIFF
                else {k: v + delta[k] for k, v in model.params.items()}
            )
            flare.send(
                FLModel(
                    params=params,
                    params_type=kind,
                    meta={"num_samples": i + 1},
                    metrics={"site": float(i)},
                )
            )

    return script


@pytest.mark.parametrize("kind", [ParamsType.FULL, ParamsType.DIFF])
async def test_fedavg_matches_a_numpy_reference(kind: ParamsType) -> None:
    clients, rounds = 4, 3
    init = {"w": np.linspace(0, 1, 12).reshape(3, 4), "b": np.zeros(4)}
    result = await simulate(
        lambda s: fedavg(s, init, rounds=rounds), updating_script(kind), clients=clients
    )
    # reference: each round the global model moves by sum(n_i * (i+1)) / sum(n_i), n_i = i+1
    step = sum((i + 1) ** 2 for i in range(clients)) / sum(i + 1 for i in range(clients))
    for k, v in init.items():
        assert np.allclose(result.params[k], v + rounds * step, rtol=0, atol=1e-9)
    assert len(result.meta["history"]) == rounds
    assert result.meta["history"][0]["metrics"] == {"site": 1.5}


HANG = threading.Event()


@pytest.fixture(autouse=True)
def _release_hung_scripts() -> Any:
    yield
    HANG.set()  # the simulator abandoned the hung script's thread; let it end


@pytest.mark.parametrize("kind", [ParamsType.FULL, ParamsType.DIFF])
async def test_hierarchical_fedavg_through_two_relays_equals_flat(kind: ParamsType) -> None:
    init = {"w": np.random.default_rng(4).standard_normal((5, 7)), "b": np.zeros(7)}
    flat_rounds: list[Any] = []
    tree_rounds: list[Any] = []
    flat = await simulate(
        lambda s: fedavg(s, init, rounds=3),
        updating_script(kind),
        clients=6,
        on_round=flat_rounds.append,
    )
    tree = await simulate(
        lambda s: fedavg(s, init, rounds=3),
        updating_script(kind),
        clients=6,
        relays=2,
        on_round=tree_rounds.append,
    )
    for k in init:
        assert np.allclose(tree.params[k], flat.params[k], rtol=0, atol=1e-12)
    assert len(tree_rounds[0].responded) == 6
    assert [r.partials for r in tree_rounds] == [2, 2, 2]  # one partial sum per relay
    assert [r.partials for r in flat_rounds] == [0, 0, 0]
    assert sorted(tree_rounds[0].metrics) == sorted(tree_rounds[0].responded)
    assert tree.meta["history"][0]["metrics"] == flat.meta["history"][0]["metrics"]


def crash_on_first(kind: str) -> Any:
    ok = updating_script(ParamsType.FULL)
    HANG.clear()
    hang = HANG

    def script() -> None:
        if not flare.get_site_name().endswith(".site-3"):
            ok()
            return
        model = flare.receive()
        assert model is not None
        if kind == "crash":
            raise RuntimeError("the training script blew up")
        hang.wait(30)  # hangs past the deadline

    return script


# hang: slow, it waits out a real round deadline
@pytest.mark.parametrize("kind", ["crash", pytest.param("hang", marks=pytest.mark.slow)])
async def test_a_round_completes_without_a_failed_client_when_the_minimum_is_met(kind: str) -> None:
    rounds: list[Any] = []
    init = {"w": np.zeros(3)}
    result = await simulate(
        lambda s: fedavg(s, init, rounds=1, min_responses=3, deadline=2.0),
        crash_on_first(kind),
        clients=4,
        on_round=rounds.append,
    )
    (r,) = rounds
    assert sorted(r.responded) == ["server.site-1", "server.site-2", "server.site-4"]
    assert "server.site-3" in r.failed
    if kind == "crash":  # reported at once, not found out at the deadline
        assert "the training script blew up" in r.failed["server.site-3"]
    # the mean of sites 1, 2 and 4 (weights 1, 2, 4; each adds its own weight)
    assert np.allclose(result.params["w"], (1 + 4 + 16) / 7)


async def test_a_round_fails_by_name_when_too_few_clients_answer() -> None:
    with pytest.raises(RoundFailed, match="3 of 4 clients answered, 4 needed"):
        await simulate(
            lambda s: fedavg(s, {"w": np.zeros(3)}, rounds=1, deadline=2.0),
            crash_on_first("crash"),
            clients=4,
        )


async def test_unreachable_clients_are_failed_not_waited_for() -> None:
    async def workflow(server: FLServer) -> Any:
        server.clients.append("server.site-99")  # never joined
        return await fedavg(server, {"w": np.zeros(2)}, rounds=1, min_responses=2, deadline=30)

    rounds: list[Any] = []
    await simulate(workflow, updating_script(ParamsType.FULL), clients=2, on_round=rounds.append)
    assert "server.site-99" in rounds[0].failed
    assert "Unreachable" in rounds[0].failed["server.site-99"]


@pytest.mark.parametrize("codec", ["q8", "nf4"])
async def test_quantized_transfer_both_ways(codec: str) -> None:
    init = {"w": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)}
    exact = await simulate(
        lambda s: fedavg(s, init, rounds=2), updating_script(ParamsType.FULL), clients=3
    )
    lossy = await simulate(
        lambda s: fedavg(s, init, rounds=2),
        updating_script(ParamsType.FULL),
        clients=3,
        codec=codec,
    )
    scale = np.abs(exact.params["w"]).max()
    bound = {"q8": 1 / 254, "nf4": 0.16}[codec]
    assert np.abs(lossy.params["w"] - exact.params["w"]).max() <= 4 * bound * scale


def test_the_client_api_outside_a_site_says_so() -> None:
    with pytest.raises(RuntimeError, match="outside a running site"):
        flare.init()


async def test_the_second_workflow_example_runs_on_the_public_api() -> None:
    out = await cyclic_example_main()
    assert out.params["visits"].tolist() == [2.0, 2.0, 2.0]


class ServerDied(Exception):
    pass


def leftovers(folder: Path) -> list[Path]:
    return list(folder.glob("*.part"))


def read(path: Path) -> bytes:
    return path.read_bytes()


async def test_a_restarted_server_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    init = {"w": np.zeros((2, 2))}
    script = updating_script(ParamsType.FULL)

    def score(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
        return {"score": -abs(float(params["w"][0, 0]) - 4.0)}  # best near w == 4

    def dies_in_round_3(rnd: int, params: dict[str, np.ndarray]) -> dict[str, float]:
        if rnd == 3:
            raise ServerDied  # after rounds 0, 1 and 2 were checkpointed
        return score(rnd, params)

    whole = await simulate(
        lambda s: fedavg(s, init, rounds=5, evaluate=score, validation_key="score"),
        script,
        clients=2,
    )
    with pytest.raises(ServerDied):
        await simulate(
            lambda s: fedavg(
                s,
                init,
                rounds=5,
                evaluate=dies_in_round_3,
                validation_key="score",
                checkpoints=tmp_path,
            ),
            script,
            clients=2,
        )
    assert (tmp_path / "last.safetensors").exists()
    assert not leftovers(tmp_path)
    resumed = await simulate(
        lambda s: fedavg(
            s, init, rounds=5, evaluate=score, validation_key="score", checkpoints=tmp_path
        ),
        script,
        clients=2,
    )
    assert np.array_equal(resumed.params["w"], whole.params["w"])
    assert [h["round"] for h in resumed.meta["history"]] == [0, 1, 2, 3, 4]
    assert resumed.meta["best"] == whole.meta["best"]
    best, _ = decode(read(tmp_path / "best.safetensors"))  # a safetensors file
    assert np.array_equal(best["w"], whole.meta["best_params"]["w"])


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["threads", "processes", "sites-as-processes"])
async def test_the_same_job_in_process_and_as_subprocesses(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    script: Any = (
        updating_script(ParamsType.FULL)
        if kind == "threads"
        else "tests._fl_scripts:add_site_weight"
    )
    rounds: list[Any] = []
    init = {"w": np.zeros(4)}
    out = await simulate(
        lambda s: fedavg(s, init, rounds=2),
        script,
        clients=3,
        on_round=rounds.append,
        processes=kind == "sites-as-processes",
    )
    step = (1 + 4 + 9) / 6
    assert np.allclose(out.params["w"], 2 * step)
    if kind != "threads":
        pids = {m["pid"] for m in rounds[0].metrics.values()}
        assert len(pids) == 3
        assert os.getpid() not in pids


async def test_a_training_process_that_dies_is_a_failed_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    rounds: list[Any] = []
    await simulate(
        lambda s: fedavg(s, {"w": np.zeros(2)}, rounds=1, min_responses=3, deadline=30),
        "tests._fl_scripts:dies_at_site_3",
        clients=4,
        on_round=rounds.append,
    )
    assert "server.site-3" in rounds[0].failed
    assert "training process ended" in rounds[0].failed["server.site-3"]


@pytest.mark.slow  # the CLI and its sites as processes
def test_flare_async_simulate_prints_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flare_async",
            "simulate",
            "tests._fl_scripts:small_recipe",
            "--clients",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert "site 2 trained round 2" in done.stdout  # the scripts' own output passes through
    assert [e["round"] for e in events if e["event"] == "round"] == [1, 2, 3]
    assert all(e["responded"] == 3 for e in events if e["event"] == "round")
    assert events[-1]["event"] == "done"
    bad = subprocess.run(
        [sys.executable, "-m", "flare_async", "simulate", "tests._fl_scripts:nothing"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert bad.returncode == 1
    assert "cannot load the recipe" in bad.stderr


def test_a_rejected_update_leaves_the_sum_untouched() -> None:
    agg = WeightedSum()
    agg.add({"a": np.zeros(3), "b": np.zeros(2)}, 1.0, ParamsType.FULL)
    with pytest.raises(RoundMismatch):
        agg.add({"a": np.full(3, 100.0), "b": np.zeros(5)}, 1.0, ParamsType.FULL)
    assert np.array_equal(agg.mean()["a"], np.zeros(3))


async def test_hierarchical_fedavg_keeps_the_models_dtypes() -> None:
    init = {"w": np.zeros((3, 3), np.float32), "steps": np.zeros(2, np.int64)}
    tree = await simulate(
        lambda s: fedavg(s, init, rounds=2), updating_script(ParamsType.FULL), clients=4, relays=2
    )
    assert tree.params["w"].dtype == np.float32
    assert tree.params["steps"].dtype == np.int64


async def test_a_crash_below_a_relay_does_not_hold_the_round_to_its_deadline() -> None:
    rounds: list[Any] = []
    start = anyio.current_time()
    await simulate(
        lambda s: fedavg(s, {"w": np.zeros(3)}, rounds=1, min_responses=3, deadline=20),
        crash_on_first("crash"),
        clients=4,
        relays=2,
        on_round=rounds.append,
    )
    assert anyio.current_time() - start < 10  # reported at once, not found at 0.9 x 20 s
    assert "the training script blew up" in rounds[0].failed["server.relay-1.site-3"]


async def test_a_site_cannot_forge_a_relays_partial_sum() -> None:
    def forger() -> None:
        flare.init()
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            if flare.get_site_name() == "server.site-1":
                flare.send(
                    FLModel(
                        params={"w": np.full(2, 1000.0)},
                        meta={
                            WEIGHT_KEY: 1.0,
                            COUNT_KEY: 2,
                            "responded": ["server.site-2", "server.site-2"],
                        },
                    )
                )
            else:
                flare.send(FLModel(params={"w": model.params["w"] + 1}, meta={"num_samples": 1}))

    rounds: list[Any] = []
    out = await simulate(
        lambda s: fedavg(s, {"w": np.zeros(2)}, rounds=1, min_responses=1, deadline=5),
        forger,
        clients=2,
        on_round=rounds.append,
    )
    assert np.array_equal(out.params["w"], np.ones(2))  # only site-2's honest update
    assert "server.site-1" in rounds[0].failed


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_an_async_training_script_uses_the_awaitable_client_api(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    from tests._fl_scripts import add_site_weight_async  # noqa: PLC0415

    script: Any = (
        add_site_weight_async if kind == "thread" else "tests._fl_scripts:add_site_weight_async"
    )
    out = await simulate(lambda s: fedavg(s, {"w": np.zeros(2)}, rounds=2), script, clients=3)
    assert np.allclose(out.params["w"], 2 * (1 + 4 + 9) / 6)


async def test_two_tiers_of_relays_and_scripts_on_the_simulations_own_loop() -> None:
    """``relays=(2, 2)``: four leaf relays under two, each folding its sites' results, and the
    two folding the leaves' partial sums (the server gets two); the async scripts run on the
    simulation's loop (no thread each) and the model is flat FedAvg's."""
    from tests._fl_scripts import add_site_weight_async  # noqa: PLC0415

    rounds: list[Any] = []
    threads = threading.active_count()
    seen: list[int] = []

    async def workflow(server: Any) -> Any:
        seen.append(threading.active_count())  # the scripts are running by now
        return await fedavg(server, {"w": np.zeros(3)}, rounds=2)

    out = await simulate(
        workflow,
        add_site_weight_async,
        clients=8,
        relays=(2, 2),
        in_loop=True,
        on_round=rounds.append,
    )
    weights = [i + 1 for i in range(8)]
    step = sum(w * w for w in weights) / sum(weights)
    assert np.allclose(out.params["w"], 2 * step)
    assert [r.partials for r in rounds] == [2, 2]  # every tier folds: one per top relay
    assert sorted(rounds[0].responded) == sorted(
        f"server.relay-{a}.relay-{b}.site-{i + 1}"
        for i, (a, b) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2), (1, 1), (1, 2), (2, 1), (2, 2)])
    )
    assert seen[0] <= threads + 1  # no thread per site


async def test_a_blocking_client_call_from_a_script_on_the_loop_is_refused() -> None:
    errors: list[str] = []

    async def wrong() -> None:
        try:
            flare.receive()  # would block the loop every simulated site runs on
        except RuntimeError as exc:
            errors.append(str(exc))
            raise

    async def workflow(server: Any) -> None:
        with pytest.raises(RoundFailed):
            await server.run_round(FLModel(params={"w": np.zeros(1)}), server.clients, deadline=2)

    await simulate(workflow, wrong, clients=1, in_loop=True)
    assert errors == ["an async script on the cell's loop uses await receive_async()"]


async def test_only_a_cell_above_a_relay_arms_it() -> None:
    """``fl/expect`` arms a relay's fold for a task: from a sibling it is refused, so no cell
    beside a relay can make it fold (and keep) results meant for the server."""
    from flare_async import Cell, MemoryNetwork  # noqa: PLC0415
    from flare_async.errors import Unauthorized  # noqa: PLC0415
    from flare_async.fl import RelayAggregator  # noqa: PLC0415

    net = MemoryNetwork()
    plan = json.dumps({"task": "t", "sites": ["server.r.s"], "deadline": 5}).encode()
    server = Cell("server", listen=["memory://server"], drivers=[net])
    relay = Cell("server.r", parent="memory://server", drivers=[net])
    relay.mount(RelayAggregator(relay).handlers())
    sibling = Cell("server.x", parent="memory://server", drivers=[net])
    async with server, relay, sibling:
        await relay.wait_parent()
        await sibling.wait_parent()
        with pytest.raises(Unauthorized, match=r"only a cell above server\.r arms it"):
            await sibling.request("server.r", "fl", "expect", plan)
        answer = await server.request("server.r", "fl", "expect", plan)
        assert answer.tobytes() == b"armed"
