"""The edges of every number the job service takes: accepted at the limit, refused one past it
(settings an operator gives, and what an admin or a job process may send)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from flare_async.cell import Cell
from flare_async.codecs import CodecRegistry
from flare_async.errors import ConfigError
from flare_async.fl import FLModel
from flare_async.fl._admin import METRICS_LIMIT, Metrics
from flare_async.fl._jobchannel import HEAD_MAX, MAX_PARTS, JobProcessError
from flare_async.fl._jobproc import BEAT, MAX_DEADLINE, MIN_DEADLINE, _round_request
from flare_async.fl._jobs import JobManager
from flare_async.fl._model import model_parts
from flare_async.fl._results import MAX_PLAN_DEADLINE, RelayPlan
from flare_async.fl._secure import SecureAggregation
from flare_async.fl._server import FLServer
from flare_async.fl._site import SiteJobs
from tests.fl.test_jobs_process import framed, hostile_child

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("settings", "ok"),
    [
        ({}, True),  # the defaults
        ({"hang_after": BEAT + 0.01}, True),
        ({"hang_after": BEAT}, False),  # no longer than a heartbeat: healthy jobs would die
        ({"hang_after": math.inf}, False),
        ({"hang_after": math.nan}, False),
        ({"max_model_bytes": 1}, True),
        ({"max_model_bytes": 0}, False),
    ],
)
def test_job_manager_settings_at_their_edges(
    tmp_path: Path, settings: dict[str, Any], ok: bool
) -> None:
    def make() -> JobManager:
        return JobManager(Cell("server"), tmp_path, admin_of=lambda _: None, **settings)

    if ok:
        make()
    else:
        with pytest.raises(ConfigError):
            make()


@pytest.mark.parametrize(("lease", "ok"), [(0.001, True), (0.0, False), (math.inf, False)])
def test_a_site_lease_at_its_edges(tmp_path: Path, lease: float, ok: bool) -> None:
    if ok:
        SiteJobs(Cell("server.s"), tmp_path, lease=lease)
    else:
        with pytest.raises(ConfigError, match="lease"):
            SiteJobs(Cell("server.s"), tmp_path, lease=lease)
    with pytest.raises(ConfigError, match="lease"):
        SiteJobs(Cell("server.s"), tmp_path, lease=math.nan)


@pytest.mark.parametrize(
    ("limit", "clamped"),
    [(-5, 1), (0, 1), (1, 1), (METRICS_LIMIT, METRICS_LIMIT), (METRICS_LIMIT + 1, METRICS_LIMIT)],
)
def test_a_metrics_limit_is_clamped_to_its_range(limit: int, clamped: int) -> None:
    assert Metrics(id="j", limit=limit).clamped == clamped


def test_a_relay_plan_deadline_at_its_edges() -> None:
    assert RelayPlan(task="t", deadline=MAX_PLAN_DEADLINE).deadline == MAX_PLAN_DEADLINE
    assert RelayPlan(task="t", deadline=1e-9).deadline == 1e-9
    for bad in (MAX_PLAN_DEADLINE + 1, 0.0, -1e-9, math.nan, math.inf):
        with pytest.raises(ValueError, match="deadline must be within"):
            RelayPlan(task="t", deadline=bad)


def _round(**head: Any) -> tuple[FLModel, list[str], dict[str, Any]]:
    server = FLServer(Cell("server"), ["server.a", "server.b"], job="j")
    parts = model_parts(FLModel(params={"w": np.zeros(2)}), CodecRegistry())
    body = memoryview(b"".join(bytes(memoryview(p).cast("B")) for p in parts))
    base = {"targets": ["server.a", "server.b"], "deadline": 5.0}
    return _round_request(server, {**base, **head}, body)


@pytest.mark.parametrize(
    "head",
    [
        {"deadline": MIN_DEADLINE},
        {"deadline": MAX_DEADLINE},
        {"deadline": 5},  # an int is a number of seconds too
        {"min_responses": 0},
        {"min_responses": 2},
        {"task": "validate"},
    ],
)
def test_a_round_at_the_edges_of_its_ranges_is_taken(head: dict[str, Any]) -> None:
    _, targets, kw = _round(**head)
    assert targets == ["server.a", "server.b"]
    assert kw["deadline"] == float(head.get("deadline", 5.0))


@pytest.mark.parametrize(
    "head",
    [
        {"deadline": MIN_DEADLINE * 0.99},
        {"deadline": MAX_DEADLINE * 1.0001},
        {"deadline": True},
        {"min_responses": 3},
        {"min_responses": -1},
        {"task": "validate", "secure": {"clip": 1.0}},  # a secure round trains, nothing else
    ],
)
def test_a_round_just_past_its_ranges_is_refused(head: dict[str, Any]) -> None:
    with pytest.raises(JobProcessError):
        _round(**head)


async def test_frames_exactly_at_the_channels_limits_are_taken() -> None:
    async with hostile_child(max_bytes=2**20) as (proc, job_end, _server):
        await job_end._send_all(memoryview(framed({"op": "round", "sizes": [0] * MAX_PARTS})))
        head, body = await proc.channel.receive()
        assert len(head["sizes"]) == MAX_PARTS
        assert body.nbytes == 0
        await job_end._send_all(memoryview(framed({"op": "round", "sizes": [2**20]})))
        await job_end._send_all(memoryview(bytes(2**20)))
        _, body = await proc.channel.receive()
        assert body.nbytes == 2**20
        # A header of exactly HEAD_MAX bytes.
        pad = HEAD_MAX - len(msgspec.msgpack.encode({"op": "beat", "sizes": [], "pad": ""}))
        head_bytes = msgspec.msgpack.encode({"op": "beat", "sizes": [], "pad": "x" * (pad - 4)})
        assert len(head_bytes) == HEAD_MAX
        await job_end._send_all(memoryview(len(head_bytes).to_bytes(4, "big") + head_bytes))
        head, _ = await proc.channel.receive()
        assert head["op"] == "beat"


async def test_a_secure_round_refuses_what_it_would_silently_drop() -> None:
    server = FLServer(Cell("server"), ["server.a"], job="j")
    model = FLModel(params={"w": np.zeros(2)})
    for extra in ({"task": "validate"}, {"headers": {"x": "y"}}):
        with pytest.raises(ConfigError, match="a secure round trains"):
            await server.run_round(model, ["server.a"], secure=SecureAggregation(), **extra)
