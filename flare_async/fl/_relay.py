"""Hierarchical aggregation: a relay folds its subtree's results and sends up one partial sum.

The server (``FLServer(hierarchical=True)``) tells each relay directly below it which sites
under it answer a task and by when (``fl/expect``); each relay tells the relays below it the
same for their share (a little earlier), down to the leaves, so every tier folds. The sites send
their results to their parent instead of the server; a relay folds its own children's results
(each weighted by ``result_weight``) and the partial sums of the relays below it into a weighted
sum as they arrive and, once all answered or its deadline passed, streams one partial sum (sum,
total weight, each tensor's own total weight where some sites did not send that tensor, who
answered, who failed and why, each site's metrics) to the cell that armed it. Each cell's
traffic and memory for a round grow with its own fan-out, not with the sites below it, and the
result equals flat FedAvg (partial sums travel in the accumulator's dtype, losslessly).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from flare_async._memory import return_large_blocks
from flare_async.cell import Cell, Context, HandlerTable, IncomingStream, Payload
from flare_async.errors import BadRequest, FlareError, Unauthorized
from flare_async.fl._admin import decode_as
from flare_async.fl._aggregate import COUNT_KEY, WEIGHT_KEY, WeightedSum
from flare_async.fl._model import FLModel, ParamsType, model_parts
from flare_async.fl._results import Collector, RelayPlan, arm_relays_below, receive_result
from flare_async.fl._secure import VECTOR, masked_vector
from flare_async.fl._signed import CHANNEL, stream_signed
from flare_async.security import SignatureVerifier, Signer


class RelayAggregator:
    """Mount :meth:`handlers` on a relay cell to aggregate its children's results (large ones
    wait in ``spill``, complete, before they are folded; see ``FLServer``). With ``verifier``
    the children's signatures are checked; with ``signer`` the partial sum is signed by the
    relay (the server checks it: it cannot check the sites' own signatures inside a sum). Its
    partial sums go to the cell that armed it for the task (the server, or the relay above)."""

    def __init__(
        self,
        cell: Cell,
        *,
        digest: bool = True,
        spill: str | os.PathLike[str] | None = None,
        verifier: SignatureVerifier | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.verifier = verifier
        self.signer = signer
        if verifier is not None:
            cell.require_digest(CHANNEL, "result")  # the signed digest is checked against it
        self.cell = cell
        self.spill = Path(spill) if spill is not None else None
        return_large_blocks()  # a new model every round: freed memory goes back
        self.digest = digest
        self._open: dict[str, Collector] = {}
        self._masked: dict[str, MaskedSum | None] = {}

    def handlers(self) -> HandlerTable:
        table = HandlerTable("fl relay")

        @table.request(CHANNEL, "expect")
        async def expect(ctx: Context, msg: Payload) -> bytes:
            plan = decode_as(msg, RelayPlan)
            task, sites, deadline = plan.task, plan.sites, plan.deadline
            me = self.cell.name
            if not me.startswith(ctx.src + "."):
                raise Unauthorized(f"only a cell above {me} arms it, not {ctx.src}")
            if not sites or any(not s.startswith(me + ".") for s in sites):
                raise BadRequest(f"{me} aggregates only for cells below it")
            masked = MaskedSum(plan.secure) if plan.secure else None
            collector = Collector(task, 0, sites, masked.add if masked else None)
            self._masked[task] = masked
            self._open[task] = collector
            # Well within the 10 s the cell above gives this relay to answer.
            await arm_relays_below(self.cell, collector, list(collector.pending), plan.below(), 5)
            self.cell._spawn(self._collect, collector, deadline, ctx.src, name=f"fl relay {task}")
            return b"armed"

        @table.request(CHANNEL, "failed")
        async def failed(ctx: Context, msg: Payload) -> bytes:
            collector = self._open.get(ctx.headers.get("task", ""))
            if collector is not None and ctx.src in collector.pending:
                collector.result.failed[ctx.src] = msg.tobytes().decode(errors="replace")
                collector.settle(ctx.src)
            return b"noted"

        @table.stream(CHANNEL, "result")
        async def result(ctx: Context, stream: IncomingStream) -> bytes:
            collector = self._open.get(stream.headers.get("task", ""))
            if collector is None:
                return b"late"
            return await receive_result(
                collector, ctx.src, stream, self.spill, self.verifier, self.cell.name
            )

        return table

    async def _collect(self, collector: Collector, deadline: float, upstream: str) -> None:
        with anyio.move_on_after(deadline):
            while collector.pending:
                collector.changed = anyio.Event()
                await collector.changed.wait()
        await collector.close()
        self._open.pop(collector.task, None)
        result = collector.result
        for site in collector.pending:
            result.failed.setdefault(site, "no result before the relay's deadline")
        if not result.responded:
            return  # nothing to send; the server sees these sites fail at its deadline
        masked = self._masked.pop(collector.task, None)
        partial = (
            masked.partial(result.responded, result.failed, result.metrics)
            if masked is not None
            else _partial(result.sum, result.responded, result.failed, result.metrics)
        )
        try:
            await stream_signed(
                self.cell,
                self.signer,
                upstream,
                "result",
                model_parts(partial, self.cell.codecs, "tensors"),  # lossless
                collector.task,
                codec="",
                digest=self.digest,
            )
        except FlareError as exc:
            self.cell._log.warning("partial sum not delivered", task=collector.task, error=str(exc))


class MaskedSum:
    """A secure round's relay side: the sum (mod 2^bits, the ring of the vectors: uint32 or
    uint64) of its sites' masked vectors. A site's refusal (a result out of the declared range)
    counts that site as failed, with its reason."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.total: np.ndarray | None = None
        self.params_type = ParamsType.FULL

    def add(self, site: str, update: FLModel) -> None:
        y = masked_vector(update, self.session)
        if self.total is None:
            self.total = y.copy()
        elif y.size != self.total.size or y.dtype != self.total.dtype:
            raise ValueError(
                f"a masked vector of {y.size} {y.dtype}, not {self.total.size} {self.total.dtype}"
            )
        else:
            self.total += y
        self.params_type = update.params_type

    def partial(
        self, responded: list[str], failed: dict[str, str], metrics: dict[str, dict[str, float]]
    ) -> FLModel:
        assert self.total is not None
        return FLModel(
            params={VECTOR: self.total},
            params_type=self.params_type,
            meta={
                "secagg": self.session,
                WEIGHT_KEY: 0.0,  # the weights are inside the masked sum
                COUNT_KEY: len(responded),
                "responded": responded,
                "failed": failed,
                "metrics": metrics,
            },
        )


def _partial(
    total: WeightedSum,
    responded: list[str],
    failed: dict[str, str],
    metrics: dict[str, dict[str, float]],
) -> Any:
    partial = total.partial()
    partial.meta.update({"responded": responded, "failed": failed, "metrics": metrics})
    return partial
