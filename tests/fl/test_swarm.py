"""Swarm learning: the sites run the rounds among themselves (a rotating aggregator, models
site to site over peer links), the server only starting the job; the model is FedAvg's, the
swarm finishes with the server killed after the start, and members take updates and models
only from whom the plan says."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest

import flare_async.client as flare
from flare_async import Cell, MemoryNetwork
from flare_async.codecs import CodecRegistry
from flare_async.errors import BadRequest, Unauthorized
from flare_async.fl import ClientRuntime, FLModel, FLServer, SwarmRecipe, simulate, swarm
from flare_async.fl._model import model_parts
from flare_async.fl._swarm import SwarmMember, SwarmPlan
from tests._fl_scripts import answer_tasks

pytestmark = pytest.mark.anyio
SITES = 3
INIT = {"w": np.linspace(-1.0, 1.0, 4)}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def site_result(i: int, w: np.ndarray) -> np.ndarray:
    return (1.0 - 0.1 * (i + 1)) * w + 0.05 * (i + 1)


def reference(rounds: int, sites: int = SITES) -> np.ndarray:
    w = INIT["w"].copy()
    total = sum(i + 1 for i in range(sites))
    for _ in range(rounds):
        w = sum((i + 1) * site_result(i, w) for i in range(sites)) / total
    return w


started = threading.Barrier(SITES + 1)
"""Each site's script, once it holds round 0's model, and the test that waits for them."""


def step(i: int, task: FLModel) -> FLModel:
    """Site ``i``'s answer: ``site_result`` of the model, weighed ``i + 1``."""
    w = site_result(i, np.asarray(task.params["w"]))
    return FLModel(params={"w": w}, meta={"num_samples": i + 1}, metrics={"i": i})


def breaks(site: int, rnd: int, why: str) -> Callable[[], None]:
    """A script that answers as ``step`` does, but raises when ``site`` gets round ``rnd``."""

    def respond(i: int, task: FLModel) -> FLModel:
        if i == site and task.current_round == rnd:
            raise RuntimeError(why)
        return step(i, task)

    return lambda: answer_tasks(respond)


def affine() -> None:
    def respond(i: int, task: FLModel) -> FLModel:
        if task.current_round == 0 and flare.get_config().get("barrier"):
            started.wait(timeout=30)
        return step(i, task)

    answer_tasks(respond)


async def test_a_swarm_averages_as_fedavg_with_the_aggregator_rotating() -> None:
    seen: list[list[dict[str, Any]]] = []

    async def workflow(server: FLServer) -> FLModel:
        out = await swarm(server, INIT, rounds=4, deadline=30)
        seen.append(list(server.tracked))
        return out

    out = await simulate(workflow, affine, clients=SITES, peers=True)
    np.testing.assert_allclose(out.params["w"], reference(4), rtol=1e-12)
    # Each round's aggregator recorded it at the server: 4 rounds, all 3 answered.
    rounds = [r for r in seen[0] if r["key"] == "swarm/responded"]
    assert sorted(r["step"] for r in rounds) == [0, 1, 2, 3]
    assert {r["value"] for r in rounds} == {3.0}
    # The aggregators rotate: round r's record comes from members[r % 3].
    by = {r["step"]: r["site"] for r in rounds}
    assert by == {r: f"server.site-{r % SITES + 1}" for r in range(4)}


async def test_the_swarm_recipe_runs_in_the_simulator() -> None:
    out = await SwarmRecipe(initial=INIT, script=affine, rounds=2, deadline=30).simulate(SITES)
    np.testing.assert_allclose(out.params["w"], reference(2), rtol=1e-12)


class Mesh:
    """Set once a site is linked to every other site directly."""

    def __init__(self, others: set[str]) -> None:
        self.others = others
        self.up: set[str] = set()
        self.linked = anyio.Event()

    def __call__(self, peer: str, role: str, up: bool) -> None:
        if role == "peer" and up:
            self.up.add(peer)
            if self.up >= self.others:
                self.linked.set()


async def test_a_swarm_finishes_with_the_server_killed_after_the_start() -> None:
    """The server starts the swarm and is gone once every site holds round 0: the sites
    finish all the rounds over their peer links, each keeping the final model."""
    net = MemoryNetwork()
    names = [f"server.site-{i + 1}" for i in range(SITES)]
    runtimes: list[ClientRuntime] = []
    server_up, meshed, stop_server = anyio.Event(), anyio.Event(), anyio.Event()

    async def run_server() -> None:
        cell = Cell("server", listen=["memory://server"], drivers=[net])
        server = FLServer(cell, names, job="sim", digest=False)
        cell.mount(server.handlers())
        async with cell, anyio.create_task_group() as tg:
            server_up.set()
            await meshed.wait()
            tg.start_soon(partial(swarm, server, INIT, rounds=5, deadline=30.0))
            await stop_server.wait()
            tg.cancel_scope.cancel()  # and the cell closes: the server is gone

    async def run_sites() -> None:
        meshes: list[Mesh] = []
        async with AsyncExitStack() as sites:
            for i, name in enumerate(names):
                mesh = Mesh(set(names) - {name})
                cell = Cell(
                    name,
                    parent="memory://server",
                    listen=[f"memory://peer.{name}"],
                    peers=[f"memory://peer.{n}" for n in names[i + 1 :]],
                    drivers=[net],
                    on_link=mesh,
                )
                config = {"site_index": i, "barrier": True}
                runtime = ClientRuntime(cell, "server", config=config, digest=False, job="sim")
                cell.mount(runtime.handlers())
                await sites.enter_async_context(cell)
                runtimes.append(runtime)
                meshes.append(mesh)
            for mesh in meshes:
                await mesh.linked.wait()
            meshed.set()
            async with anyio.create_task_group() as scripts:  # ends when every script has
                for runtime in runtimes:
                    scripts.start_soon(runtime.run_script, affine)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_server)
            await server_up.wait()
            tg.start_soon(run_sites)
            await anyio.to_thread.run_sync(started.wait, 30)  # every site holds round 0
            stop_server.set()
    for runtime in runtimes:
        assert runtime.swarm is not None
        final = runtime.swarm.final
        assert final is not None
        np.testing.assert_allclose(final.params["w"], reference(5), rtol=1e-12)


def test_a_plan_out_of_range_is_refused() -> None:
    SwarmPlan(["a"], 1, 0.5, 1)
    for bad in (
        ([], 1, 1.0, 1),
        (["a", "a"], 1, 1.0, 1),
        (["a"], 0, 1.0, 1),
        (["a"], 1, float("nan"), 1),
        (["a"], 1, 1.0, 2),
        (["a"], 1, 1.0, 0),
    ):
        with pytest.raises(ValueError):
            SwarmPlan(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SwarmPlan.decode(
            '{"members": ["a"], "rounds": 1, "deadline": 1, "min_responses": 1, "x": 1}'
        )


class FakeStream:
    def __init__(self, src: str, headers: dict[str, str], data: bytes = b"") -> None:
        self.src = src
        self.headers = headers
        self.data = data

    async def read_joined(self) -> bytes:
        return self.data


async def test_members_take_updates_and_models_only_from_whom_the_plan_says() -> None:
    net = MemoryNetwork()
    async with Cell("server.site-1", drivers=[net]) as cell:
        plan = SwarmPlan(["server.site-1", "server.site-2", "server.site-3"], 4, 10.0, 2)
        member = SwarmMember(cell, plan, "j", "t", "server", lambda r, m: None, lambda: None, _noop)
        member.start(0, FLModel(params={"w": np.zeros(3)}))
        # site-1 aggregates round 0 (site-2 its backup) and backs up round 2 (site-3's).
        with pytest.raises(Unauthorized, match="not a member"):
            await member.take_update(FakeStream("server.site-9", {"task": "swarm/j/0/"}))  # type: ignore[arg-type]
        with pytest.raises(Unauthorized, match="does not aggregate"):
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/j/1/"}))  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="not this swarm's now"):
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/j/3/"}))  # type: ignore[arg-type]
        with pytest.raises(Unauthorized, match="did not aggregate"):
            await member.take_model(FakeStream("server.site-1", {"task": "swarm/j/2/"}))  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="round"):
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/j/x/"}))  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="unusable"):
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/j/0/"}, b"junk"))  # type: ignore[arg-type]


async def test_a_swarm_message_for_another_job_or_of_another_shape_is_refused() -> None:
    net = MemoryNetwork()
    async with Cell("server.site-1", drivers=[net]) as cell:
        plan = SwarmPlan(["server.site-1", "server.site-2", "server.site-3"], 4, 10.0, 2)
        member = SwarmMember(cell, plan, "j", "t", "server", lambda r, m: None, lambda: None, _noop)
        member.start(0, FLModel(params={"w": np.zeros(3)}))
        with pytest.raises(BadRequest, match="job and round"):
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/k/0/"}))  # type: ignore[arg-type]
        wrong = blob(FLModel(params={"w": np.zeros(4)}, meta={"num_samples": 1}))
        with pytest.raises(BadRequest, match="shape"):
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/j/0/"}, wrong))  # type: ignore[arg-type]
        extra = blob(FLModel(params={"w": np.zeros(3), "x": np.ones(1)}))
        with pytest.raises(BadRequest, match="extra"):
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/j/0/"}, extra))  # type: ignore[arg-type]
        right = blob(FLModel(params={"w": np.ones(3)}, meta={"num_samples": 1}))
        assert (
            await member.take_update(FakeStream("server.site-2", {"task": "swarm/j/0/"}, right))
            == b"taken"
        )  # type: ignore[arg-type]


def blob(model: FLModel) -> bytes:
    return b"".join(bytes(p) for p in model_parts(model, CodecRegistry()))


async def _noop(model: FLModel) -> None:
    return None


fails_in_round_1_at_site_3 = breaks(2, 1, "site 3 breaks in round 1")


async def test_a_member_that_drops_out_is_waited_for_until_the_deadline_only() -> None:
    """Round 1 goes on with the two members left once its 2 s are up (min_responses 2)."""
    out = await simulate(
        lambda s: swarm(s, INIT, rounds=2, deadline=2.0, min_responses=2),
        fails_in_round_1_at_site_3,
        clients=SITES,
        peers=True,
    )
    w = INIT["w"].copy()
    w = sum((i + 1) * site_result(i, w) for i in range(3)) / 6  # round 0: all three
    w = sum((i + 1) * site_result(i, w) for i in range(2)) / 3  # round 1: sites 1 and 2
    np.testing.assert_allclose(out.params["w"], w, rtol=1e-12)


aggregator_of_round_1_breaks = breaks(1, 1, "the round-1 aggregator breaks")
"""Site 2 aggregates round 1, but its script breaks as round 1 begins: it never closes it."""


@pytest.mark.parametrize("rounds", [3, 2])
async def test_a_silent_aggregator_is_replaced_by_the_next_in_turn(rounds: int) -> None:
    """Round 1's aggregator (site 2) falls silent: after twice the round's time the members
    send their results to site 3, which takes the round over; round 2 (site 3's own) goes on
    without site 2, and the swarm ends with the model of the sites that trained. With 2
    rounds the backup closes the last round: the final model reaches the server from it."""
    out = await simulate(
        lambda s: swarm(s, INIT, rounds=rounds, deadline=1.0, min_responses=2),
        aggregator_of_round_1_breaks,
        clients=SITES,
        peers=True,
    )
    w = INIT["w"].copy()
    w = sum((i + 1) * site_result(i, w) for i in range(3)) / 6  # round 0: all three
    for _ in range(rounds - 1):  # then: sites 1 and 3
        w = (1 * site_result(0, w) + 3 * site_result(2, w)) / 4
    np.testing.assert_allclose(out.params["w"], w, rtol=1e-12)


async def test_a_result_that_comes_before_the_rounds_model_is_checked_when_it_does() -> None:
    """A fast member's result for round 1 may reach round 1's aggregator before round 1's
    model does: it is held, and checked against that model once it comes (not taken as the
    template)."""
    net = MemoryNetwork()
    async with Cell("server.site-2", drivers=[net]) as cell:
        plan = SwarmPlan(["server.site-1", "server.site-2", "server.site-3"], 4, 0.2, 2)
        member = SwarmMember(cell, plan, "j", "t", "server", lambda r, m: None, lambda: None, _noop)
        member.start(0, FLModel(params={"w": np.zeros(3)}))
        wrong = blob(FLModel(params={"w": np.zeros(5)}, meta={"num_samples": 1}))
        early = FakeStream("server.site-1", {"task": "swarm/j/1/"}, wrong)
        assert await member.take_update(early) == b"taken"  # type: ignore[arg-type]
        member.start(1, FLModel(params={"w": np.ones(3)}))
        right = blob(FLModel(params={"w": np.ones(3)}, meta={"num_samples": 1}))
        await member.submit(1, [right])  # site-2 aggregates round 1: folds, closes
        # The early one did not fit: round 1 had 1 of the 2 results it needs, so the swarm
        # stopped there, every member keeping round 1's model.
        assert member.final is not None
        np.testing.assert_array_equal(member.final.params["w"], np.ones(3))
