"""A job's own process: on a deployment the server never runs a job's code.

The server (its :class:`~flare_async.fl._jobs.JobManager`) starts one Python process per job
attempt (``python -m flare_async.fl.job_process run FD SPEC OVERRIDES``), beside itself, as FLARE
runs a server job process beside the server's parent. That process imports the recipe (only a
declared recipe object is accepted: ``load_recipe``), calls its ``initial`` and ``evaluate``,
runs its workflow and writes its checkpoints; the server keeps the fabric: it starts the sites,
sends each round's task, checks and folds the results, and runs secure aggregation. A crash,
an exit, a hang or a broken message of the job process fails that job, never the server.

The two talk over a socket pair (the child's end passed as file descriptor ``FD``), in frames::

    u32 big-endian  header length (at most HEAD_MAX from the job process)
    header          a msgpack map: "op", the op's fields, "sizes": [bytes of each part]
    parts           the parts' bytes, one after another (a model: header + tensors, as
                    ``model_parts`` encodes it; at most ``max_bytes`` in all from the job)

Job process -> server: ``ready`` (what the server needs of the recipe: ``min_clients``,
``script``, ``codec``, ``config``, ``encrypt``, ``relay_aggregation``), then ``round`` (the
task's model in parts; ``id``, ``targets``, ``min_responses``, ``deadline``, ``task``,
``secure``), ``checkpoint`` (``round``), ``beat`` every :data:`BEAT` seconds from its event
loop, and at the end ``done`` (``metrics``, ``validation``) or ``failed`` (``kind``, ``why``,
``failed``). Server -> job process: ``start`` (``clients``, ``job``, ``checkpoints``), and for
each round ``result`` (``id`` and the round's outcome; the sum as a partial-sum model in parts,
none if nobody answered) or ``error`` (``id``, ``kind``, ``why``, ``failed``).

The server checks everything the job process sends as it would a peer's: targets must be the
job's started sites, numbers in range, models must decode. A job process that sends nothing for
``hang_after`` seconds (its event loop blocked) is killed and its job fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from flare_async import _logging
from flare_async.codecs import CodecRegistry
from flare_async.errors import ConfigError, DecodeError, FlareError
from flare_async.fl._artifact import code_path_env, python
from flare_async.fl._crosssite import checked_report
from flare_async.fl._handoff import ROUTE_FIELDS, TAKE_SHA
from flare_async.fl._jobchannel import (
    HEAD_MAX,
    MAX_PARTS,
    Channel,
    JobProcessError,
)
from flare_async.fl._keys import SWARM_PLAN
from flare_async.fl._model import FLModel, model_from_parts, model_parts, wire_format
from flare_async.fl._recipe import FedAvgRecipe
from flare_async.fl._secagg import SecAggRangeError
from flare_async.fl._secure import SecureAggregation
from flare_async.fl._server import FLServer, RoundFailed
from flare_async.fl._swarm import MAX_PLAN, SwarmPlan
from flare_async.fl._updates import pack

BEAT = 2.0
"""Seconds between a job process's heartbeats."""
RESOLVE_TIMEOUT = 60.0
"""Seconds a job's recipe gets to load in its process (at submission and at each start)."""
TASK_KINDS = ("train", "validate", "submit_model")
WHY_MAX = 2000
"""Characters of a job process's own words (its failure) kept in the job's record."""
MIN_DEADLINE = 0.01
MAX_DEADLINE = 7 * 86400.0


@dataclasses.dataclass(frozen=True)
class JobFacts:
    """What the server needs of a job's recipe (read by the job process, checked here)."""

    min_clients: int
    script: str
    codec: str
    config: dict[str, Any]
    encrypt: bool
    relay_aggregation: bool
    rounds: int = 0
    """The rounds the workflow runs (what ``job wait`` counts towards)."""

    @classmethod
    def of(cls, recipe: FedAvgRecipe) -> JobFacts:
        return cls(
            rounds=recipe.rounds,
            min_clients=recipe.min_clients,
            script=recipe.script_spec(),
            codec=recipe.codec,
            config=dict(recipe.config),
            encrypt=bool(recipe.encrypt),
            relay_aggregation=bool(recipe.relay_aggregation),
        )

    @classmethod
    def checked(cls, head: Mapping[str, Any]) -> JobFacts:
        try:
            facts = cls(**{f.name: head[f.name] for f in dataclasses.fields(cls)})
            json.dumps(facts.config)  # it goes to the sites as JSON
        except (KeyError, TypeError, ValueError) as exc:
            raise JobProcessError(f"the job process described its recipe wrongly: {exc}") from None
        types = {"min_clients": int, "script": str, "codec": str, "config": dict, "rounds": int}
        types |= {"encrypt": bool, "relay_aggregation": bool}
        for name, kind in types.items():
            if type(getattr(facts, name)) is not kind:
                why = f"the job process sent a {name} that is not a {kind.__name__}"
                raise JobProcessError(why)
        if facts.rounds < 0:
            raise JobProcessError(f"the job process sent rounds {facts.rounds}, below 0")
        try:
            CODECS.get(facts.codec)
        except DecodeError:
            raise JobProcessError(f"the job process named no codec: {facts.codec[:80]!r}") from None
        return facts


# ---------------------------------------------------------------------------- the server's side
class JobProcess:
    """The server's handle on one job attempt's process (``async with JobProcess.start(...)``).

    Args:
        max_bytes: the most bytes one message of the job process may carry (a model).
        hang_after: seconds without a frame after which the job process counts as hung.
    """

    def __init__(
        self, process: anyio.abc.Process, channel: Channel, facts: JobFacts, job: str
    ) -> None:
        self.process = process
        self.channel = channel
        self.facts = facts
        self.job = job
        self.report: dict[str, Any] = {}
        """What the workflow reported at its end (checked: see ``checked_report``)."""
        self._log = _logging.get_logger(job=job)

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        job: str,
        spec: str,
        overrides: Mapping[str, Any],
        *,
        log: Path,
        max_bytes: int = 32 * 2**30,
        hang_after: float = 60.0,
        resolve_timeout: float = RESOLVE_TIMEOUT,
        code: Path | None = None,
    ) -> AsyncIterator[JobProcess]:
        """Start the job's process and wait for its recipe to load (from ``code``, the job's
        own code, when it ships some: first on its path, see ``fl/_artifact.py``).

        Raises:
            JobProcessError: it did not load (its reason), or ended, within ``resolve_timeout``.
        """
        ours, theirs = socket.socketpair()
        argv = [*python(code), "-m", "flare_async.fl.job_process", "run", str(theirs.fileno())]
        argv += [spec, json.dumps(dict(overrides))]
        try:
            with log.open("ab") as out:
                # A session of its own: what it starts (data loader workers...) ends with it.
                process = await anyio.open_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    pass_fds=[theirs.fileno()],
                    start_new_session=True,
                    env=code_path_env(code),
                )
        except OSError as exc:
            ours.close()
            raise JobProcessError(f"the job process could not start: {exc}") from None
        except BaseException:  # cancelled while starting it (the job aborted): no socket left
            ours.close()
            raise
        finally:
            theirs.close()
        channel = Channel(
            ours,
            max_bytes=max_bytes,
            head_max=HEAD_MAX,
            idle=resolve_timeout,
            max_parts=MAX_PARTS,
            carry=frozenset({"round"}),
        )
        try:
            head, _ = await channel.receive()
            if head.get("op") == "failed":
                raise JobProcessError(str(head.get("why", ""))[:WHY_MAX])
            if head.get("op") != "ready":
                raise JobProcessError(f"the job process began with {head.get('op')!r}")
            channel.idle = hang_after
            yield cls(process, channel, JobFacts.checked(head), job)
        finally:
            with anyio.CancelScope(shield=True):
                await _end(process, channel)

    async def run(
        self,
        server: FLServer,
        *,
        checkpoints: str,
        on_checkpoint: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """Run the job's workflow in its process over ``server``'s clients, to its end.

        Returns:
            the final model's metrics, with its last validation's as ``validation_*``.

        Raises:
            RoundFailed: a round failed and the workflow let it end the job.
            JobProcessError: the workflow raised anything else, or the process failed.
        """
        await self.channel.send(
            {"op": "start", "clients": server.clients, "job": self.job, "checkpoints": checkpoints}
        )
        outcome: dict[str, float] | FlareError
        async with anyio.create_task_group() as tg:  # rounds run beside the reading
            outcome = await self._follow(server, tg, on_checkpoint)
            tg.cancel_scope.cancel()
        if isinstance(outcome, FlareError):
            raise outcome
        return outcome

    async def _follow(
        self,
        server: FLServer,
        tg: anyio.abc.TaskGroup,
        on_checkpoint: Callable[[int], None] | None,
    ) -> dict[str, float] | FlareError:
        """Read the job process's messages to its end: its metrics, or why it failed. At most
        one round per site runs at once; the next waits (and the job process with it)."""
        rounds = anyio.Semaphore(max(1, len(server.clients)))
        while True:
            try:
                head, body = await self.channel.receive()
            except JobProcessError as exc:
                return JobProcessError(f"{exc}{await self._exit_status()}")
            op = head.get("op")
            if op == "round":
                await rounds.acquire()
                tg.start_soon(self._round, server, head, body, rounds)
            elif op == "checkpoint" and type(head.get("round")) is int:
                if on_checkpoint is not None:
                    on_checkpoint(head["round"])
            elif op == "done":
                self.report = checked_report(head.get("report"))
                metrics = _floats(head.get("metrics"), "")
                return metrics | _floats(head.get("validation"), "validation_")
            elif op == "failed":
                why = str(head.get("why", ""))[:WHY_MAX]
                if head.get("kind") == "RoundFailed":
                    failed = strings(head.get("failed"))
                    return RoundFailed(
                        why, {k: v[:WHY_MAX] for k, v in failed.items() if k in server.clients}
                    )
                return JobProcessError(f"{str(head.get('kind', 'Error'))[:80]}: {why}")
            elif op != "beat":
                return JobProcessError(f"the job process sent an unknown message {op!r:.80}")

    async def _exit_status(self) -> str:
        """`` (exit N)`` once the process has ended (waiting a moment for it), else nothing."""
        with anyio.move_on_after(2):
            await self.process.wait()
        code = self.process.returncode
        return "" if code is None else f" (exit {code})"

    async def _round(
        self,
        server: FLServer,
        head: dict[str, Any],
        body: memoryview,
        rounds: anyio.Semaphore,
    ) -> None:
        try:
            await self._one_round(server, head, body)
        finally:
            rounds.release()

    async def _one_round(self, server: FLServer, head: dict[str, Any], body: memoryview) -> None:
        rid = head.get("id")
        try:
            model, targets, kw = _round_request(server, head, body)
            server.params_format = wire_format(body)
            result = await server.run_round(model, targets, **kw)
        except Exception as exc:  # any failure of the round is the job's to hear, by name
            if not isinstance(exc, RoundFailed | SecAggRangeError | JobProcessError):
                self._log.warning("a round of the job process failed", exc_info=exc)
            failed = exc.failed if isinstance(exc, RoundFailed) else {}
            kind = type(exc).__name__
            await self._answer(
                {"op": "error", "id": rid, "kind": kind, "why": str(exc), "failed": failed}
            )
            return
        del model
        if result.updates is not None:
            out = pack(result.updates) if len(result.updates) else None
        else:
            out = result.sum.partial() if result.sum.count else None
        head = {
            "op": "result",
            "id": rid,
            "round": result.round,
            "responded": result.responded,
            "failed": result.failed,
            "metrics": result.metrics,
            "late": result.late,
            "partials": result.partials,
        }
        await self._answer(head, model_parts(out, CODECS) if out is not None else ())

    async def _answer(self, head: dict[str, Any], parts: Sequence[Any] = ()) -> None:
        """Answer a round. A job process gone meanwhile is the reading's to report; one that
        does not take its answer within ``hang_after`` is hung: the channel closes, and the
        reading fails the job."""
        with anyio.move_on_after(self.channel.idle) as waited:
            with contextlib.suppress(JobProcessError):
                await self.channel.send(head, parts)
        if waited.cancelled_caught:
            await self.channel.aclose()


def _round_request(
    server: FLServer, head: Mapping[str, Any], body: memoryview
) -> tuple[FLModel, list[str], dict[str, Any]]:
    """A job process's round, checked: its own sites, numbers in range, a model that decodes."""
    targets, need = head.get("targets"), head.get("min_responses")
    deadline: Any = head.get("deadline")
    if (
        not isinstance(targets, list)
        or not targets
        or not all(type(t) is str for t in targets)
        or len(set(targets)) != len(targets)
    ):
        raise JobProcessError("a round's targets must be a list of distinct sites")
    strangers = sorted(str(t) for t in targets if t not in server.clients)
    if strangers:
        raise JobProcessError(f"a round may only go to the job's sites, not {strangers[:5]}")
    if need is not None and not (type(need) is int and 0 <= need <= len(targets)):
        raise JobProcessError(f"min_responses {need!r} is not a count of the round's targets")
    if type(deadline) not in (int, float) or not MIN_DEADLINE <= deadline <= MAX_DEADLINE:
        raise JobProcessError(
            f"a round's deadline must be within [{MIN_DEADLINE:g}, {MAX_DEADLINE:g}] s"
        )
    if head.get("task", "train") not in TASK_KINDS:
        raise JobProcessError(f"a round's task must be one of {TASK_KINDS}")
    try:
        secure = SecureAggregation.of(head.get("secure") or False)
        model = model_from_parts(body)
    except (ConfigError, DecodeError, TypeError) as exc:
        raise JobProcessError(f"a round the job process asked for does not decode: {exc}") from None
    task = head.get("task", "train")
    if secure is not None and task != "train":
        raise JobProcessError("a secure round trains: no other task")
    collect = head.get("collect", "sum")
    if collect not in ("sum", "each") or (secure is not None and collect != "sum"):
        raise JobProcessError("a round collects 'sum' or 'each' (a secure round: 'sum')")
    headers = _round_headers(server, head.get("headers") or {}, targets)
    kw = {
        "headers": headers,
        "min_responses": need,
        "deadline": float(deadline),
        "secure": secure,
        "task": task,
        "collect": collect,
    }
    return model, targets, kw


def _round_headers(server: FLServer, headers: Any, targets: list[str]) -> dict[str, str]:
    """A job process's round headers, checked: where a model is handed (the job's sites, a
    digest) or a swarm's plan (over the job's sites)."""
    allowed = (*ROUTE_FIELDS, SWARM_PLAN)
    if not isinstance(headers, dict) or not set(headers) <= set(allowed):
        raise JobProcessError(f"a round's headers may only be {list(allowed)}")
    for key, value in headers.items():
        if type(value) is not str or len(value) > (MAX_PLAN if key == SWARM_PLAN else 512):
            raise JobProcessError(f"a round's header {key} must be a short text")
        if key == SWARM_PLAN:
            try:
                members = SwarmPlan.decode(value).members
            except ValueError as exc:
                raise JobProcessError(f"a round's swarm plan does not decode: {exc}") from None
            if set(members) != set(targets):
                raise JobProcessError("a swarm's members must be the round's targets")
        elif key != TAKE_SHA and value and value not in server.clients:
            raise JobProcessError(f"a round's {key} must name one of the job's sites")
    return dict(headers)


async def _end(process: anyio.abc.Process, channel: Channel) -> None:
    """Close the channel, give the process a moment to exit by itself, then kill it and
    whatever it started (its session's process group)."""
    await channel.aclose()
    with anyio.move_on_after(5):
        await process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
    with contextlib.suppress(OSError, anyio.ClosedResourceError):
        await process.aclose()


def _floats(doc: Any, prefix: str) -> dict[str, float]:
    if not isinstance(doc, dict):
        return {}
    out = {}
    for k, v in doc.items():
        if type(v) in (int, float):
            out[f"{prefix}{k}"] = float(v)
    return out


def strings(doc: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


CODECS = CodecRegistry()


async def check_recipe(
    spec: str,
    overrides: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    *,
    code: Path | None = None,
) -> None:
    """Load ``spec`` with ``overrides`` in a child Python process (``python -m
    flare_async.fl.job_process check SPEC OVERRIDES``; with ``code``, the job's own code first
    on its path), as a submission is checked: a module whose import crashes, exits or hangs
    takes that process down, not the server.

    Raises:
        ConfigError: the child did not load a recipe within ``timeout`` (its words, if any).
    """
    timeout = RESOLVE_TIMEOUT if timeout is None else timeout
    argv = [*python(code), "-m", "flare_async.fl.job_process", "check", spec]
    argv.append(json.dumps(dict(overrides or {})))
    with tempfile.TemporaryFile() as err:  # whatever it prints: on disk, not in the server
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                env=code_path_env(code),
            )
        except OSError as exc:
            raise ConfigError(f"the recipe {spec} could not be checked: {exc}") from None
        with anyio.move_on_after(timeout) as waited:
            await process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()
        err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
        tail = err.read().decode(errors="replace")
    if waited.cancelled_caught:
        raise ConfigError(f"the recipe {spec} did not load within {timeout:g} s")
    if process.returncode != 0:
        words = (tail.strip().splitlines() or [""])[-1][:500]
        if words.startswith("ConfigError: "):
            raise ConfigError(words.removeprefix("ConfigError: "))
        raise ConfigError(f"the recipe {spec} does not load (exit {process.returncode}): {words}")


__all__ = ["BEAT", "CODECS", "JobFacts", "JobProcess", "check_recipe", "strings"]
