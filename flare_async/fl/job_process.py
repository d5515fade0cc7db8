"""A job's own process (see ``flare_async.fl._jobproc``)::

    python -m flare_async.fl.job_process run FD MODULE:RECIPE OVERRIDES_JSON
    python -m flare_async.fl.job_process check MODULE:RECIPE OVERRIDES_JSON

``run`` is what the server starts for each job attempt (``FD``: its end of the socket pair);
``check`` loads the recipe with the overrides and exits 0, else 2 with ``ConfigError: why`` on
stderr (the server's check of a submission).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import socket
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from flare_async.errors import ConfigError
from flare_async.fl._aggregate import WeightedSum
from flare_async.fl._jobchannel import Channel, JobProcessError
from flare_async.fl._jobproc import BEAT, CODECS, JobFacts, strings
from flare_async.fl._model import FLModel, model_from_parts, model_parts
from flare_async.fl._recipe import FedAvgRecipe, load_recipe
from flare_async.fl._results import RoundResult
from flare_async.fl._secagg import SecAggRangeError
from flare_async.fl._secure import SecureAggregation
from flare_async.fl._server import Collect, RoundFailed, sample
from flare_async.fl._updates import Updates, unpack


class RemoteRounds:
    """The server as a workflow in the job process sees it (a :class:`Rounds`): each round is
    sent to the server's process, which runs it and sends back the sum."""

    def __init__(self, channel: Channel, clients: list[str], job: str) -> None:
        self.channel = channel
        self.clients = list(clients)
        self.job = job
        self.params_format: str | None = None
        self.rng = random.Random()
        self._waiting: dict[int, MemoryObjectSendStream[tuple[dict[str, Any], memoryview]]] = {}
        self._ids = 0
        self.saved: list[int] = []
        """Rounds checkpointed and not yet told to the server (:meth:`flush`)."""

    async def flush(self) -> None:
        """Tell the server of the checkpoints written since last time."""
        while self.saved:
            await self.channel.send({"op": "checkpoint", "round": self.saved.pop(0)})

    def sample(self, fraction: float = 1.0, minimum: int = 1) -> list[str]:
        return sample(self.clients, self.rng, fraction, minimum)

    async def run_round(
        self,
        model: FLModel,
        targets: Sequence[str],
        *,
        min_responses: int | None = None,
        deadline: float = 60.0,
        task: str = "train",
        secure: SecureAggregation | None = None,
        collect: Collect = "sum",
        headers: Mapping[str, str] | None = None,
    ) -> RoundResult:
        """Run one round in the server's process (see ``FLServer.run_round``; with
        ``collect="each"`` every site's result comes back, in this process's memory).

        Raises:
            RoundFailed, SecAggRangeError: as ``FLServer.run_round``.
            JobProcessError: the server refused the round.
        """
        self._ids += 1
        rid = self._ids
        send, receive = anyio.create_memory_object_stream[tuple[dict[str, Any], memoryview]](1)
        self._waiting[rid] = send
        head = {
            "op": "round",
            "id": rid,
            "targets": list(targets),
            "min_responses": min_responses,
            "deadline": float(deadline),
            "task": task,
            "secure": dataclasses.asdict(secure) if secure is not None else None,
            "collect": collect,
            "headers": dict(headers or {}),
        }
        try:
            await self.flush()
            parts = model_parts(model, CODECS, params_format=self.params_format)
            await self.channel.send(head, parts)
            del parts
            async with receive:
                answer, body = await receive.receive()
        finally:
            self._waiting.pop(rid, None)
            send.close()
        if answer["op"] == "error":
            kind, why = answer.get("kind"), str(answer.get("why", ""))
            if kind == "RoundFailed":
                raise RoundFailed(why, strings(answer.get("failed")))
            if kind == "SecAggRangeError":
                raise SecAggRangeError(why)
            raise JobProcessError(why)
        total = WeightedSum()
        updates = None
        if collect == "each":
            updates = unpack(model_from_parts(body)) if body.nbytes else Updates()
        elif body.nbytes:  # the received buffer becomes the sum: decoded and adopted, uncopied
            total.merge(model_from_parts(body), adopt=True)
        return RoundResult(
            updates=updates,
            round=int(answer["round"]),
            sum=total,
            responded=list(answer["responded"]),
            failed=dict(answer["failed"]),
            metrics={k: dict(v) for k, v in answer["metrics"].items()},
            late=int(answer["late"]),
            partials=int(answer["partials"]),
        )

    async def serve(self) -> None:
        """Hand each answer of the server to the round waiting for it; beat meanwhile."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat)
            while True:
                head, body = await self.channel.receive()
                waiter = self._waiting.get(head.get("id", -1))
                if waiter is not None:  # gone meanwhile: that round was given up
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.WouldBlock):
                        waiter.send_nowait((head, body))

    async def _beat(self) -> None:
        while True:
            await self.channel.send({"op": "beat"})
            await anyio.sleep(BEAT)


async def child_main(fd: int, spec: str, overrides: Mapping[str, Any]) -> int:
    """The job process (``python -m flare_async.fl.job_process run FD SPEC OVERRIDES``)."""
    channel = Channel(socket.socket(fileno=fd))
    try:
        recipe = load_recipe(spec, overrides)
        facts = JobFacts.of(recipe)
    except ConfigError as exc:
        await channel.send({"op": "failed", "kind": "ConfigError", "why": str(exc)})
        return 2
    await channel.send({"op": "ready", **dataclasses.asdict(facts)})
    head, _ = await channel.receive()
    rounds = RemoteRounds(channel, head["clients"], head["job"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(rounds.serve)
        outcome = await _workflow(recipe, rounds, head["checkpoints"])
        tg.cancel_scope.cancel()
    if isinstance(outcome, Exception):  # the job's failure, told to the server whatever it was
        failed = outcome.failed if isinstance(outcome, RoundFailed) else {}
        kind, why = type(outcome).__name__, str(outcome)
        with contextlib.suppress(JobProcessError):
            await channel.send({"op": "failed", "kind": kind, "why": why, "failed": failed})
        traceback.print_exception(outcome)  # into the job's log
        return 1
    await channel.send(outcome)
    return 0


async def _workflow(
    recipe: FedAvgRecipe, rounds: RemoteRounds, checkpoints: str
) -> dict[str, Any] | Exception:
    """Run the recipe: the ``done`` message, or what it raised."""

    try:
        final = await recipe.run(rounds, checkpoints=checkpoints, on_checkpoint=rounds.saved.append)
        await rounds.flush()  # the last round's, before "done"
        history = final.meta.get("history") or [{}]
        return {
            "op": "done",
            "metrics": {str(k): float(v) for k, v in final.metrics.items()},
            "validation": {str(k): float(v) for k, v in history[-1].get("validation", {}).items()},
            "report": {"cross_site": final.meta["cross_site"]}
            if "cross_site" in final.meta
            else {},
        }
    except Exception as exc:
        return exc


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "check":
        try:
            JobFacts.of(load_recipe(argv[2], json.loads(argv[3])))
        except ConfigError as exc:
            sys.stderr.write(f"ConfigError: {exc}\n")
            return 2
        return 0
    if len(argv) == 5 and argv[1] == "run":
        return anyio.run(child_main, int(argv[2]), argv[3], json.loads(argv[4]))
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
