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

import contextlib
import gc
import json
import os
import runpy
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flare_async._spec import load_object
from flare_async.codecs import CodecRegistry
from flare_async.fl._client import bind_process_runtime, log_records, run_any
from flare_async.fl._model import (
    FLModel,
    controls_from_meta,
    controls_to_meta,
    model_from_parts,
    model_parts,
    params_format_of,
    script_format,
    to_framework,
    wire_format,
)
from flare_async.fl._tracking import AnalyticsDataType
from flare_async.wire import NEED_DATA, Connection, Event, Frame, Limits

FLUSH_EVERY = 0.5
"""Seconds between two writes of tracked values to the site (at most)."""
FLUSH_AT = 1000
"""Tracked values that are written to the site at once."""

LIMITS = Limits(max_frame=(1 << 63) - 1)
"""A local pipe to our own parent: no frame limit (a model is one frame)."""


class PipeRuntime:
    """The Client API's runtime in the worker process: blocking frames over the socket."""

    def __init__(
        self,
        sock: socket.socket,
        site: str,
        config: dict[str, object],
        codec: str,
        job: str = "",
    ):
        self.sock = sock
        self.site = site
        self.job = job
        self.config = config
        self.codec = codec
        self.conn = Connection(LIMITS)
        self.conn.peer_limits = LIMITS
        self.codecs = CodecRegistry()
        self._running = True
        self._has_task = False
        self._peeked: FLModel | None = None
        self._sent_format: str | None = None
        self.task_name: str | None = None
        self._writing = threading.Lock()  # the script's thread and the metrics flusher
        self._tracked: list[dict[str, Any]] = []
        self._flusher: threading.Thread | None = None

    def is_running(self) -> bool:
        """Waits for the next task when none is in hand (FLARE's way; see the Client API)."""
        if self._has_task or self._peeked is not None:
            return True
        self._peeked = self.receive()
        return self._peeked is not None

    def system_info(self) -> dict[str, Any]:
        return {"job_id": self.job, "site_name": self.site}

    def get_task_name(self) -> str | None:
        return self.task_name

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
        self.flush()
        if self._peeked is not None:
            model, self._peeked = self._peeked, None
            return model
        if not self._running:
            return None
        frame = self._next_frame()
        if frame is None or not isinstance(frame.header, Event) or frame.header.topic != "task":
            self._running = False
            return None
        self._has_task = True
        self.task_name = frame.header.headers.get("kind", "train")
        model = model_from_parts(frame.parts)
        fmt = script_format(self.config, wire_format(frame.parts), self._sent_format)
        model.params = to_framework(model.params, fmt)
        return controls_to_meta(model)

    def send(self, model: FLModel) -> None:
        if not self._has_task:
            raise RuntimeError("send() without a task received: one result per task")
        self._has_task = False
        model = controls_from_meta(model)  # a FLARE SCAFFOLD script's control change
        self._sent_format = params_format_of(model.params)
        self.flush()  # the round's values before its result
        self._write("result", model_parts(model, self.codecs, self.codec), self.codec)

    def _write(self, topic: str, parts: list[Any], codec: str = "") -> None:
        with self._writing:
            self._write_locked(topic, parts, codec)

    def _write_locked(self, topic: str, parts: list[Any], codec: str) -> None:
        header = Event(
            id=0,
            src="worker",
            dst="site",
            route=["worker"],
            budget=None,
            headers={},
            channel="fl",
            topic=topic,
            codec=codec,
        )
        for seg in self.conn.send(header, parts):
            self.sock.sendall(seg)

    def log(
        self,
        key: str,
        value: Any,
        data_type: AnalyticsDataType | str | int | None = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.track(log_records(key, value, data_type, step, kwargs))

    def track(self, recs: list[dict[str, Any]]) -> None:
        """Kept, and written to the site in batches: every ``FLUSH_EVERY`` seconds (by a
        thread of its own), at ``FLUSH_AT`` values, and before every result and receive."""
        with self._writing:
            self._tracked.extend(recs)
            full = len(self._tracked) >= FLUSH_AT
        if full:
            self.flush()
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_now_and_then, daemon=True)
            self._flusher.start()

    def flush(self) -> None:
        with self._writing:
            recs, self._tracked = self._tracked, []
            if recs:
                self._write_locked("metrics", [json.dumps(recs).encode()], "")

    def _flush_now_and_then(self) -> None:
        while self._running:
            time.sleep(FLUSH_EVERY)
            with contextlib.suppress(OSError):  # the site is gone: the process ends soon
                self.flush()

    def report(self, exc: BaseException) -> None:
        """Tell the site why the script failed (its own words), before the process ends."""
        text = "".join(traceback.format_exception_only(exc)).strip()
        with contextlib.suppress(OSError):  # the site is gone already
            self._write("error", [text.encode()[:2000]])


def load_script(spec: str) -> Callable[[], object]:
    """``MODULE:FUNCTION`` (or ``MODULE``: its ``main``), or the path of a script file
    (``client.py``, as FLARE jobs name them), run as ``__main__``."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no training script {spec} (from {Path.cwd()})")
        return lambda: runpy.run_path(str(path), run_name="__main__")
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
        job=os.environ.get("FLARE_ASYNC_JOB", ""),
    )
    cell.mount(runtime.handlers())
    async with cell:
        await cell.wait_parent()
        await runtime.run_script(script)  # a failure is reported (fail), then raised


def main(argv: list[str]) -> int:
    if len(argv) == 6 and argv[1] == "--site" and argv[3] == "--parent":
        import anyio  # noqa: PLC0415

        try:
            anyio.run(serve_site, argv[2], argv[4], argv[5], backend_options={"use_uvloop": True})
        except KeyboardInterrupt:  # the terminal's Ctrl-C reached the whole group: the
            return 130  # simulator that started us says so, once
        return 0
    sock = socket.socket(fileno=int(os.environ["FLARE_ASYNC_FD"]))
    runtime = PipeRuntime(
        sock,
        os.environ.get("FLARE_ASYNC_SITE", "site"),
        json.loads(os.environ.get("FLARE_ASYNC_CONFIG", "{}")),
        os.environ.get("FLARE_ASYNC_CODEC", "tensors"),
        os.environ.get("FLARE_ASYNC_JOB", ""),
    )
    bind_process_runtime(runtime)
    try:
        run_any(load_script(argv[1]))
    except BaseException as exc:  # the site reports the script's own words, then we exit
        with contextlib.suppress(OSError):
            runtime.flush()
        runtime.report(exc)
        if isinstance(exc, KeyboardInterrupt):
            return 130  # the terminal's Ctrl-C: whoever started us reports it, once
        raise
    with contextlib.suppress(OSError):
        runtime.flush()
    runtime._running = False
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
