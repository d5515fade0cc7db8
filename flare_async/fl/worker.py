"""A training script in its own process: ``python -m flare_async.fl.worker MODULE:FUNCTION``.

The site's cell starts this (``ClientRuntime.run_subprocess``) with one end of a socket pair
(its descriptor in ``FLARE_ASYNC_FD``). Tasks and results cross it as frames of the fabric's
own wire format, so the script's ``flare_async.client`` calls work exactly as in-process:
``receive()`` reads a task frame, ``send()`` writes the result (encoded here, in the script's
process, with the job's codec). The script's stdout and stderr stay its own.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable

from flare_async._spec import load_object
from flare_async.codecs import CodecRegistry
from flare_async.fl._client import bind_process_runtime
from flare_async.fl._model import FLModel, model_from_parts, model_parts
from flare_async.wire import NEED_DATA, Connection, Event, Frame, Limits

LIMITS = Limits(max_frame=(1 << 63) - 1)
"""A local pipe to our own parent: no frame limit (a model is one frame)."""


class PipeRuntime:
    """The Client API's runtime in the worker process: blocking frames over the socket."""

    def __init__(self, sock: socket.socket, site: str, config: dict[str, object], codec: str):
        self.sock = sock
        self.site = site
        self.config = config
        self.codec = codec
        self.conn = Connection(LIMITS)
        self.conn.peer_limits = LIMITS
        self.codecs = CodecRegistry()
        self._running = True
        self._has_task = False
        self.logged: list[tuple[str, float, int | None]] = []

    def is_running(self) -> bool:
        return self._running

    def _next_frame(self) -> Frame | None:
        while True:
            event = self.conn.next_event()
            if isinstance(event, Frame):
                return event
            if event is not NEED_DATA:
                return None
            buf = self.conn.get_buffer()
            n = self.sock.recv_into(buf)
            if not n:
                self.conn.receive_data(b"")
                return None
            self.conn.buffer_updated(n)

    def receive(self, timeout: float | None = None) -> FLModel | None:
        del timeout  # blocking until the site sends a task or stops the job
        frame = self._next_frame()
        if frame is None or not isinstance(frame.header, Event) or frame.header.topic != "task":
            self._running = False
            return None
        self._has_task = True
        return model_from_parts(frame.parts)

    def send(self, model: FLModel) -> None:
        if not self._has_task:
            raise RuntimeError("send() without a task received: one result per task")
        self._has_task = False
        parts = model_parts(model, self.codecs, self.codec)
        header = Event(
            id=0,
            src="worker",
            dst="site",
            route=["worker"],
            budget=None,
            headers={},
            channel="fl",
            topic="result",
            codec=self.codec,
        )
        segments = self.conn.send(header, parts)
        for seg in segments:
            self.sock.sendall(seg)

    def log(self, key: str, value: float, step: int | None = None) -> None:
        self.logged.append((key, float(value), step))


def load_script(spec: str) -> Callable[[], object]:
    fn = load_object(spec, "training script", "main")
    if not callable(fn):
        raise TypeError(f"{spec} is not a function")
    return fn  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(os.environ["FLARE_ASYNC_FD"]))
    runtime = PipeRuntime(
        sock,
        os.environ.get("FLARE_ASYNC_SITE", "site"),
        json.loads(os.environ.get("FLARE_ASYNC_CONFIG", "{}")),
        os.environ.get("FLARE_ASYNC_CODEC", "tensors"),
    )
    bind_process_runtime(runtime)
    load_script(argv[1])()
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
