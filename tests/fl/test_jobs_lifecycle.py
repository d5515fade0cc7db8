"""A job's life on a site against a peer that replays or disappears (issue 18): a replayed
start that starts nothing (for the job's whole life and after, across a site restart), and
training processes that end when their server no longer runs their job (on relink) or is
gone (a lease).

In-process cells over ``memory://`` as in ``test_jobs.py``; training processes are real."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from flare_async import Cell, errors
from flare_async.cell import Context, HandlerTable, Payload
from flare_async.errors import FlareError
from flare_async.fl._jobs import CHANNEL
from flare_async.fl._site import SiteJobs
from flare_async.security import AuditLog
from flare_async.transport import MemoryNetwork
from tests._fl_scripts import hanging_recipe
from tests.fl.test_jobs import ROOT, SITES, Events, audit_entries, deployment

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # slow: training processes are real subprocesses


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real subprocesses and real time


# ---------------------------------------------------------------- (3) replayed starts


def starts_of(path: Path) -> list[dict[str, Any]]:
    return [e for e in audit_entries(path) if e["event"] == "job-start"]


async def test_a_replayed_start_starts_nothing_for_the_jobs_life_and_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = tmp_path / "sites" / SITES[0] / "audit.jsonl"
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        sent: dict[str, bytes] = {}
        to_site = d.server._to_site

        async def capture(site: str, topic: str, body: bytes, *, timeout: float) -> Payload:
            if topic == "start":
                sent[site] = body
            return await to_site(site, topic, body, timeout=timeout)

        monkeypatch.setattr(d.server, "_to_site", capture)
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-ended", count=2, job=rec["id"])
        body = sent[SITES[0]]
        site = d.sites[SITES[0]]
        assert len(starts_of(audit)) == 1

        async def replay(dst: str, start: bytes) -> bytes:
            return (await d.server.cell.request(dst, CHANNEL, "start", start)).tobytes()

        # The job ended: the same start, replayed, starts nothing and audits no start.
        for _ in range(2):
            assert await replay(SITES[0], body) == b"started"
            assert rec["id"] not in site.jobs
        assert len(starts_of(audit)) == 1
        assert len([e for e, f in d.events.seen if e == "job-process"]) == 2

        # The site restarts (same folder, a new runner): it remembers.
        async with lone_site(tmp_path / "sites" / SITES[0], audit=AuditLog(audit)) as again:
            reply = await again.server.request(SITES[0], CHANNEL, "start", body)
            assert reply.tobytes() == b"started"
            assert rec["id"] not in again.site.jobs
        assert len(starts_of(audit)) == 1

        # A newer attempt (the server restarted) still starts; the older one then is refused.
        newer = json.dumps({**json.loads(body), "attempt": json.loads(body)["attempt"] + 1})
        assert await replay(SITES[0], newer.encode()) == b"started"
        assert rec["id"] in site.jobs
        assert len(starts_of(audit)) == 2
        with pytest.raises(errors.BadRequest, match="older"):
            await replay(SITES[0], body)
        assert site.jobs[rec["id"]].attempt == json.loads(newer)["attempt"]
        await site.stop(rec["id"])
        assert len(starts_of(audit)) == 2
    kept = json.loads((tmp_path / "sites" / SITES[0] / ".starts.json").read_text())
    assert kept[rec["id"]]["attempt"] == 2
    assert kept[rec["id"]]["state"] == "ended"


# ---------------------------------------------------------------- (4) orphaned processes


async def test_a_site_stops_a_job_its_server_ended_while_it_was_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        to_site = d.server._to_site

        async def unreachable(site: str, topic: str, body: bytes, *, timeout: float) -> Payload:
            if topic == "abort" and site == SITES[0]:
                raise FlareError(f"{site} is unreachable")  # its relay died, say
            return await to_site(site, topic, body, timeout=timeout)

        monkeypatch.setattr(d.server, "_to_site", unreachable)
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:hanging_recipe"})
        await d.events.wait("job-process", count=2, job=rec["id"])
        pid = d.sites[SITES[0]].jobs[rec["id"]].pid
        assert pid is not None
        assert (await d.call("abort", {"id": rec["id"]}))["state"] == "aborted"
        await d.events.wait("job-ended", job=rec["id"])  # site-2 heard of it
        assert rec["id"] in d.sites[SITES[0]].jobs  # site-1 did not: an orphan
        # site-1 links up again (what `flare-async run` does on a link-up)
        d.sites[SITES[0]].parent_up()
        with anyio.fail_after(30):
            ended = await d.events.wait("job-ended", count=2, job=rec["id"])
        assert {e["outcome"] for e in ended} == {"stopped"}
        assert rec["id"] not in d.sites[SITES[0]].jobs
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, and reaped
    entries = audit_entries(tmp_path / "sites" / SITES[0] / "audit.jsonl")
    (stopped,) = [e for e in entries if e["event"] == "job-orphaned"]
    assert stopped["job"] == rec["id"]
    assert "not running" in stopped["why"]


@dataclass
class LoneSite:
    """One site runner under a "server" cell that only takes registrations."""

    server: Cell
    site: SiteJobs
    close_server: anyio.Event = field(default_factory=anyio.Event)
    server_closed: anyio.Event = field(default_factory=anyio.Event)

    async def serve(self) -> None:
        async with self.server:
            await self.close_server.wait()
        self.server_closed.set()

    async def server_gone(self) -> None:
        """The server closes for good (its links break; nothing listens any more)."""
        self.close_server.set()
        await self.server_closed.wait()


@asynccontextmanager
async def lone_site(workdir: Path, **options: Any) -> AsyncIterator[LoneSite]:
    net = MemoryNetwork()
    registered = anyio.Event()
    fake = HandlerTable("a server that only registers")

    @fake.request(CHANNEL, "register")
    async def register(ctx: Context, msg: Payload) -> bytes:
        registered.set()
        return b"registered"

    server = Cell("server", listen=["memory://server"], drivers=[net], handlers=[fake])
    cell = Cell(SITES[0], parent="memory://server", drivers=[net])
    lone = LoneSite(server, SiteJobs(cell, workdir, **options))
    cell.mount(lone.site.handlers())
    async with anyio.create_task_group() as tg:
        tg.start_soon(lone.serve)
        async with cell:
            tg.start_soon(lone.site.run)
            await registered.wait()
            yield lone
            tg.cancel_scope.cancel()


async def test_a_job_whose_server_is_gone_ends_after_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    events = Events()
    audit = tmp_path / "site" / "audit.jsonl"
    options: dict[str, Any] = {"on_event": events, "grace": 1, "audit": AuditLog(audit)}
    async with lone_site(tmp_path / "site", lease=1.0, **options) as lone:
        recipe = hanging_recipe()
        body = {
            "id": "j1",
            "attempt": 1,
            "script": recipe.script_spec(),
            "config": {**recipe.config, "site_index": 0, "sites": 1},
        }
        await lone.server.request(SITES[0], CHANNEL, "start", json.dumps(body).encode())
        (started,) = await events.wait("job-process", job="j1")
        await lone.server_gone()
        with anyio.fail_after(30):
            (ended,) = await events.wait("job-ended", job="j1")
        assert ended["outcome"] == "stopped"
        with pytest.raises(ProcessLookupError):
            os.kill(started["pid"], 0)
        assert (await events.wait("job-lease-expired", job="j1"))[0]["lease"] == 1.0
        assert "j1" not in lone.site.jobs
    (expired,) = [e for e in audit_entries(audit) if e["event"] == "job-lease-expired"]
    assert expired["job"] == "j1"
