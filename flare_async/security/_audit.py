"""Audit logs: append-only JSON lines, each chained to the one before by its SHA-256.

Every line is a JSON object with ``seq`` (0, 1, 2 ...), ``time``, ``prev`` (the previous line's
``hash``; 64 zeros for the first), the event's own fields, and ``hash``: the SHA-256 of the
line's canonical JSON without ``hash`` (keys sorted, no spaces). Editing a line breaks its hash;
deleting or moving one breaks the next line's ``prev`` and the sequence. :func:`verify_audit`
finds the first line that does not hold together. A chain cannot show that its *last* lines
were cut off: compare the head (:attr:`AuditReport.head`, the last hash) with a copy kept
elsewhere (``flare-async audit verify --head``) when that matters.

Layer L1: files and hashes only; the caller gives the time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
_RESERVED = frozenset({"seq", "time", "prev", "hash"})


def _digest(record: dict[str, Any]) -> str:
    canonical = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(f"duplicate key {key!r}")
        record[key] = value
    return record


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify_audit` found.

    Attributes:
        ok: every line holds together.
        entries: lines checked (up to the first bad one).
        head: the hash of the last good line (``GENESIS`` for an empty log).
        bad_line: the first bad line's number (1-based), if any.
        reason: why it is bad.
    """

    ok: bool
    entries: int
    head: str
    bad_line: int | None = None
    reason: str = ""


def verify_audit(lines: Iterable[str]) -> AuditReport:
    """Check a chain of audit lines (see the module text)."""
    prev, n = GENESIS, 0
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            return AuditReport(
                False, n - 1, prev, n, f"{exc}: the line as written is not the record hashed"
            )
        except ValueError as exc:
            return AuditReport(False, n - 1, prev, n, f"unreadable: {exc}")
        if not isinstance(record, dict) or "hash" not in record:
            return AuditReport(False, n - 1, prev, n, "not an audit record")
        claimed = record.pop("hash")
        if record.get("seq") != n - 1:
            return AuditReport(False, n - 1, prev, n, f"sequence {record.get('seq')}, not {n - 1}")
        if record.get("prev") != prev:
            return AuditReport(False, n - 1, prev, n, "does not follow the line before it")
        if _digest(record) != claimed:
            return AuditReport(False, n - 1, prev, n, "its content does not match its hash")
        prev = str(claimed)
    return AuditReport(True, n, prev)


class AuditLog:
    """Appends chained lines to one file (thread-safe; one writer process per file).

    Args:
        path: the log file; an existing log is verified and continued.
        durable: fsync after every line (slower; survives a power cut).

    Raises:
        ValueError: the existing file does not verify (it is left as it is; nothing appended).
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                report = verify_audit(f)
            if not report.ok:
                raise ValueError(f"{self.path}: line {report.bad_line}: {report.reason}")
            self._seq, self._prev = report.entries, report.head
        else:
            self._seq, self._prev = 0, GENESIS

    @property
    def head(self) -> str:
        return self._prev

    def append(self, event: str, *, now: float, **fields: Any) -> str:
        """Write one line; returns its hash.

        Raises:
            ValueError: a field uses a reserved name (seq, time, prev, hash).
        """
        clash = _RESERVED & set(fields)
        if clash:
            raise ValueError(f"reserved audit field names: {sorted(clash)}")
        with self._lock:
            record = {
                "seq": self._seq,
                "time": round(now, 6),
                "prev": self._prev,
                "event": event,
                **fields,
            }
            digest = _digest(record)
            line = json.dumps({**record, "hash": digest}, ensure_ascii=False, default=str)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            self._seq += 1
            self._prev = digest
            return digest


__all__ = ["GENESIS", "AuditLog", "AuditReport", "verify_audit"]
