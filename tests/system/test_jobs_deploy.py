"""Jobs on a real deployment: server, relay and two sites each their own OS process
(``flare-async run KIT --jobs DIR``) over mutual TLS with provisioned certificates, driven by the
admin CLI (``flare-async job ...``) with the admin's kit, as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from flare_async import Cell
from flare_async.cell import system_handlers
from flare_async.cli._job import admin_session
from flare_async.cli._kit import kit_drivers, kit_verifier
from flare_async.codecs import decode
from flare_async.errors import IntegrityError
from flare_async.security import load_kit, provision
from flare_async.testing import FaultyDriver, free_ports
from tests._procs import ROOT, Proc

pytestmark = pytest.mark.slow  # every cell an OS process, driven by the admin CLI

RELAY = "server.relay-1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the relay's wss driver (aiohttp) runs on asyncio only


SITES = [f"{RELAY}.site-1", f"{RELAY}.site-2"]


class Deployment:
    def __init__(
        self,
        root: Path,
        *,
        skip: tuple[str, ...] = (),
        files: dict[str, str] | None = None,
        sites: list[str] = SITES,
    ) -> None:
        self.root = root
        self.sites = sites
        p_server, p_relay = free_ports(2)
        project = root / "project.toml"
        orgs = ["hospital-a", "hospital-b", "hospital-c"]
        clients = "".join(
            f'[[clients]]\nname = "{site}"\norg = "{orgs[i % 3]}"\n'
            f'parent = "tls://127.0.0.1:{p_relay}"\n'
            for i, site in enumerate(sites)
        )
        project.write_text(f"""
project = "jobs"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:{p_server}"]
[[relays]]
name = "{RELAY}"
parent = "tls://127.0.0.1:{p_server}"
listen = ["tls://127.0.0.1:{p_relay}"]
{clients}
[[admins]]
name = "alice@example.org"
parent = "tls://127.0.0.1:{p_server}"
[[admins]]
name = "bob@example.org"
org = "hospital-b"
parent = "tls://127.0.0.1:{p_server}"
""")
        self.kits = root / "kits"
        provision(project, self.kits, now=datetime.now(UTC))
        for name, text in (files or {}).items():  # policies dropped into kits
            (self.kits / name).write_text(text)
        self.procs: dict[str, Proc] = {}
        for name in ["server", RELAY, *sites]:
            if name in skip:
                continue
            self.procs[name] = Proc(
                name,
                self.kits / name,
                root / f"{name}.log",
                ["--jobs", str(root / "jobs" / name)],
            )
        if not skip:
            self.procs["server"].wait_all("site-registered", "site", sites)

    def job(self, *args: str, kit: str = "alice@example.org") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flare_async", "job", "--kit", str(self.kits / kit), *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=180,
            check=False,
            cwd=ROOT,
        )

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            proc.stop()


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FLARE_TEST_GATE", str(tmp_path / "gate"))
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def test_an_admin_submits_follows_downloads_and_aborts_jobs(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    done = d.job("submit", "tests._fl_scripts:small_recipe", "--wait", "--timeout", "120")
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    job = final["id"]
    assert final["state"] == "finished"
    assert final["rounds_done"] == 3
    assert final["sites"] == SITES
    assert final["submitter"] == "alice@example.org"

    listed = d.job("list")
    assert job in listed.stdout
    assert "finished" in listed.stdout

    events = d.job("logs", job)
    rounds = [json.loads(x) for x in events.stdout.splitlines() if '"round"' in x]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(sorted(r["responded"]) == SITES for r in rounds)
    site_log = d.job("logs", job, "--site", SITES[1])
    assert site_log.returncode == 0, site_log.stderr
    assert "site 1 trained round 2" in site_log.stdout  # the training process's own output

    out = tmp_path / "downloaded"
    got = d.job("download", job, "-o", str(out))
    assert got.returncode == 0, got.stderr
    tensors, _ = decode((out / job / "checkpoints" / "last.safetensors").read_bytes())
    assert np.allclose(tensors["w"], 5.0)  # (1*1 + 2*2) / 3 a round, 3 rounds, via the relay
    assert json.loads((out / job / "job.json").read_text())["state"] == "finished"

    # The same job under secure aggregation: the server learns only the sum, same model.
    secure = d.job("submit", "tests._fl_scripts:small_recipe", "--secure", "--wait")
    assert secure.returncode == 0, secure.stderr
    sjob = json.loads(secure.stdout.splitlines()[-1])["id"]
    folder = tmp_path / "jobs" / "server" / sjob / "checkpoints"
    tensors, _ = decode((folder / "last.safetensors").read_bytes())
    assert np.allclose(tensors["w"], 5.0, atol=1e-3)

    # Sealed for the server's key: the relay forwards results it cannot read; same model.
    sealed = d.job("submit", "tests._fl_scripts:small_recipe", "--encrypt", "--wait")
    assert sealed.returncode == 0, sealed.stderr
    ejob = json.loads(sealed.stdout.splitlines()[-1])["id"]
    folder = tmp_path / "jobs" / "server" / ejob / "checkpoints"
    tensors, _ = decode((folder / "last.safetensors").read_bytes())
    assert np.allclose(tensors["w"], 5.0)

    # Abort: every site's training process is stopped, and the deployment goes on.
    hung = json.loads(d.job("submit", "tests._fl_scripts:hanging_recipe").stdout)["id"]
    pids = [d.procs[s].wait_for("job-process", job=hung)["pid"] for s in SITES]
    aborted = d.job("abort", hung)
    assert aborted.returncode == 0, aborted.stderr
    assert json.loads(aborted.stdout)["state"] == "aborted"
    for site in SITES:
        assert d.procs[site].wait_for("job-ended", job=hung)["outcome"] == "stopped"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert json.loads(d.job("status", hung).stdout)["state"] == "aborted"

    # Every participant kept an audit log that verifies; the server's says who did what.
    server_log = tmp_path / "jobs" / "server" / "audit.jsonl"
    ok = subprocess.run(
        [sys.executable, "-m", "flare_async", "audit", "verify", str(server_log)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout
    entries = [json.loads(line) for line in server_log.read_text().splitlines()]
    submitted = [e for e in entries if e["event"] == "job-submitted"]
    assert [(e["job"], e["by"]) for e in submitted] == [
        (job, "alice@example.org"),
        (sjob, "alice@example.org"),
        (ejob, "alice@example.org"),
        (hung, "alice@example.org"),
    ]
    assert any(e["event"] == "job-abort" and e["job"] == hung for e in entries)


def test_only_an_admin_kit_reaches_the_job_service(deployment: Deployment, tmp_path: Path) -> None:
    refused = deployment.job("list", kit=SITES[0])
    assert refused.returncode == 1
    assert "not an admin kit" in refused.stderr
    missing = deployment.job("status", "no-such-job")
    assert missing.returncode == 1
    assert "no job" in missing.stderr
    assert deployment.job("logs", "no-such-job").returncode == 1  # recorded, with signature

    # The admin's own session, but a command without its signature: refused and audited.
    async def unsigned() -> None:
        async with admin_session(deployment.kits / "alice@example.org") as session:
            session.cell.signing = None  # this session's cell signs nothing
            await session.cell.request(session.server, "job", "list", b"{}")

    with pytest.raises(IntegrityError, match="not signed"):
        anyio.run(unsigned)
    audit = (tmp_path / "jobs" / "server" / "audit.jsonl").read_text().splitlines()
    refusals = [json.loads(x) for x in audit if '"refused"' in x]
    assert refusals[-1]["by"] == "alice@example.org"
    assert refusals[-1]["command"] == "job/list"
    signed = [json.loads(x) for x in audit if '"admin-command"' in x]
    assert signed
    assert all(e["signature"] for e in signed)  # every command kept with its signature


def test_a_server_killed_mid_job_resumes_from_its_last_checkpoint(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    server = d.procs["server"]
    job = json.loads(d.job("submit", "tests._fl_scripts:gated_recipe").stdout)["id"]
    server.wait_for("job-checkpoint", job=job, round=0)  # round 1 is gated: it cannot end
    server.proc.kill()  # SIGKILL: no goodbye, no cleanup
    server.proc.wait()
    server.restart()
    server.wait_all("site-registered", "site", SITES)  # the sites are back
    server.wait_for("job-state", job=job, state="running", attempt=2)
    for site in SITES:
        assert d.procs[site].wait_for("job-process", job=job, attempt=2)["pid"]
    (tmp_path / "gate").touch()
    server.wait_for("job-state", job=job, state="finished", timeout=120)

    folder = tmp_path / "jobs" / "server" / job
    lines = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines if x["event"] == "round"] == [0, 1, 2]  # 0 not redone
    assert [x["attempt"] for x in lines if x["event"] == "resumed"] == [2]
    tensors, _ = decode((folder / "checkpoints" / "last.safetensors").read_bytes())
    assert np.allclose(tensors["w"], 5.0)


def relay_cell(d: Deployment, rewrite: Any) -> Cell:
    """The deployment's relay, run in this process from its kit, with ``rewrite`` applied to
    every frame it forwards (``tests.security.test_signatures.HostileRelay``)."""
    kit = load_kit(d.kits / RELAY)
    return Cell(
        kit.name,
        listen=list(kit.listen),
        parent=kit.parent,
        drivers=[FaultyDriver(drv, rewrite=rewrite) for drv in kit_drivers(kit)],
        handlers=[system_handlers()],
        verify_peer=kit_verifier(kit),
    )


@pytest.mark.anyio
async def test_secure_aggregation_with_a_site_dropping_mid_round_in_a_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sites behind a relay that records what site-1 sends (what the server gets: relay
    aggregation is off). site-3's training process exits mid round 0, after the keys went out;
    the round still completes on the other two, the next round runs without site-3, and the
    model is the plain weighted average. What site-1 sent is masked: its plain fixed-point
    vector never crossed the relay."""
    from tests.security.test_signatures import HostileRelay  # noqa: PLC0415

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    sites = [*SITES, f"{RELAY}.site-3"]
    d = Deployment(tmp_path, skip=(RELAY,), sites=sites)
    try:
        snoop = HostileRelay("snoop")
        async with relay_cell(d, snoop):
            await anyio.to_thread.run_sync(
                d.procs["server"].wait_all, "site-registered", "site", sites
            )
            done = await anyio.to_thread.run_sync(
                lambda: d.job(
                    "submit",
                    "tests._fl_scripts:secure_dropout_recipe",
                    "--no-relay-aggregation",
                    "--wait",
                )
            )
    finally:
        d.stop()
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    assert final["state"] == "finished"
    lines = (tmp_path / "jobs" / "server" / final["id"] / "events.jsonl").read_text()
    rounds = [json.loads(x) for x in lines.splitlines() if '"round"' in x]
    assert [sorted(r["responded"]) for r in rounds] == [SITES, SITES]
    assert sites[2] in rounds[0]["failed"]  # dropped mid-round, after the keys went out
    folder = tmp_path / "jobs" / "server" / final["id"] / "checkpoints"
    tensors, _ = decode((folder / "last.safetensors").read_bytes())
    assert np.allclose(tensors["w"], 2 * 5 / 3, atol=1e-3)  # (1*1 + 2*2) / 3 a round
    assert len(snoop.seen) > 0
    plain = np.full(17, 1 << 16, np.uint32)  # site-1's round 0 vector (w + 1, weight 1) unmasked
    assert plain[:16].tobytes() not in snoop.seen


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["bytes", "replay", "snoop", "task", "start"])
async def test_a_tampering_relay_is_caught_in_a_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Server and sites are processes; the relay between them runs here, from its own kit,
    and changes site-1's first result on the way (bytes, with the CRCs fixed up), or replays
    round 0's signature on later results. With relay aggregation off the server checks every
    site's signature itself."""
    from tests.security.test_signatures import HostileRelay  # noqa: PLC0415

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    d = Deployment(tmp_path, skip=(RELAY,))
    try:
        hostile = HostileRelay(mode)
        async with relay_cell(d, hostile):
            await anyio.to_thread.run_sync(
                d.procs["server"].wait_all, "site-registered", "site", d.sites
            )
            extra = {"snoop": ["--encrypt"], "task": []}.get(mode, [])
            done = await anyio.to_thread.run_sync(
                lambda: d.job(
                    "submit",
                    "tests._fl_scripts:small_recipe",
                    "--no-relay-aggregation",
                    "--min-responses",
                    "1",
                    "--wait",
                    *extra,
                )
            )
    finally:
        d.stop()
    assert done.returncode == 0, done.stderr
    if mode == "start":  # the job start to site-1 was changed: site-1 refused to run it
        assert hostile.tampered == 1
        job = json.loads(done.stdout.splitlines()[-1])["id"]
        lines = (tmp_path / "jobs" / "server" / job / "events.jsonl").read_text().splitlines()
        events = [json.loads(x) for x in lines]
        (skipped,) = [e for e in events if e["event"] == "site-not-started"]
        assert skipped["site"] == SITES[0]
        assert "changed on the way" in skipped["error"]
        assert all(e["responded"] == [SITES[1]] for e in events if e["event"] == "round")
        site_audit = tmp_path / "jobs" / SITES[0] / "audit.jsonl"
        refused = [json.loads(x) for x in site_audit.read_text().splitlines() if "refused" in x]
        assert refused[-1]["command"] == "job/start"
        assert "changed on the way" in refused[-1]["why"]
        return
    if mode == "snoop":  # sealed for the server: the relay carried bytes it cannot read
        assert len(hostile.seen) > 0
        # site-1's round-0 result in clear: the zero model plus 1 (float64, as the tensors
        # codec lays it out); an unsealed result would carry these 24 bytes as they are
        assert np.ones(3).tobytes() not in hostile.seen
        job = json.loads(done.stdout.splitlines()[-1])["id"]
        folder = tmp_path / "jobs" / "server" / job / "checkpoints"
        tensors, _ = decode((folder / "last.safetensors").read_bytes())
        assert np.allclose(tensors["w"], 5.0)
        return
    bad = {"bytes": [0], "task": [0]}.get(mode, [1, 2])  # rounds site-1 was tampered with
    assert hostile.tampered == len(bad)
    job = json.loads(done.stdout.splitlines()[-1])["id"]
    lines = (tmp_path / "jobs" / "server" / job / "events.jsonl").read_text().splitlines()
    rounds = [json.loads(x) for x in lines if '"round"' in x]
    for r in range(3):
        if r in bad:
            assert rounds[r]["responded"] == [SITES[1]]
            assert "IntegrityError" in rounds[r]["failed"][SITES[0]]
        else:
            assert sorted(rounds[r]["responded"]) == SITES  # untouched rounds count
    audit = [
        json.loads(x)
        for x in (tmp_path / "jobs" / "server" / "audit.jsonl").read_text().splitlines()
    ]
    rejected = [e for e in audit if e["event"] == "result-rejected"]
    if mode == "task":  # the site refused the changed model: no result to reject
        assert rejected == []
        return
    assert [(e["site"], e["why"].split(":")[0]) for e in rejected] == [
        (SITES[0], "IntegrityError")
    ] * len(bad)


def test_admin_rights_and_a_sites_mandatory_dp_filter_in_a_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    d = Deployment(
        tmp_path,
        files={
            "server/admins.toml": "[rights]\n"
            '"alice@example.org" = ["submit", "code", "abort", "view"]\n"*" = ["view"]\n',
            f"{SITES[0]}/policy.toml": "[privacy.dp]\nclip = 0.5\nnoise_multiplier = 0.8\n",
        },
    )
    try:
        refused = d.job("submit", "tests._fl_scripts:small_recipe", kit="bob@example.org")
        assert refused.returncode == 1
        assert "may not submit" in refused.stderr
        assert d.job("list", kit="bob@example.org").returncode == 0  # bob may view
        done = d.job("submit", "tests._fl_scripts:small_recipe", "--wait")
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout.splitlines()[-1])["id"]
    finally:
        d.stop()
    folder = tmp_path / "jobs" / "server" / job / "checkpoints"
    tensors, _ = decode((folder / "last.safetensors").read_bytes())
    assert not np.allclose(tensors["w"], 5.0)  # site-1's updates clipped and noised
    site_log = tmp_path / "jobs" / SITES[0] / "audit.jsonl"
    entries = [json.loads(x) for x in site_log.read_text().splitlines()]
    assert len([e for e in entries if e["event"] == "privacy"]) == 3
    ok = subprocess.run(
        [sys.executable, "-m", "flare_async", "audit", "verify", str(site_log)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout
    server_log = (tmp_path / "jobs" / "server" / "audit.jsonl").read_text()
    assert '"why": "bob@example.org may not submit"' in server_log
