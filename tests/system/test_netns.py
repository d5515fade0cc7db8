"""A deployment across hosts, as network namespaces: server, relay and two sites each in their
own namespace with their own address on a bridge (veth pairs, all made and removed by the
test). Site-2's link is cut mid-round and healed: the round goes on without it, the job
finishes, and site-2 answers again. Root only (skipped otherwise); the only addresses used are
those of the namespaces the test made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flare_async.security import provision
from tests._procs import ROOT, Proc

pytestmark = pytest.mark.slow  # a deployment across network namespaces, a real cut

RELAY = "server.relay-1"
SITES = [f"{RELAY}.site-1", f"{RELAY}.site-2"]
PREFIX = f"fa{os.getpid()}"  # namespaces of this run only
SUBNET = f"10.213.{os.getpid() % 250}"
CELLS = {"srv": 1, "rly": 2, "s1": 3, "s2": 4}  # namespace suffix -> host part of its address


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def ns(name: str) -> str:
    return f"{PREFIX}-{name}"


def addr(name: str) -> str:
    return f"{SUBNET}.{CELLS[name]}"


@pytest.fixture
def namespaces() -> Iterator[None]:
    """The namespaces and their bridge, removed again whatever happens (their veths go with
    them)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    made: list[str] = []
    try:
        try:
            ip("netns", "add", ns("br"))
        except (subprocess.CalledProcessError, OSError) as e:
            pytest.skip(f"ip netns add failed: {e}")
        made.append(ns("br"))
        br = ["-n", ns("br")]
        ip(*br, "link", "add", "br0", "type", "bridge")
        ip(*br, "link", "set", "br0", "up")
        ip(*br, "link", "set", "lo", "up")
        for name, _ in CELLS.items():
            ip("netns", "add", ns(name))
            made.append(ns(name))
            # Both ends made inside the bridge's namespace, one moved: none in the host's.
            ip(*br, "link", "add", f"v-{name}", "type", "veth", "peer", "name", "eth0")
            ip(*br, "link", "set", "eth0", "netns", ns(name))
            ip(*br, "link", "set", f"v-{name}", "master", "br0", "up")
            inside = ["-n", ns(name)]
            ip(*inside, "link", "set", "lo", "up")
            ip(*inside, "addr", "add", f"{addr(name)}/24", "dev", "eth0")
            ip(*inside, "link", "set", "eth0", "up")
        yield
    finally:
        for name in reversed(made):
            subprocess.run(
                ["ip", "netns", "del", name], check=False, capture_output=True, timeout=20
            )


def exec_in(name: str) -> list[str]:
    return ["ip", "netns", "exec", ns(name)]


@pytest.mark.timeout(300)
def test_a_site_cut_off_mid_round_rejoins_and_the_job_finishes(
    namespaces: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    server_url = f"tls://{addr('srv')}:8002"
    relay_url = f"tls://{addr('rly')}:8003"
    clients = "".join(
        f'[[clients]]\nname = "{site}"\norg = "hospital-a"\nparent = "{relay_url}"\n'
        for site in SITES
    )
    (tmp_path / "project.toml").write_text(f"""
project = "netns"
org = "example.org"
[server]
listen = ["{server_url}"]
[[relays]]
name = "{RELAY}"
parent = "{server_url}"
listen = ["{relay_url}"]
{clients}
[[admins]]
name = "alice@example.org"
parent = "{server_url}"
""")
    kits = tmp_path / "kits"
    provision(tmp_path / "project.toml", kits, now=datetime.now(UTC))
    where = dict(zip(["server", RELAY, *SITES], CELLS, strict=True))
    procs: dict[str, Proc] = {}

    def job(*args: str) -> subprocess.CompletedProcess[str]:
        """The admin CLI, from the server's namespace (the admin kit names its address)."""
        admin = ["--kit", str(kits / "alice@example.org")]
        return subprocess.run(
            [*exec_in("srv"), sys.executable, "-m", "flare_async", "job", *admin, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=ROOT,
        )

    try:
        for cell, name in where.items():
            procs[cell] = Proc(
                cell,
                kits / cell,
                tmp_path / f"{cell}.log",
                ["--jobs", str(tmp_path / "jobs" / cell)],
                prefix=exec_in(name),
            )
        server = procs["server"]
        server.wait_all("site-registered", "site", SITES, timeout=60)

        submitted = job("submit", "tests._fl_scripts:slow_recipe")
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["id"]
        first = server.wait_for("job-round", job=job_id, timeout=60)
        assert first["round"] == 0
        assert sorted(first["responded"]) == SITES

        # Round 1's task is out; site-2 needs 1.5 s to answer it: cut its link now.
        ip("-n", ns("s2"), "link", "set", "eth0", "down")
        cut = server.wait_for("job-round", job=job_id, timeout=60)  # after the 20 s deadline
        assert cut["round"] == 1
        assert cut["responded"] == [SITES[0]]
        ip("-n", ns("s2"), "link", "set", "eth0", "up")

        later = [server.wait_for("job-round", job=job_id, timeout=60) for _ in range(2)]
        server.wait_for("job-state", job=job_id, state="finished", timeout=60)
        assert [r["round"] for r in later] == [2, 3]
        assert any(SITES[1] in r["responded"] for r in later), later  # it answers again
        status = job("status", job_id)
        assert status.returncode == 0, status.stderr
        final = json.loads(status.stdout)
        assert final["state"] == "finished"
        assert final["rounds_done"] == 4
    finally:
        for proc in reversed(procs.values()):
            try:
                proc.stop()  # SIGTERM: a site stops its training processes too
            except subprocess.TimeoutExpired:
                proc.proc.kill()
                proc.proc.wait(timeout=10)
