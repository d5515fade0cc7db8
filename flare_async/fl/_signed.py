"""Results signed end to end: a site signs what it sends, the server (or the relay that folds
it) checks the signature before the bytes count. See :mod:`flare_async.security._signing`."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread

from flare_async.cell import Cell, IncomingStream
from flare_async.errors import IntegrityError
from flare_async.security import SignatureVerifier, Signer

CHANNEL = "fl"
RESULT_WINDOW = 4 << 20
"""Flow-control window of a result stream: what the server holds at most per client sending
at once (16 MiB, the default, times many clients would be the server's largest cost)."""


async def stream_signed(
    cell: Cell,
    signer: Signer | None,
    dst: str,
    topic: str,
    parts: list[Any],
    task: str,
    *,
    codec: str,
    digest: bool,
) -> None:
    """Stream a result (or a relay's partial sum) for ``task`` to ``dst`` on the FL channel.

    With ``signer``, the SHA-256 of the bytes is computed first (in a worker thread), signed
    with the task and both ends, and announced with the stream: the receiver's stream layer
    checks the bytes against it and the receiver checks the signature
    (:func:`check_signed`)."""
    headers = {"task": task}
    sha = ""
    if signer is not None:
        sha = await anyio.to_thread.run_sync(_sha256, parts)
        fields = {"src": cell.name, "dst": dst, "task": task, "sha256": sha, "topic": topic}
        headers.update(signer.sign(fields))
    await cell.stream(
        dst,
        CHANNEL,
        topic,
        parts,
        codec=codec,
        headers=headers,
        digest=digest or signer is not None,
        sha256=sha,
        window=RESULT_WINDOW,
    )


def check_signed(verifier: SignatureVerifier, stream: IncomingStream, receiver: str) -> None:
    """Check a received result's signature (after its bytes all arrived).

    Raises:
        IntegrityError: unsigned, signed by another cell, for another task or receiver, or
            bytes other than the ones signed.
    """
    if not stream.sha256:
        raise IntegrityError(f"a result from {stream.src} came without a digest to check")
    verifier.verify(
        stream.headers,
        src=stream.src,
        expect={
            "dst": receiver,
            "task": stream.headers.get("task", ""),
            "sha256": stream.sha256,
            "topic": stream.topic,
        },
        now=datetime.now(UTC),
    )


def _sha256(parts: list[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


__all__ = ["CHANNEL", "RESULT_WINDOW", "check_signed", "stream_signed"]
