"""Models passed site to site: what cyclic training (and any workflow that chains sites) uses
so that the model goes from one site to the next directly, not through the server.

A task may carry, beside its model, two instructions (task headers, signed with the task when
the server signs tasks, so no relay can add, drop or change them):

``pass_to: SITE``
    the result is *handed over* to ``SITE`` (``fl/handoff``, a stream over the fabric: a peer
    link where one exists, else up the tree and down again, the cells between forwarding its
    frames undecoded); the server gets a result without tensors whose ``meta["handed_to"]``
    names ``SITE`` and whose ``meta["handoff_sha"]`` is the BLAKE3 digest of what was handed
    over (``"blake3:<hex>"``). If the handover fails, the whole result goes to the server
    instead, its ``meta["handoff_failed"]`` saying why.
``take_from: SITE`` and ``take_sha: DIGEST``
    the task's model is the one ``SITE`` handed over with that digest (the task itself carries
    no tensors): a site takes a handed-over model only when the server's task names its sender
    and digest, so no other site (and no relay) can slip a model in. A task whose handover is
    not there is refused (``BadRequest``), and the round counts the site as failed.

A site keeps, per sender, the last model it handed over and no task took yet, and at most
:data:`KEEP` senders' (the one heard from least recently dropped): a sender cannot push out
what another handed over, short of posing as many senders.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import anyio.to_thread

from flare_async.cell import Cell, IncomingStream
from flare_async.errors import BadRequest, Unauthorized
from flare_async.fl._model import FLModel
from flare_async.fl._results import digest_of
from flare_async.fl._signed import CHANNEL

KEEP = 16
"""Senders whose last handover (not yet taken) a site keeps."""
PASS_TO = "pass_to"
TAKE_FROM = "take_from"
TAKE_SHA = "take_sha"
ROUTE_FIELDS = (PASS_TO, TAKE_FROM, TAKE_SHA)
"""The task headers that say where a model comes from and goes: signed with the task."""


class Handoffs:
    """The models other sites handed over to this one, until a task takes them."""

    def __init__(self, job: str, keep: int = KEEP) -> None:
        self.job = job
        self.keep = keep
        self._held: OrderedDict[str, tuple[str, bytes | memoryview]] = OrderedDict()
        """Per sender: the digest and bytes of its last handover."""

    async def take_stream(self, stream: IncomingStream) -> bytes:
        """A handover (``fl/handoff``) from another cell: kept by its sender and digest.

        Raises:
            Unauthorized: it is for another job.
        """
        if stream.headers.get("job", "") != self.job:
            raise Unauthorized(f"a handover for job {stream.headers.get('job', '')!r:.80}")
        data = await stream.read_joined()
        sha = stream.digest  # BLAKE3, computed as the bytes came and checked against the sender's
        if not sha.startswith("blake3:"):  # a sender that did not ask for it: hash them here
            sha = await anyio.to_thread.run_sync(digest_of, [data])
        self._held.pop(stream.src, None)
        self._held[stream.src] = (sha, data)  # read_joined's own buffer: kept, not copied
        while len(self._held) > self.keep:
            self._held.popitem(last=False)
        return b"kept"

    def pop(self, sender: str, sha: str) -> bytes | memoryview:
        """The model ``sender`` handed over with digest ``sha`` (forgotten here).

        Raises:
            BadRequest: none such arrived (or it was dropped for newer ones).
        """
        held = self._held.get(sender)
        if held is None or held[0] != sha:
            raise BadRequest(f"no model handed over by {sender} with digest {sha:.80}")
        del self._held[sender]
        return held[1]


async def hand_over(cell: Cell, dst: str, parts: Sequence[Any], job: str, task: str) -> str:
    """Stream a result's bytes to ``dst`` as a handover; returns their digest.

    Raises:
        FlareError: ``dst`` could not be reached or refused it.
    """
    sha = await anyio.to_thread.run_sync(digest_of, parts)
    await cell.stream(  # the receiver checks its own BLAKE3 of the bytes against it: one pass
        dst,
        CHANNEL,
        "handoff",
        list(parts),
        headers={"job": job, "task": task},
        digest="blake3",
        sha256=sha,
    )
    return sha


def handed(model: FLModel, dst: str, sha: str) -> FLModel:
    """What the server gets when a result was handed over: no tensors, where it went."""
    meta = {**model.meta, "handed_to": dst, "handoff_sha": sha}
    return FLModel(
        params={},
        params_type=model.params_type,
        metrics=model.metrics,
        meta=meta,
        current_round=model.current_round,
        total_rounds=model.total_rounds,
    )


__all__ = [
    "KEEP",
    "PASS_TO",
    "ROUTE_FIELDS",
    "TAKE_FROM",
    "TAKE_SHA",
    "Handoffs",
    "hand_over",
    "handed",
]
