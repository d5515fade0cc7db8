"""A site's own policy: who may run jobs on it, which code, and the privacy filters it forces on
everything it sends, whatever the job asks.

The policy is ``policy.toml`` in the site's kit folder (optional; no file means no extra
restriction)::

    [jobs]
    submitters = ["alice@example.org"]      # admins whose jobs may run here ("*": any)
    scripts = ["examples.*", "ours.train:*"] # training scripts allowed (fnmatch on MODULE:FN)
    custom_code = true                      # jobs may bring their own code (job export/submit)
    code_from = ["alice@example.org"]       # ... signed by these admins only ("*": any)
    packages = ["examples", "lab_*"]        # ... holding only these top-level names (fnmatch)

    [accept]                                # who may send what here: "channel/topic" pattern
    "job/*" = ["server"]                    # -> origins (fnmatch); the first matching
    "files/*" = []                          # pattern decides; no pattern: accepted

    [privacy]
    exclude = ["^head\\\\.", "bias$"]        # tensors (regex on the name) never shared: the
                                            # received value goes back instead
    codec = "q8"                            # results always quantized so (fp16, bf16, q8, nf4)

    [privacy.dp]                            # Gaussian differential privacy on each update
    clip = 1.0                              # the update's L2 norm is clipped to this
    noise_multiplier = 1.1                  # noise std = noise_multiplier * clip
    delta = 1e-5

    [privacy.percentile]                    # share only the largest changes
    percentile = 90                         # changes below this percentile of |change| -> 0
    gamma = 0.01                            # the others clipped to [-gamma, gamma]

Filters work on the update (what the site's training changed: the sent model minus the received
one, or the DIFF as sent), in this order: exclusion, percentile, DP; then the result is sent
in the policy's codec. The DP guarantee is reported per round and in total as (epsilon, delta)
from Renyi-DP accounting of the Gaussian mechanism (no subsampling amplification claimed),
in the result's metrics (``dp_epsilon``, ``dp_epsilon_total``, ``dp_delta``) and the site's
audit log.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flare_async.errors import ConfigError
from flare_async.fl._model import FLModel, ParamsType

_ORDERS = (1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 128, 256)


@dataclass(frozen=True)
class DPConfig:
    clip: float
    noise_multiplier: float
    delta: float = 1e-5


@dataclass(frozen=True)
class PercentileConfig:
    percentile: float
    gamma: float


@dataclass(frozen=True)
class SitePolicy:
    """A site's policy (see the module text); the default allows everything, filters nothing."""

    submitters: tuple[str, ...] = ("*",)
    scripts: tuple[str, ...] = ("*",)
    custom_code: bool = True
    code_from: tuple[str, ...] = ("*",)
    packages: tuple[str, ...] = ("*",)
    accept_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    exclude: tuple[str, ...] = ()
    codec: str | None = None
    dp: DPConfig | None = None
    percentile: PercentileConfig | None = None
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @property
    def filters(self) -> bool:
        return bool(self.exclude or self.dp or self.percentile)

    def may_submit(self, admin: str) -> bool:
        return "*" in self.submitters or admin in self.submitters

    def may_run(self, script: str) -> bool:
        return any(fnmatch.fnmatchcase(script, p) for p in self.scripts)

    def refuses_code(self, admin: str, packages: list[str]) -> str | None:
        """Why a job's own code (signed by ``admin``, shipping these top-level names) may not
        run here, or ``None`` when it may."""
        if not self.custom_code:
            return "this site runs no code shipped with a job (custom_code = false)"
        own = {p.split(":")[0].split(".")[0] for p in self.scripts} - {"*"}
        taken = sorted(own & set(packages))
        if taken:  # the site's own scripts live there: shipped code may not stand in for them
            return f"shipped code may not bring {taken[0]!r}, the package of this site's scripts"
        if "*" not in self.code_from and admin not in self.code_from:
            return f"this site runs no code shipped by {admin!r}"
        for name in packages:
            if not any(fnmatch.fnmatchcase(name, p) for p in self.packages):
                return (
                    f"this site runs no shipped package {name!r} (allowed: {list(self.packages)})"
                )
        return None

    def accepts(self, src: str, channel: str, topic: str) -> bool:
        """Whether ``src`` may send ``channel/topic`` here (the first matching rule)."""
        address = f"{channel}/{topic}"
        for pattern, origins in self.accept_rules:
            if fnmatch.fnmatchcase(address, pattern):
                return any(fnmatch.fnmatchcase(src, o) for o in origins)
        return True

    def excluded(self, name: str) -> bool:
        return any(p.search(name) for p in self._patterns)


def load_policy(path: str | Path) -> SitePolicy:
    """The policy in ``path`` (a missing file: the default policy).

    Raises:
        ConfigError: not TOML, unknown keys, or values out of range.
    """
    p = Path(path)
    if not p.exists():
        return SitePolicy()
    try:
        doc = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return policy_from_dict(doc, str(p))


def policy_from_dict(doc: Mapping[str, Any], where: str = "policy") -> SitePolicy:
    """Build and check a :class:`SitePolicy` from parsed TOML."""
    unknown = set(doc) - {"jobs", "privacy", "accept"}
    jobs, privacy = dict(doc.get("jobs", {})), dict(doc.get("privacy", {}))
    job_keys = {"submitters", "scripts", "custom_code", "code_from", "packages"}
    unknown |= {f"jobs.{k}" for k in set(jobs) - job_keys}
    unknown |= {f"privacy.{k}" for k in set(privacy) - {"exclude", "codec", "dp", "percentile"}}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        patterns = tuple(re.compile(str(x)) for x in privacy.get("exclude", []))
        dp = privacy.get("dp")
        dp_config = (
            DPConfig(float(dp["clip"]), float(dp["noise_multiplier"]), float(dp.get("delta", 1e-5)))
            if dp is not None
            else None
        )
        pc = privacy.get("percentile")
        pc_config = (
            PercentileConfig(float(pc["percentile"]), float(pc["gamma"]))
            if pc is not None
            else None
        )
    except (re.error, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from None
    if dp_config is not None and not (
        dp_config.clip > 0 and dp_config.noise_multiplier > 0 and 0 < dp_config.delta < 1
    ):
        raise ConfigError(f"{where}: dp needs clip > 0, noise_multiplier > 0, 0 < delta < 1")
    if pc_config is not None and not (0 <= pc_config.percentile < 100 and pc_config.gamma > 0):
        raise ConfigError(f"{where}: percentile needs 0 <= percentile < 100 and gamma > 0")
    custom_code = jobs.get("custom_code", True)
    if not isinstance(custom_code, bool):
        raise ConfigError(f"{where}: jobs.custom_code is true or false, not {custom_code!r:.40}")
    for key in ("submitters", "scripts", "code_from", "packages"):
        value = jobs.get(key, [])
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where}: jobs.{key} is a list of strings")
    accept = doc.get("accept", {})
    if not isinstance(accept, dict) or not all(isinstance(v, list) for v in accept.values()):
        raise ConfigError(f"{where}: [accept] maps 'channel/topic' patterns to lists of origins")
    return SitePolicy(
        accept_rules=tuple((str(k), tuple(str(o) for o in v)) for k, v in accept.items()),
        submitters=tuple(str(x) for x in jobs.get("submitters", ["*"])),
        scripts=tuple(str(x) for x in jobs.get("scripts", ["*"])),
        custom_code=custom_code,
        code_from=tuple(jobs.get("code_from", ["*"])),
        packages=tuple(jobs.get("packages", ["*"])),
        exclude=tuple(p.pattern for p in patterns),
        codec=str(privacy["codec"]) if "codec" in privacy else None,
        dp=dp_config,
        percentile=pc_config,
        _patterns=patterns,
    )


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, ``delta``)-DP of ``rounds`` Gaussian mechanisms of this noise multiplier
    (sensitivity = the clip), from Renyi DP: each round is (a, a / (2 s^2))-RDP; they add up;
    epsilon = min over a of rounds * a / (2 s^2) + log(1 / delta) / (a - 1)."""
    if rounds <= 0:
        return 0.0
    s2 = noise_multiplier**2
    return min(rounds * a / (2 * s2) + math.log(1 / delta) / (a - 1) for a in _ORDERS)


class PrivacyFilter:
    """Applies a site's privacy filters to its results, one job at a time (it counts the
    rounds for the DP total)."""

    def __init__(self, policy: SitePolicy, *, seed: int | None = None) -> None:
        self.policy = policy
        self.rounds = 0
        self._rng = np.random.default_rng(seed)

    def apply(self, sent: FLModel, received: Mapping[str, Any]) -> FLModel:
        """The result as the site lets it go. ``received`` is the model the task brought."""
        policy = self.policy
        if not policy.filters:
            return sent
        diff = sent.params_type is ParamsType.DIFF
        update: dict[str, np.ndarray] = {}
        for name, value in sent.params.items():
            v = np.asarray(value)
            base = np.asarray(received[name]) if not diff and name in received else None
            if base is not None and base.shape != v.shape:
                base = None
            if policy.excluded(name):
                update[name] = np.zeros(v.shape, np.float64)
                continue
            delta = v.astype(np.float64) - (base if base is not None else 0.0)
            update[name] = delta
        # Noise and thresholds apply to float tensors; counters and other integers go as sent.
        floats = [
            n
            for n, v in sent.params.items()
            if np.asarray(v).dtype.kind == "f" and not policy.excluded(n)
        ]
        if policy.percentile is not None:
            _percentile(update, floats, policy.percentile)
        metrics = dict(sent.metrics)
        if policy.dp is not None:
            self.rounds += 1
            _gaussian(update, floats, policy.dp, self._rng)
            metrics["dp_epsilon"] = gaussian_epsilon(policy.dp.noise_multiplier, 1, policy.dp.delta)
            metrics["dp_epsilon_total"] = gaussian_epsilon(
                policy.dp.noise_multiplier, self.rounds, policy.dp.delta
            )
            metrics["dp_delta"] = policy.dp.delta
        params: dict[str, np.ndarray] = {}
        for name, value in sent.params.items():
            v = np.asarray(value)
            out = update[name]
            if not diff and name in received and np.asarray(received[name]).shape == v.shape:
                out = out + np.asarray(received[name])
            params[name] = (
                np.rint(out).astype(v.dtype) if v.dtype.kind in "iub" else out.astype(v.dtype)
            )
        return FLModel(
            params=params,
            params_type=sent.params_type,
            metrics=metrics,
            meta=sent.meta,
            current_round=sent.current_round,
            total_rounds=sent.total_rounds,
        )


def _percentile(update: dict[str, np.ndarray], names: list[str], config: PercentileConfig) -> None:
    if not names:
        return
    magnitudes = np.concatenate([np.abs(update[n]).ravel() for n in names])
    cut = float(np.percentile(magnitudes, config.percentile)) if magnitudes.size else 0.0
    for n in names:
        v = update[n]
        v[np.abs(v) < cut] = 0.0
        np.clip(v, -config.gamma, config.gamma, out=v)


def _gaussian(
    update: dict[str, np.ndarray], names: list[str], config: DPConfig, rng: np.random.Generator
) -> None:
    norm = math.sqrt(sum(float(np.sum(update[n] ** 2)) for n in names))
    scale = min(1.0, config.clip / norm) if norm > 0 else 1.0
    std = config.noise_multiplier * config.clip
    for n in names:
        v = update[n]
        v *= scale
        v += rng.normal(0.0, std, size=v.shape)


__all__ = [
    "DPConfig",
    "PercentileConfig",
    "PrivacyFilter",
    "SitePolicy",
    "gaussian_epsilon",
    "load_policy",
    "policy_from_dict",
]
