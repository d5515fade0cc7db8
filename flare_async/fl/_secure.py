"""Secure aggregation in FL rounds: the server learns the weighted sum of the results and
nothing about any one of them (the protocol: :mod:`flare_async.fl._secagg`).

``await secure_round(server, model, targets, ...)`` runs one round in four exchanges on the
``fl/secagg`` request topic (keys, shares, ciphertexts, then the usual task and result
streams, then unmasking). Each site turns its result into one vector: every tensor times the
site's weight (``num_samples``), flattened in name order, then the weight itself; encodes it
in fixed point (``scale``) and masks it. The server folds masked vectors as they arrive (one
running uint32 sum), unmasks the total once enough sites answered, and hands the workflow an
ordinary :class:`RoundResult` whose ``sum`` is the weighted sum: ``fedavg_step`` works as
usual. A site's privacy filters (its policy) run before masking. With relay aggregation
(``FLServer(hierarchical=True)``) each relay adds up its sites' masked vectors (mod 2^32) and
sends one sum up: the masks still cancel, and the relay learns nothing either. Sites that drop
after the keys are out, and the round still completes while at least ``threshold`` remain.

Fixed point: values are ``round(w * x * scale)`` in signed 32-bit; the sum over all sites must
stay within +-2^31 / scale (with the default 2^16: +-32,768). Pick ``scale`` for the model's
weights and the sites' ``num_samples``.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import numpy as np

from flare_async.errors import BadRequest, FlareError, IntegrityError
from flare_async.fl._aggregate import COUNT_KEY, WEIGHT_KEY
from flare_async.fl._model import FLModel, ParamsType
from flare_async.fl._secagg import Keys, SecAggClient, SecAggError, SecAggServer, decode, encode
from flare_async.fl._server import FLServer, RoundFailed, RoundResult
from flare_async.fl._signed import CHANNEL
from flare_async.security import SignatureVerifier, Signer

VECTOR = "secagg.y"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def layout(params: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes, in the order they are flattened."""
    return [(name, tuple(np.shape(params[name]))) for name in sorted(params)]


def flatten(model: FLModel, shapes: list[tuple[str, tuple[int, ...]]], scale: float) -> np.ndarray:
    """A site's result as one fixed-point vector: ``w * x`` per tensor, then ``w``."""
    weight = float(model.meta.get("num_samples", 1.0))
    parts = []
    for name, shape in shapes:
        value = np.asarray(model.params[name], np.float64)
        if value.shape != shape:
            raise BadRequest(f"tensor {name!r}: shape {value.shape}, expected {shape}")
        parts.append(value.reshape(-1) * weight)
    parts.append(np.array([weight]))
    return encode(np.concatenate(parts), scale)


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
        self.sessions: dict[str, tuple[SecAggClient, float, list[tuple[str, tuple[int, ...]]]]] = {}
        self.ciphertexts: dict[str, dict[int, bytes]] = {}

    def handle(self, body: dict[str, Any]) -> dict[str, Any]:
        """One ``fl/secagg`` request from the server."""
        sid, step = str(body["session"]), str(body["step"])
        if step == "keys":
            shapes = [(str(n), tuple(int(d) for d in s)) for n, s in body["layout"]]
            size = sum(int(np.prod(s)) for _, s in shapes) + 1
            client = SecAggClient(int(body["id"]), size)
            self.sessions[sid] = (client, float(body["scale"]), shapes)
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
        """The result as it leaves the site in a secure round: one masked vector."""
        client, scale, shapes = self.sessions[sid]
        y = client.masked_input(flatten(model, shapes, scale), self.ciphertexts.pop(sid, {}))
        return FLModel(
            params={VECTOR: y},
            params_type=model.params_type,
            metrics=model.metrics,
            meta={"secagg": sid},
            current_round=model.current_round,
            total_rounds=model.total_rounds,
        )


async def secure_round(
    server: FLServer,
    model: FLModel,
    targets: Sequence[str],
    *,
    threshold: int | None = None,
    scale: float = 2.0**16,
    min_responses: int | None = None,
    deadline: float = 60.0,
) -> RoundResult:
    """One round under secure aggregation (see the module text).

    Args:
        threshold: sites needed to unmask (default: a majority of ``targets``); fewer than
            that answering at any step fails the round.

    Raises:
        RoundFailed: too few sites at some step, or fewer than ``min_responses`` results.
    """
    cell = server.cell
    ids = {site: i + 1 for i, site in enumerate(sorted(targets))}
    t = threshold or len(targets) // 2 + 1
    shapes = layout(model.params)
    size = sum(int(np.prod(s)) for _, s in shapes) + 1
    sid = secrets.token_hex(8)
    agg = SecAggServer(size, t)

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
                server._log.warning(
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
            {s: {"id": ids[s], "layout": layout_json, "scale": scale} for s in targets},
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
        if update.meta.get("secagg") != sid or VECTOR not in update.params:
            raise ValueError("a plain result in a secure round")
        y = np.asarray(update.params[VECTOR])
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
    values = decode(total, scale)
    weighted: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        weighted[name] = values[offset : offset + n].reshape(shape)
        offset += n
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
    server: FLServer, sid: str, ids: Mapping[str, int], keys: Mapping[str, Any]
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
            server._log.warning("keys rejected", site=site, why=why)
            if server.on_reject is not None:
                server.on_reject(site, sid, why)
            continue
        good[site] = k
    return good


__all__ = ["SecureSite", "flatten", "key_fields", "layout", "secure_round"]
