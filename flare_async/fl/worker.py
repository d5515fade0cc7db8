"""A training script in its own process: ``python -m flare_async.fl.worker MODULE:FUNCTION``.

Two modes:

- **Worker of a site** (no options): the site's cell started this process and talks to it over
  a socket pair, described below.
- **A whole site** (``--site NAME --parent URL``): this process is the site: its own cell,
  connected to its parent over the network (``tcp://`` in the simulator's ``processes`` mode),
  running the script in a worker thread beside it. The process ends when the job does.

The site's cell starts this (``ClientRuntime.run_subprocess``) with one end of a socket pair
(its descriptor in ``FLARE_ASYNC_FD``). Tasks and results cross it as frames of the fabric's
own wire format, so the script's ``flare_async.client`` calls work exactly as in-process:
``receive()`` reads a task frame, ``send()`` writes the result (encoded here, in the script's
process, with the job's codec). The script's stdout and stderr stay its own.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from collections.abc import Callable

from flare_async._spec import load_object
from flare_async.codecs import CodecRegistry
from flare_async.fl._client import bind_process_runtime, run_any
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


async def serve_site(name: str, parent: str, spec: str) -> None:
    """Be the site ``name`` below ``parent`` until the job ends (the script returns)."""
    from flare_async.cell import Cell  # noqa: PLC0415 - the pipe worker needs no cell
    from flare_async.fl._client import ClientRuntime  # noqa: PLC0415
    from flare_async.transport import TcpDriver  # noqa: PLC0415

    script = load_script(spec)
    # Everything imported so far lives as long as the process: keep the collector from
    # walking it again and again while tasks allocate (about 5% of a site's CPU otherwise).
    gc.freeze()
    cell = Cell(name, parent=parent, drivers=[TcpDriver()])
    runtime = ClientRuntime(
        cell,
        os.environ.get("FLARE_ASYNC_SERVER", "server"),
        config=json.loads(os.environ.get("FLARE_ASYNC_CONFIG", "{}")),
        codec=os.environ.get("FLARE_ASYNC_CODEC", "tensors"),
        digest=os.environ.get("FLARE_ASYNC_DIGEST", "1") == "1",
    )
    cell.mount(runtime.handlers())
    async with cell:
        await cell.wait_parent()
        try:
            await runtime.run_script(script)
        except Exception as exc:  # reported as a failed task, then the process ends
            await runtime.report_failure(f"training script failed: {type(exc).__name__}: {exc}")
            raise


def main(argv: list[str]) -> int:
    if len(argv) == 6 and argv[1] == "--site" and argv[3] == "--parent":
        import anyio  # noqa: PLC0415

        anyio.run(serve_site, argv[2], argv[4], argv[5], backend_options={"use_uvloop": True})
        return 0
    sock = socket.socket(fileno=int(os.environ["FLARE_ASYNC_FD"]))
    runtime = PipeRuntime(
        sock,
        os.environ.get("FLARE_ASYNC_SITE", "site"),
        json.loads(os.environ.get("FLARE_ASYNC_CONFIG", "{}")),
        os.environ.get("FLARE_ASYNC_CODEC", "tensors"),
    )
    bind_process_runtime(runtime)
    run_any(load_script(argv[1]))
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
