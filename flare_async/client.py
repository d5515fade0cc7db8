"""The Client API, FLARE-shaped: a training script ports with a few lines.

::

    import flare_async.client as flare

    flare.init()
    while flare.is_running():
        model = flare.receive()              # FLModel from the server (None: the job is over)
        if model is None:
            break
        params = train(model.params)         # your code
        flare.send(FLModel(params=params, meta={"num_samples": n}, metrics={"loss": loss}))

The runtime (the simulator, or a site's cell) runs the script in a worker thread and binds these
functions to that site; they are plain blocking calls.

An async script (``async def main(): ...``) is run on an event loop of its own in that thread,
and uses the awaitable forms ``await flare.receive_async()`` and ``await flare.send_async(m)``,
which wait in a worker thread and leave the script's loop free for its own tasks (data
loading, metrics upload...). A simulation of thousands of light sites runs async scripts on
the cells' own loop instead (``simulate(..., in_loop=True)``: no thread per site); such a
script must not block::

    async def main() -> None:
        flare.init()
        while (model := await flare.receive_async()) is not None:
            flare_model = await train(model)
            await flare.send_async(flare_model)
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread

from flare_async.fl._client import current_runtime as _runtime
from flare_async.fl._client import loop_runtime as _loop_runtime
from flare_async.fl._model import FLModel, ParamsType


def init() -> None:
    """Check that the script runs under a site (raises ``RuntimeError`` otherwise)."""
    _runtime()


def is_running() -> bool:
    """False once the server ended the job."""
    return _runtime().is_running()


def receive(timeout: float | None = None) -> FLModel | None:
    """The next model to work on; ``None`` when the job is over (or after ``timeout``)."""
    return _runtime().receive(timeout)


def send(model: FLModel) -> None:
    """Send the result of the task last received (streamed to the server)."""
    _runtime().send(model)


async def receive_async(timeout: float | None = None) -> FLModel | None:
    """:func:`receive`, awaitable (the wait happens in a worker thread, or, for a script on
    its cell's own loop, on that loop)."""
    here = _loop_runtime()
    if here is not None:
        return await here.areceive(timeout)
    runtime = _runtime()  # bound to the calling thread: look it up here, not in the worker
    return await anyio.to_thread.run_sync(runtime.receive, timeout, abandon_on_cancel=True)


async def send_async(model: FLModel) -> None:
    """:func:`send`, awaitable."""
    here = _loop_runtime()
    if here is not None:
        await here.asend(model)
        return
    runtime = _runtime()
    await anyio.to_thread.run_sync(runtime.send, model)


def get_site_name() -> str:
    return _runtime().site


def get_config() -> dict[str, Any]:
    return dict(_runtime().config)


def log(key: str, value: float, step: int | None = None) -> None:
    """Record a metric (kept by the runtime; reported with the result's metrics)."""
    _runtime().log(key, value, step)


__all__ = [
    "FLModel",
    "ParamsType",
    "get_config",
    "get_site_name",
    "init",
    "is_running",
    "log",
    "receive",
    "receive_async",
    "send",
    "send_async",
]
