"""Process-wide memory behaviour for processes that hold large models.

glibc serves a large allocation with its own ``mmap`` (given back to the system when freed)
only up to a *dynamic* threshold: after the first large block is freed, blocks up to 32 MiB
come from the heap instead, and freed heap memory is kept by the process. A server that makes a
new 100 MB model every round out of 10 MB tensors then grows by hundreds of MiB of freed but
kept memory (measured: 359 MiB peak instead of 258-282 for the FedAvg benchmark's server).
Fixing the threshold keeps large tensors in their own mappings, returned at once when freed.
Just above 4 MiB, stream chunks (1 MiB, or 4 MiB for large objects) still come from the heap
and are reused without page faults (a threshold at the chunk size cost the FedAvg benchmark
30% of its round time: each chunk a fresh mapping, faulted in page by page).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3
_done = False


def return_large_blocks(threshold: int = (4 << 20) + (64 << 10)) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with ``mmap``, always.

    Called by the FL server, relays and sites (once per process; later calls do nothing).
    Returns whether the setting took effect (False on other C libraries).
    """
    global _done  # noqa: PLW0603 - a process-wide setting, made once
    if _done or not sys.platform.startswith("linux"):
        return _done
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        _done = False
    return _done
