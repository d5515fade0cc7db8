"""Secure aggregation overhead per round, for 10 and 100 clients.

Cases ``secagg-<n>clients``: one round of :mod:`flare_async.fl._secagg` (keys, shares,
masked inputs, unmasking; threshold n // 2 + 1, no dropouts; and ``-drop10pct`` with a tenth of
the clients dropping after sharing their keys) on vectors of ``--size`` float values (default
100,000; ``--quick``: 10,000), every party in this process, one after another:

- ``client_seconds``: the mean time one client spends in its steps (what each site pays);
- ``server_seconds``: the server's time (routing, summing, reconstructing, unmasking);
- baseline of both: the plain round's cost measured in the same run (fixed-point encoding per
  client; the server's sum of the encoded vectors), so ``ratio`` is the overhead factor.

The ring is ``--bits`` wide (64, the default, ``uint64``; or 32, ``uint32``): the cases of a
32-bit run are named ``...-32bit``.

Run: ``python benchmarks/secagg.py [--quick] [--repeat N] [--size N] [--bits 32|64]``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from _report import emit, log, median, parser

from flare_async.fl._secagg import SecAggClient, SecAggServer, encode, ring

SCALE = 2.0**16


def plain(xs: dict[int, np.ndarray], bits: int) -> tuple[float, float]:
    start = time.perf_counter()
    encoded = {cid: encode(x, SCALE, bits) for cid, x in xs.items()}
    client = (time.perf_counter() - start) / len(xs)
    start = time.perf_counter()
    total = np.zeros(next(iter(xs.values())).size, ring(bits))
    for y in encoded.values():
        total += y
    return client, time.perf_counter() - start


def secure(xs: dict[int, np.ndarray], dropped: set[int], bits: int) -> tuple[float, float]:
    n = next(iter(xs.values())).size
    threshold = len(xs) // 2 + 1
    client_time = 0.0
    t: dict[str, Any] = {}

    def timed(fn: Any, *args: Any) -> Any:
        nonlocal client_time
        start = time.perf_counter()
        out = fn(*args)
        client_time += time.perf_counter() - start
        return out

    clients = {cid: timed(SecAggClient, cid, n, bits) for cid in xs}
    server = SecAggServer(n, threshold, bits)
    advertised = {cid: timed(c.advertise) for cid, c in clients.items()}
    start = time.perf_counter()
    keys = server.collect_keys(advertised)
    t["server"] = time.perf_counter() - start
    sent = {cid: timed(c.share_keys, keys, threshold) for cid, c in clients.items()}
    start = time.perf_counter()
    routed = server.route_shares(sent)
    t["server"] += time.perf_counter() - start
    for cid, c in clients.items():
        if cid in dropped:
            continue
        y = timed(c.masked_input, encode(xs[cid], SCALE, bits), routed[cid])
        start = time.perf_counter()
        server.add_input(cid, y)
        t["server"] += time.perf_counter() - start
    u3 = server.survivors()
    revealed = {cid: timed(clients[cid].unmask, u3) for cid in u3}
    start = time.perf_counter()
    server.finish(revealed)
    t["server"] += time.perf_counter() - start
    return client_time / len(xs), t["server"]


def main() -> None:
    p = parser(__doc__.split("\n\n", 1)[0])
    p.add_argument("--size", type=int, default=None, help="values per vector")
    p.add_argument("--bits", type=int, choices=(32, 64), default=64, help="the ring's width")
    args = p.parse_args()
    tag = "" if args.bits == 64 else f"-{args.bits}bit"
    size = args.size or (10_000 if args.quick else 100_000)
    rng = np.random.default_rng(0)
    for n in (10, 100):
        xs = {cid: rng.normal(0, 1, size) for cid in range(1, n + 1)}
        base = [plain(xs, args.bits) for _ in range(args.repeat)]
        base_client, base_server = median([b[0] for b in base]), median([b[1] for b in base])
        for suffix, dropped in (("", set()), ("-drop10pct", set(range(1, n + 1, 10)))):
            runs = [secure(xs, dropped, args.bits) for _ in range(args.repeat)]
            client, server = median([r[0] for r in runs]), median([r[1] for r in runs])
            case = f"secagg-{n}clients{suffix}{tag}"
            emit("secagg", case, "client_seconds", client, "s", base_client)
            emit("secagg", case, "server_seconds", server, "s", base_server)
            log(
                f"{case}: client {client * 1e3:.1f} ms, server {server * 1e3:.1f} ms, {size} values"
            )


if __name__ == "__main__":
    main()
