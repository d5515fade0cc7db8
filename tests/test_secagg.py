"""Secure aggregation: the server gets the plain sum, no single input, and survives dropouts."""

from __future__ import annotations

import numpy as np
import pytest

from flare_async.fl._secagg import (
    SecAggClient,
    SecAggError,
    SecAggServer,
    decode,
    encode,
    reconstruct,
    share,
)

SCALE = 2.0**16


def run_round(
    xs: dict[int, np.ndarray],
    threshold: int,
    *,
    drop_before_input: tuple[int, ...] = (),
    drop_before_unmask: tuple[int, ...] = (),
    relay_groups: int = 1,
) -> tuple[np.ndarray, SecAggServer, dict[int, np.ndarray]]:
    n = next(iter(xs.values())).size
    clients = {cid: SecAggClient(cid, n) for cid in xs}
    server = SecAggServer(n, threshold)
    keys = server.collect_keys({cid: c.advertise() for cid, c in clients.items()})
    routed = server.route_shares({cid: c.share_keys(keys, threshold) for cid, c in clients.items()})
    seen: dict[int, np.ndarray] = {}
    senders = [cid for cid in clients if cid not in drop_before_input]
    # Relays may add their subtree's masked inputs first: the server adds up partial sums.
    for g in range(relay_groups):
        for cid in senders[g::relay_groups]:
            y = clients[cid].masked_input(encode(xs[cid], SCALE), routed[cid])
            seen[cid] = y
            server.add_input(cid, y)
    u3 = server.survivors()
    revealed = {cid: clients[cid].unmask(u3) for cid in u3 if cid not in drop_before_unmask}
    return server.finish(revealed), server, seen


def inputs(n_clients: int, size: int = 1000) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(7)
    return {cid: rng.normal(0, 1, size) for cid in range(1, n_clients + 1)}


def test_shamir_needs_the_threshold() -> None:
    secret = 123456789 << 200
    shares = share(secret, list(range(1, 8)), 4)
    assert reconstruct({k: shares[k] for k in (1, 3, 5, 7)}) == secret
    assert reconstruct({k: shares[k] for k in (2, 3, 4)}) != secret  # three say nothing


def test_the_server_gets_the_plain_sum_and_no_single_input() -> None:
    xs = inputs(10)
    total, _, seen = run_round(xs, threshold=6)
    plain = sum(xs.values())
    assert np.allclose(decode(total, SCALE), plain, atol=10 / SCALE)
    for cid, y in seen.items():
        # What the server saw of one client is uniform noise, unrelated to its input.
        ours = encode(xs[cid], SCALE)
        assert np.mean(y == ours) < 0.01
        assert abs(np.corrcoef(decode(y, SCALE), xs[cid])[0, 1]) < 0.1
        assert 0.4 < np.mean(y >= 2**31) < 0.6


def test_a_minority_dropping_mid_round_still_gives_the_sum_of_the_rest() -> None:
    xs = inputs(10)
    total, _, _ = run_round(xs, threshold=6, drop_before_input=(2, 5, 9))
    rest = sum(x for cid, x in xs.items() if cid not in (2, 5, 9))
    assert np.allclose(decode(total, SCALE), rest, atol=10 / SCALE)
    # ... and when some of those who sent their input do not help unmask
    total, _, _ = run_round(xs, threshold=6, drop_before_input=(2,), drop_before_unmask=(4, 7))
    rest = sum(x for cid, x in xs.items() if cid != 2)
    assert np.allclose(decode(total, SCALE), rest, atol=10 / SCALE)


def test_relays_may_add_masked_inputs_of_their_subtree() -> None:
    xs = inputs(9)
    total, _, _ = run_round(xs, threshold=5, relay_groups=3, drop_before_input=(8,))
    rest = sum(x for cid, x in xs.items() if cid != 8)
    assert np.allclose(decode(total, SCALE), rest, atol=10 / SCALE)


def test_too_many_dropouts_fail_by_name() -> None:
    xs = inputs(6)
    with pytest.raises(SecAggError, match="needed"):
        run_round(xs, threshold=4, drop_before_input=(1, 2, 3))
    with pytest.raises(SecAggError, match="helped unmask"):
        run_round(xs, threshold=4, drop_before_unmask=(1, 2, 3))


def test_a_client_reveals_one_secret_per_peer_never_both() -> None:
    xs = inputs(5, 10)
    clients = {cid: SecAggClient(cid, 10) for cid in xs}
    server = SecAggServer(10, 3)
    keys = server.collect_keys({c: k.advertise() for c, k in clients.items()})
    routed = server.route_shares({c: k.share_keys(keys, 3) for c, k in clients.items()})
    for cid in (1, 2, 3, 4):
        server.add_input(cid, clients[cid].masked_input(encode(xs[cid], SCALE), routed[cid]))
    answer = clients[1].unmask(server.survivors())
    assert answer[5][0] == "s"  # 5 dropped: its masking key, not its self-mask seed
    assert all(kind == "b" for v, (kind, _) in answer.items() if v != 5)
    with pytest.raises(SecAggError):
        server.add_input(1, np.zeros(10, np.uint32))  # one input per client
