"""The simulator on Ray (``simulate(..., backend="ray")``): the server and the workflow stay in
this process (the driver), listening on ``tcp://``; the top tier's subtrees (a top relay with
the relays and sites below it; without relays, the sites themselves) are shared out over Ray
actors. Each actor hosts its share's cells on one event loop in one thread (``anyio.run``),
linked to each other over an in-process ``MemoryNetwork`` and to the server over ``tcp://``.
A Ray cluster spreads the actors over its machines; a local ``ray.init()`` over this machine's
cores.

Names, configs and sampling are those of the in-process simulator (one :class:`Layout`), so
the same seed gives the same result. Ray is imported here only, and this module only when
``backend="ray"`` is asked for.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from flare_async.cell import Cell
from flare_async.errors import ConfigError, FlareError
from flare_async.fl._simulator import (
    LINKING,
    SCRIPT_GRACE,
    Layout,
    Script,
    Workflow,
    _SiteCells,
    start_relays,
)
from flare_async.transport import MemoryNetwork, TcpDriver

STOP_WAIT = SCRIPT_GRACE + 30.0
"""Seconds the actors get to end their cells after the workflow is over, before being killed."""


def _import_ray() -> ModuleType:
    try:
        import ray  # noqa: PLC0415 (only when the Ray backend is asked for)
    except ImportError:
        raise ConfigError(
            "simulate(backend='ray') needs Ray: pip install 'flare_async[ray]'"
        ) from None
    return ray


@dataclass
class Share:
    """What one actor hosts: relays (each after the relay above it) and sites, their parents
    named (``server`` is the driver's cell, at ``server_url``)."""

    server_url: str
    relays: list[str]
    sites: list[tuple[str, str, dict[str, Any]]]
    """``(name, parent, config)``."""
    script: Script
    codec: str
    job: str
    in_loop: bool
    linking: int


def shares(lay: Layout, script: Script, actors: int, **common: Any) -> list[Share]:
    """The layout's top-tier subtrees dealt round-robin over ``actors`` shares."""
    tops = lay.levels[0] if lay.levels else lay.names
    out = []
    for k in range(min(actors, len(tops))):
        mine = tops[k::actors]
        under = tuple(f"{top}." for top in mine)
        relays = [r for r in lay.relays() if r in mine or r.startswith(under)]
        sites = [
            (name, parent, config)
            for name, parent, config in zip(lay.names, lay.parents, lay.configs, strict=True)
            if name in mine or name.startswith(under)
        ]
        own = {n: script[n] for n, _, _ in sites} if isinstance(script, dict) else script
        out.append(Share(relays=relays, sites=sites, script=own, **common))
    return out


def _loop_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return {}
    return {"use_uvloop": True}


class Host:
    """One Ray actor: its share's cells on one event loop (``run``, in the actor's thread until
    the end), ``ready`` once they are all linked, ``stop`` to end them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._failed: str | None = None
        self._stop_asked = False
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._stop: anyio.Event | None = None

    def run(self, share: Share) -> None:
        """Host ``share`` until stopped."""
        try:
            anyio.run(_host, self, share, backend="asyncio", backend_options=_loop_options())
        except BaseException as exc:
            self.saw_up(exc)
            raise

    def ready(self) -> str | None:
        """Once every cell of the share is linked: ``None``, or why one could not start."""
        self._up.wait()
        return self._failed

    def stop(self) -> None:
        """The workflow is over: the scripts are told, then the cells end."""
        with self._lock:
            self._stop_asked = True
            token, event = self._token, self._stop
        if token is not None and event is not None:
            with contextlib.suppress(anyio.RunFinishedError):
                anyio.from_thread.run_sync(event.set, token=token)

    def saw_up(self, failed: BaseException | None) -> None:
        if not self._up.is_set():
            self._failed = None if failed is None else f"{type(failed).__name__}: {failed}"
            self._up.set()

    def started(self, stop: anyio.Event | None) -> None:
        """The share's event loop runs (``stop`` set to end it), or has ended (``None``)."""
        with self._lock:
            self._token = None if stop is None else anyio.lowlevel.current_token()
            self._stop = stop
            if stop is not None and self._stop_asked:
                stop.set()


QUIET_LOOP = 600.0
"""Seconds a tcp link between the driver and an actor may stay quiet before it is dropped: an
actor's loop starting or running 50,000 sites does not answer a ping for a minute at times
(a link that really dies, the OS reports)."""


# Outside the class: Ray makes an actor with any `async def` method an async actor, whose
# methods all run on one loop (`ready` would block it).
async def _host(host: Host, share: Share) -> None:
    stop = anyio.Event()
    host.started(stop)
    net = MemoryNetwork()
    drivers = [TcpDriver(), net]
    try:
        async with AsyncExitStack() as stack:
            urls = {"server": share.server_url}
            await start_relays(stack, share.relays, urls, drivers, dead_after=QUIET_LOOP)
            heartbeat = None if share.in_loop else 15.0
            cells = _SiteCells(drivers, share.codec, heartbeat, share.job, linking=share.linking)
            sites = [(name, urls[parent], config) for name, parent, config in share.sites]
            await cells.run(
                stop.wait, share.script, sites, in_loop=share.in_loop, on_up=host.saw_up
            )
    finally:
        host.started(None)


async def simulate_on_ray(
    workflow: Workflow,
    script: Script,
    lay: Layout,
    server_args: dict[str, Any],
    in_loop: bool,
    actors: int | None,
    ray_address: str | None,
    join_timeout: float,
) -> Any:
    """``simulate(..., backend="ray")``: see there."""
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=ray_address)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    units = len(lay.levels[0] if lay.levels else lay.names)
    count = actors if actors is not None else max(1, min(units, int(cpus)))
    if count < 1:
        raise ConfigError(f"actors must be at least 1, not {actors}")
    count = min(count, max(1, units))
    # One machine: the server listens on loopback; a cluster: on this node's address.
    alive = [n for n in ray.nodes() if n.get("Alive")]
    host = "127.0.0.1" if len(alive) <= 1 else ray.util.get_node_ip_address()
    cell = Cell("server", listen=[f"tcp://{host}:0"], drivers=[TcpDriver()], dead_after=QUIET_LOOP)
    server = lay.server(cell, **server_args)
    async with cell:
        common = {
            "server_url": cell.listen_urls[0],
            "codec": server_args["codec"],
            "job": server_args["job"],
            "in_loop": in_loop,
            # At most LINKING cells connect to one listener at once, over all actors.
            "linking": max(1, LINKING // count),
        }
        plan = shares(lay, script, count, **common)
        # Fractional CPUs: more actors than CPUs still get placed; SPREAD: over the nodes.
        actor_class = ray.remote(max_concurrency=3)(Host)
        options = {"num_cpus": min(1.0, cpus / len(plan)), "scheduling_strategy": "SPREAD"}
        handles = [actor_class.options(**options).remote() for _ in plan]
        try:
            runs = [h.run.remote(share) for h, share in zip(handles, plan, strict=True)]
            return await _drive(ray, workflow, server, handles, runs, join_timeout)
        finally:
            for h in handles:
                ray.kill(h)


async def _drive(
    ray: ModuleType,
    workflow: Workflow,
    server: Any,
    handles: Sequence[Any],
    runs: list[Any],
    join_timeout: float,
) -> Any:
    """Wait for every actor's cells, run the workflow while watching the actors, stop them."""
    readies = {h.ready.remote(): i for i, h in enumerate(handles)}
    index = {ref: i for i, ref in enumerate(runs)}
    with anyio.move_on_after(join_timeout):
        while readies:
            ref = await _first_done(ray, [*readies, *runs])
            if ref in index:  # an actor ended before its cells were up
                _get(ray, ref, index[ref], "ended before its cells were up")
                raise FlareError(f"Ray actor {index[ref]} ended before its cells were up")
            failed = _get(ray, ref, readies.pop(ref), "failed while starting its cells")
            if failed is not None:
                raise FlareError(f"a simulated site did not start in a Ray actor: {failed}")
    if readies:
        raise FlareError(
            f"Ray actors {sorted(readies.values())} did not link their cells within "
            f"{join_timeout:g} s (no room for them in the cluster? a server they cannot reach?)"
        )
    crashed: str | None = None
    error: Exception | None = None
    outcome: Any = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal crashed
            ref = await _first_done(ray, runs)
            try:
                _get(ray, ref, index[ref], "failed")
                crashed = f"Ray actor {index[ref]} ended while the workflow ran"
            except FlareError as exc:
                crashed = str(exc)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            outcome = await workflow(server)
        except Exception as exc:  # re-raised below, not inside a group
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if crashed is not None:
        raise FlareError(crashed) from error
    if error is not None:
        raise error
    for h in handles:
        h.stop.remote()
    with anyio.move_on_after(STOP_WAIT):
        for ref in runs:  # an actor failing now still says so
            await _first_done(ray, [ref])
            _get(ray, ref, index[ref], "failed while ending its cells")
    return outcome


async def _first_done(ray: ModuleType, refs: list[Any]) -> Any:
    """The first of ``refs`` that is ready (waited for in a thread, left there if cancelled)."""
    done: Callable[[], list[Any]] = lambda: ray.wait(refs, num_returns=1)[0]  # noqa: E731
    return (await anyio.to_thread.run_sync(done, abandon_on_cancel=True))[0]


def _get(ray: ModuleType, ref: Any, actor: int, what: str) -> Any:
    """``ray.get(ref)`` of a ready ref; an actor's error as a :class:`FlareError`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        raise FlareError(f"Ray actor {actor} {what}: {type(cause).__name__}: {cause}") from exc


__all__ = ["Host", "Share", "shares", "simulate_on_ray"]
