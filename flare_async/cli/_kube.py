"""``flare-async kube KITS``: Kubernetes manifests (or, with ``--compose``, a compose file) for
the server, relays and sites whose startup kits lie in ``KITS``; admins are skipped.

Each cell gets a Secret with its kit's files (mounted read-only at ``/kits/NAME``) and a pod
that runs ``flare-async run /kits/NAME --jobs /work/jobs`` as UID 10001 (the image's user) on a
read-only root file system, ``/work`` an emptyDir (or, with ``--storage``, a claim). The server
is a Deployment and a Service; a relay a StatefulSet and its headless Service; a site a
Deployment. Kits are checked first, and refused with the reason:

- a server or relay must listen on ``0.0.0.0`` or ``::`` (a pod is reached at its own address);
- a child's parent URL must name its parent's Service: ``SVC``, ``SVC.NS``, ``SVC.NS.svc`` or
  ``SVC.NS.svc.cluster.local``, where SVC is the parent's name with dots as dashes
  (``server.relay-1`` is ``server-relay-1``), and the parent's certificate must carry that
  host, for the child checks it on every dial. The generator cannot rename a certificate:
  provision with those hosts (docs/deployment.md, "Docker and Kubernetes").

The output is YAML written here (block style, strings quoted where YAML could misread them),
so the core package needs no YAML library.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from flare_async.errors import ConfigError
from flare_async.security import KIT_FILE, Kit, Role, load_kit

UID = 10001
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_WILDCARD = frozenset({"0.0.0.0", "::", "[::]", ""})
_PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9_./-]*")
_RESERVED = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
_COMPONENT = {Role.SERVER: "server", Role.RELAY: "relay", Role.CLIENT: "site"}
_RESOURCES = {
    Role.SERVER: {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    Role.RELAY: {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    Role.CLIENT: {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
}


def service_name(cell: str) -> str:
    """The Kubernetes name of a cell (its Service, workload and, prefixed ``kit-``, Secret)."""
    label = cell.lower().replace(".", "-").replace("_", "-")
    if not _DNS_LABEL.fullmatch(label) or "--" in label:
        raise ConfigError(
            f"cell {cell!r} has no Kubernetes name ({label!r} is not a DNS label of at most "
            "63 lower-case letters, digits and single dashes, starting with a letter)"
        )
    return label


def service_hosts(service: str, namespace: str) -> list[str]:
    """The names a Service is reached at from pods (of its namespace, for the first)."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]  # fmt: skip


def load_cells(kits_dir: Path) -> list[tuple[Kit, Path]]:
    """Every server, relay and site kit in ``kits_dir`` (checked), parents first."""
    found = []
    for folder in sorted(p for p in kits_dir.iterdir() if (p / KIT_FILE).is_file()):
        kit = load_kit(folder)
        if kit.role is not Role.ADMIN:
            found.append((kit, folder))
    if not found:
        raise ConfigError(f"no server, relay or site kit in {kits_dir}")
    return sorted(found, key=lambda pair: (pair[0].name.count("."), pair[0].name))


def kit_files(kit: Kit, folder: Path) -> dict[str, bytes]:
    """The kit's files, all of them plain files in its folder (none elsewhere, no CA key)."""
    files: dict[str, bytes] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not _SECRET_KEY.fullmatch(path.name) or path.name == "ca.key":
            raise ConfigError(f"kit {folder}: {path.name!r} cannot go into its Secret (only "
                              "plain files, no folders, never the CA key)")  # fmt: skip
        files[path.name] = path.read_bytes()
    for name in (kit.cert, kit.key, kit.ca):
        if Path(name).parent.resolve() != folder.resolve():
            raise ConfigError(f"kit {folder}: {name} lies outside the kit folder")
    if sum(len(data) for data in files.values()) > 900_000:
        raise ConfigError(f"kit {folder} is too large for a Secret (1 MiB)")
    return files


def ports(kit: Kit) -> list[dict[str, Any]]:
    """The kit's listen ports, each checked to bind every address of the pod."""
    out = []
    for url in kit.listen:
        parts = urlsplit(url)
        if (parts.hostname or "") not in _WILDCARD:
            raise ConfigError(f"{kit.name} listens on {url}: in a container a cell must listen "
                              "on 0.0.0.0 (its hosts = [...] say where it is reached)")  # fmt: skip
        name = f"{parts.scheme}-{parts.port}"
        out.append({"name": name, "containerPort": parts.port, "protocol": "TCP"})
    return out


def check_parents(cells: list[tuple[Kit, Path]], allowed: dict[str, list[str]]) -> None:
    """Each child's parent URL must reach its parent by one of ``allowed[parent]``, a name
    on the parent's certificate, at one of its ports."""
    by_name = {kit.name: (kit, folder) for kit, folder in cells}
    for kit, _ in cells:
        if kit.role is Role.SERVER:
            continue
        if kit.parent_name not in by_name or kit.parent is None:
            raise ConfigError(f"{kit.name}: its parent {kit.parent_name!r} is not among the kits")
        parent, folder = by_name[kit.parent_name]
        url = urlsplit(kit.parent)
        hosts = allowed[parent.name]
        cert = x509.load_pem_x509_certificate((folder / Path(parent.cert).name).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if url.hostname not in hosts or url.hostname not in sans.get_values_for_type(x509.DNSName):
            raise ConfigError(
                f"{kit.name} dials {kit.parent}, but {parent.name} is reached at "
                f"{' or '.join(hosts)}: provision {parent.name} with hosts = [{hosts[0]!r}] "
                f"(or another of those names) and {kit.name} with parent = "
                f"'{url.scheme}://{hosts[0]}:{url.port}'"
            )
        if url.port not in {urlsplit(u).port for u in parent.listen}:
            raise ConfigError(f"{kit.name} dials {kit.parent}: {parent.name} listens on no port "
                              f"{url.port}")  # fmt: skip


def manifests(
    cells: list[tuple[Kit, Path]], image: str, namespace: str, storage: str | None = None
) -> list[dict[str, Any]]:
    """The Kubernetes objects for ``cells`` (from :func:`load_cells`)."""
    service_name(namespace)
    check_parents(cells, {k.name: service_hosts(service_name(k.name), namespace) for k, _ in cells})
    docs: list[dict[str, Any]] = []
    for kit, folder in cells:
        name = service_name(kit.name)
        labels = {"app.kubernetes.io/name": "flare-async", "app.kubernetes.io/instance": name}
        meta = {"name": name, "namespace": namespace,
                "labels": {**labels, "app.kubernetes.io/component": _COMPONENT[kit.role]},
                "annotations": {"flare-async/cell": kit.name}}  # fmt: skip
        data = {k: base64.b64encode(v).decode() for k, v in kit_files(kit, folder).items()}
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {**meta, "name": f"kit-{name}"}, "data": data})  # fmt: skip
        work: dict[str, Any] = {"emptyDir": {}}
        if storage is not None:
            docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "metadata": {**meta, "name": f"work-{name}"},
                         "spec": {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": storage}}}})  # fmt: skip
            work = {"persistentVolumeClaim": {"claimName": f"work-{name}"}}
        listen = ports(kit)
        pod = _pod(kit, image, listen, work)
        template = {"metadata": {"labels": labels, "annotations": meta["annotations"]},
                    "spec": pod}  # fmt: skip
        spec: dict[str, Any] = {"replicas": 1, "selector": {"matchLabels": labels},
                                "template": template}  # fmt: skip
        if kit.role is Role.RELAY:
            spec["serviceName"] = name
            docs.append({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
                         "spec": spec})  # fmt: skip
        else:
            spec["strategy"] = {"type": "Recreate"}  # never two cells with one name at once
            docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                         "spec": spec})  # fmt: skip
        if listen:
            svc_ports = [{"name": p["name"], "port": p["containerPort"],
                          "targetPort": p["name"], "protocol": "TCP"} for p in listen]  # fmt: skip
            svc: dict[str, Any] = {"selector": labels, "ports": svc_ports}
            if kit.role is Role.RELAY:
                svc["clusterIP"] = "None"  # headless: the StatefulSet's stable identity
            docs.append({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": svc})
    return docs


def _pod(kit: Kit, image: str, listen: list[dict[str, Any]], work: dict[str, Any]) -> Any:
    container = {
        "name": "cell", "image": image, "imagePullPolicy": "IfNotPresent",
        "args": ["run", f"/kits/{kit.name}", "--jobs", "/work/jobs"],
        "env": [{"name": "HOME", "value": "/work"}],
        "ports": listen, "resources": _RESOURCES[kit.role],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "kit", "mountPath": f"/kits/{kit.name}", "readOnly": True},
                         {"name": "work", "mountPath": "/work"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }  # fmt: skip
    secret = {"secretName": f"kit-{service_name(kit.name)}", "defaultMode": 0o440}
    return {
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "kit", "secret": secret}, {"name": "work", **work},
                    {"name": "tmp", "emptyDir": {}}],
    }  # fmt: skip


def compose(cells: list[tuple[Kit, Path]], image: str) -> dict[str, Any]:
    """A compose file for one host: a service per cell, named as in Kubernetes; kits from
    ``./kits/FOLDER`` (read-only), work in ``./work/NAME``; the server's ports on loopback."""
    check_parents(cells, {k.name: [service_name(k.name)] for k, _ in cells})
    services: dict[str, Any] = {}
    for kit, folder in cells:
        name = service_name(kit.name)
        kit_files(kit, folder)
        listen = ports(kit)
        service: dict[str, Any] = {
            "image": image, "command": ["run", f"/kits/{kit.name}", "--jobs", "/work/jobs"],
            "user": "${FLARE_UID:-10001}:${FLARE_GID:-10001}", "read_only": True,
            "tmpfs": ["/tmp"], "environment": {"HOME": "/work"},
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"],
            "volumes": [f"./kits/{folder.name}:/kits/{kit.name}:ro", f"./work/{name}:/work"],
            "restart": "unless-stopped",
        }  # fmt: skip
        if kit.role is Role.SERVER:
            service["ports"] = [f"127.0.0.1:{p['containerPort']}:{p['containerPort']}"
                                for p in listen]  # fmt: skip
        services[name] = service
    return {"services": services}


def to_yaml(node: Any, pad: str = "") -> list[str]:
    """Block-style YAML lines for dicts, lists, strings, ints and booleans."""
    if not isinstance(node, dict | list) or not node:
        return [pad + _scalar(node)]
    out = []
    for key, value in node.items() if isinstance(node, dict) else enumerate(node):
        head = f"{pad}{_scalar(key)}:" if isinstance(node, dict) else f"{pad}-"
        if not isinstance(value, dict | list) or not value:
            out.append(f"{head} {_scalar(value)}")
        elif isinstance(node, dict):
            out += [head, *to_yaml(value, pad + "  ")]
        else:
            inner = to_yaml(value, pad + "  ")
            out += [f"{head} {inner[0].lstrip()}", *inner[1:]]
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def add_parser(sub: Any) -> None:
    """The ``kube`` subcommand's arguments."""
    p = sub.add_parser("kube", help="Kubernetes manifests (or a compose file) from kits")
    p.add_argument("kits", help="the folder of startup kits (`flare-async provision -o`)")
    p.add_argument("--image", required=True, help="the flare-async image (see the Dockerfile)")
    p.add_argument("--namespace", default="flare", help="the namespace (default flare)")
    p.add_argument("--storage", metavar="SIZE", default=None,
                   help="a PersistentVolumeClaim of SIZE (e.g. 10Gi) for each /work, "
                   "instead of an emptyDir")  # fmt: skip
    p.add_argument("--compose", action="store_true", help="a compose file for one host instead")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="default: stdout")


def run(args: argparse.Namespace) -> int:
    """Entry of ``flare-async kube``; returns the exit status."""
    kits = Path(args.kits)
    if not kits.is_dir():
        raise ConfigError(f"no kits folder {kits}")
    cells = load_cells(kits)
    if args.compose:
        text = "\n".join(to_yaml(compose(cells, args.image))) + "\n"
    else:
        docs = manifests(cells, args.image, args.namespace, args.storage)
        text = "".join("---\n" + "\n".join(to_yaml(doc)) + "\n" for doc in docs)
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0
