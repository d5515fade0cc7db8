"""Secure aggregation: the server gets the plain sum, no single input, and survives dropouts."""

from __future__ import annotations

import numpy as np
import pytest

from flare_async.fl._secagg import (
    SecAggClient,
    SecAggError,
    SecAggRangeError,
    SecAggServer,
    check_range,
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
        assert 0.4 < np.mean(y >= 2**63) < 0.6


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


# ------------------------------------------------------------------ the ring's range
def test_the_bound_admits_exactly_the_sites_that_cannot_wrap() -> None:
    # Defaults: n * 2^20 * 2^10 * 2^16 (plus margins) < 2^63: 2^17 - 1 sites, not 2^17.
    check_range(2**17 - 1, 2.0**20, 2.0**10, 2.0**16, 64)
    with pytest.raises(SecAggRangeError, match="at most 131071 site"):
        check_range(2**17, 2.0**20, 2.0**10, 2.0**16, 64)
    # 32 bits, weight 1, clip 1 (the weight entry alone: max(clip, 1)), scale 2^16: 2^15 - 1.
    check_range(2**15 - 1, 1.0, 0.5, 2.0**16, 32)
    with pytest.raises(SecAggRangeError, match="32-bit"):
        check_range(2**15, 1.0, 0.5, 2.0**16, 32)
    # What the tester's jobs declared on the old ring: 4 x 20,000 samples at scale 2^16.
    with pytest.raises(SecAggRangeError):
        check_range(4, 20_000, 1.0, 2.0**16, 32)
    check_range(4, 20_000, 1.0, 2.0**16, 64)
    for bad in ({"bits": 16}, {"clip": 0.0}, {"scale": float("inf")}, {"max_weight": -1.0}):
        args = {"sites": 1, "max_weight": 1.0, "clip": 1.0, "scale": 2.0, "bits": 64, **bad}
        with pytest.raises(SecAggRangeError):
            check_range(**args)  # type: ignore[arg-type]


def test_encode_refuses_what_it_cannot_hold_instead_of_wrapping() -> None:
    assert decode(encode(np.array([-3.0, 3.0]), 2.0, limit=3.0), 2.0).tolist() == [-3.0, 3.0]
    with pytest.raises(SecAggRangeError, match="a value beyond the declared 3"):
        encode(np.array([0.0, -3.5]), 2.0, limit=3.0)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(SecAggRangeError, match="not finite"):
            encode(np.array([1.0, bad]), 2.0)
    for beyond in (2.0**15, -(2.0**15)):  # +-2^31: the range is symmetric, as in the bound
        with pytest.raises(SecAggRangeError, match="2\\^31"):
            encode(np.array([beyond]), 2.0**16, 32)
    top = 2.0**15 - 2.0**-16  # 2^31 - 1 in fixed point: the largest value that fits
    assert decode(encode(np.array([-top, top]), 2.0**16, 32), 2.0**16).tolist() == [-top, top]
    assert encode(np.zeros(3), 1.0, 32).dtype == np.uint32
    assert encode(np.zeros(3), 1.0).dtype == np.uint64
    with pytest.raises(SecAggError):
        decode(np.zeros(3, np.int64), 1.0)  # no ring


def edge_round(n: int, bits: int, clip: float, max_weight: float, scale: float) -> np.ndarray:
    """``n`` clients all at the edge of the range (``+-clip * max_weight``, then the weight),
    through the whole protocol, in a ring the bound says is just wide enough."""
    check_range(n, max_weight, clip, scale, bits)
    top = clip * max_weight
    x = np.array([top, -top, 0.0, max_weight])
    clients = {cid: SecAggClient(cid, 4, bits) for cid in range(1, n + 1)}
    server = SecAggServer(4, n // 2 + 1, bits)
    keys = server.collect_keys({cid: c.advertise() for cid, c in clients.items()})
    routed = server.route_shares(
        {cid: c.share_keys(keys, n // 2 + 1) for cid, c in clients.items()}
    )
    for cid, c in clients.items():
        server.add_input(cid, c.masked_input(encode(x, scale, bits, limit=top), routed[cid]))
    u3 = server.survivors()
    total = decode(server.finish({cid: clients[cid].unmask(u3) for cid in u3}), scale)
    assert total.tolist() == (n * x).tolist()
    # One more such client would not fit: refused, where the plain sum would wrap.
    with pytest.raises(SecAggRangeError):
        check_range(n + 1, max_weight, clip, scale, bits)
    wrapped = sum(encode(x, scale, bits).astype(np.uint64) for _ in range(n + 1))
    assert decode(wrapped.astype(encode(x, scale, bits).dtype), scale)[0] != (n + 1) * x[0]
    return total


def test_values_exactly_at_the_clip_and_max_weight_sum_exactly_at_the_edge() -> None:
    # 32 bits, clip 4, scale 2^8: n * W * 1024 < 2^31 -> W = 2^21 // n - 1 for n = 3 ...
    edge_round(3, 32, 4.0, float(2**31 // (3 * 1024) - 1), 2.0**8)
    # ... one client alone (W * 2^8 * 4 just under 2^31) ...
    edge_round(1, 32, 4.0, float(2**21 - 1), 2.0**8)
    # ... and many: 30 clients in a 64-bit ring, clip 2^10, scale 2^16.
    edge_round(30, 64, 2.0**10, float(2**37 // 30 - 1), 2.0**16)


def test_a_32_bit_ring_still_masks_and_sums() -> None:
    xs = inputs(5, 100)
    clients = {cid: SecAggClient(cid, 100, 32) for cid in xs}
    server = SecAggServer(100, 3, 32)
    keys = server.collect_keys({c: k.advertise() for c, k in clients.items()})
    routed = server.route_shares({c: k.share_keys(keys, 3) for c, k in clients.items()})
    # A vector of another ring is refused, not cast (a cast would wrap or narrow it).
    with pytest.raises(SecAggError, match="uint64 vector in a uint32 ring"):
        server.add_sum([1, 2], np.zeros(100, np.uint64))
    with pytest.raises(SecAggError, match="uint64 vector in a uint32 ring"):
        clients[1].masked_input(np.zeros(100, np.uint64), routed[1])
    for cid, c in clients.items():
        y = c.masked_input(encode(xs[cid], SCALE, 32), routed[cid])
        assert y.dtype == np.uint32
        server.add_input(cid, y)
    u3 = server.survivors()
    total = server.finish({cid: clients[cid].unmask(u3) for cid in u3})
    assert np.allclose(decode(total, SCALE), sum(xs.values()), atol=5 / SCALE)
