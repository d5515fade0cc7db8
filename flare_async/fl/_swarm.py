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
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import numpy as np

from flare_async.cell import Cell, IncomingStream
from flare_async.errors import BadRequest, FlareError, Unauthorized
from flare_async.fl._aggregate import WeightedSum, fedavg_step, result_weight
from flare_async.fl._checks import misfit
from flare_async.fl._keys import SWARM_PLAN
from flare_async.fl._model import FLModel, model_from_parts, model_parts, params_format_of
from flare_async.fl._results import RoundFailed
from flare_async.fl._server import Rounds
from flare_async.fl._signed import CHANNEL, check_signed, stream_signed
from flare_async.fl._tracking import records
from flare_async.security import SignatureVerifier, Signer

MAX_PLAN = 1 << 16
MAX_WAIT = 7 * 86400.0
"""The longest the server's task of a swarm waits for its end."""


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

    def backup(self, rnd: int) -> str:
        """Who takes round ``rnd`` over if its aggregator falls silent: the next in turn."""
        return self.members[(rnd + 1) % len(self.members)]

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
    plan = SwarmPlan(
        who, rounds, float(deadline), len(who) if min_responses is None else min_responses
    )
    if server.params_format is None:
        server.params_format = params_format_of(initial)
    # One task for the whole swarm: it ends with the last round (what the job's record counts).
    task = FLModel(params=dict(initial), current_round=rounds - 1, total_rounds=rounds)
    header = msgspec.json.encode(plan).decode()
    result = await server.run_round(
        task,
        who,
        deadline=min(deadline * (3 * rounds + 1), MAX_WAIT),  # every round taken over
        min_responses=1,
        headers={SWARM_PLAN: header},
        collect="each",
    )
    # Only the last round's aggregator (or its backup) brings the final model: a member
    # that answers its task with a model of its own is not the swarm's result.
    closing = {plan.aggregator(rounds - 1), plan.backup(rounds - 1)}
    final = [m for site, m in (result.updates or ()) if m.params and site in closing]
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
        signer / verifier: (a deployment) every update and model is signed end to end by its
            sender and checked by its receiver, the round and whether it ends the swarm
            included: no relay on the way can change one or make one up.
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
        signer: Signer | None = None,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        self.signer = signer
        self.verifier = verifier
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
        """The rounds this site takes part in now (at most this one and the next)."""
        self.current = 0
        self.progressed = time.monotonic()
        """When the last round began here (``time.monotonic()``): a site keeps a swarm's job
        running without the server while its rounds go on (``SiteJobs``' lease)."""

    def alive(self, now: float) -> bool:
        """Whether the swarm still goes on here (``now``: ``time.monotonic()``): its current
        round began less than three rounds' time ago (its own, a backup's, and a margin)."""
        return self.final is None and now < self.progressed + 3 * self.plan.deadline

    def _round(self, rnd: int) -> _Round:
        state = self.rounds.get(rnd)
        if state is None:
            state = self.rounds[rnd] = _Round()
        return state

    def start(self, rnd: int, model: FLModel) -> None:
        """Round ``rnd``'s model arrived: the round's clock starts, the script gets it (once:
        a second copy, from a backup that took the round over too late, is ignored); what
        earlier rounds held is let go."""
        if rnd < self.current or (rnd == self.current and self._round(rnd).model is not None):
            return
        for old in [r for r in self.rounds if r < rnd]:
            self.rounds[old].next.set()
            del self.rounds[old]
        self.current = rnd
        self.progressed = time.monotonic()
        model.current_round, model.total_rounds = rnd, self.plan.rounds
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
        rnd, _ = _tag_of(stream.headers, self.job)
        if stream.src not in self.plan.members:
            raise Unauthorized(f"{stream.src} is not a member of this swarm")
        if self.cell.name not in (self.plan.aggregator(rnd), self.plan.backup(rnd)):
            raise Unauthorized(f"{self.cell.name} does not aggregate round {rnd}")
        if not self.current <= rnd <= self.current + 1 or rnd >= self.plan.rounds:
            raise BadRequest(f"round {rnd} is not this swarm's now ({self.current})")
        data = await stream.read_joined()
        self._check(stream)
        return await self._fold(rnd, stream.src, data)

    def _check(self, stream: IncomingStream) -> None:
        """The sender's signature over what arrived (with a verifier).

        Raises:
            IntegrityError: unsigned, or not what the sender signed.
        """
        if self.verifier is not None:
            check_signed(self.verifier, stream, self.cell.name)

    async def _fold(self, rnd: int, member: str, data: Any) -> bytes:
        if rnd < self.current or self.final is not None:
            return b"late"  # that round is over here (a backup closed it, or the swarm ended)
        state = self._round(rnd)
        async with state.lock:
            if state.closed:
                return b"late"
            if member in state.responded or member in state.early:
                raise BadRequest(f"a second result from {member} for round {rnd}")
            if state.model is None:  # before this site has the round's model: checked then
                state.early[member] = data  # read_joined's own buffer: kept, not copied
                return b"taken"
            await self._fold_one(state, member, data)
        return b"taken"

    async def _fold_one(self, state: _Round, member: str, data: Any) -> None:
        """Fold one member's result into the round (its lock held), checked against the round's
        model.

        Raises:
            BadRequest: it does not decode, fit the model, or add up.
        """
        try:
            update = model_from_parts(data)
            _fits(state.model, update)
            add = state.sum.add
            await anyio.to_thread.run_sync(
                add, update.params, result_weight(update.meta), update.params_type
            )
        except (ValueError, TypeError, KeyError, FlareError) as exc:
            raise BadRequest(f"unusable swarm result: {exc}") from None
        state.responded.append(member)
        state.metrics[member] = dict(update.metrics)
        state.changed.set()

    async def _fold_early(self, state: _Round) -> None:
        """The results that came before the round's model: folded now, each checked."""
        async with state.lock:
            early, state.early = state.early, {}
            for member, data in early.items():
                try:
                    await self._fold_one(state, member, data)
                except BadRequest as exc:
                    self.cell._log.warning("swarm result refused", member=member, error=str(exc))

    async def submit(self, rnd: int, parts: list[Any]) -> None:
        """This site's result for round ``rnd``: to the round's aggregator; if that is this
        site, folded here, and then the round is closed and its model sent on (waiting for
        the others until the round's time is up).

        A member then waits for the next round's model until twice the round's time has
        passed since it began; none come, the aggregator counts as gone and the next member
        in turn (``SwarmPlan.backup``) takes the round over: the member sends it its result
        again, or, being the backup, aggregates the round itself, a fresh round's time long."""
        me = self.cell.name
        if self.plan.aggregator(rnd) == me:
            await self._aggregate(rnd, parts)
            return
        state = self.rounds.get(rnd)  # before sending: the next round may come meanwhile
        if state is None or rnd < self.current or self.final is not None:
            return  # that round is over here already
        await self._send_update(self.plan.aggregator(rnd), rnd, parts)
        with anyio.move_on_after(max(0.0, state.started + 2 * self.plan.deadline - _now())):
            await state.next.wait()
            return
        backup = self.plan.backup(rnd)
        self.cell._log.warning(
            "swarm aggregator silent, the next in turn takes the round over",
            round=rnd,
            aggregator=self.plan.aggregator(rnd),
            backup=backup,
        )
        if backup == me:
            state.started = _now()
            await self._aggregate(rnd, parts)
        else:
            await self._send_update(backup, rnd, parts)

    async def _send_update(self, to: str, rnd: int, parts: list[Any]) -> None:
        try:
            await self._send(to, "swarm_update", parts, rnd, end=False)
        except FlareError as exc:
            self.cell._log.warning("swarm result not delivered", to=to, round=rnd, error=str(exc))

    async def _aggregate(self, rnd: int, parts: list[Any]) -> None:
        if await self._fold(rnd, self.cell.name, parts) == b"taken":  # the parts, unjoined
            await self._close(rnd)

    async def _close(self, rnd: int) -> None:
        state = self.rounds.get(rnd)
        if state is None or state.model is None or rnd < self.current:
            return  # another (the backup, or the aggregator after all) closed it meanwhile
        await self._fold_early(state)
        left = state.started + self.plan.deadline - _now()
        with anyio.move_on_after(max(left, 0.0)):
            while len(state.responded) < len(self.plan.members):
                state.changed = anyio.Event()
                await state.changed.wait()
        async with state.lock:
            state.closed = True
        if state.next.is_set():
            return  # the next round came from elsewhere meanwhile: one model per round
        base = state.model
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
        await self._publish(rnd + 1, model, stopped=False, last=last, report=(rnd, state))

    async def _publish(
        self,
        rnd: int,
        model: FLModel,
        *,
        stopped: bool,
        last: bool = False,
        report: tuple[int, _Round] | None = None,
    ) -> None:
        """The next round's model (or the final one) to every member (each send bounded by a
        round's time), this site included; then the round's record to the server."""
        end = last or stopped
        parts = model_parts(model, self.cell.codecs)
        others = [m for m in self.plan.members if m != self.cell.name]

        async def one(member: str) -> None:
            with anyio.move_on_after(self.plan.deadline):
                try:
                    await self._send(member, "swarm_model", parts, rnd, end=end)
                except FlareError as exc:
                    self.cell._log.warning("swarm model not delivered", to=member, error=str(exc))

        async with anyio.create_task_group() as tg:
            for member in others:
                tg.start_soon(one, member)
        if report is not None:
            await self._report(*report)
        await self.arrived(rnd, model, ended=end, stopped=stopped, mine=not stopped)

    async def _send(self, to: str, topic: str, parts: list[Any], rnd: int, *, end: bool) -> None:
        """One update or model, its round (and whether it ends the swarm) in its ``task``
        header, signed end to end with a signer."""
        await stream_signed(
            self.cell,
            self.signer,
            to,
            topic,
            parts,
            _tag(self.job, rnd, end),
            codec="tensors",
            digest=self.signer is not None,
            headers={"job": self.job},
        )

    async def take_model(self, stream: IncomingStream) -> bytes:
        """The next round's model (or the final one) from that round's aggregator.

        Raises:
            Unauthorized: not from the aggregator of the round it closes.
        """
        rnd, end = _tag_of(stream.headers, self.job)
        if rnd < 1 or stream.src not in (self.plan.aggregator(rnd - 1), self.plan.backup(rnd - 1)):
            raise Unauthorized(f"{stream.src} did not aggregate round {rnd - 1}")
        if not self.current < rnd <= self.plan.rounds or (rnd == self.plan.rounds and not end):
            return b"late"  # a round this site has (or a backup's second copy)
        data = await stream.read_joined()
        self._check(stream)
        try:
            model = model_from_parts(data)
        except (ValueError, TypeError, KeyError, FlareError) as exc:
            raise BadRequest(f"unusable swarm model: {exc}") from None
        base = self.rounds.get(self.current)
        if (
            base is not None
            and base.model is not None
            and (why := misfit(base.model.params, model))
        ):
            raise BadRequest(f"a swarm model that does not fit: {why}")
        await self.arrived(rnd, model, ended=end)
        return b"taken"

    async def arrived(
        self,
        rnd: int,
        model: FLModel,
        *,
        ended: bool,
        stopped: bool = False,
        mine: bool = False,
    ) -> None:
        """A round's model: the next round starts, or (``ended``) the swarm is over: the
        script stops, and the server is offered this site's answer (the last aggregator's:
        the final model; the others': none, the round's metrics only). ``mine``: this site
        closed the last round (its aggregator, or the backup that took it over)."""
        if not ended:
            self.start(rnd, model)
            return
        if self.final is not None:
            return  # a backup's second copy
        self.current = rnd
        for state in self.rounds.values():
            state.next.set()
        self.final = model
        self.finish()
        offer = model if mine and not stopped else FLModel(metrics=model.metrics, meta=model.meta)
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
                await self.cell.request(
                    self.server, CHANNEL, "metrics", body, headers={"job": self.job}, timeout=5
                )
            except FlareError as exc:
                self.cell._log.info("swarm round not recorded", round=rnd, error=str(exc))


class _Round:
    def __init__(self) -> None:
        self.model: FLModel | None = None
        self.started = 0.0
        self.sum = WeightedSum()
        self.responded: list[str] = []
        self.metrics: dict[str, dict[str, float]] = {}
        self.early: dict[str, Any] = {}
        """Results that came before this site had the round's model (checked once it has)."""
        self.closed = False
        self.lock = anyio.Lock()
        self.changed = anyio.Event()
        self.next = anyio.Event()
        """Set once the next round (or the end) has come: the round is over here."""


def _fits(base: FLModel | None, model: FLModel) -> None:
    """Raises ValueError: ``model`` does not fit the round's model (see ``misfit``)."""
    why = misfit(base.params, model) if base is not None else ""
    if why:
        raise ValueError(why)


def _now() -> float:
    return anyio.current_time()


def _tag(job: str, rnd: int, end: bool) -> str:
    """A swarm message's ``task`` header (signed): its job, round, and whether it ends it."""
    return f"swarm/{job}/{rnd}/{'end' if end else ''}"


def _tag_of(headers: Mapping[str, str], job: str) -> tuple[int, bool]:
    """The round a swarm message is for, and whether it ends the swarm.

    Raises:
        BadRequest: no such tag, or one for another job.
    """
    head, _, rest = headers.get("task", "").rpartition(f"swarm/{job}/")
    rnd, _, end = rest.partition("/")
    if head or not rest or end not in ("", "end"):
        raise BadRequest("a swarm message without its job and round")
    try:
        return int(rnd), end == "end"
    except ValueError:
        raise BadRequest("a swarm message without its round") from None


def _mean(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    keys = {k for m in metrics.values() for k in m}
    return {k: float(np.mean([m[k] for m in metrics.values() if k in m])) for k in sorted(keys)}


__all__ = ["SwarmMember", "SwarmPlan", "swarm"]
