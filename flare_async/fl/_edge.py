"""Edge clients: devices online now and then, that come for their work instead of waiting for it.

A phone or a gateway behind a proxy reaches the system through one URL (``wss://`` through the
proxy) and is connected only in short visits: connect, pull a task (``fl/pull``: the model
streams down while the pull waits), disconnect; train offline; connect, push the result,
disconnect. The server side is ``fedbuff(..., pull=True)``: it hands out at most
``concurrency`` tasks at once, one per client, and folds each pushed result with the staleness
of the version it was trained on.

:class:`EdgeClient` is a :class:`~flare_async.fl.ClientRuntime` whose ``receive`` and ``send``
are visits, so the same Client API training script runs on an always-connected site and on an
intermittent device. A result that cannot be pushed (offline again) stays in the client's
outbox and goes out at the start of its next visit: nothing trained is lost to a dropped link.
Each visit is a fresh cell on a fresh link (the cell is cheap): nothing is held between visits
but the outbox and the task in hand.
"""

from __future__ import annotations

import json
import queue
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from flare_async.cell import Cell, PeerVerifier
from flare_async.cell._signing import MessageSigner
from flare_async.errors import (
    CellClosed,
    ConnectError,
    DeadlineExceeded,
    FlareError,
    Overloaded,
    RoutingError,
    StreamError,
    TransportError,
)
from flare_async.fl._client import ClientRuntime, _in_loop
from flare_async.fl._model import FLModel, model_parts
from flare_async.fl._server import PULL_WAIT
from flare_async.fl._signed import CHANNEL
from flare_async.transport import Driver
from flare_async.wire import Limits

OFFLINE: tuple[type[FlareError], ...] = (
    TransportError,
    RoutingError,
    DeadlineExceeded,
    StreamError,
    CellClosed,
    Overloaded,
)
"""Failures that mean "not now" (no link, the path or the server busy or down): the visit is
tried again later. Anything else (refused, unauthorised, no FL job there) is raised."""


@dataclass
class EdgeStats:
    """What an edge client's visits did.

    Attributes:
        visits: connections made (successful ones).
        offline: visits that failed for want of a link or a path.
        tasks: tasks pulled.
        waits: pulls answered "come back later".
        pushed: the server's answer to each result pushed (``taken``, ``late``...), counted.
        dropped: results the server refused outright (not retried).
    """

    visits: int = 0
    offline: int = 0
    tasks: int = 0
    waits: int = 0
    pushed: dict[str, int] = field(default_factory=dict)
    dropped: int = 0


class EdgeClient(ClientRuntime):
    """A client that visits: every ``receive`` pulls a task on a short connection, every
    ``send`` pushes a result on another (see the module text).

    Args:
        name: the client's cell name (under the cell it connects to).
        url: where it connects, e.g. ``wss://fl.example.org:443/flare``.
        server: the server cell's name.
        drivers / verify_peer / signing / limits: as for :class:`~flare_async.Cell` (a kit's:
            ``cli.edge_client_from_kit``).
        connect_timeout: seconds a visit waits for its link before counting as offline.
        pull_timeout: seconds a pull may take, the model's download included.
        retry: seconds to wait before visiting again after an offline visit.
        runtime: the rest goes to :class:`~flare_async.fl.ClientRuntime` (config, codec,
            signer, policy, task_verifier...).
    """

    def __init__(
        self,
        name: str,
        url: str,
        server: str = "server",
        *,
        drivers: Iterable[Driver] = (),
        verify_peer: PeerVerifier | None = None,
        signing: MessageSigner | None = None,
        limits: Limits | None = None,
        connect_timeout: float = 30.0,
        pull_timeout: float = 300.0,
        retry: float = PULL_WAIT,
        **runtime: Any,
    ) -> None:
        self.url = url
        self.drivers = list(drivers)
        self.verify_peer = verify_peer
        self.signing = signing
        self.limits = limits
        self.connect_timeout = connect_timeout
        self.pull_timeout = pull_timeout
        self.retry = retry
        self.edge = EdgeStats()
        self._outbox: list[tuple[str, FLModel, str, str]] = []
        """Results as they leave (filtered, masked): task, model, destination, codec."""
        self._name = name
        super().__init__(self._new_cell(), server, **runtime)

    def _new_cell(self) -> Cell:
        return Cell(
            self._name,
            parent=self.url,
            drivers=self.drivers,
            verify_peer=self.verify_peer,
            signing=self.signing,
            limits=self.limits,
            heartbeat=None,  # a visit is short; a dead link shows as a failed call
        )

    @property
    def outbox(self) -> int:
        """Results trained but not yet pushed."""
        return len(self._outbox)

    @asynccontextmanager
    async def visit(self) -> AsyncIterator[Cell]:
        """One connection: a fresh cell linked to ``url``; closed (an orderly goodbye) after.

        Raises:
            ConnectError: no link within ``connect_timeout``.
        """
        cell = self._new_cell()
        cell.mount(self.handlers())
        if self.task_verifier is not None:
            cell.require_digest(CHANNEL, "task")
        self.cell = cell
        async with cell:
            with anyio.move_on_after(self.connect_timeout):
                await cell.wait_parent()
            if cell.parent_name is None:
                raise ConnectError(
                    f"{self._name}: no link to {self.url} within {self.connect_timeout:g} s"
                )
            self.edge.visits += 1
            yield cell

    def track(self, recs: list[dict[str, Any]]) -> None:
        """Tracked values wait for the next visit (the device is offline in between)."""
        self.metrics.add(recs)

    async def _flush(self, cell: Cell) -> None:
        """Push what the outbox holds, oldest first, then the tracked values; stop at the
        first offline failure."""
        await self._push_results()
        await self.flush_metrics()

    async def _push_results(self) -> None:
        cell = self.cell
        while self._outbox:
            task, model, dst, codec = self._outbox[0]
            parts = model_parts(model, cell.codecs, codec)
            try:
                reply = await self._stream_result(parts, task, dst, codec)
                answer = reply.tobytes().decode(errors="replace")
            except OFFLINE:
                raise
            except FlareError as exc:  # refused: sending it again would not help
                self.edge.dropped += 1
                cell._log.warning("result refused", task=task, error=str(exc))
                answer = ""
            else:
                self.edge.pushed[answer] = self.edge.pushed.get(answer, 0) + 1
            self._outbox.pop(0)

    async def _check_in(self) -> FLModel | float | None:
        """One visit: push what waits, then pull. Returns the task's model, the seconds to
        stay away, or ``None`` when the job is over."""
        try:
            async with self.visit() as cell:
                await self._flush(cell)
                reply = await cell.request(
                    self.server, CHANNEL, "pull", b"", timeout=self.pull_timeout
                )
        except OFFLINE as exc:
            self.edge.offline += 1
            self.cell._log.info("offline", url=self.url, error=str(exc))
            return self.retry
        answer = json.loads(reply.tobytes())
        if answer.get("done"):
            self.stop()
            return None
        task = answer.get("task")
        if task is None:
            self.edge.waits += 1
            return float(answer.get("wait", PULL_WAIT))
        while True:  # the task is in the inbox already (its stream ended before the reply)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:  # not expected: the server answers once the task arrived
                self.cell._log.warning("a granted task did not arrive", task=task)
                return self.retry
            model = self._take(item)
            if model is None:  # the job was stopped while we were here
                return None
            if self._task == task:
                self.edge.tasks += 1
                return model
            self._received.pop(self._task or "", None)  # a task lost earlier: replaced

    async def areceive(self, timeout: float | None = None) -> FLModel | None:
        """Visit until a task comes: its model; ``None`` once the job is over (or after
        ``timeout``). Between visits the client is offline."""
        with anyio.move_on_after(timeout):
            while self._running:
                got = await self._check_in()
                if got is None or isinstance(got, FLModel):
                    return got
                await anyio.sleep(got)
        return None

    async def asend(self, model: FLModel) -> None:
        """Push the result of the task in hand on a visit of its own; if offline, it waits in
        the outbox for the next visit."""
        if self._task is None:
            raise RuntimeError("send() before receive(): no task to answer")
        task, self._task = self._task, None
        # The site's filters run once, now: a result retried later leaves as filtered.
        codec = self._result_codec(task)
        self._outbox.append((task, await self._outgoing(model, task), self._reply_to, codec))
        await self.flush()

    async def flush(self) -> bool:
        """Push what the outbox holds on one visit; True if it is empty after (offline: what
        is left waits for the next visit)."""
        if self._outbox:
            try:
                async with self.visit() as cell:
                    await self._flush(cell)
            except OFFLINE as exc:
                self.edge.offline += 1
                self.cell._log.info("offline; results wait", url=self.url, error=str(exc))
        return not self._outbox

    # The blocking Client API (a script in a worker thread): the same visits, through the portal.
    def receive(self, timeout: float | None = None) -> FLModel | None:
        if _in_loop.get() is self:
            raise RuntimeError("an async script on the cell's loop uses await receive_async()")
        assert self._portal is not None, "the script must run under EdgeClient.run_script"
        if (peeked := self._pop_peeked()) is not None:  # taken by is_running()
            return peeked
        return self._portal.call(self.areceive, timeout)

    def send(self, model: FLModel) -> None:
        if _in_loop.get() is self:
            raise RuntimeError("an async script on the cell's loop uses await send_async()")
        assert self._portal is not None, "the script must run under EdgeClient.run_script"
        self._portal.call(self.asend, model)


__all__ = ["OFFLINE", "EdgeClient", "EdgeStats"]
