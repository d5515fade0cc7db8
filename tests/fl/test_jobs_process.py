"""A job's code runs in a process of its own, never the server's (issue 18, defect 1): its
crash, exit, exception or hang fails that job only, and what the job process asks of the server
is checked as a peer's would be."""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import numpy as np
import pytest

from flare_async.cell import Cell
from flare_async.codecs import CodecRegistry
from flare_async.fl import FLModel
from flare_async.fl._aggregate import WeightedSum, fedavg_step
from flare_async.fl._jobchannel import HEAD_MAX, MAX_PARTS, Channel, JobProcessError
from flare_async.fl._jobproc import JobFacts, JobProcess
from flare_async.fl._model import ParamsType, model_from_parts, model_parts
from flare_async.fl._server import FLServer
from tests.fl.test_jobs import SITES, deployment

pytestmark = pytest.mark.anyio
HOSTILE = "tests.hostile_recipes.in_job"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real subprocesses and real time


def marks(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(w, int(p)) for w, p in (line.split() for line in path.read_text().splitlines())]


async def wait_for_mark(path: Path, what: str) -> int:
    with anyio.fail_after(60):
        while True:
            found = [pid for w, pid in marks(path) if w == what]
            if found:
                return found[-1]
            await anyio.sleep(0.05)  # polling a file another process writes


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow  # a deployment with job and training processes
async def test_a_jobs_code_runs_in_a_process_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server never imports the recipe's module: the check at submission and each
    attempt load it in other processes; its ``evaluate`` runs there, its scores come back."""
    mark = tmp_path / "mark"
    monkeypatch.setenv("FLARE_TEST_MARK", str(mark))
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": f"{HOSTILE}:scores"})
        await d.events.wait("job-state", job=rec["id"], state="finished")
        status = await d.call("status", {"id": rec["id"]})
    assert HOSTILE not in sys.modules
    pids = {pid for _, pid in marks(mark)}
    assert len(pids) == 2
    assert os.getpid() not in pids
    assert {w for w, _ in marks(mark)} == {"import", "evaluate"}
    # Two sites add 1 and 2 (weights 1 and 2) to zeros, twice: the mean grows by 5/3 a round.
    assert status["metrics"]["validation_mean"] == pytest.approx(10 / 3)
    assert (tmp_path / "jobs" / rec["id"] / "job_process.log").exists()
    assert (tmp_path / "jobs" / rec["id"] / "checkpoints" / "last.safetensors").exists()
    # Every round's checkpoint is told, the last one too (it used to be lost at the end).
    told = [f["round"] for e, f in d.events.seen if e == "job-checkpoint" and f["job"] == rec["id"]]
    assert told == [0, 1]


@pytest.mark.slow  # a deployment with job and training processes
@pytest.mark.parametrize(
    ("recipe", "error"),
    [
        ("aborts", r"the job process ended \(exit -6\)"),
        ("raises", "ValueError: evaluate broke"),
    ],
)
async def test_a_crash_or_error_in_the_job_process_fails_its_job_not_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str, error: str
) -> None:
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": f"{HOSTILE}:{recipe}"})
        await d.events.wait("job-state", job=rec["id"], state="failed")
        status = await d.call("status", {"id": rec["id"]})
        assert re.search(error, status["error"]), status["error"]
        # The sites were told to stop; the server goes on running jobs.
        await d.events.wait("job-ended", count=len(SITES), job=rec["id"])
        nxt = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-state", job=nxt["id"], state="finished")


@pytest.mark.slow  # a deployment; waits out hang_after
async def test_a_hung_job_process_is_killed_and_its_job_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its event loop stopped (SIGSTOP: no heartbeat), the server waits ``hang_after``, kills
    it and fails the job; the server answered all along."""
    mark = tmp_path / "mark"
    monkeypatch.setenv("FLARE_TEST_MARK", str(mark))
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        d.server.hang_after = 3.0
        rec = await d.call("submit", {"recipe": f"{HOSTILE}:stops"})
        pid = await wait_for_mark(mark, "evaluate")
        assert [r["id"] for r in await d.call("list", {})] == [rec["id"]]  # still answering
        await d.events.wait("job-state", job=rec["id"], state="failed")
        status = await d.call("status", {"id": rec["id"]})
        assert "the job process sent nothing for 3 s" in status["error"]
        assert gone(pid)


@pytest.mark.slow  # a deployment with job and training processes
async def test_aborting_a_job_ends_its_process_whatever_it_is_doing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workflow busy in a worker thread forever (its heartbeat goes on) is ended by abort."""
    mark = tmp_path / "mark"
    monkeypatch.setenv("FLARE_TEST_MARK", str(mark))
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": f"{HOSTILE}:waits"})
        pid = await wait_for_mark(mark, "evaluate")
        await d.call("abort", {"id": rec["id"]})
        status = await d.call("status", {"id": rec["id"]})
        assert status["state"] == "aborted"
        assert gone(pid)


# ------------------------------------------------------------------ a hostile job process
FACTS = JobFacts(1, "tests._fl_scripts:add_site_weight", "tensors", {}, False, True)


@asynccontextmanager
async def hostile_child(
    max_bytes: int = 2**20,
) -> AsyncIterator[tuple[JobProcess, Channel, FLServer]]:
    """The server's side of a job process, and the job's end of the channel for the test to
    speak for a job's code that writes to it directly."""
    ours, theirs = socket.socketpair()
    process = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(60)"])
    server_end = Channel(
        ours,
        max_bytes=max_bytes,
        head_max=HEAD_MAX,
        idle=10,
        max_parts=MAX_PARTS,
        carry=frozenset({"round"}),
    )
    job_end = Channel(theirs)
    try:
        server = FLServer(Cell("server"), ["server.site-1", "server.site-2"], job="j")
        yield JobProcess(process, server_end, FACTS, "j"), job_end, server
    finally:
        await server_end.aclose()
        await job_end.aclose()
        process.kill()
        await process.wait()
        await process.aclose()


PLAN = (
    '{"members": ["server.site-1", "server.site-2"], "rounds": 2, "deadline": 5.0,'
    ' "min_responses": 1}'
)
"""A well-formed swarm plan over both of the job's sites."""


def task(**head: Any) -> tuple[dict[str, Any], list[Any]]:
    model = FLModel(params={"w": np.zeros(3)}, current_round=0, total_rounds=1)
    base = {"op": "round", "id": 1, "targets": ["server.site-1"], "deadline": 5.0}
    return {**base, **head}, model_parts(model, CodecRegistry())


@pytest.mark.parametrize(
    ("head", "why"),
    [
        ({"targets": ["server.admin"]}, "only go to the job's sites"),
        ({"targets": ["server"]}, "only go to the job's sites"),
        ({"targets": []}, "list of distinct sites"),
        ({"targets": ["server.site-1", "server.site-1"]}, "list of distinct sites"),
        ({"targets": "server.site-1"}, "list of distinct sites"),
        ({"deadline": math.nan}, "deadline must be within"),
        ({"deadline": math.inf}, "deadline must be within"),
        ({"deadline": 0}, "deadline must be within"),
        ({"deadline": 7 * 86400.0 + 1}, "deadline must be within"),
        ({"deadline": "5"}, "deadline must be within"),
        ({"min_responses": -1}, "not a count"),
        ({"min_responses": 2}, "not a count"),
        ({"min_responses": True}, "not a count"),
        ({"task": "rm -rf"}, "task must be one of"),
        ({"targets": [["server.site-1"]]}, "list of distinct sites"),
        ({"deadline": 5e-324}, "deadline must be within"),
        ({"collect": "all"}, "collects 'sum' or 'each'"),
        ({"collect": "each", "secure": {"clip": 1.0}}, "collects 'sum' or 'each'"),
        ({"headers": {"pass_to": "server.admin"}}, "must name one of the job's sites"),
        ({"headers": {"take_from": "server"}}, "must name one of the job's sites"),
        ({"headers": {"aggregate": "parent"}}, "headers may only be"),
        ({"headers": ["pass_to"]}, "headers may only be"),
        ({"headers": {"take_sha": 7}}, "must be a short text"),
        ({"headers": {"take_sha": "x" * 513}}, "must be a short text"),
        ({"headers": {"swarm": "{"}}, "swarm plan does not decode"),
        (
            {"headers": {"swarm": PLAN.replace("server.site-1", "server.other")}},
            "members must be the round's targets",
        ),
        ({"headers": {"swarm": PLAN}, "targets": ["server.site-1"]}, "the round's targets"),
        ({"headers": {"swarm": "x" * (64 * 1024 + 1)}}, "must be a short text"),
        ({"secure": {"clip": -1.0}}, "SecAggRangeError"),
        ({"secure": {"bits": 16}}, "SecAggRangeError"),
        ({"secure": {"max_weight": 2.0**60}}, "SecAggRangeError"),
    ],
)
async def test_the_server_refuses_a_round_outside_the_jobs_bounds(
    head: dict[str, Any], why: str
) -> None:
    """Whatever a job's code writes on its channel, a round goes only to the job's own sites
    with numbers in range; a refused round is answered with an error (the job's workflow sees
    ``JobProcessError``), nothing is sent to any cell."""
    async with hostile_child() as (proc, job_end, server):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    proc._one_round, server, *await _through(job_end, proc, *task(**head))
                )
                answer, _ = await job_end.receive()
        assert answer["op"] == "error"
        if why == "SecAggRangeError":  # a range that does not hold is refused by its own name
            assert answer["kind"] == why
        else:
            assert answer["kind"] == "JobProcessError"
            assert why in answer["why"]
        assert server._tasks == 0  # no round was started


async def _through(
    job_end: Channel, proc: JobProcess, head: dict[str, Any], parts: list[Any]
) -> tuple[dict[str, Any], list[bytearray]]:
    """``head`` and ``parts`` as the server reads them off the channel."""
    await job_end.send(head, parts)
    return await proc.channel.receive()


async def test_a_round_whose_model_does_not_decode_is_refused() -> None:
    async with hostile_child() as (proc, job_end, server):
        head, _ = task()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                got = await _through(job_end, proc, head, [b"\xff" * 64])
                tg.start_soon(proc._one_round, server, *got)
                answer, _ = await job_end.receive()
        assert answer["kind"] == "JobProcessError"
        assert "does not decode" in answer["why"]


def framed(head: Any) -> bytes:
    data = msgspec.msgpack.encode(head)
    return len(data).to_bytes(4, "big") + data


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ((HEAD_MAX + 1).to_bytes(4, "big"), "frame header of"),
        (b"\x00\x00\x00\x01\xc1", "does not decode"),
        (framed(7), "list of part sizes"),
        (framed({"op": "round"}), "list of part sizes"),
        (framed({"op": "round", "sizes": [2**21]}), "list of part sizes"),
        (framed({"op": "round", "sizes": [-1]}), "list of part sizes"),
        (framed({"op": "round", "sizes": [1.5]}), "list of part sizes"),
        (framed({"op": "round", "sizes": [2**19, 2**19, 1]}), "a frame of"),
        (framed({"op": "round", "sizes": [0] * (MAX_PARTS + 1)}), r"part sizes \(at most 100000\)"),
        (framed({"op": "beat", "sizes": [1]}), "'beat' frame with parts"),
        (framed({"op": "checkpoint", "round": 1, "sizes": [8]}), "frame with parts"),
        (b"\x00\x00\x10\x00" + b"\x91" * 4096, "does not decode"),  # nested 4,096 deep
    ],
)
async def test_a_frame_beyond_the_protocol_is_refused_from_its_header(raw: bytes, why: str) -> None:
    """Headers past HEAD_MAX, headers that do not decode, parts past ``max_bytes`` in all (1 MiB
    here): refused from the header, before any part is read."""
    async with hostile_child() as (proc, job_end, _server):
        await job_end._send_all(memoryview(raw))
        with anyio.fail_after(10), pytest.raises(JobProcessError, match=why):
            await proc.channel.receive()


async def test_a_job_process_that_goes_quiet_or_away_fails_the_read() -> None:
    async with hostile_child() as (proc, job_end, _server):
        proc.channel.idle = 0.2
        with anyio.fail_after(10), pytest.raises(JobProcessError, match=r"sent nothing for 0\.2 s"):
            await proc.channel.receive()
        await job_end.aclose()
        with anyio.fail_after(10), pytest.raises(JobProcessError, match="ended"):
            await proc.channel.receive()


def test_job_facts_refuse_what_is_not_a_recipe_s() -> None:
    good = {
        "min_clients": 1,
        "script": "m:f",
        "codec": "tensors",
        "config": {},
        "encrypt": False,
        "relay_aggregation": True,
        "rounds": 2,
    }
    assert JobFacts.checked(good).min_clients == 1
    assert JobFacts.checked(good).rounds == 2
    for field, bad in [
        ("min_clients", "1"),
        ("min_clients", True),
        ("script", 3),
        ("config", []),
        ("encrypt", 1),
        ("rounds", "2"),
        ("rounds", -1),
    ]:
        with pytest.raises(JobProcessError, match=field):
            JobFacts.checked({**good, field: bad})
    with pytest.raises(JobProcessError, match="wrongly"):
        JobFacts.checked({k: v for k, v in good.items() if k != "codec"})
    with pytest.raises(JobProcessError, match="named no codec"):
        JobFacts.checked({**good, "codec": "rot13"})


async def test_a_received_sum_becomes_the_job_process_accumulator_uncopied() -> None:
    """What the server sends back (a partial sum's layout) arrives in one buffer, decodes
    from it, and the job process's sum adopts those very bytes: no copy of the model."""
    part = WeightedSum()
    part.add({"a": np.ones(300_000, np.float32), "b": np.arange(5.0)}, 2.0, ParamsType.FULL)
    async with hostile_child() as (proc, job_end, _server):
        proc.channel.max_bytes = 2**30
        await proc.channel.send({"op": "result"}, model_parts(part.partial(), CodecRegistry()))
        _, body = await job_end.receive()
    total = WeightedSum()
    total.merge(model_from_parts(body), adopt=True)
    assert all(np.shares_memory(a, body) for a in total.partial().params.values())
    assert np.allclose(fedavg_step({}, total)["a"], 1.0)


async def test_a_part_is_committed_as_its_bytes_arrive_not_when_announced() -> None:
    """A header announcing 2 GiB and nothing after it costs the server no memory: the part is
    an anonymous mapping whose pages are committed as bytes arrive (before: a zero-filled
    2 GiB buffer, at once)."""
    async with hostile_child(max_bytes=2**40) as (proc, job_end, _server):
        await job_end._send_all(memoryview(framed({"op": "round", "sizes": [2 << 30]})))
        await job_end._send_all(memoryview(b"x" * 4096))
        await job_end.aclose()
        tracemalloc.start()  # Python's own allocations (a bytearray's buffer is one)
        try:
            with anyio.fail_after(10), pytest.raises(JobProcessError, match="ended"):
                await proc.channel.receive()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 64 << 20, peak
