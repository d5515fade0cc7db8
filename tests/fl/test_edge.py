"""Edge clients online now and then: each ``receive`` is a visit that pulls a task, each
``send`` a visit that pushes its result, and the server runs FedBuff on pulled tasks.

The memory tests run under a relay (``server.r``), on asyncio and on trio's virtual clock; a
relay that is stopped and started again is the client's connectivity going and coming back.
The last test is the real thing: provisioned kits, the edge clients reaching the system only
through the relay's ``wss://`` listener with mutual TLS, every message and result signed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from trio.testing import MockClock

import flare_async.client as flare
from flare_async import Cell, MemoryNetwork
from flare_async.cell._inline import INLINE_HEADER
from flare_async.cli import cell_from_kit, edge_client_from_kit
from flare_async.errors import Unauthorized
from flare_async.fl import EdgeClient, FLModel, FLServer, fedbuff
from flare_async.fl._privacy import policy_from_dict
from flare_async.security import SignatureVerifier, Signer, load_kit
from flare_async.testing import FaultyDriver, wss_edge_project
from flare_async.wire import Frame, Request, StreamData
from tests._topo import serve_until

pytestmark = pytest.mark.anyio

RELAY = "server.r"
TARGETS = {f"{RELAY}.e{i}": float(i) for i in range(4)}
"""Each client pulls the model all the way to its own target."""


def toward_target(model: FLModel, site: str) -> FLModel:
    w = np.full_like(model.params["w"], TARGETS[site])
    return FLModel(params={"w": w}, meta={"num_samples": 1})


async def train_offline() -> None:
    """The demo loop with the awaitable Client API: every receive and send is a visit."""
    site = flare.get_site_name()
    while (model := await flare.receive_async()) is not None:
        await flare.send_async(toward_target(model, site))


@dataclass
class Links:
    """What the relay saw of its children's links, in order."""

    events: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, peer: str, role: str, up: bool) -> None:
        if role == "child":
            self.events.append((peer, up))

    def ups(self, site: str) -> int:
        return sum(1 for peer, up in self.events if peer == site and up)


@dataclass
class System:
    net: MemoryNetwork
    server: FLServer
    links: Links
    relay_stop: anyio.Event
    tg: Any

    async def restart_relay(self) -> None:
        self.relay_stop = anyio.Event()
        relay = Cell(
            RELAY,
            listen=[f"memory://{RELAY}"],
            parent="memory://server",
            drivers=[self.net],
            on_link=self.links,
        )
        await self.tg.start(serve_until, relay, self.relay_stop)
        await relay.wait_parent()


@asynccontextmanager
async def system(clients: list[str]) -> AsyncIterator[System]:
    net = MemoryNetwork()
    cell = Cell("server", listen=["memory://server"], drivers=[net])
    server = FLServer(cell, clients, job="edge")
    cell.mount(server.handlers())
    async with cell, anyio.create_task_group() as tg:
        sys = System(net, server, Links(), anyio.Event(), tg)
        await sys.restart_relay()
        yield sys
        sys.relay_stop.set()


def edge(net: MemoryNetwork, site: str, **kw: Any) -> EdgeClient:
    kw.setdefault("retry", 0.05)
    kw.setdefault("connect_timeout", 0.5)
    return EdgeClient(site, f"memory://{RELAY}", drivers=[net], **kw)


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "trio":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return ("asyncio", {})


async def test_edge_clients_pull_train_offline_and_push_on_visits_of_their_own() -> None:
    sites = list(TARGETS)
    async with system(sites) as sys:
        edges = [edge(sys.net, s) for s in sites]
        async with anyio.create_task_group() as tg:
            for e in edges:
                tg.start_soon(partial(e.run_script, train_offline, in_loop=True))
            out = await fedbuff(
                sys.server,
                {"w": np.zeros(8, np.float32)},
                updates=30,
                buffer=2,
                concurrency=2,
                deadline=10,
                retry_after=0.05,
                staleness_exponent=0.0,
                server_lr=0.5,
                pull=True,
            )
            await sys.server.stop_clients()  # offline clients learn it at their next pull
    stats = out.meta["fedbuff"]
    assert stats.version == 30
    w = out.params["w"]
    assert np.all(w == w[0])
    assert 0.25 <= w[0] <= 2.75  # pulled into the targets' range
    # Sampled without replacement: each pass serves every client once (two at a time).
    counts = [stats.updates.get(s, 0) for s in sites]
    assert max(counts) - min(counts) <= 1, stats.updates
    for e in edges:
        assert not e.is_running()
        assert e.outbox == 0
        # A visit per pull (granted or told to wait) and one per push, plus the last pull
        # that heard "done": the client was never connected while it trained.
        pushes = sum(e.edge.pushed.values())
        assert e.edge.visits == e.edge.tasks + e.edge.waits + pushes + 1
        assert sys.links.ups(e.site) == e.edge.visits
        ups_and_downs = [up for peer, up in sys.links.events if peer == e.site]
        assert ups_and_downs == [True, False] * e.edge.visits
    assert sum(stats.updates.values()) >= 60


EXCLUDE_SECRET = policy_from_dict({"privacy": {"exclude": ["secret"]}})
"""A site policy: the variable ``secret`` never leaves the site (its update is dropped)."""


async def one_version(server: FLServer, result: dict[str, FLModel], done: anyio.Event) -> None:
    """A pulled FedBuff run of one version from one update, on ``w`` and ``secret``."""
    result["out"] = await fedbuff(
        server,
        {"w": np.zeros(4, np.float32), "secret": np.zeros(4, np.float32)},
        updates=1,
        buffer=1,
        concurrency=1,
        deadline=1000,
        pull=True,
    )
    done.set()


def trained_with_secret(model: FLModel, site: str) -> FLModel:
    trained = toward_target(model, site)
    trained.params["secret"] = np.full(4, 42.0, np.float32)
    return trained


async def test_a_result_trained_offline_waits_in_the_outbox_for_the_next_visit() -> None:
    """The result goes out at the next visit, as the site's privacy policy filtered it when it
    was sent: a retry does not skip the filter (here: ``secret`` never leaves the site)."""
    site = f"{RELAY}.e0"
    result: dict[str, FLModel] = {}
    done = anyio.Event()
    async with system([site]) as sys:
        client = edge(sys.net, site, policy=EXCLUDE_SECRET)
        async with anyio.create_task_group() as tg:
            tg.start_soon(one_version, sys.server, result, done)
            model = await client.areceive()
            assert model is not None
            assert client.edge.tasks == 1
            sys.relay_stop.set()  # the client goes offline while it trains
            await client.asend(trained_with_secret(model, site))
            assert client.outbox == 1  # kept for the next visit
            assert client.edge.offline == 1
            assert not client.edge.pushed
            await sys.restart_relay()  # back online
            assert await client.flush()
            await done.wait()
    assert client.edge.pushed == {"taken": 1}
    out = result["out"].params
    assert float(out["w"][0]) == pytest.approx(TARGETS[site])
    assert np.all(out["secret"] == 0.0)  # filtered before the first attempt, kept filtered


@pytest.mark.parametrize(  # a stalled push: 60 s, of virtual time
    "anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})], ids=["trio"]
)
async def test_a_push_that_breaks_mid_stream_is_retried_still_filtered() -> None:
    """The link drops the result's bytes (the push stalls and fails as offline): the retry at
    the next visit sends the result as the filters made it the first time, not unfiltered."""
    site = f"{RELAY}.e0"
    losing = [False]

    def lost(frame: Frame) -> bool:  # the bytes of a streamed result, or a small one whole
        h = frame.header
        inline = isinstance(h, Request) and INLINE_HEADER in h.headers
        return losing[0] and (isinstance(h, StreamData) or inline)

    result: dict[str, FLModel] = {}
    done = anyio.Event()
    async with system([site]) as sys:
        client = edge(sys.net, site, policy=EXCLUDE_SECRET)
        client.drivers = [FaultyDriver(sys.net, drop=lost)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(one_version, sys.server, result, done)
            model = await client.areceive()
            assert model is not None
            losing[0] = True
            # It connects and starts the push, which stalls and fails as offline.
            await client.asend(trained_with_secret(model, site))
            assert client.outbox == 1
            assert client.edge.offline == 1
            losing[0] = False
            assert await client.flush()
    assert client.edge.pushed == {"taken": 1}
    assert np.all(result["out"].params["secret"] == 0.0)


async def test_pulls_come_from_the_jobs_clients_and_hear_wait_or_done() -> None:
    site, stranger = f"{RELAY}.e0", f"{RELAY}.intruder"
    async with system([site]) as sys:
        async with edge(sys.net, stranger).visit() as cell:
            with pytest.raises(Unauthorized, match="not a client of job edge"):
                await cell.request("server", "fl", "pull", b"")
        client = edge(sys.net, site)
        async with client.visit() as cell:  # no workflow hands out tasks yet
            reply = await cell.request("server", "fl", "pull", b"")
            assert json.loads(reply.tobytes()) == {"wait": 5.0}
        await sys.server.stop_clients()
        assert await client.areceive() is None  # the job is over: heard at the next pull
        assert not client.is_running()


async def test_a_full_server_says_wait_and_serves_clients_not_yet_served_first() -> None:
    a, b = f"{RELAY}.e0", f"{RELAY}.e1"
    async with system([a, b]) as sys:
        ea, eb = edge(sys.net, a), edge(sys.net, b)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: fedbuff(
                    sys.server,
                    {"w": np.zeros(4, np.float32)},
                    updates=100,
                    buffer=1,
                    concurrency=1,
                    deadline=60,
                    retry_after=7.0,
                    pull=True,
                )
            )
            first = await ea._check_in()
            assert isinstance(first, FLModel)
            assert await eb._check_in() == 7.0  # the one slot is taken: come back in 7 s
            await ea.asend(toward_target(first, a))
            assert ea.edge.pushed == {"taken": 1}
            assert await ea._check_in() == 7.0  # b, not yet served in this pass, goes first
            assert isinstance(await eb._check_in(), FLModel)
            await eb.asend(toward_target(first, b))
            # Both served: a new pass. A client that pulls again while holding a task lost it:
            # it gets a new one, and the old task's result is answered "late".
            assert isinstance(await ea._check_in(), FLModel)
            lost = ea._task
            assert isinstance(await ea._check_in(), FLModel)
            assert ea._task != lost
            async with ea.visit():
                answer = await ea._send(toward_target(first, a), lost or "", "server")
            assert answer.tobytes() == b"late"
            tg.cancel_scope.cancel()


# ----------------------------------------------------------------- the real network: wss only
@pytest.fixture
def wss_kits(tmp_path: Path) -> tuple[Path, list[str]]:
    sites = [f"{RELAY}.e{i}" for i in range(3)]
    return wss_edge_project(tmp_path, RELAY, sites), sites


def train_blocking() -> None:
    """The same loop with the blocking Client API, in a worker thread."""
    site = flare.get_site_name()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        flare.send(toward_target(model, site))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiohttp (wss) runs on asyncio only
async def test_edge_clients_reach_the_server_through_wss_only(
    wss_kits: tuple[Path, list[str]],
) -> None:
    folder, sites = wss_kits
    server_kit = load_kit(folder / "server")
    links = Links()
    refused: list[Any] = []
    server_cell = cell_from_kit(server_kit, on_refused=lambda *r: refused.append(r))
    server = FLServer(
        server_cell,
        sites,
        job="edge",
        verifier=SignatureVerifier.from_kit(server_kit),
        signer=Signer(server_kit),
        on_reject=lambda *r: refused.append(r),
    )
    server_cell.mount(server.handlers())
    relay = cell_from_kit(load_kit(folder / RELAY), on_link=links)
    edges = [edge_client_from_kit(load_kit(folder / s), retry=0.05) for s in sites]
    assert all(e.url.startswith("wss://") for e in edges)
    async with server_cell, relay:
        await relay.wait_parent()
        async with anyio.create_task_group() as tg:
            for e in edges:
                tg.start_soon(e.run_script, train_blocking)
            out = await fedbuff(
                server,
                {"w": np.zeros(1000, np.float32)},
                updates=6,
                buffer=2,
                concurrency=2,
                deadline=30,
                retry_after=0.05,
                pull=True,
            )
            await server.stop_clients()
    assert out.meta["fedbuff"].version == 6
    assert not refused
    for e in edges:
        assert not e.is_running()
        assert e.outbox == 0
        assert e.edge.offline == 0
        assert links.ups(e.site) == e.edge.visits >= 2  # a fresh mTLS link per visit
        assert [up for p, up in links.events if p == e.site] == [True, False] * e.edge.visits


async def train_offline_and_log() -> None:
    site = flare.get_site_name()
    while (model := await flare.receive_async()) is not None:
        flare.log("target", TARGETS[site], step=model.current_round)  # kept until a visit
        await flare.send_async(toward_target(model, site))


async def test_an_edge_clients_tracked_values_go_up_on_its_visits() -> None:
    sites = list(TARGETS)[:2]
    async with system(sites) as sys:
        edges = [edge(sys.net, s) for s in sites]
        async with anyio.create_task_group() as tg:
            for e in edges:
                tg.start_soon(partial(e.run_script, train_offline_and_log, in_loop=True))
            await fedbuff(
                sys.server,
                {"w": np.zeros(2, np.float32)},
                updates=4,
                buffer=1,
                concurrency=2,
                deadline=10,
                retry_after=0.05,
                pull=True,
            )
            await sys.server.stop_clients()
    for e in edges:
        values = [r for r in sys.server.tracked if r["site"] == e.site]
        assert len(values) == sum(e.edge.pushed.values()) > 0  # one per result pushed
        assert {r["value"] for r in values} == {TARGETS[e.site]}
        assert e.metrics_sent == len(values)
        assert len(e.metrics) == 0
