"""Secure aggregation in FL rounds: sites' results are masked, the server's sum is the plain
weighted sum, and a minority of sites dropping mid-round does not stop the round."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import flare_async.client as flare
from flare_async.fl import FLModel, FLServer, _secure, fedavg_step, simulate
from flare_async.fl._secagg import SecAggServer, decode

pytestmark = pytest.mark.anyio
SITES = 5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def add_weight() -> None:
    i = int(flare.get_config()["site_index"])
    while (model := flare.receive()) is not None:
        params = {k: np.asarray(v) + (i + 1) for k, v in model.params.items()}
        flare.send(FLModel(params=params, meta={"num_samples": i + 1}))


def crash_on_round_1() -> None:
    model = flare.receive()
    assert model is not None
    flare.send(
        FLModel(
            params={k: np.asarray(v) + 5 for k, v in model.params.items()}, meta={"num_samples": 5}
        )
    )
    flare.receive()
    raise RuntimeError("the site went down mid-round")


async def run(
    scripts: Any, monkeypatch: pytest.MonkeyPatch, rounds: int = 2
) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[Any]]:
    seen: list[np.ndarray] = []
    add = SecAggServer.add_input

    def spy(self: SecAggServer, u: int, y: np.ndarray) -> None:
        seen.append(np.array(y))  # what the server gets of one site
        add(self, u, y)

    monkeypatch.setattr(SecAggServer, "add_input", spy)
    results: list[Any] = []

    async def workflow(server: FLServer) -> dict[str, np.ndarray]:
        params = {"w": np.zeros(200), "b": np.zeros(3)}
        for rnd in range(rounds):
            result = await _secure.secure_round(
                server, FLModel(params=params, current_round=rnd), server.clients, deadline=20
            )
            results.append(result)
            params = fedavg_step(params, result.sum)
        return params

    out: dict[str, np.ndarray] = await simulate(workflow, scripts, clients=SITES)
    return out, seen, results


async def test_the_secure_sum_is_the_plain_weighted_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    out, seen, results = await run(add_weight, monkeypatch)
    step = sum((i + 1) ** 2 for i in range(SITES)) / sum(i + 1 for i in range(SITES))
    assert np.allclose(out["w"], 2 * step, atol=1e-3)
    assert np.allclose(out["b"], 2 * step, atol=1e-3)
    assert sorted(results[0].responded) == [f"server.site-{i + 1}" for i in range(SITES)]
    # Each site's vector, as the server saw it, is noise: the plain one would be w * (x + 1)
    # (a constant per site), then w.
    assert len(seen) == 2 * SITES
    for y in seen:
        values = decode(y, 2.0**16)
        assert np.unique(values[:200]).size > 150
        assert 0.3 < np.mean(y >= 2**31) < 0.7


async def test_a_minority_dropping_mid_round_still_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripts: dict[str, Any] = {f"server.site-{i + 1}": add_weight for i in range(SITES)}
    scripts["server.site-2"] = crash_on_round_1
    out, _, results = await run(scripts, monkeypatch)
    # round 0: site-2 adds 5 with weight 5, the others add i + 1 with weight i + 1
    first = (sum((i + 1) ** 2 for i in range(SITES) if i != 1) + 5 * 5) / (
        sum(i + 1 for i in range(SITES) if i != 1) + 5
    )
    rest = [i for i in range(SITES) if i != 1]
    second = sum((i + 1) ** 2 for i in rest) / sum(i + 1 for i in rest)
    assert "server.site-2" in results[1].failed
    assert np.allclose(out["w"], first + second, atol=1e-3)


async def test_relays_add_masked_vectors_of_their_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    add_sum = SecAggServer.add_sum

    def spy(self: SecAggServer, ids: Any, y: np.ndarray) -> None:
        seen.append(np.array(y))
        add_sum(self, ids, y)

    monkeypatch.setattr(SecAggServer, "add_sum", spy)
    results: list[Any] = []

    async def workflow(server: FLServer) -> dict[str, np.ndarray]:
        params = {"w": np.zeros(50)}
        result = await _secure.secure_round(
            server, FLModel(params=params, current_round=0), server.clients, deadline=20
        )
        results.append(result)
        return fedavg_step(params, result.sum)

    out = await simulate(workflow, add_weight, clients=6, relays=2)
    step = sum((i + 1) ** 2 for i in range(6)) / sum(i + 1 for i in range(6))
    assert np.allclose(out["w"], step, atol=1e-3)
    assert len(seen) == 2  # one masked sum per relay, not six vectors
    assert results[0].partials == 2
    assert len(results[0].responded) == 6
