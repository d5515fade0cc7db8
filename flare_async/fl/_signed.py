"""Results signed end to end: a site signs what it sends, the server (or the relay that folds
it) checks the signature before the bytes count. See :mod:`flare_async.security._signing`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flare_async.cell import Cell, IncomingStream, Payload
from flare_async.errors import IntegrityError
from flare_async.security import SignatureVerifier, Signer
from flare_async.streaming import CRYPTOGRAPHIC

CHANNEL = "fl"
E2E = "e2e1"
"""The ``enc`` header of a result sealed for the server's key (``security.encrypt_for``)."""
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
    digest: bool | str,
    headers: dict[str, str] | None = None,
) -> Payload:
    """Stream a result (or a relay's partial sum) for ``task`` to ``dst`` on the FL channel;
    return the receiver's answer (``taken``, ``late``...).

    With ``signer``, the stream's end message carries a signature over the BLAKE3 digest of
    the bytes (computed while they stream: no second pass; the signed text names the
    algorithm), the task and both ends; the receiver computes the digest itself and checks the
    signature (:func:`check_signed`)."""

    def seal(to: str, sha: str) -> dict[str, str]:
        assert signer is not None
        fields = {"src": cell.name, "dst": to, "task": task, "sha256": sha, "topic": topic}
        return signer.sign(fields)

    return await cell.stream(
        dst,
        CHANNEL,
        topic,
        parts,
        codec=codec,
        headers={**(headers or {}), "task": task},
        digest=digest,
        window=RESULT_WINDOW,
        seal=seal if signer is not None else None,
    )


def check_signed(verifier: SignatureVerifier, stream: IncomingStream, receiver: str) -> None:
    """Check a received result's signature (in its end message, once all bytes arrived).

    Raises:
        IntegrityError: unsigned, signed by another cell, for another task or receiver, or
            bytes other than the ones signed.
    """
    if not stream.digest:
        raise IntegrityError(f"a result from {stream.src} came without a digest to check")
    if stream.digest.partition(":")[0] not in CRYPTOGRAPHIC:
        raise IntegrityError(f"a result from {stream.src} has no cryptographic digest to check")
    verifier.verify(
        stream.trailer,
        src=stream.src,
        expect={
            "dst": receiver,
            "task": stream.headers.get("task", ""),
            "sha256": stream.digest,
            "topic": stream.topic,
        },
        now=datetime.now(UTC),
    )


__all__ = ["CHANNEL", "E2E", "RESULT_WINDOW", "check_signed", "stream_signed"]
