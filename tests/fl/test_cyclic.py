"""Cyclic training as a workflow: the model walks the sites, handed site to site directly (over
peer links, or through the cells between when there are none: never decoded on the way), the
server seeing only where it went until the round's last site sends it back; a site that fails
its turn is skipped and what it held is lost, said so; handovers nobody named are refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import flare_async.client as flare
from flare_async.errors import BadRequest, ConfigError, Unauthorized
from flare_async.fl import CyclicRecipe, FLModel, FLServer, ParamsType, cyclic, simulate
from flare_async.fl._handoff import Handoffs
from flare_async.fl._results import digest_of
from tests._fl_scripts import answer_tasks

pytestmark = pytest.mark.anyio
SITES = 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def count_visits() -> None:
    """Adds 1 to the counter of its own index: the model's path is visible in it."""
    flare.init()
    index = int(flare.get_config()["site_index"])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        visits = np.array(model.params["visits"], copy=True)
        visits[index] += 1
        flare.send(FLModel(params={"visits": visits}, metrics={"site": float(index)}))


async def run(rounds: int, *, peers: bool, direct: bool = True, script: Any = count_visits) -> Any:
    forwarded: list[int] = []

    async def workflow(server: FLServer) -> FLModel:
        out = await cyclic(server, {"visits": np.zeros(SITES)}, rounds=rounds, direct=direct)
        forwarded.append(server.cell.statistics().forwarded)
        return out

    out = await simulate(workflow, script, clients=SITES, peers=peers)
    return out, forwarded[0]


async def test_the_model_goes_site_to_site_over_peer_links() -> None:
    out, forwarded = await run(2, peers=True)
    np.testing.assert_array_equal(out.params["visits"], [2, 2, 2])
    assert forwarded == 0  # no frame of the model passed through the server's cell
    history = out.meta["history"]
    assert [h["order"] for h in history] == [[f"server.site-{i + 1}" for i in range(SITES)]] * 2
    assert all(h["lost"] == [] and h["failed"] == [] for h in history)
    assert out.metrics == {"site": 2.0}  # the last site's, in the last round


async def test_without_peer_links_the_handover_goes_through_the_tree() -> None:
    out, forwarded = await run(2, peers=False)
    np.testing.assert_array_equal(out.params["visits"], [2, 2, 2])
    assert forwarded > 0  # the server's cell forwarded the handovers' frames


async def test_through_the_server_as_flares_cyclic_controller() -> None:
    out, forwarded = await run(2, peers=True, direct=False)
    np.testing.assert_array_equal(out.params["visits"], [2, 2, 2])
    assert forwarded == 0  # every model came back to the server as a result


def fails_at_site_2_round_1() -> None:
    flare.init()
    index = int(flare.get_config()["site_index"])
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if index == 1 and model.current_round == 1:
            raise RuntimeError("site 2 breaks in round 1")
        visits = np.array(model.params["visits"], copy=True)
        visits[index] += 1
        flare.send(FLModel(params={"visits": visits}))


async def test_a_site_that_fails_its_turn_is_skipped_and_the_loss_is_said() -> None:
    """Round 1: site 1 hands the model to site 2, which fails: site 1's training is lost; site
    3 gets the model the server held (after round 0). Round 2: site 2's script is gone, and
    again what site 1 handed it is lost."""
    out, _ = await run(3, peers=True, script=fails_at_site_2_round_1)
    h = out.meta["history"]
    assert h[0]["failed"] == []
    assert h[0]["lost"] == []
    assert h[1]["failed"] == ["server.site-2"]
    assert h[1]["lost"] == ["server.site-1"]
    assert "site 2 breaks in round 1" in h[1]["why"]["server.site-2"]
    assert h[2]["failed"] == ["server.site-2"]
    assert h[2]["lost"] == ["server.site-1"]
    # Round 0: 1,1,1. Rounds 1 and 2: site 1's +1 lost with site 2, site 3's +1 kept.
    np.testing.assert_array_equal(out.params["visits"], [1, 1, 3])


class FakeStream:
    def __init__(self, src: str, job: str, data: bytes) -> None:
        self.digest = ""  # a sender that asked for none: the site hashes the bytes itself
        self.src = src
        self.headers = {"job": job}
        self.data = data

    async def read_joined(self) -> bytes:
        return self.data


async def test_a_handover_is_taken_only_from_the_named_site_with_its_digest() -> None:
    held = Handoffs("job-1", keep=2)
    await held.take_stream(FakeStream("server.site-1", "job-1", b"model"))  # type: ignore[arg-type]
    sha = digest_of([b"model"])
    with pytest.raises(BadRequest, match="no model handed over"):
        held.pop("server.site-3", sha)  # another sender
    with pytest.raises(BadRequest):
        held.pop("server.site-1", digest_of([b"other"]))  # another digest
    assert held.pop("server.site-1", sha) == b"model"
    with pytest.raises(BadRequest):
        held.pop("server.site-1", sha)  # taken once
    with pytest.raises(Unauthorized):
        await held.take_stream(FakeStream("server.site-1", "job-2", b"x"))  # type: ignore[arg-type]


async def test_a_site_keeps_only_the_newest_handovers() -> None:
    held = Handoffs("j", keep=2)
    for i in range(3):
        await held.take_stream(FakeStream("s", "j", bytes([i])))  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        held.pop("s", digest_of([bytes([0])]))  # dropped for the newer two
    assert held.pop("s", digest_of([bytes([2])])) == bytes([2])


async def test_cyclic_as_a_recipe_with_cross_site_evaluation_refuses_secure() -> None:
    recipe = CyclicRecipe(initial={"visits": np.zeros(SITES)}, script=count_visits, rounds=2)
    out = await recipe.simulate(clients=SITES)
    np.testing.assert_array_equal(out.params["visits"], [2, 2, 2])
    with pytest.raises(ConfigError, match="secure"):
        CyclicRecipe(initial={"w": np.zeros(1)}, script=count_visits, secure=True)


async def test_one_sender_cannot_push_out_what_another_handed_over() -> None:
    """Each sender keeps one slot (its last handover): a peer flooding handovers replaces only
    its own, never the model the next task names from another site."""
    held = Handoffs("j")
    await held.take_stream(FakeStream("site-1", "j", b"the model"))  # type: ignore[arg-type]
    for i in range(50):
        await held.take_stream(FakeStream("site-9", "j", bytes([i])))  # type: ignore[arg-type]
    assert held.pop("site-1", digest_of([b"the model"])) == b"the model"
    assert held.pop("site-9", digest_of([bytes([49])])) == bytes([49])


def count_as_diff() -> None:
    """``count_visits`` answering with the change (a DIFF), not the model."""

    def respond(i: int, model: FLModel) -> FLModel:
        change = np.zeros_like(np.asarray(model.params["visits"]))
        change[i] = 1
        return FLModel(params={"visits": change}, params_type=ParamsType.DIFF)

    answer_tasks(respond)


async def test_a_diff_is_not_handed_over_but_applied_by_the_server() -> None:
    """A change is no model to train on: the site sends it to the server (which holds the
    model it changes), the next site gets the model from there; nobody failed, nothing lost."""
    out, _ = await run(2, peers=True, script=count_as_diff)
    np.testing.assert_array_equal(out.params["visits"], [2, 2, 2])
    assert all(h["failed"] == [] and h["lost"] == [] for h in out.meta["history"])
