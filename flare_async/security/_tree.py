"""A project's topology by depth and fan-out: ``[tree]`` in a project file.

::

    project = "three-tier"
    [tree]
    fanout = [2, 2, 4]      # 2 relays under the server, 2 under each, 4 sites under each of those
    host = "127.0.0.1"      # where every listener listens (and is reached)
    port = 18100            # the server's port; each relay takes the next one
    scheme = "tls"
    orgs = ["hospital-a", "hospital-b"]   # the sites' organisations, in turn (default: the
                                          # project's)

expands, before any check, to the explicit entries: ``[server]`` on ``tls://HOST:PORT``, the
relays ``server.relay-1``, ``server.relay-1.relay-1``, ... (breadth first, one port each) and the
sites ``<leaf relay>.site-N`` numbered across the tree. ``[[admins]]`` are written as usual
(they connect to the server's URL unless they say otherwise). A ``[tree]`` and explicit
``[server]``, ``[[relays]]`` or ``[[clients]]`` in one file are refused.
"""

from __future__ import annotations

from typing import Any

import msgspec

from flare_async.errors import ConfigError


class TreeSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fanout: tuple[int, ...]
    host: str = "127.0.0.1"
    port: int
    scheme: str = "tls"
    orgs: tuple[str, ...] = ()


def expand_tree(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a parsed project file) with its ``[tree]`` replaced by explicit entries.

    Raises:
        ConfigError: a malformed ``[tree]``, or one beside explicit cells.
    """
    if "tree" not in raw:
        return raw
    clash = sorted(k for k in ("server", "relays", "clients") if k in raw)
    if clash:
        raise ConfigError(f"[tree] describes every cell; remove {', '.join(clash)}")
    try:
        tree = msgspec.convert(raw["tree"], TreeSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"[tree]: {exc}") from None
    if not tree.fanout or any(n < 1 for n in tree.fanout):
        raise ConfigError("[tree] fanout needs at least one level, each of at least 1")
    if not 0 < tree.port < 65536 - 1000:
        raise ConfigError(f"[tree] port {tree.port} is out of range")
    ports = iter(range(tree.port, 65536))
    url = f"{tree.scheme}://{tree.host}:{next(ports)}"
    out = {k: v for k, v in raw.items() if k != "tree"}
    out["server"] = {"name": "server", "listen": [url]}
    relays: list[dict[str, Any]] = []
    level = [("server", url)]
    for count in tree.fanout[:-1]:
        below = []
        for parent, parent_url in level:
            for j in range(count):
                name = f"{parent}.relay-{j + 1}"
                listen = f"{tree.scheme}://{tree.host}:{next(ports)}"
                relays.append({"name": name, "parent": parent_url, "listen": [listen]})
                below.append((name, listen))
        level = below
    clients: list[dict[str, Any]] = []
    for parent, parent_url in level:
        for _ in range(tree.fanout[-1]):
            entry = {"name": f"{parent}.site-{len(clients) + 1}", "parent": parent_url}
            if tree.orgs:
                entry["org"] = tree.orgs[len(clients) % len(tree.orgs)]
            clients.append(entry)
    out["relays"] = relays
    out["clients"] = clients
    return out
