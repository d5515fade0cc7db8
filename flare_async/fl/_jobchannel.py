"""The frames between a job's own process and the server (see ``flare_async.fl._jobproc``):
length-prefixed msgpack headers and raw parts over a socket pair, read straight into their
buffers, every size checked against the reader's limits before anything is allocated."""

from __future__ import annotations

import contextlib
import math
import mmap
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

from flare_async.errors import FlareError

HEAD_MAX = 2**20
"""Bytes of one frame's header a job process may send."""
MAX_PARTS = 100_000
"""Parts of one frame a job process may send (a model: its header and one per tensor)."""
CHUNK = 2**20
YIELD_EVERY = 8 * 2**20
LAZY_AT = 2**20
Part = bytearray | mmap.mmap
"""A received frame's parts: a large one an anonymous mapping, committed as bytes arrive."""
SOCKET_BUFFER = 4 * 2**20


def _lazy(n: int) -> mmap.mmap:
    """``n`` zero bytes whose pages are committed as they are written (huge pages where the
    kernel offers them: far fewer faults than 4 KiB pages)."""
    area = mmap.mmap(-1, n)
    with contextlib.suppress(AttributeError, OSError):
        area.madvise(mmap.MADV_HUGEPAGE)
    return area


class JobProcessError(FlareError):
    """A job's own process failed: its recipe or workflow raised (its message starts with the
    exception's name), it crashed or exited, hung, or sent what the protocol does not allow."""


class Channel:
    """Frames over a connected stream socket (see the module text), read straight into their
    buffers (``recv_into``) and written from the caller's (no copies). ``max_bytes`` and
    ``head_max`` bound what is read; ``idle`` bounds each wait for bytes (``JobProcessError``
    past it)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_bytes: int = 2**62,
        head_max: int = 2**62,
        idle: float = math.inf,
        max_parts: int = 2**62,
        carry: frozenset[str] | None = None,
    ) -> None:
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # fewer wake-ups per model
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.sock = sock
        self.max_bytes = max_bytes
        self.head_max = head_max
        self.idle = idle
        self.max_parts = max_parts
        self.carry = carry
        """The ops whose frames may carry parts (None: any)."""
        self._lock = anyio.Lock()
        self._broken = False

    async def send(self, head: Mapping[str, Any], parts: Sequence[Any] = ()) -> None:
        """Send one frame (whole: a cancelled send breaks the channel rather than leave half a
        frame for the other side to misread).

        Raises:
            JobProcessError: the other side is gone.
        """
        views = [memoryview(p).cast("B") for p in parts]
        data = msgspec.msgpack.encode({**head, "sizes": [v.nbytes for v in views]})
        async with self._lock:
            if self._broken:
                raise JobProcessError("the channel broke mid-frame")
            try:
                await self._send_all(memoryview(len(data).to_bytes(4, "big") + data))
                for view in views:
                    await self._send_all(view)
            except BaseException:
                self._broken = True
                raise

    async def _send_all(self, view: memoryview) -> None:
        sent = 0
        while sent < view.nbytes:
            await self._yield(sent)
            try:
                sent += self.sock.send(view[sent : sent + CHUNK])
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
            except OSError as exc:
                raise JobProcessError(f"the other side is gone: {exc}") from None

    @staticmethod
    async def _yield(done: int) -> None:
        """Let the other tasks run every few MiB of a frame (a large model never holds the
        event loop, whose heartbeats keep the server's links), else only see cancellation."""
        if done and done % YIELD_EVERY < CHUNK:
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.lowlevel.checkpoint_if_cancelled()

    async def receive(self) -> tuple[dict[str, Any], memoryview]:
        """The next frame: its header, and its parts one after another in one buffer (a
        model's parts are its layout whole: it decodes from that buffer without a copy).

        Raises:
            JobProcessError: the other side closed, went quiet past ``idle``, or sent a frame
                the protocol does not allow.
        """
        n = int.from_bytes(await self._exactly(4), "big")
        if n > self.head_max:
            raise JobProcessError(f"a frame header of {n} bytes (at most {self.head_max})")
        try:
            head = msgspec.msgpack.decode(await self._exactly(n))
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            raise JobProcessError(f"a frame header that does not decode: {exc}") from None
        sizes = head.get("sizes") if isinstance(head, dict) else None
        if (
            not isinstance(sizes, list)
            or len(sizes) > self.max_parts
            or not all(type(s) is int and 0 <= s <= self.max_bytes for s in sizes)
        ):
            raise JobProcessError(
                f"a frame header without a list of part sizes (at most {self.max_parts})"
            )
        if sizes and self.carry is not None and head.get("op") not in self.carry:
            raise JobProcessError(f"a {str(head.get('op'))[:40]!r} frame with parts")
        if sum(sizes) > self.max_bytes:
            raise JobProcessError(f"a frame of {sum(sizes)} bytes (at most {self.max_bytes})")
        return head, memoryview(await self._exactly(sum(sizes)))

    async def _exactly(self, n: int) -> Part:
        # A large part is an anonymous mapping: its pages are committed as bytes arrive, not
        # when the header announces them (a header is only a promise).
        out: Part = _lazy(n) if n >= LAZY_AT else bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            await self._yield(got)
            try:
                k = self.sock.recv_into(view[got:])
            except BlockingIOError:
                with anyio.move_on_after(self.idle) as waited:
                    await anyio.wait_readable(self.sock)
                if waited.cancelled_caught:
                    why = f"the job process sent nothing for {self.idle:g} s"
                    raise JobProcessError(why) from None
                continue
            except OSError:
                k = 0
            if k == 0:
                raise JobProcessError("the job process ended")
            got += k
        return out

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)
            self.sock.close()
        await anyio.lowlevel.checkpoint()


__all__ = ["HEAD_MAX", "MAX_PARTS", "SOCKET_BUFFER", "Channel", "JobProcessError", "Part"]
