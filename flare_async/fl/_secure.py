"""Secure aggregation in FL rounds: the server learns the weighted sum of the results and
nothing about any one of them (the protocol: :mod:`flare_async.fl._secagg`).

``await secure_round(server, model, targets, config=SecureAggregation(...))`` runs one round in
four exchanges on the ``fl/secagg`` request topic (keys, shares, ciphertexts, then the usual
task and result streams, then unmasking). Each site turns its result into one vector: every
tensor times the site's weight (``num_samples``), flattened in name order, then the job's
declared metrics (each as ``weight * value`` and ``weight``), then the weight itself; encodes it
in fixed point and masks it. The server folds masked vectors as they arrive (one running sum in
the ring), unmasks the total once enough sites answered, and hands the workflow an ordinary
:class:`RoundResult` whose ``sum`` is the weighted sum: ``fedavg_step`` works as usual. A
site's privacy filters (its policy) run before masking. With relay aggregation
(``FLServer(hierarchical=True)``) each relay adds up its sites' masked vectors (mod 2^bits) and
sends one sum up: the masks still cancel, and the relay learns nothing either. Sites that drop
after the keys are out, and the round still completes while at least ``threshold`` remain.

The range (:class:`SecureAggregation`). The job declares a clip ``C`` (every value a site
sends, and every declared metric, is within ``+-C``), a maximum weight ``W`` (``num_samples``),
the fixed-point ``scale`` and the ring's ``bits``. Before it asks any site anything the server
checks, for the ``n`` sites of the round, ``n * (W * max(C, 1) * scale * (1 + 2^-50) + 1/2) <
2^(bits-1)`` (:func:`~flare_async.fl._secagg.check_range`) and refuses the round with
:class:`SecAggRangeError` if it does not hold: then no sum of the sites' entries can wrap.
A site refuses to encode a value beyond the clip (or not finite), or a weight beyond ``W``
(or negative): it answers the task with a refusal instead of a vector, and the server counts
that site as failed with the reason (with ``clamp``, values are clipped to ``+-C`` instead).
The error of the weighted mean is at most ``n / (2 * scale * total weight)`` per entry.

Metrics. A site's metrics are not sent in clear: the declared ``metrics`` travel inside the
masked vector (weighted by ``num_samples``; the round's ``metrics`` then hold their weighted
means under :data:`AGGREGATE`), the others are dropped; ``clear_metrics`` sends every site's
metrics in clear, as outside secure aggregation.

Why one file past 500 lines: the range check, the sites' encoding and the server's round are
one protocol whose limits must agree; kept together so they are read together.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import numpy as np

from flare_async import _logging
from flare_async.cell import Cell
from flare_async.errors import BadRequest, ConfigError, FlareError, IntegrityError
from flare_async.fl._aggregate import COUNT_KEY, WEIGHT_KEY, result_weight
from flare_async.fl._model import FLModel, ParamsType
from flare_async.fl._results import RoundFailed, RoundResult
from flare_async.fl._secagg import (
    Keys,
    SecAggClient,
    SecAggError,
    SecAggRangeError,
    SecAggServer,
    check_range,
    decode,
    encode,
)
from flare_async.fl._signed import CHANNEL
from flare_async.security import SignatureVerifier, Signer

VECTOR = "secagg.y"
REFUSED = "secagg.refused"
"""In a refusal's meta: why the site would not encode its result (a value out of range)."""
AGGREGATE = "secure aggregate"
"""The key of the declared metrics' weighted means in a secure round's ``metrics``."""


@dataclasses.dataclass(frozen=True)
class SecureAggregation:
    """A job's secure aggregation settings: the range every round must fit (module text).

    Attributes:
        clip: every value a site sends (and every declared metric) is within ``+-clip``.
        max_weight: the largest weight (``num_samples``) a site may give its result.
        scale: the fixed point: values travel as ``round(weight * value * scale)``.
        bits: the ring, 64 (``uint64``) or 32 (``uint32``: half the bytes, far less range).
        clamp: sites clip values beyond ``clip`` to it instead of refusing their result.
        metrics: metric names summed inside the masked vector (weighted means come out).
        clear_metrics: every site's metrics travel in clear beside its masked vector.

    The defaults leave room for 131,071 sites (``n * 2^20 * 2^10 * 2^16 < 2^63``).

    Raises:
        SecAggRangeError: a parameter that is not a positive number, or bits not 32 or 64.
    """

    clip: float = 2.0**10
    max_weight: float = 2.0**20
    scale: float = 2.0**16
    bits: int = 64
    clamp: bool = False
    metrics: tuple[str, ...] = ()
    clear_metrics: bool = False

    def __post_init__(self) -> None:
        names: Any = self.metrics  # a list, from JSON
        if isinstance(names, str) or not all(isinstance(m, str) for m in names):
            raise ConfigError(f"metrics are a list of names, not {names!r}")
        object.__setattr__(self, "metrics", tuple(names))
        self.check(1)

    def check(self, sites: int) -> None:
        """Refuse a round of ``sites`` sites whose sum could wrap.

        Raises:
            SecAggRangeError: ``sites * max_weight * max(clip, 1) * scale`` (and the rounding
                margin) does not fit ``bits - 1`` bits.
        """
        check_range(sites, self.max_weight, self.clip, self.scale, self.bits)

    def size(self, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> int:
        """The masked vector's length for a model of ``shapes``."""
        return sum(math.prod(s) for _, s in shapes) + 2 * len(self.metrics) + 1

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "metrics": list(self.metrics)}

    @classmethod
    def of(cls, value: Any) -> SecureAggregation | None:
        """Settings from what a job gives: ``False``/``None`` (off), ``True`` (the defaults),
        settings, or a mapping of their fields (a submission's override).

        Raises:
            ConfigError: an unknown field or a value of another kind.
            SecAggRangeError: see the class.
        """
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ConfigError(f"unknown secure aggregation settings {unknown}: {sorted(names)}")
            return cls(**value)
        raise ConfigError(f"secure is True, False or SecureAggregation(...), not {value!r}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def layout(params: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes, in the order they are flattened."""
    return [(name, tuple(np.shape(params[name]))) for name in sorted(params)]


def _within(value: np.ndarray, what: str, config: SecureAggregation) -> np.ndarray:
    """``value`` if every entry is within the clip (clipped to it with ``clamp``). The refusal
    names no value: it goes to the server, which must learn nothing of one site's result."""
    top = float(np.max(np.abs(value))) if value.size else 0.0
    if not math.isfinite(top):
        raise SecAggRangeError(f"{what}: a value that is not finite (NaN or infinity)")
    if top <= config.clip:
        return value
    if config.clamp:
        clipped: np.ndarray = np.clip(value, -config.clip, config.clip)
        return clipped
    raise SecAggRangeError(f"{what}: a value beyond the declared clip {config.clip:g}")


def flatten(
    model: FLModel, shapes: list[tuple[str, tuple[int, ...]]], config: SecureAggregation
) -> np.ndarray:
    """A site's result as one fixed-point vector: ``w * x`` per tensor, ``w * m, w`` per
    declared metric (``0, 0`` if the site has none), then ``w``.

    Raises:
        SecAggRangeError: a weight beyond ``max_weight`` or negative, a value or metric beyond
            the clip (without ``clamp``), or one not finite: nothing is encoded.
    """
    try:  # num_samples, else NUM_STEPS_CURRENT_ROUND, else 1: as every aggregation weighs
        weight = result_weight(model.meta)
    except ValueError:
        weight = math.nan  # refused below, naming no value
    if not 0.0 <= weight <= config.max_weight:  # NaN fails too
        raise SecAggRangeError(
            f"a weight (num_samples or NUM_STEPS_CURRENT_ROUND) outside "
            f"0..{config.max_weight:g}, the declared max_weight"
        )
    parts = []
    for name, shape in shapes:
        value = np.asarray(model.params[name], np.float64)
        if value.shape != shape:
            raise BadRequest(f"tensor {name!r}: shape {value.shape}, expected {shape}")
        parts.append(_within(value.reshape(-1), f"tensor {name!r}", config) * weight)
    for name in config.metrics:
        if name not in model.metrics:
            parts.append(np.zeros(2))
            continue
        metric = _within(np.array([float(model.metrics[name])]), f"metric {name!r}", config)
        parts.append(np.array([metric[0] * weight, weight]))
    parts.append(np.array([weight]))
    limit = config.max_weight * max(config.clip, 1.0)
    return encode(np.concatenate(parts), config.scale, config.bits, limit=limit)


def masked_vector(update: FLModel, sid: str) -> np.ndarray:
    """The masked vector of a secure round's result (a site's or a relay's sum).

    Raises:
        ValueError: a plain result, a site's refusal (with its reason), or no ring vector.
    """
    if update.meta.get("secagg") != sid:
        raise ValueError("a plain result in a secure round")
    if REFUSED in update.meta:
        raise ValueError(f"the site refused to encode its result: {update.meta[REFUSED]}")
    if VECTOR not in update.params:
        raise ValueError("a secure round's result without its masked vector")
    y = np.asarray(update.params[VECTOR])
    if y.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"a masked vector of {y.dtype}, not of a ring")
    return y.reshape(-1)


def key_fields(site: str, sid: str, cid: int, keys: Mapping[str, Any]) -> dict[str, Any]:
    """What a site signs of its advertised keys: a server or relay that swapped a site's keys
    for its own (to read that site's masks) is caught by every other site."""
    return {
        "src": site,
        "session": sid,
        "id": cid,
        "cipher": str(keys["cipher"]),
        "mask": str(keys["mask"]),
    }


class SecureSite:
    """A site's side of secure rounds (kept by its :class:`ClientRuntime`).

    Args:
        signer: signs the keys this site advertises (its kit).
        verifier: checks the keys the other sites advertised (the project CA); with it,
            unsigned or changed keys fail the step with ``IntegrityError``.
    """

    def __init__(
        self, signer: Signer | None = None, verifier: SignatureVerifier | None = None
    ) -> None:
        self.signer = signer
        self.verifier = verifier
        self.sessions: dict[
            str, tuple[SecAggClient, SecureAggregation, list[tuple[str, tuple[int, ...]]]]
        ] = {}
        self.ciphertexts: dict[str, dict[int, bytes]] = {}

    def handle(self, body: dict[str, Any]) -> dict[str, Any]:
        """One ``fl/secagg`` request from the server."""
        sid, step = str(body["session"]), str(body["step"])
        if step == "keys":
            shapes = [(str(n), tuple(int(d) for d in s)) for n, s in body["layout"]]
            config = SecureAggregation.of(dict(body.get("secure") or {}))
            assert config is not None
            client = SecAggClient(int(body["id"]), config.size(shapes), config.bits)
            self.sessions[sid] = (client, config, shapes)
            mine = client.advertise()
            answer: dict[str, Any] = {"cipher": _b64(mine.cipher), "mask": _b64(mine.mask)}
            if self.signer is not None:
                fields = key_fields(self.signer.name, sid, client.cid, answer)
                answer["sig"] = self.signer.sign(fields)
            return answer
        client = self.sessions[sid][0]
        if step == "share":
            if self.verifier is not None:
                self._check_keys(sid, client.cid, body["keys"])
            keys = {int(cid): Keys(_unb64(k[0]), _unb64(k[1])) for cid, k in body["keys"].items()}
            sent = client.share_keys(keys, int(body["threshold"]))
            return {str(v): _b64(c) for v, c in sent.items()}
        if step == "ciphertexts":
            self.ciphertexts[sid] = {int(u): _unb64(c) for u, c in body["from"].items()}
            return {}
        if step == "unmask":
            revealed = client.unmask([int(c) for c in body["survivors"]])
            self.sessions.pop(sid, None)
            return {str(v): [kind, str(value)] for v, (kind, value) in revealed.items()}
        raise BadRequest(f"unknown secure aggregation step {step!r}")

    def _check_keys(self, sid: str, me: int, keys: Mapping[str, Sequence[Any]]) -> None:
        """Every other site's keys, as the server relays them, must carry that site's
        signature over this session, its id and the keys themselves.

        Raises:
            IntegrityError: a key unsigned, signed by another, or changed; one site twice.
        """
        assert self.verifier is not None
        now = datetime.now(UTC)
        names: set[str] = set()
        for cid, entry in keys.items():
            if int(cid) == me:
                continue
            if len(entry) < 4:
                raise IntegrityError(f"the keys of participant {cid} come without a signature")
            site = str(entry[2])
            if site in names:
                raise IntegrityError(f"{site} appears twice among the advertised keys")
            names.add(site)
            expect = key_fields(site, sid, int(cid), {"cipher": entry[0], "mask": entry[1]})
            self.verifier.verify(entry[3], src=site, expect=expect, now=now)

    def mask(self, sid: str, model: FLModel) -> FLModel:
        """The result as it leaves the site in a secure round: one masked vector; or, for a
        result out of the declared range, a refusal (its reason in ``meta``, nothing else)."""
        client, config, shapes = self.sessions[sid]
        ciphertexts = self.ciphertexts.pop(sid, {})
        params: dict[str, Any] = {}
        meta: dict[str, Any] = {"secagg": sid}
        try:
            params[VECTOR] = client.masked_input(flatten(model, shapes, config), ciphertexts)
        except SecAggRangeError as exc:
            meta[REFUSED] = str(exc)
        return FLModel(
            params=params,
            params_type=model.params_type,
            metrics=dict(model.metrics) if config.clear_metrics else {},
            meta=meta,
            current_round=model.current_round,
            total_rounds=model.total_rounds,
        )


class SecureHost(Protocol):
    """What a secure round needs of its server (an ``FLServer``): its cell, job, the checks of
    the sites' keys, and a plain round whose results it folds itself."""

    cell: Cell
    job: str
    verifier: SignatureVerifier | None
    on_reject: Callable[[str, str, str], None] | None

    async def run_round(
        self,
        model: FLModel,
        targets: Sequence[str],
        *,
        min_responses: int | None = None,
        deadline: float = 60.0,
        fold_with: Callable[[str, FLModel], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RoundResult: ...


async def secure_round(
    server: SecureHost,
    model: FLModel,
    targets: Sequence[str],
    *,
    threshold: int | None = None,
    config: SecureAggregation | None = None,
    min_responses: int | None = None,
    deadline: float = 60.0,
) -> RoundResult:
    """One round under secure aggregation (see the module text).

    Args:
        threshold: sites needed to unmask (default: a majority of ``targets``); fewer than
            that answering at any step fails the round.
        config: the range (clip, maximum weight, scale, bits) and metrics; default
            ``SecureAggregation()``.

    Raises:
        SecAggRangeError: the round's sum could wrap (checked before any site is asked).
        RoundFailed: too few sites at some step, or fewer than ``min_responses`` results.
    """
    config = config or SecureAggregation()
    config.check(len(targets))
    cell = server.cell
    ids = {site: i + 1 for i, site in enumerate(sorted(targets))}
    t = threshold or len(targets) // 2 + 1
    shapes = layout(model.params)
    sid = secrets.token_hex(8)
    agg = SecAggServer(config.size(shapes), t, config.bits)

    async def ask(
        sites: Sequence[str], step: str, bodies: Mapping[str, dict[str, Any]]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}

        async def one(site: str) -> None:
            body = {"session": sid, "step": step, **bodies[site]}
            try:
                reply = await cell.request(
                    site,
                    CHANNEL,
                    "secagg",
                    json.dumps(body).encode(),
                    timeout=deadline,
                    headers={"job": server.job},
                )
                out[site] = json.loads(reply.tobytes())
            except FlareError as exc:
                _logging.get_logger(cell=cell.name, job=server.job).warning(
                    "secure aggregation step failed", site=site, step=step, error=str(exc)
                )

        async with anyio.create_task_group() as tg:
            for site in sites:
                tg.start_soon(one, site)
        return out

    try:
        layout_json = [[n, list(s)] for n, s in shapes]
        keys = await ask(
            targets,
            "keys",
            {s: {"id": ids[s], "layout": layout_json, "secure": config.to_json()} for s in targets},
        )
        keys = _signed_keys(server, sid, ids, keys)
        advertised = {ids[s]: Keys(_unb64(k["cipher"]), _unb64(k["mask"])) for s, k in keys.items()}
        agg.collect_keys(advertised)
        public = {
            str(ids[s]): [k["cipher"], k["mask"], s, k.get("sig", {})] for s, k in keys.items()
        }
        shared = await ask(list(keys), "share", {s: {"keys": public, "threshold": t} for s in keys})
        routed = agg.route_shares(
            {ids[s]: {int(v): _unb64(c) for v, c in cts.items()} for s, cts in shared.items()}
        )
        by_id = {cid: site for site, cid in ids.items()}
        u2 = [by_id[c] for c in sorted(routed)]
        await ask(
            u2,
            "ciphertexts",
            {s: {"from": {str(u): _b64(c) for u, c in routed[ids[s]].items()}} for s in u2},
        )
    except SecAggError as exc:
        raise RoundFailed(f"secure aggregation: {exc}") from None

    params_type: list[ParamsType] = []

    def fold(site: str, update: FLModel) -> None:
        y = masked_vector(update, sid)
        try:
            if WEIGHT_KEY in update.meta:  # a relay's sum of its sites' masked vectors
                agg.add_sum([ids[str(s)] for s in update.meta.get("responded", [])], y)
            else:
                agg.add_input(ids[site], y)
        except (SecAggError, KeyError) as exc:
            raise ValueError(f"secure aggregation: {exc}") from None
        params_type.append(update.params_type)

    result = await server.run_round(
        model,
        u2,
        min_responses=max(t, min_responses or 0),
        deadline=deadline,
        fold_with=fold,
        headers={"secagg": sid},
    )
    try:
        survivors = agg.survivors()
        answers = await ask(
            [by_id[c] for c in survivors],
            "unmask",
            {by_id[c]: {"survivors": survivors} for c in survivors},
        )
        total = agg.finish(
            {
                ids[s]: {int(v): (k, int(value)) for v, (k, value) in a.items()}
                for s, a in answers.items()
            }
        )
    except SecAggError as exc:
        raise RoundFailed(f"secure aggregation: {exc}") from None
    values = decode(total, config.scale)
    weighted: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes:
        n = math.prod(shape)
        weighted[name] = values[offset : offset + n].reshape(shape)
        offset += n
    means = {}
    for name in config.metrics:
        value, weight = values[offset : offset + 2]
        offset += 2
        if weight > 0:
            means[name] = float(value / weight)
    if means:
        result.metrics[AGGREGATE] = means
    kind = params_type[0] if params_type else ParamsType.FULL
    result.sum.merge(
        FLModel(
            params=weighted,
            params_type=kind,
            meta={WEIGHT_KEY: float(values[-1]), COUNT_KEY: len(survivors)},
        )
    )
    return result


def _signed_keys(
    server: SecureHost, sid: str, ids: Mapping[str, int], keys: Mapping[str, Any]
) -> dict[str, Any]:
    """The sites whose advertised keys verify (all, without a verifier); the others are
    rejected (``on_reject``) and left out of the round, as sites that dropped."""
    if server.verifier is None:
        return dict(keys)
    now = datetime.now(UTC)
    good = {}
    for site, k in keys.items():
        try:
            expect = key_fields(site, sid, ids[site], k)
            server.verifier.verify(k.get("sig", {}), src=site, expect=expect, now=now)
        except (IntegrityError, KeyError, TypeError) as exc:
            why = f"secure aggregation keys: {type(exc).__name__}: {exc}"
            log = _logging.get_logger(cell=server.cell.name, job=server.job)
            log.warning("keys rejected", site=site, why=why)
            if server.on_reject is not None:
                server.on_reject(site, sid, why)
            continue
        good[site] = k
    return good


__all__ = [
    "AGGREGATE",
    "REFUSED",
    "SecureAggregation",
    "SecureHost",
    "SecureSite",
    "flatten",
    "key_fields",
    "layout",
    "masked_vector",
    "secure_round",
]
