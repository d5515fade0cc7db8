"""The simulator on Ray (issue 24): the same topology, names, configs and sampling as the
in-process simulator, the sites' cells in 2 Ray actors on a local Ray instance, so the same
seed gives the same rounds and the same model; an actor that dies is a clear error."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flare_async.client as flare
from flare_async import MemoryNetwork
from flare_async.errors import ConfigError, FlareError
from flare_async.fl import FedAvgRecipe, FLModel, FLServer, RoundResult, fedavg, simulate
from tests.cli.test_cli_simulate import events
from tests.cli.test_cli_simulate import simulate as cli

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # Ray starts processes: seconds per test
ROOT = Path(__file__).absolute().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Ray actors and tcp links: real time


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # the actors import tests.*
    )
    yield
    ray.shutdown()


# The scripts send integers, so every sum of results is exact: the order results are folded
# in (which depends on timing, on either backend) cannot change a bit of the model.


async def weighted_site() -> None:
    """Site i adds a site-dependent amount and reports i % 7 + 1 samples; site 5's first
    result has a negative weight (refused: the site fails that round), then it goes on."""
    i = int(flare.get_config()["site_index"])
    k = i * 37 % 11
    while (model := await flare.receive_async()) is not None:
        params = {n: np.floor(v) + k for n, v in model.params.items()}  # see `exact`
        if i == 5 and model.current_round == 0:
            await flare.send_async(FLModel(params=params, meta={"num_samples": -1}))  # refused
            continue
        await flare.send_async(FLModel(params=params, meta={"num_samples": i % 7 + 1}))


def threaded_site() -> None:
    """The same in a worker thread, with the blocking Client API."""
    flare.init()
    i = int(flare.get_config()["site_index"])
    while (model := flare.receive()) is not None:
        params = {n: np.floor(v) + i for n, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": i + 1}))


async def raises_at_site_6() -> None:
    """Site 6 finds no data once its first task came: its script raises."""
    if flare.get_site_name().endswith("site-6"):
        await flare.receive_async()
        raise ValueError("no data at this site")
    await weighted_site()


def dies_at_site_2() -> None:
    """Site 2 takes its actor's whole process down with it."""
    flare.init()
    model = flare.receive()
    if flare.get_site_name().endswith("site-2"):
        os._exit(3)
    while model is not None:
        flare.send(FLModel(params=model.params, meta={"num_samples": 1}))
        model = flare.receive()


async def run(backend: str, script: Any, **kwargs: Any) -> tuple[FLModel, list[Any]]:
    rounds: list[Any] = []

    def on_round(r: RoundResult) -> None:
        rounds.append((sorted(r.responded), sorted(r.failed), r.partials))

    async def workflow(server: FLServer) -> FLModel:
        initial = {"w": np.arange(6, dtype=np.float64)}
        return await fedavg(server, initial, rounds=3, fraction=0.7, min_responses=10, deadline=60)

    extra = {"actors": 2} if backend == "ray" else {}
    final = await simulate(
        workflow, script, seed=7, on_round=on_round, backend=backend, **extra, **kwargs
    )
    return final, rounds


@pytest.mark.parametrize(
    ("relays", "script", "in_loop"),
    [
        pytest.param((2, 2), weighted_site, True, id="two-tiers-in-loop"),
        pytest.param(0, weighted_site, True, id="no-relays-in-loop"),
        pytest.param(3, threaded_site, False, id="one-tier-threads"),
    ],
)
async def test_ray_with_two_actors_equals_the_in_process_simulator(
    relays: Any, script: Any, in_loop: bool
) -> None:
    kwargs = {"clients": 20, "relays": relays, "in_loop": in_loop}
    local, local_rounds = await run("local", script, **kwargs)
    on_ray, ray_rounds = await run("ray", script, **kwargs)
    assert len(ray_rounds) == 3
    assert ray_rounds == local_rounds  # the same sites sampled, answering and failing
    assert all(len(responded) == 14 for responded, _, _ in ray_rounds[1:])
    assert np.array_equal(on_ray.params["w"], local.params["w"])
    assert on_ray.params["w"].dtype == local.params["w"].dtype


async def test_a_script_that_fails_is_reported_as_in_process() -> None:
    failures: list[dict[str, str]] = []

    async def workflow(server: FLServer) -> FLModel:
        return await fedavg(server, {"w": np.ones(4)}, rounds=1, min_responses=1, deadline=60)

    await simulate(
        workflow,
        raises_at_site_6,
        clients=8,
        relays=2,
        in_loop=True,
        backend="ray",
        actors=2,
        on_round=lambda r: failures.append(r.failed),
    )
    assert list(failures[0]) == ["server.relay-2.site-6"]
    assert "ValueError: no data at this site" in failures[0]["server.relay-2.site-6"]


@pytest.mark.timeout(90)
async def test_an_actor_that_dies_is_a_flare_error_not_a_hang() -> None:
    async def workflow(server: FLServer) -> FLModel:
        # the others go on: the workflow does not fail first, the dead actor is what is reported
        return await fedavg(server, {"w": np.ones(4)}, rounds=3, min_responses=1, deadline=600)

    with pytest.raises(FlareError, match="Ray actor 1"):
        await simulate(workflow, dies_at_site_2, clients=4, backend="ray", actors=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"processes": True},
        {"peers": True},
        {"network": MemoryNetwork()},
        {"backend": "dask"},
    ],
)
async def test_options_the_ray_backend_does_not_take(kwargs: dict[str, Any]) -> None:
    async def workflow(server: FLServer) -> None:
        raise AssertionError("not reached")

    options = {"backend": "ray", **kwargs}
    with pytest.raises(ConfigError, match="backend="):
        await simulate(workflow, threaded_site, clients=2, **options)


async def test_without_ray_installed_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError

    async def workflow(server: FLServer) -> None:
        raise AssertionError("not reached")

    with pytest.raises(ConfigError, match=r"flare_async\[ray\]"):
        await simulate(workflow, threaded_site, clients=2, backend="ray")


async def test_at_least_one_actor() -> None:
    async def workflow(server: FLServer) -> None:
        raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="actors must be at least 1"):
        await simulate(workflow, threaded_site, clients=2, backend="ray", actors=0)


def ray_recipe() -> FedAvgRecipe:
    """A recipe for ``flare-async simulate --backend ray`` and ``recipe.simulate``."""
    return FedAvgRecipe(
        initial={"w": np.arange(4, dtype=np.float64)}, script=threaded_site, rounds=2
    )


async def test_a_recipe_simulates_on_ray_as_in_process() -> None:
    recipe = ray_recipe()
    local = await recipe.simulate(6, relays=2)
    on_ray = await recipe.simulate(6, relays=2, backend="ray", actors=2)
    assert np.array_equal(on_ray.params["w"], local.params["w"])
    # Site i floors the model, adds i, weighs i + 1: a round adds sum(i(i + 1)) / sum(i + 1)
    # = 70 / 21 to the floored model; two rounds from 0, 1, 2, 3 give w + 3 + 70 / 21.
    assert np.allclose(local.params["w"], np.arange(4) + 3 + 70 / 21)
    with pytest.raises(ConfigError, match="backend='ray'"):
        await recipe.simulate(2, processes=True, backend="ray")


ARGS = ("--clients", "6", "--relays", "2", "--backend", "ray", "--actors", "2", "--json")


def test_the_cli_simulates_on_ray_in_two_actors() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the actors import tests.fl.test_ray
    out = cli("tests.fl.test_ray:ray_recipe", *ARGS, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = events(out.stdout)
    assert [(e["round"], e["of"]) for e in got if e["event"] == "round"] == [(1, 2), (2, 2)]
    assert got[-1]["event"] == "done"
