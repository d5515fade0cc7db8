"""Jobs: the server's job service and the sites' job runners, cells in this process over
``memory://``, each site's training process a real subprocess.

The deployment version (every cell its own process, mTLS, the admin CLI) is in
``test_jobs_deploy.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from flare_async import Cell, errors
from flare_async.codecs import decode
from flare_async.errors import ConfigError
from flare_async.fl._jobs import CHANNEL, AdminRights, JobManager, JobStore
from flare_async.fl._privacy import SitePolicy, policy_from_dict
from flare_async.fl._site import SiteJobs
from flare_async.security import AuditLog, admin_cell_name, verify_audit
from flare_async.transport import MemoryNetwork

# slow: every site's training process is a real subprocess
pytestmark = [pytest.mark.anyio, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ADMIN = admin_cell_name("server", "alice@example.org")
BOB = admin_cell_name("server", "bob@example.org")
SITES = ["server.site-1", "server.site-2"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real subprocesses and real time


@dataclass
class Events:
    """What the job service and the site runners report, as it happens."""

    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def __call__(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))
        self.changed.set()
        self.changed = anyio.Event()

    async def wait(self, event: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        with anyio.fail_after(60):
            while True:
                found = [
                    f
                    for e, f in self.seen
                    if e == event and all(f.get(k) == v for k, v in match.items())
                ]
                if len(found) >= count:
                    return found
                await self.changed.wait()


@dataclass
class Deployment:
    server: JobManager
    sites: dict[str, SiteJobs]
    admin: Cell
    bob: Cell
    events: Events

    async def call(self, topic: str, body: dict[str, Any], *, by: Cell | None = None) -> Any:
        cell = by or self.admin
        reply = await cell.request("server", CHANNEL, topic, json.dumps(body).encode())
        return json.loads(reply.tobytes())


@asynccontextmanager
async def deployment(
    store: Path,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    policies: dict[str, SitePolicy] | None = None,
    rights: AdminRights | None = None,
) -> AsyncIterator[Deployment]:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    net = MemoryNetwork()
    events = Events()
    async with AsyncExitStack() as stack:
        server_cell = Cell("server", listen=["memory://server"], drivers=[net])
        manager = JobManager(
            server_cell,
            store,
            admin_of={ADMIN: "alice@example.org", BOB: "bob@example.org"}.get,
            rights=rights,
            on_event=events,
            digest=False,
            audit=AuditLog(store / "audit.jsonl"),
        )
        server_cell.mount(manager.handlers())
        await stack.enter_async_context(server_cell)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        tg.start_soon(manager.run)
        sites = {}
        for name in SITES:
            cell = Cell(name, parent="memory://server", drivers=[net])
            runner = SiteJobs(
                cell,
                workdir / name,
                on_event=events,
                grace=5,
                audit=AuditLog(workdir / name / "audit.jsonl"),
                policy=(policies or {}).get(name),
            )
            cell.mount(runner.handlers())
            await stack.enter_async_context(cell)
            tg.start_soon(runner.run)
            sites[name] = runner
        admin = Cell(ADMIN, parent="memory://server", drivers=[net])
        await stack.enter_async_context(admin)
        await admin.wait_parent()
        bob = Cell(BOB, parent="memory://server", drivers=[net])
        await stack.enter_async_context(bob)
        await bob.wait_parent()
        await events.wait("site-registered", count=len(SITES))
        yield Deployment(manager, sites, admin, bob, events)


async def test_a_job_runs_to_the_end_and_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        assert rec["state"] == "submitted"
        assert rec["submitter"] == "alice@example.org"
        await d.events.wait("job-state", job=rec["id"], state="finished")
        done = await d.call("status", {"id": rec["id"]})
        assert done["state"] == "finished"
        assert done["rounds_done"] == 3
        assert done["sites"] == SITES
        listed = await d.call("list", {})
        assert [r["id"] for r in listed] == [rec["id"]]
        # Each site's training process ran and ended with the job.
        ended = await d.events.wait("job-ended", count=2, job=rec["id"])
        assert {e["outcome"] for e in ended} == {"finished"}
        assert all(not s.jobs for s in d.sites.values())
    folder = tmp_path / "jobs" / rec["id"]
    tensors, _ = decode((folder / "checkpoints" / "last.safetensors").read_bytes())
    # Sites add 1 (weight 1) and 2 (weight 2): 5/3 a round, 3 rounds.
    assert np.allclose(tensors["w"], 5.0)
    lines = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines if x["event"] == "round"] == [0, 1, 2]
    states = [x["state"] for x in lines if x["event"] == "state"]
    assert states == ["submitted", "running", "finished"]
    # The record survives the server: a new store reads the same jobs.
    assert JobStore(tmp_path / "jobs").load_all()[0].state == "finished"


async def test_only_admins_manage_jobs_and_bad_jobs_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        site_cell = d.sites[SITES[0]].cell
        with pytest.raises(errors.Unauthorized):
            await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"}, by=site_cell)
        with pytest.raises(errors.Unauthorized):
            await d.call("list", {}, by=site_cell)
        with pytest.raises(errors.BadRequest, match="cannot load the recipe"):
            await d.call("submit", {"recipe": "tests._fl_scripts:nothing"})
        with pytest.raises(errors.BadRequest, match="cannot override"):
            await d.call(
                "submit",
                {"recipe": "tests._fl_scripts:small_recipe", "overrides": {"script": "os:_exit"}},
            )
        with pytest.raises(errors.BadRequest, match="no job"):
            await d.call("status", {"id": "nope"})
        # A site takes job commands from the server only.
        with pytest.raises(errors.Unauthorized):
            await d.admin.request(SITES[0], CHANNEL, "abort", b'{"id": "x"}')
        assert await d.call("list", {}) == []
    entries = audit_entries(tmp_path / "jobs" / "audit.jsonl")
    refused = [e for e in entries if e["event"] == "refused"]
    assert [(e["src"], e["command"]) for e in refused] == [(SITES[0], "submit"), (SITES[0], "list")]
    assert next(e["why"] for e in entries if e["event"] == "job-refused").startswith("cannot load")
    site_entries = audit_entries(tmp_path / "sites" / SITES[0] / "audit.jsonl")
    assert [(e["event"], e["src"]) for e in site_entries] == [("refused", ADMIN)]


def audit_entries(path: Path) -> list[dict[str, Any]]:
    text = path.read_text().splitlines()
    assert verify_audit(text).ok
    return [json.loads(line) for line in text]


async def test_abort_stops_every_sites_training_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:hanging_recipe"})
        started = await d.events.wait("job-process", count=2, job=rec["id"])
        pids = [e["pid"] for e in started]
        for pid in pids:
            os.kill(pid, 0)  # alive
        aborted = await d.call("abort", {"id": rec["id"]})
        assert aborted["state"] == "aborted"
        assert "alice@example.org" in aborted["error"]
        ended = await d.events.wait("job-ended", count=2, job=rec["id"])
        assert {e["outcome"] for e in ended} == {"stopped"}
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # gone, and reaped
        assert all(not s.jobs for s in d.sites.values())
        # The service goes on: the next job runs.
        nxt = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-state", job=nxt["id"], state="finished")
    assert JobStore(tmp_path / "jobs").load_all()[0].state == "aborted"
    entries = audit_entries(tmp_path / "jobs" / "audit.jsonl")
    assert {"event": "job-abort", "job": rec["id"], "by": "alice@example.org"}.items() <= next(
        e for e in entries if e["event"] == "job-abort"
    ).items()
    site_events = [e["event"] for e in audit_entries(tmp_path / "sites" / SITES[1] / "audit.jsonl")]
    assert site_events.count("job-start") == 2  # the aborted job and the next one
    assert "job-abort" in site_events


async def test_a_site_takes_tasks_only_from_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:hanging_recipe"})
        await d.events.wait("job-process", count=2, job=rec["id"])
        # Another cell (here the admin session) forges a task for the running job.
        with pytest.raises(errors.Unauthorized, match="tasks come from server"):
            await d.admin.stream(
                SITES[0], "fl", "task", b"forged", headers={"job": rec["id"], "task": "x"}
            )
        await d.call("abort", {"id": rec["id"]})


async def test_a_sites_mandatory_dp_filter_applies_to_a_job_that_asks_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dp = policy_from_dict({"privacy": {"dp": {"clip": 0.5, "noise_multiplier": 0.8}}})
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch, {SITES[0]: dp}) as d:
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-state", job=rec["id"], state="finished")
    tensors, _ = decode(
        (tmp_path / "jobs" / rec["id"] / "checkpoints" / "last.safetensors").read_bytes()
    )
    # Unfiltered, every value would be exactly 5.0 (see the first test); site-1's updates are
    # clipped to norm 0.5 and noised, so the model moved less and not uniformly.
    assert not np.allclose(tensors["w"], 5.0)
    entries = audit_entries(tmp_path / "sites" / SITES[0] / "audit.jsonl")
    privacy = [e for e in entries if e["event"] == "privacy"]
    assert len(privacy) == 3  # one per round
    assert privacy[0]["dp_epsilon"] == privacy[1]["dp_epsilon"] > 0
    assert privacy[0]["dp_epsilon_total"] < privacy[2]["dp_epsilon_total"]
    assert not [
        e
        for e in audit_entries(tmp_path / "sites" / SITES[1] / "audit.jsonl")
        if e["event"] == "privacy"
    ]  # site-2 has no filter


async def test_a_site_refuses_jobs_its_policy_does_not_allow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_bob = policy_from_dict({"jobs": {"submitters": ["bob@example.org"]}})
    async with deployment(
        tmp_path / "jobs", tmp_path / "sites", monkeypatch, {SITES[1]: only_bob}
    ) as d:
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-state", job=rec["id"], state="finished")
        done = await d.call("status", {"id": rec["id"]})
    assert done["rounds_done"] == 3
    tensors, _ = decode(
        (tmp_path / "jobs" / rec["id"] / "checkpoints" / "last.safetensors").read_bytes()
    )
    assert np.allclose(tensors["w"], 3.0)  # site-1 alone (adds 1 a round)
    refused = [
        e
        for e in audit_entries(tmp_path / "sites" / SITES[1] / "audit.jsonl")
        if e["event"] == "job-refused"
    ]
    assert refused[0]["submitter"] == "alice@example.org"
    events = (tmp_path / "jobs" / rec["id"] / "events.jsonl").read_text()
    assert "site-not-started" in events


async def test_an_admin_without_the_right_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "admins.toml"
    toml.write_text('[rights]\n"alice@example.org" = ["submit", "abort", "view"]\n"*" = ["view"]\n')
    rights = AdminRights.load(toml)
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch, rights=rights) as d:
        with pytest.raises(errors.Unauthorized, match="may not submit"):
            await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"}, by=d.bob)
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:hanging_recipe"})
        assert [r["id"] for r in await d.call("list", {}, by=d.bob)] == [rec["id"]]  # view
        with pytest.raises(errors.Unauthorized, match="may not abort"):
            await d.call("abort", {"id": rec["id"]}, by=d.bob)
        with pytest.raises(errors.Unauthorized, match="may not abort"):
            await d.call("abort", {"id": "no-such-job"}, by=d.bob)  # says nothing more
        assert (await d.call("abort", {"id": rec["id"]}))["state"] == "aborted"  # her own
    refused = [
        e for e in audit_entries(tmp_path / "jobs" / "audit.jsonl") if e["event"] == "refused"
    ]
    assert [e["admin"] for e in refused] == ["bob@example.org"] * 3


def test_admin_rights_by_name_then_organisation_then_everyone(tmp_path: Path) -> None:
    toml = tmp_path / "admins.toml"
    toml.write_text(
        '[rights]\n"alice@example.org" = ["view"]\n"org:hospital-a" = ["submit", "view"]\n'
        '"*" = []\n'
    )
    rights = AdminRights.load(toml)
    assert rights.of("alice@example.org", "hospital-a") == {"view"}  # her own entry first
    assert rights.of("carol@example.org", "hospital-a") == {"submit", "view"}
    assert rights.of("mallory@example.org", "elsewhere") == frozenset()
    assert AdminRights.load(tmp_path / "none.toml").of("anyone") == {
        "submit",
        "code",
        "abort",
        "abort-any",
        "view",
    }
    toml.write_text('[rights]\n"x" = ["rule-the-world"]\n')
    with pytest.raises(ConfigError, match="unknown rights"):
        AdminRights.load(toml)


async def test_an_admin_cannot_make_the_server_call_or_import_what_it_likes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's recipe is only ever a recipe, or a function declared to return one; a module
    that crashes or hangs as it loads takes a child process down, not the server."""
    import flare_async.fl._jobproc as jobproc  # noqa: PLC0415

    monkeypatch.setattr(jobproc, "RESOLVE_TIMEOUT", 3.0)
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        for spec in ("os:abort", "sys:exit", "signal:pause", "builtins:input", "os:getpid"):
            with pytest.raises(errors.BadRequest, match="neither a recipe nor a function"):
                await d.call("submit", {"recipe": spec})
        with pytest.raises(errors.BadRequest, match=r"does not load \(exit 7\)"):
            await d.call("submit", {"recipe": "tests.hostile_recipes.exits:recipe"})
        with pytest.raises(errors.BadRequest, match="did not load within 3 s"):
            await d.call("submit", {"recipe": "tests.hostile_recipes.hangs:recipe"})
        assert await d.call("list", {}) == []  # the server is still here, and ran nothing
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-state", job=rec["id"], state="finished")


async def test_an_admin_request_that_does_not_fit_its_type_is_refused_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin protocol's bodies are typed (``fl/_admin.py``): the wrong type, an unknown
    field or a missing one is a ``BadRequest`` naming it, before anything acts on it."""
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        cases = [
            ("submit", {"recipe": ["tests._fl_scripts:small_recipe"]}, r"`\$.recipe`"),
            ("submit", {"recipe": "m:r", "overrides": ["rounds"]}, r"`\$.overrides`"),
            ("submit", {"recipe": "m:r", "sites": "server.site-1"}, r"`\$.sites`"),
            ("submit", {"recipe": "m:r", "run_as": "root"}, "unknown field `run_as`"),
            ("submit", {}, "missing required field `recipe`"),
            ("status", {"id": 7}, r"`\$.id`"),
            ("abort", {"id": None}, r"`\$.id`"),
            ("logs", {"id": "x", "site": 1}, r"`\$.site`"),
            ("metrics", {"id": "x", "limit": 1.5}, r"`\$.limit`"),
        ]
        for topic, body, why in cases:
            with pytest.raises(errors.BadRequest, match=why):
                await d.call(topic, body)
        assert await d.call("list", {}) == []  # nothing was submitted


async def test_job_metrics_filters_and_bounds_what_an_admin_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``job/metrics``: filtered by site and key, the last ``limit`` records, ``limit``
    clamped to 1..100,000; a non-integer limit or an unknown job is a named error."""
    async with deployment(tmp_path / "jobs", tmp_path / "sites", monkeypatch) as d:
        rec = await d.call("submit", {"recipe": "tests._fl_scripts:small_recipe"})
        await d.events.wait("job-state", job=rec["id"], state="finished")
        store = d.server.store
        store.add_metrics(
            rec["id"],
            [{"site": SITES[i % 2], "key": "k", "value": float(i), "step": i} for i in range(6)],
        )
        store.add_metrics(rec["id"], [{"site": SITES[0], "key": "other", "value": 9.0}])
        got = await d.call("metrics", {"id": rec["id"], "site": SITES[0], "key": "k"})
        assert [r["step"] for r in got] == [0, 2, 4]
        assert len(await d.call("metrics", {"id": rec["id"]})) == 7
        last = await d.call("metrics", {"id": rec["id"], "key": "k", "limit": 2})
        assert [r["step"] for r in last] == [4, 5]
        assert len(await d.call("metrics", {"id": rec["id"], "limit": 0})) == 1  # clamped
        with pytest.raises(errors.BadRequest, match=r"Expected `int`, got `str` - at `\$.limit`"):
            await d.call("metrics", {"id": rec["id"], "limit": "all"})
        with pytest.raises(errors.BadRequest, match="no job"):
            await d.call("metrics", {"id": "nope"})
        with pytest.raises(errors.Unauthorized):
            await d.call("metrics", {"id": rec["id"]}, by=d.sites[SITES[0]].cell)
