"""Throwaway deployments for tests and benchmarks: free loopback ports, and a provisioned
project of edge clients that reach the system only through a relay's ``wss://`` listener."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from flare_async.security import provision


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (bound and released: another process could take
    one before it is used, which a test run on one machine does not do)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wss_edge_project(root: Path, relay: str, sites: Sequence[str], project: str = "edge") -> Path:
    """Provision (real CA, real keys) a server on ``tls://``, ``relay`` under it listening on
    ``wss://``, and ``sites`` whose only way in is that URL; returns the kits' folder."""
    p_server, p_relay = free_ports(2)
    clients = "".join(
        f'[[clients]]\nname = "{s}"\nparent = "wss://127.0.0.1:{p_relay}/flare"\n' for s in sites
    )
    spec = root / f"{project}.toml"
    spec.write_text(f"""
project = "{project}"
org = "example.org"
[server]
listen = ["tls://127.0.0.1:{p_server}"]
[[relays]]
name = "{relay}"
parent = "tls://127.0.0.1:{p_server}"
listen = ["wss://127.0.0.1:{p_relay}/flare"]
{clients}""")
    provision(spec, root / "kits", now=datetime.now(UTC))
    return root / "kits"


__all__ = ["free_ports", "wss_edge_project"]
