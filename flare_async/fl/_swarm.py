"""Swarm learning: the sites train together with no server in the data path.

The server only starts the job and records what it hears. It sends every member one task
whose ``swarm`` header (signed with the task) is the :class:`SwarmPlan`: the members, the
rounds, the seconds a round may take and how many results a round needs. From then on the
sites run the rounds among themselves: round ``r``'s aggregator is ``members[r % n]`` (they
all know the rotation from the plan, nobody elects anybody); every member trains the round's
model (its script's ``receive()`` / ``send()``, as in any job) and streams its result to the
aggregator (``fl/swarm_update``, over a peer link where there is one); the aggregator folds
them as they arrive (FedAvg's weighted sum), waits until all have answered or the round's
time is up, and streams the new model to every member (``fl/swarm_model``), which is the
next round's task. After the last round each member keeps the final model (its script's
``receive()`` returns ``None``: the job is over) and the last aggregator offers the final model
to the server as the result of its task; each round's aggregator offers the server a record
of the round (``fl/metrics``). If the server is gone meanwhile, nothing waits for it.

A member takes updates only from the plan's members, and a round's model only from that
round's aggregator. A round with fewer results than ``min_responses`` ends the swarm there
(every member keeps the last model, and their scripts are stopped).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import numpy as np

from flare_async.cell import Cell, IncomingStream
from flare_async.errors import BadRequest, FlareError, Unauthorized
from flare_async.fl._aggregate import WeightedSum, fedavg_step, result_weight
from flare_async.fl._keys import SWARM_PLAN
from flare_async.fl._model import FLModel, model_from_parts, model_parts, params_format_of
from flare_async.fl._results import RoundFailed
from flare_async.fl._server import Rounds
from flare_async.fl._signed import CHANNEL
from flare_async.fl._tracking import records

SWARM = SWARM_PLAN
MAX_PLAN = 1 << 16


class SwarmPlan(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What every member of a swarm knows from the start."""

    members: list[str]
    rounds: int
    deadline: float
    min_responses: int

    def __post_init__(self) -> None:
        if not self.members or len(set(self.members)) != len(self.members):
            raise ValueError("a swarm's members must be distinct, and at least one")
        if not 1 <= self.rounds <= 1_000_000:
            raise ValueError(f"a swarm's rounds must be within [1, 1000000], not {self.rounds}")
        if not (math.isfinite(self.deadline) and 0 < self.deadline <= 7 * 86400):
            raise ValueError("a swarm round's deadline must be within (0, 7 days]")
        if not 1 <= self.min_responses <= len(self.members):
            raise ValueError("a swarm's min_responses must be a count of its members")

    def aggregator(self, rnd: int) -> str:
        return self.members[rnd % len(self.members)]

    @classmethod
    def decode(cls, text: str) -> SwarmPlan:
        """Raises: ValueError (msgspec's errors included): not a plan."""
        if len(text) > MAX_PLAN:
            raise ValueError("a swarm plan longer than 64 KiB")
        return msgspec.json.decode(text.encode(), type=cls)


async def swarm(
    server: Rounds,
    initial: Mapping[str, Any],
    *,
    rounds: int,
    deadline: float = 60.0,
    min_responses: int | None = None,
    members: list[str] | None = None,
) -> FLModel:
    """Start a swarm over ``members`` (default: the job's sites) and wait for its final model.

    Returns:
        the final model, as the last round's aggregator offered it.

    Raises:
        RoundFailed: no final model came (every member failed, or the swarm stopped short).
    """
    who = list(members) if members is not None else sorted(server.clients)
    plan = SwarmPlan(who, rounds, float(deadline), min_responses or len(who))
    if server.params_format is None:
        server.params_format = params_format_of(initial)
    task = FLModel(params=dict(initial), current_round=0, total_rounds=rounds)
    header = msgspec.json.encode(plan).decode()
    result = await server.run_round(
        task,
        who,
        deadline=deadline * rounds + deadline,
        min_responses=1,
        headers={SWARM: header},
        collect="each",
    )
    final = [m for _, m in (result.updates or ()) if m.params]
    if not final:
        raise RoundFailed("the swarm ended with no final model", result.failed)
    out = final[0]
    out.meta["swarm"] = {"members": who, "responded": result.responded, "failed": result.failed}
    return out


class SwarmMember:
    """One site's part in a swarm (made by the site's runtime from the server's task).

    Args:
        cell: the site's cell.
        plan: the swarm's plan.
        job: the job's id.
        task: the server's task id (the final model answers it).
        server: the server's name (round records go there, if it is still up).
        deliver: hands a round's model to the site's script (``round``, model).
        finish: called once the swarm is over (the script's loop ends).
        answer: sends the server this site's answer to its task (the final model from the
            last round's aggregator, else a result without tensors).
    """

    def __init__(
        self,
        cell: Cell,
        plan: SwarmPlan,
        job: str,
        task: str,
        server: str,
        deliver: Callable[[int, FLModel], None],
        finish: Callable[[], None],
        answer: Callable[[FLModel], Awaitable[object]],
    ) -> None:
        self.server = server
        self.answer = answer
        self.cell = cell
        self.plan = plan
        self.job = job
        self.task = task
        self.deliver = deliver
        self.finish = finish
        self.final: FLModel | None = None
        """The swarm's final model, once it is over."""
        self.rounds: dict[int, _Round] = {}

    def _round(self, rnd: int) -> _Round:
        state = self.rounds.get(rnd)
        if state is None:
            state = self.rounds[rnd] = _Round()
        return state

    def start(self, rnd: int, model: FLModel) -> None:
        """Round ``rnd``'s model arrived: the round's clock starts, the script gets it."""
        state = self._round(rnd)
        state.model = model
        state.started = anyio.current_time()
        self.deliver(rnd, model)

    async def take_update(self, stream: IncomingStream) -> bytes:
        """A member's result for a round this site aggregates (``fl/swarm_update``).

        Raises:
            Unauthorized: not from a member, or for a round this site does not aggregate.
            BadRequest: a result that cannot be folded, or a second one from the member.
        """
        rnd = _round_of(stream.headers)
        if stream.src not in self.plan.members:
            raise Unauthorized(f"{stream.src} is not a member of this swarm")
        if self.plan.aggregator(rnd) != self.cell.name:
            raise Unauthorized(f"{self.cell.name} does not aggregate round {rnd}")
        data = await stream.read_joined()
        return await self._fold(rnd, stream.src, data)

    async def _fold(self, rnd: int, member: str, data: Any) -> bytes:
        state = self._round(rnd)
        async with state.lock:
            if state.closed:
                return b"late"
            if member in state.responded:
                raise BadRequest(f"a second result from {member} for round {rnd}")
            try:
                update = model_from_parts(data)
                add = state.sum.add
                await anyio.to_thread.run_sync(
                    add, update.params, result_weight(update.meta), update.params_type
                )
            except (ValueError, TypeError, KeyError, FlareError) as exc:
                raise BadRequest(f"unusable swarm result: {exc}") from None
            state.responded.append(member)
            state.metrics[member] = dict(update.metrics)
            state.changed.set()
        return b"taken"

    async def submit(self, rnd: int, parts: list[Any]) -> None:
        """This site's result for round ``rnd``: to the round's aggregator; if that is this
        site, folded here, and then the round is closed and its model sent on (waiting for
        the others until the round's time is up)."""
        agg = self.plan.aggregator(rnd)
        if agg != self.cell.name:
            await self.cell.stream(
                agg, CHANNEL, "swarm_update", parts, headers={"job": self.job, "round": str(rnd)}
            )
            return
        await self._fold(rnd, self.cell.name, b"".join(bytes(p) for p in parts))
        await self._close(rnd)

    async def _close(self, rnd: int) -> None:
        state = self._round(rnd)
        left = state.started + self.plan.deadline - anyio.current_time()
        with anyio.move_on_after(max(left, 0.0)):
            while len(state.responded) < len(self.plan.members):
                state.changed = anyio.Event()
                await state.changed.wait()
        async with state.lock:
            state.closed = True
        base = state.model
        assert base is not None
        last = rnd + 1 >= self.plan.rounds
        if len(state.responded) < self.plan.min_responses:
            await self._publish(rnd + 1, base, stopped=True)
            return
        params = await anyio.to_thread.run_sync(fedavg_step, base.params, state.sum)
        model = FLModel(
            params=params,
            current_round=rnd + 1,
            total_rounds=self.plan.rounds,
            metrics=_mean(state.metrics),
            meta={"swarm_round": rnd, "responded": state.responded},
        )
        await self._report(rnd, state)
        await self._publish(rnd + 1, model, stopped=False, last=last)

    async def _publish(
        self, rnd: int, model: FLModel, *, stopped: bool, last: bool = False
    ) -> None:
        """The next round's model (or the final one) to every member, this site included."""
        headers = {"job": self.job, "round": str(rnd), "end": "1" if (last or stopped) else ""}
        parts = model_parts(model, self.cell.codecs)
        others = [m for m in self.plan.members if m != self.cell.name]
        if others:
            await self.cell.stream_many(others, CHANNEL, "swarm_model", parts, headers=headers)
        await self.arrived(rnd, model, ended=bool(headers["end"]), stopped=stopped)

    async def take_model(self, stream: IncomingStream) -> bytes:
        """The next round's model (or the final one) from that round's aggregator.

        Raises:
            Unauthorized: not from the aggregator of the round it closes.
        """
        rnd = _round_of(stream.headers)
        if rnd < 1 or stream.src != self.plan.aggregator(rnd - 1):
            raise Unauthorized(f"{stream.src} did not aggregate round {rnd - 1}")
        model = model_from_parts(await stream.read_joined())
        await self.arrived(rnd, model, ended=bool(stream.headers.get("end")))
        return b"taken"

    async def arrived(
        self, rnd: int, model: FLModel, *, ended: bool, stopped: bool = False
    ) -> None:
        """A round's model: the next round starts, or (``ended``) the swarm is over: the
        script stops, and the server is offered this site's answer (the last aggregator's:
        the final model; the others': none, the round's metrics only)."""
        if not ended:
            self.start(rnd, model)
            return
        self.final = model
        self.finish()
        mine = self.plan.aggregator(rnd - 1) == self.cell.name and not stopped
        offer = model if mine else FLModel(metrics=model.metrics, meta=model.meta)
        with anyio.move_on_after(30):
            try:
                await self.answer(offer)
            except FlareError as exc:
                self.cell._log.info("the swarm's end not told to the server", error=str(exc))

    async def _report(self, rnd: int, state: _Round) -> None:
        """The round's record, offered to the server (which may be gone: never waited on)."""
        recs = records("swarm/responded", len(state.responded), step=rnd)
        for key, value in _mean(state.metrics).items():
            recs += records(f"swarm/{key}", value, step=rnd)
        body = json.dumps(recs).encode()
        with anyio.move_on_after(5):
            try:
                await self.cell.request(self.server, CHANNEL, "metrics", body, timeout=5)
            except FlareError as exc:
                self.cell._log.info("swarm round not recorded", round=rnd, error=str(exc))


class _Round:
    def __init__(self) -> None:
        self.model: FLModel | None = None
        self.started = 0.0
        self.sum = WeightedSum()
        self.responded: list[str] = []
        self.metrics: dict[str, dict[str, float]] = {}
        self.closed = False
        self.lock = anyio.Lock()
        self.changed = anyio.Event()


def _round_of(headers: Mapping[str, str]) -> int:
    try:
        return int(headers.get("round", ""))
    except ValueError:
        raise BadRequest("a swarm message without its round") from None


def _mean(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    keys = {k for m in metrics.values() for k in m}
    return {k: float(np.mean([m[k] for m in metrics.values() if k in m])) for k in sorted(keys)}


__all__ = ["SWARM", "SwarmMember", "SwarmPlan", "swarm"]
