"""A site's policy: parsing, and what each privacy filter does to an update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flare_async.errors import ConfigError
from flare_async.fl import FLModel, ParamsType
from flare_async.fl._privacy import PrivacyFilter, gaussian_epsilon, load_policy, policy_from_dict

RECEIVED = {"w": np.zeros(1000), "head.w": np.full(4, 7.0), "steps": np.zeros(2, np.int64)}


def sent(delta: float = 0.1) -> FLModel:
    return FLModel(
        params={
            "w": np.linspace(-1, 1, 1000) * delta,
            "head.w": np.full(4, 9.0),
            "steps": np.array([3, 4]),
        },
        metrics={"loss": 0.5},
    )


def test_a_policy_file_is_read_and_checked(tmp_path: Path) -> None:
    assert load_policy(tmp_path / "none.toml").filters is False  # no file: no restriction
    path = tmp_path / "policy.toml"
    path.write_text(
        """
[jobs]
submitters = ["alice"]
scripts = ["examples.*"]
[privacy]
exclude = ['^head\\.']
codec = "q8"
[privacy.dp]
clip = 1.0
noise_multiplier = 1.1
"""
    )
    policy = load_policy(path)
    assert policy.may_submit("alice")
    assert not policy.may_submit("mallory")
    assert policy.may_run("examples.fedavg_digits:train")
    assert not policy.may_run("evil:exfiltrate")
    assert policy.excluded("head.w")
    assert not policy.excluded("w")
    assert policy.codec == "q8"
    for bad in (
        {"privacy": {"dp": {"clip": 0, "noise_multiplier": 1}}},
        {"privacy": {"dp": {"clip": 1}}},
        {"privacy": {"percentile": {"percentile": 100, "gamma": 1}}},
        {"privacy": {"exclude": ["("]}},
        {"privacy": {"noise": 1}},
        {"jobz": {}},
    ):
        with pytest.raises(ConfigError):
            policy_from_dict(bad)


def test_the_dp_guarantee_composes_over_rounds() -> None:
    one = gaussian_epsilon(1.1, 1, 1e-5)
    ten = gaussian_epsilon(1.1, 10, 1e-5)
    assert 4.0 < one < 6.0
    assert one < ten < 10 * one  # Renyi composition beats adding epsilons
    assert gaussian_epsilon(2.2, 10, 1e-5) < ten  # more noise, less epsilon
    assert gaussian_epsilon(1.1, 0, 1e-5) == 0.0


def test_exclusion_sends_back_what_was_received() -> None:
    f = PrivacyFilter(policy_from_dict({"privacy": {"exclude": ["^head\\."]}}))
    out = f.apply(sent(), RECEIVED)
    assert np.array_equal(out.params["head.w"], RECEIVED["head.w"])
    assert np.allclose(out.params["w"], sent().params["w"])
    assert out.params["steps"].dtype == np.int64


def test_dp_clips_the_update_and_adds_calibrated_noise() -> None:
    policy = policy_from_dict({"privacy": {"dp": {"clip": 0.5, "noise_multiplier": 1e-6}}})
    out = PrivacyFilter(policy, seed=1).apply(sent(delta=1.0), RECEIVED)
    update = np.concatenate([(out.params[k] - RECEIVED[k]).ravel() for k in ("w", "head.w")])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-3)  # clipped to the bound
    noisy = PrivacyFilter(
        policy_from_dict({"privacy": {"dp": {"clip": 0.5, "noise_multiplier": 2.0}}}), seed=2
    ).apply(sent(delta=0.0), RECEIVED)
    noise = noisy.params["w"] - RECEIVED["w"]
    assert np.std(noise) == pytest.approx(1.0, rel=0.1)  # noise_multiplier * clip
    assert out.metrics["loss"] == 0.5
    assert out.metrics["dp_epsilon"] > 0
    assert out.metrics["dp_delta"] == 1e-5


def test_percentile_privacy_shares_only_the_largest_changes_clipped() -> None:
    policy = policy_from_dict({"privacy": {"percentile": {"percentile": 90, "gamma": 0.05}}})
    out = PrivacyFilter(policy).apply(sent(delta=0.1), RECEIVED)
    change = out.params["w"] - RECEIVED["w"]
    assert np.mean(change != 0) <= 0.11
    assert np.abs(change).max() <= 0.05 + 1e-12


def test_diff_updates_are_filtered_as_they_are() -> None:
    policy = policy_from_dict({"privacy": {"dp": {"clip": 0.1, "noise_multiplier": 1e-6}}})
    diff = FLModel(params={"w": np.full(100, 1.0)}, params_type=ParamsType.DIFF)
    out = PrivacyFilter(policy).apply(diff, {"w": np.full(100, 50.0)})
    assert np.linalg.norm(out.params["w"]) == pytest.approx(0.1, rel=1e-3)


def test_accept_rules_the_first_matching_pattern_decides() -> None:
    policy = policy_from_dict(
        {"accept": {"job/*": ["server"], "fl/task": ["server", "server.relay-*"], "files/*": []}}
    )
    assert policy.accepts("server", "job", "start")
    assert not policy.accepts("server.relay-1", "job", "start")
    assert policy.accepts("server.relay-2", "fl", "task")
    assert not policy.accepts("server", "files", "put")  # nobody
    assert policy.accepts("anyone", "sys", "ping")  # no rule: accepted
    with pytest.raises(ConfigError):
        policy_from_dict({"accept": {"job/*": "server"}})
