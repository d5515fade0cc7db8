"""What the tcp and ws listeners share: their listening socket, the accept errors they skip,
and the count of connections not yet past their hello (see :class:`~._base.Admission`)."""

from __future__ import annotations

import errno
import socket
from collections import Counter
from typing import Any

from flare_async.transport._base import Admission


class Pending:
    """The connections of one listener not yet past their hello, per source address."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.total = 0
        self.per_source: Counter[str] = Counter()

    def admit(self, source: str) -> str | None:
        """Count one more connection from ``source``; or why it must be refused (not counted
        as pending; counted in ``admission.refused``)."""
        adm = self.admission
        why = None
        if self.total >= adm.max_pending:
            why = "per-listener cap"
        elif self.per_source[source] >= adm.max_pending_per_source:
            why = "per-source cap"
        if why is not None:
            adm.refused[why] += 1
            return why
        self.total += 1
        self.per_source[source] += 1
        return None

    def release(self, source: str) -> None:
        self.total -= 1
        self.per_source[source] -= 1
        if not self.per_source[source]:
            del self.per_source[source]


ACCEPT_SKIP = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ECONNRESET,
        errno.ETIMEDOUT,
        errno.EINTR,
        errno.EAGAIN,
    }
)
"""accept() errors that concern only the connection being accepted (trio's list, and the
retryable ones): the listener serves the rest."""


def listening_socket(family: int, addr: Any, backlog: int) -> socket.socket:
    """A non-blocking socket bound to ``addr`` and listening (closed again if that fails)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
