"""The Client API, FLARE-shaped: a script written for NVIDIA FLARE's Client API runs with its
import lines changed (``nvflare.client`` -> ``flare_async.client``)::

    import flare_async.client as flare

    flare.init()
    while flare.is_running():                # waits for the next task; False once the job ends
        model = flare.receive()              # that task's FLModel
        params = train(model.params)         # your code
        flare.send(flare.FLModel(params=params, meta={"num_samples": n}, metrics={"loss": loss}))

``is_running()`` waits for the next task as FLARE's does, so ``receive()`` inside the loop
always has one; called on its own, ``receive()`` returns ``None`` once the job is over.
Parameters arrive in the framework of the script: torch tensors when the server's model was
torch (or the script sent torch tensors before; ``get_config()["params_format"]`` forces
``"numpy"`` or ``"torch"``), numpy arrays otherwise. ``get_task_name()`` is ``train``,
``validate`` or ``submit_model``; ``is_train()``, ``is_evaluate()``, ``is_submit_model()``
test it. ``log()`` and the writers of :mod:`flare_async.client.tracking` send values to the
server, which keeps them per job, site, key and step (``flare-async job metrics``).

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
from flare_async.fl._tracking import AnalyticsDataType


def init(rank: str | int | None = None, config_file: str | None = None) -> None:
    """Check that the script runs under a site (raises ``RuntimeError`` otherwise). FLARE's
    arguments are accepted and not needed: the site tells the script everything."""
    del rank, config_file
    _runtime()


def is_running() -> bool:
    """Whether the job goes on: waits for the next task when none is in hand (so the
    ``receive()`` that follows has it), False once the server ended the job."""
    return _runtime().is_running()


def receive(timeout: float | None = None) -> FLModel | None:
    """The next model to work on; ``None`` when the job is over (or after ``timeout``)."""
    return _runtime().receive(timeout)


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Send the result of the task last received (streamed to the server)."""
    del clear_cache  # FLARE's; nothing is cached here once sent
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


def get_job_id() -> str:
    return str(_runtime().system_info()["job_id"])


def system_info() -> dict[str, Any]:
    """``{"job_id": ..., "site_name": ...}``."""
    return _runtime().system_info()


def get_config() -> dict[str, Any]:
    return dict(_runtime().config)


def get_task_name() -> str | None:
    """The task in hand: ``train``, ``validate`` or ``submit_model`` (None before any)."""
    return _runtime().get_task_name()


def is_train() -> bool:
    return get_task_name() == "train"


def is_evaluate() -> bool:
    return get_task_name() == "validate"


def is_submit_model() -> bool:
    return get_task_name() == "submit_model"


def log(
    key: str,
    value: Any,
    data_type: AnalyticsDataType | str | int | None = None,
    step: int | None = None,
    **kwargs: Any,
) -> None:
    """Track a value: sent to the server, kept per job, site, key and step.

    Both shapes work: ``log("loss", 0.3, step=5)`` (or ``log("loss", 0.3, 5)``) and FLARE's
    ``log("loss", 0.3, AnalyticsDataType.SCALAR, global_step=5)``.
    """
    _runtime().log(key, value, data_type, step, **kwargs)


def clear() -> None:
    """FLARE's: forget the model in hand (nothing to do here: nothing is cached)."""


__all__ = [
    "AnalyticsDataType",
    "FLModel",
    "ParamsType",
    "clear",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "receive_async",
    "send",
    "send_async",
    "system_info",
]
