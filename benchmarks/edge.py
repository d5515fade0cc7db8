"""Intermittent edge clients over wss:// with mutual TLS: FedBuff on pulled tasks.

One process holds the server (``tls://``), one relay listening on ``wss://`` and ``N`` edge
clients (``EdgeClient`` from provisioned kits, real certificates): each receive is a visit that
dials the relay, handshakes TLS and the WebSocket upgrade and the cell hello, pushes what waits
in its outbox, pulls a task (the model streams down, signed by the server), and hangs up; each
send is another visit that pushes the result (signed by the client). Every message on the way is
signed and checked. The server runs ``fedbuff(pull=True)`` with ``concurrency`` = ``N / 2``
until ``--versions`` versions are published. The model is small (``--params`` float32 values):
this measures the visits, not arithmetic.

Per case (``fedbuff-pull-<N>edge-wss``):

- ``visits_per_s``: completed visits (connections) per second over the measured run;
  ``baseline``: bare TLS connections per second on this machine in the same run, each a TCP
  connect, a mutual TLS 1.3 handshake with the same kind of certificates (ECDSA P-256) and a
  close, one at a time, with Python's ``ssl`` on both ends (no WebSocket, no cell hello, no
  signatures, no FL); ``ratio`` says what share of that floor a whole visit reaches;
- ``updates_per_s``: client updates folded per second;
- ``peak_rss`` (B): this process's peak resident memory.

Run: ``python benchmarks/edge.py [--quick] [--repeat N] [--edges 20,100] [--versions 40]``.
Full size: 20 and 100 edge clients; ``--quick``: 20.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import csv_ints, emit, log, median, parser

import flare_async.client as flare
from flare_async.cli import cell_from_kit, edge_client_from_kit
from flare_async.fl import FLModel, FLServer, fedbuff
from flare_async.security import (
    SignatureVerifier,
    Signer,
    client_context,
    load_kit,
    server_context,
)
from flare_async.testing import wss_edge_project

RELAY = "server.r"


def tls_floor(folder: Path, site: str, seconds: float = 2.0) -> float:
    """Bare mutual-TLS connections per second (connect, handshake, close), one at a time."""
    server_ctx = server_context(load_kit(folder / RELAY))
    client_ctx = client_context(load_kit(folder / site))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)  # the client's byte: the handshake is done both ways
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"x")
        count += 1
    elapsed = time.perf_counter() - start
    stop.set()
    with socket.create_connection(("127.0.0.1", port)):
        pass
    thread.join(5)
    listener.close()
    return count / elapsed


def toward(model: FLModel, target: float) -> FLModel:
    return FLModel(params={"w": np.full_like(model.params["w"], target)}, meta={"num_samples": 1})


async def visit_loop() -> None:
    target = float(flare.get_site_name().rsplit("e", 1)[1])
    while (model := await flare.receive_async()) is not None:
        await flare.send_async(toward(model, target))


async def run_case(folder: Path, sites: list[str], versions: int, params: int) -> dict[str, Any]:
    server_kit = load_kit(folder / "server")
    server_cell = cell_from_kit(server_kit, heartbeat=None)
    server = FLServer(
        server_cell,
        sites,
        job="bench",
        verifier=SignatureVerifier.from_kit(server_kit),
        signer=Signer(server_kit),
    )
    server_cell.mount(server.handlers())
    relay = cell_from_kit(load_kit(folder / RELAY), heartbeat=None)
    edges = [edge_client_from_kit(load_kit(folder / s), retry=0.2) for s in sites]
    async with server_cell, relay:
        await relay.wait_parent()
        async with anyio.create_task_group() as tg:
            for e in edges:
                tg.start_soon(lambda e=e: e.run_script(visit_loop, in_loop=True))
            start = time.perf_counter()
            out = await fedbuff(
                server,
                {"w": np.zeros(params, np.float32)},
                updates=versions,
                buffer=max(1, len(sites) // 4),
                concurrency=max(1, len(sites) // 2),
                deadline=120,
                retry_after=0.2,
                pull=True,
            )
            elapsed = time.perf_counter() - start
            await server.stop_clients()
    stats = out.meta["fedbuff"]
    visits = sum(e.edge.visits for e in edges)
    assert stats.version == versions, stats
    assert all(e.edge.offline == 0 for e in edges), [e.edge for e in edges]
    return {
        "visits_per_s": visits / elapsed,
        "updates_per_s": sum(stats.updates.values()) / elapsed,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "visits": visits,
        "seconds": elapsed,
    }


def main() -> None:
    p = parser(__doc__.split("\n\n", 1)[0])
    p.add_argument("--edges", type=csv_ints, default=None, help="edge clients per case")
    p.add_argument("--versions", type=int, default=40, help="model versions per run")
    p.add_argument("--params", type=int, default=1000, help="float32 values in the model")
    args = p.parse_args()
    edges_list = args.edges or ([20] if args.quick else [20, 100])
    versions = 10 if args.quick and args.versions == 40 else args.versions
    for edges in edges_list:
        case = f"fedbuff-pull-{edges}edge-wss"
        with tempfile.TemporaryDirectory() as tmp:
            sites = [f"{RELAY}.e{i}" for i in range(edges)]
            folder = wss_edge_project(Path(tmp), RELAY, sites, "edgebench")
            runs = []
            for i in range(args.repeat):
                floor = tls_floor(folder, sites[0], 1.0 if args.quick else 2.0)
                # Kit cells write their link events to stdout: keep it for the measurements.
                with contextlib.redirect_stdout(sys.stderr):
                    out = anyio.run(run_case, folder, sites, versions, args.params)
                out["floor"] = floor
                log(
                    f"{case} run {i + 1}/{args.repeat}: {out['visits']} visits in "
                    f"{out['seconds']:.1f} s, {out['visits_per_s']:.0f} visits/s (bare TLS "
                    f"{floor:.0f}/s), {out['updates_per_s']:.1f} updates/s"
                )
                runs.append(out)
        emit(
            "edge",
            case,
            "visits_per_s",
            median([r["visits_per_s"] for r in runs]),
            "visits/s",
            median([r["floor"] for r in runs]),
        )
        emit("edge", case, "updates_per_s", median([r["updates_per_s"] for r in runs]), "1/s")
        emit("edge", case, "peak_rss", max(r["peak_rss"] for r in runs), "B")


if __name__ == "__main__":
    main()
