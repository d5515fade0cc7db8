"""Relaying a large payload from one TCP socket to another without reading it (``os.splice``).

A relay that forwards a stream chunk through user space pays two copies per byte (``recv_into``
then ``sendmsg``) on top of the ends' own; on loopback or a busy relay host those copies are the
relay's whole cost. ``splice`` moves the payload's pages from the inbound socket into a pipe and
from the pipe into the outbound socket by reference.

The payload is gathered first and written second (store and forward, as a frame read into
memory is): the outbound link gets a frame only once all of it has arrived, so a sender that
dies mid-frame never leaves half a frame on the next link. A pipe holds at most 1 MiB (the
system's ``pipe-max-size`` for unprivileged processes, and a pipe counts page references, not
bytes), so a frame is gathered into a :class:`PipeChain` of up to :data:`MOST_PIPES` pipes (a
4 MiB chunk takes four or five); what they cannot hold is read into memory as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import termios
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np

SPLICE = hasattr(os, "splice") and hasattr(os, "pipe2")
"""Whether this platform can splice (Linux)."""

_PIPE_SIZE = 1 << 20
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class Pipe:
    """A non-blocking pipe between two sockets, and how many bytes it holds. One per frame
    passing through: closing it throws away whatever a failed forward left in it."""

    def __init__(self, size: int = _PIPE_SIZE) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # bigger than the system allows: keep the default
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        self.size = int(fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ))
        self.held = 0

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.r = self.w = -1


MOST_PIPES = 8
"""Pipes one passing frame may take; past them, the rest of its payload is read into memory."""


class PipeChain:
    """The pipes one passing frame is gathered into, in order (taken from ``pool`` as they
    fill, given back by :meth:`release`)."""

    def __init__(self, pool: PipePool, most: int = MOST_PIPES) -> None:
        self._pool = pool
        self._most = most
        self.pipes = [pool.take()]  # OSError when not even one pipe can be had

    @property
    def held(self) -> int:
        return sum(p.held for p in self.pipes)

    def grow(self) -> bool:
        """Add an empty pipe after the full one; False when the frame may take no more (or
        none can be made)."""
        if len(self.pipes) >= self._most:
            return False
        try:
            self.pipes.append(self._pool.take())
        except OSError:
            return False
        return True

    def release(self) -> None:
        for pipe in self.pipes:
            self._pool.give_back(pipe)
        self.pipes = []


class PipePool:
    """A few pipes shared by every link of the process. A 1 MiB pipe counts against the
    user's pipe memory (``pipe-user-pages-soft``, 64 MiB by default) even when empty, so
    keeping one per link would run out past about 64 links (and use two descriptors each):
    a pipe is only needed while a frame passes, and a relay passes one frame per inbound link
    at a time."""

    def __init__(self, keep: int = 2 * MOST_PIPES, pipe_size: int = _PIPE_SIZE) -> None:
        self.keep = keep
        self.pipe_size = pipe_size
        self._free: list[Pipe] = []

    def take(self) -> Pipe:
        """A free, empty pipe.

        Raises:
            OSError: no pipe could be made (descriptors or pipe memory exhausted).
        """
        return self._free.pop() if self._free else Pipe(self.pipe_size)

    def give_back(self, pipe: Pipe) -> None:
        if pipe.held or len(self._free) >= self.keep or pipe.r < 0:
            pipe.close()  # what a failed forward left in it goes with it
        else:
            self._free.append(pipe)


PIPES = PipePool()


def _unread(sock: socket.socket) -> int:
    out = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(out, "little", signed=True)


async def gather(
    sock: socket.socket,
    chain: PipeChain,
    owed: int,
    wait_readable: Callable[[], Awaitable[None]],
    on_moved: Callable[[int], None],
) -> memoryview | None:
    """Move ``owed`` payload bytes from ``sock`` into the pipes of ``chain`` (a new one each
    time the last is full); the bytes the chain has no room for are read into memory and
    returned (None when the pipes took everything).

    ``on_moved(n)`` is told of every ``n`` bytes taken from the socket, as they are.

    Raises:
        EOFError: the peer closed the connection before the payload was complete.
        OSError: the socket failed.
    """
    pipe = chain.pipes[-1]
    while owed:
        try:
            n = os.splice(sock.fileno(), pipe.w, owed, flags=_FLAGS)
        except BlockingIOError:
            if _unread(sock) <= 0:
                await wait_readable()
            elif chain.grow():  # data is there, so the pipe is full: on to the next one
                pipe = chain.pipes[-1]
            else:
                return await _read_rest(sock, owed, wait_readable, on_moved)
            continue
        if not n:
            raise EOFError("peer closed the connection in the middle of a frame")
        pipe.held += n
        owed -= n
        on_moved(n)
    return None


async def take(
    sock: socket.socket,
    first: memoryview,
    owed: int,
    wait_readable: Callable[[], Awaitable[None]],
    on_moved: Callable[[int], None],
) -> memoryview:
    """The whole payload in memory: ``first`` and then ``owed`` more bytes from ``sock``."""
    buf = memoryview(cast(Any, np.empty(len(first) + owed, dtype=np.uint8))).cast("B")
    buf[: len(first)] = first
    await read_into(sock, buf[len(first) :], wait_readable, on_moved)
    return buf.toreadonly()


async def _read_rest(
    sock: socket.socket,
    owed: int,
    wait_readable: Callable[[], Awaitable[None]],
    on_moved: Callable[[int], None],
) -> memoryview:
    rest = memoryview(cast(Any, np.empty(owed, dtype=np.uint8))).cast("B")
    await read_into(sock, rest, wait_readable, on_moved)
    return rest


async def read_into(
    sock: socket.socket,
    view: memoryview,
    wait_readable: Callable[[], Awaitable[None]],
    on_moved: Callable[[int], None],
) -> None:
    """Fill ``view`` from ``sock``.

    Raises:
        EOFError: the peer closed the connection first.
    """
    got, size = 0, len(view)
    while got < size:
        try:
            n = sock.recv_into(view[got:])
        except BlockingIOError:
            await wait_readable()
            continue
        if not n:
            raise EOFError("peer closed the connection in the middle of a frame")
        got += n
        on_moved(n)


async def flush(
    chain: PipeChain, sock: socket.socket, wait_writable: Callable[[], Awaitable[Any]]
) -> None:
    """Write everything the chain's pipes hold to ``sock``, pipe after pipe."""
    for pipe in chain.pipes:
        while pipe.held:
            try:
                n = os.splice(pipe.r, sock.fileno(), pipe.held, flags=_FLAGS)
            except BlockingIOError:
                await wait_writable()
                continue
            pipe.held -= n


async def discard(
    sock: socket.socket,
    owed: int,
    wait_readable: Callable[[], Awaitable[None]],
    on_moved: Callable[[int], None],
) -> None:
    """Read and drop ``owed`` bytes (a passing payload nobody forwarded)."""
    scratch = memoryview(bytearray(min(owed, 256 * 1024)))
    while owed:
        try:
            n = sock.recv_into(scratch, min(owed, len(scratch)))
        except BlockingIOError:
            await wait_readable()
            continue
        if not n:
            raise EOFError("peer closed the connection in the middle of a frame")
        owed -= n
        on_moved(n)
