"""The simulator: a server and N client cells in one process over ``memory://``, each client's
training script in a worker thread, running a workflow to the end; or, with ``processes``, each
site its own Python process connected over ``tcp://`` on loopback; or, with ``backend="ray"``,
the sites and relays in Ray actors (``_ray.py``).

The same workflow, script and cells run in a deployment; only the transport and the place the
script runs differ. (Just past 500 lines: the layout, relays and site cells that every backend
shares live here with the local backend's three ways of running scripts.)
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.abc

from flare_async.cell import Cell, system_handlers
from flare_async.errors import ConfigError, FlareError
from flare_async.fl._client import ClientRuntime
from flare_async.fl._relay import RelayAggregator
from flare_async.fl._scripts import script_spec
from flare_async.fl._server import FLServer, RoundResult
from flare_async.transport import Driver, MemoryNetwork, TcpDriver

Workflow = Callable[[FLServer], Awaitable[Any]]
Script = Callable[[], object] | str | dict[str, Callable[[], object] | str]
SCRIPT_GRACE = 10.0
"""Seconds the sites' scripts get to end by themselves after the workflow is over."""


async def simulate(
    workflow: Workflow,
    script: Script,
    *,
    clients: int = 2,
    config: dict[str, Any] | None = None,
    codec: str = "tensors",
    job: str = "sim",
    seed: int | None = 0,
    on_round: Callable[[RoundResult], None] | None = None,
    relays: int | Sequence[int] = 0,
    processes: bool = False,
    join_timeout: float = 120.0,
    in_loop: bool = False,
    network: MemoryNetwork | None = None,
    on_metrics: Callable[[str, list[dict[str, Any]]], None] | None = None,
    peers: bool = False,
    backend: Literal["local", "ray"] = "local",
    actors: int | None = None,
    ray_address: str | None = None,
) -> Any:
    """Run ``workflow`` with ``clients`` simulated sites (``server.site-1`` ...; with
    ``relays``, ``server.relay-1.site-1`` ..., sites spread over the relays round-robin, each
    relay folding its subtree's results into one partial sum for the cell above it).

    Args:
        script: the training script: a function using :mod:`flare_async.client`, run in a
            worker thread, or ``"MODULE:FUNCTION"``, run in its own Python process per site
            (``flare_async.fl.worker``); or one of those per site name.
        config: what each script's ``get_config()`` returns (plus ``site_index`` and
            ``sites``, the number of sites).
        codec: how models travel both ways (``tensors``, ``q8``, ``nf4`` ...).
        relays: relays per tier: ``4`` is one tier of 4 relays under the server; ``(10, 10)``
            is 10 relays, each with 10 relays below it (100 leaf relays, which the sites join;
            every tier folds: the server gets 10 partial sums).
        processes: every site is its own Python process (``flare_async.fl.worker --site``):
            its cell connects to the server (or its relay) over ``tcp://127.0.0.1``, its
            script runs in a thread there. The script must then be ``"MODULE:FUNCTION"`` or a
            module-level function.
        join_timeout: (``processes``, ``ray``) how long the sites' processes (actors) get to link.
        in_loop: ``async def`` scripts run on the simulation's event loop, not in a thread
            each (``ClientRuntime.run_script(in_loop=True)``): thousands of light sites in one
            process. Such scripts must not block.
        network: the in-process network to use (its ``statistics()`` count the frames).
        on_metrics: called with ``(site, records)`` for the values each script tracks
            (``flare.log``, ``flare_async.client.tracking``); without it the server keeps
            them in ``FLServer.tracked``.
        peers: every site also keeps a direct link to every other site (``Cell(peers=)``:
            a full mesh, for a few dozen sites), all up before the workflow starts: what
            cyclic and swarm training pass models over. Not with ``processes``.
        backend: ``"ray"``: the top tier's subtrees (a relay and all below it; without
            relays, the sites) in Ray actors, each on one event loop, linked to the server here
            over ``tcp://``; the same result for the same seed (``flare_async.fl._ray``).
        actors: (``ray``) how many (default: one per subtree, at most the cluster's CPUs).
        ray_address: (``ray``) the cluster to join; default: the Ray this process initialised,
            else a local one.

    Returns:
        what the workflow returns.
    """
    lay = Layout.of(clients, relays, config)
    kw = {"job": job, "codec": codec, "seed": seed, "on_round": on_round, "on_metrics": on_metrics}
    if backend != "local":
        if backend != "ray" or processes or peers or network is not None:
            why = "'local', or 'ray' (sites in Ray actors: no processes, peers or network)"
            raise ConfigError(f"backend={backend!r}: it is {why}")
        from flare_async.fl._ray import simulate_on_ray  # noqa: PLC0415 (ray only when asked)

        where = (actors, ray_address, join_timeout)
        return await simulate_on_ray(workflow, script, lay, kw, in_loop, *where)
    if peers and processes:
        raise ConfigError("peer links between sites are simulated in one process only")
    if peers and clients > LINKING:
        raise ConfigError(f"a full mesh of peer links is for at most {LINKING} sites")
    net = network or MemoryNetwork()
    drivers: list[Driver] = [TcpDriver()] if processes else [net]
    scheme = "tcp://127.0.0.1:0" if processes else "memory://{}"
    joined = _Joined()
    # Memory links cannot go quiet, but 100,000 sites starting keep the loop from pinging.
    beat = 15.0 if processes else None
    async with AsyncExitStack() as stack:
        server_cell = Cell(
            "server",
            listen=[scheme.format("server")],
            drivers=drivers,
            on_link=joined.saw,
            heartbeat=beat,
        )
        server = lay.server(server_cell, **kw)
        await stack.enter_async_context(server_cell)
        urls = {"server": server_cell.listen_urls[0]}
        await start_relays(stack, lay.relays(), urls, drivers, scheme, joined.saw, beat)
        if processes:
            args = (server, workflow, script, lay.sites(urls), joined)
            return await _with_site_processes(*args, codec=codec, join_timeout=join_timeout)
        mesh = lay.names if peers else []
        cells = _SiteCells([net], codec, None if in_loop else 15.0, job=job, mesh=mesh)
        return await cells.run(lambda: workflow(server), script, lay.sites(urls), in_loop=in_loop)


@dataclass(frozen=True)
class Layout:
    """A simulation's topology, whichever backend runs it: relays per tier (top first), each
    site's name, parent and config (``site_index``, ``sites``)."""

    levels: list[list[str]]
    names: list[str]
    parents: list[str]
    configs: list[dict[str, Any]]

    @classmethod
    def of(cls, clients: int, relays: int | Sequence[int], config: dict[str, Any] | None) -> Layout:
        levels = relay_tree([relays] if isinstance(relays, int) else list(relays))
        ups = levels[-1] if levels else ["server"]
        parents = [ups[i % len(ups)] for i in range(clients)]
        configs = [{**(config or {}), "site_index": i, "sites": clients} for i in range(clients)]
        return cls(levels, [f"{p}.site-{i + 1}" for i, p in enumerate(parents)], parents, configs)

    def relays(self) -> list[str]:
        """Every relay, each after the relay above it."""
        return [r for level in self.levels for r in level]

    def sites(self, urls: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
        """``(name, parent's URL, config)`` per site, given the URLs of the parents."""
        triples = zip(self.names, self.parents, self.configs, strict=True)
        return [(name, urls[parent], config) for name, parent, config in triples]

    def server(self, cell: Cell, **kwargs: Any) -> FLServer:
        """The simulation's server on ``cell``, its handlers mounted."""
        # Bytes never leave this machine: chunk CRCs stay, the whole-model SHA-256 goes.
        server = FLServer(cell, self.names, digest=False, hierarchical=bool(self.levels), **kwargs)
        cell.mount(server.handlers())
        return server


async def start_relays(
    stack: AsyncExitStack,
    relays: Sequence[str],
    urls: dict[str, str],
    drivers: Sequence[Driver],
    scheme: str = "memory://{}",
    on_link: Callable[[str, str, bool], None] | None = None,
    heartbeat: float | None = 15.0,
    dead_after: float | None = None,
) -> None:
    """Start ``relays`` on ``stack``, each linked to its parent (in ``urls``), adding theirs."""
    for relay in relays:
        relay_cell = Cell(
            relay,
            listen=[scheme.format(relay)],
            parent=urls[relay.rsplit(".", 1)[0]],
            drivers=drivers,
            handlers=[system_handlers()],
            on_link=on_link,
            heartbeat=heartbeat,
            dead_after=dead_after,
        )
        relay_cell.mount(RelayAggregator(relay_cell, digest=False).handlers())
        await stack.enter_async_context(relay_cell)
        await relay_cell.wait_parent()
        urls[relay] = relay_cell.listen_urls[0]


@contextmanager
def _quiet_gc(sites: int) -> Iterator[None]:
    """While thousands of simulated sites start and run: what exists now leaves the collector's
    view (the caller freezes again once every site is linked), and young collections wait for
    25 new objects a site (at least 50,000). Each young object a collection walks costs a cache
    miss or two into a heap of gigabytes, and a round keeps about a hundred objects a site alive
    until it ends, so at the default threshold a round walked them all, again and again
    (measured, round time: 2,000 sites, 10.2 s -> 6.5 s with the freeze; 40,000 sites, 49.6 s ->
    28.9 s with this threshold rather than 50,000, where collections took 17.7 s of the round;
    no cyclic garbage to speak of is found in either: 17 objects over a whole start-up)."""
    old = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    gc.set_threshold(max(50_000, 25 * sites), 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        if not frozen_before:  # never thaw what the application froze itself
            gc.unfreeze()


def relay_tree(tiers: Sequence[int]) -> list[list[str]]:
    """Relay names per tier, top first: ``(2, 3)`` gives ``server.relay-1`` and
    ``server.relay-2``, then ``server.relay-1.relay-1`` ... ``server.relay-2.relay-3``."""
    levels: list[list[str]] = []
    above = ["server"]
    for count in tiers:
        if count <= 0:
            break
        above = [f"{parent}.relay-{j + 1}" for parent in above for j in range(count)]
        levels.append(above)
    return levels


_NOBODY: frozenset[str] = frozenset()
_NOBODY_UP: set[str] = set()
"""A site of no mesh: nobody to link to, nobody linked (shared by 100,000 such sites)."""


class _Meshed:
    """One site's direct links to the other sites of a mesh: whom it dials (those after it),
    and an event set once it is linked with all the others."""

    def __init__(self, name: str, mesh: Sequence[str]) -> None:
        self.others = frozenset(s for s in mesh if s != name) if mesh else _NOBODY
        after = list(mesh)[list(mesh).index(name) + 1 :] if name in mesh else []
        self.dials = [f"memory://peer.{s}" for s in after]
        self.up: set[str] = set() if mesh else _NOBODY_UP  # (never added to: see saw)
        self.linked = anyio.Event() if self.others else None
        """Set once linked with all the others (``None``: no others to wait for)."""

    def saw(self, peer: str, role: str, up: bool) -> None:
        if self.linked is None or role != "peer" or peer not in self.others:
            return
        (self.up.add if up else self.up.discard)(peer)
        if self.up == self.others:
            self.linked.set()


LINKING = 128
"""Simulated sites linking to their parents at once: more would overflow a relay's accept
backlog (128) and send them all into reconnect backoff (100,000 sites did)."""


class _SiteCells:
    """The simulated sites of one process: each cell runs in a task of its own (started all
    at once, at most ``LINKING`` linking at a time; closed all at once), its script beside
    it."""

    def __init__(
        self,
        drivers: Sequence[Driver],
        codec: str,
        heartbeat: float | None,
        job: str = "sim",
        mesh: Sequence[str] = (),
        linking: int = LINKING,
    ) -> None:
        self.mesh = list(mesh)
        """Sites that link to each other directly (each dials those after it)."""
        self.job = job
        self.drivers = list(drivers)
        self.codec = codec
        self.heartbeat = heartbeat
        self.runtimes: list[ClientRuntime] = []
        self.stop = anyio.Event()
        self.up = 0
        self.all_up = anyio.Event()
        self.failed: BaseException | None = None
        self.linking = anyio.CapacityLimiter(linking)
        # The scripts run in their sites' own tasks (a task of its own each was 3 KB a site):
        self.go = anyio.Event()  # set once every site is up (or the start failed: see stop)
        self.script: Script = ""
        self.in_loop = False
        self.running = 0
        self.all_ended = anyio.Event()

    async def _cell(self, name: str, parent: str, config: dict[str, Any], total: int) -> None:
        meshed = _Meshed(name, self.mesh)
        cell = Cell(
            name,
            parent=parent,
            drivers=self.drivers,
            heartbeat=self.heartbeat,
            listen=[f"memory://peer.{name}"] if self.mesh else [],
            peers=meshed.dials,
            on_link=meshed.saw,
            idle_workers=0,  # a site answers a task or two a round: no task waits between
        )
        runtime = ClientRuntime(
            cell, "server", config=config, codec=self.codec, digest=False, job=self.job
        )
        cell.mount(runtime.handlers())
        linking = True
        await self.linking.acquire()
        try:
            async with cell:
                await cell.wait_parent()
                if meshed.linked is not None:
                    await meshed.linked.wait()
                self.linking.release()
                linking = False
                self.runtimes.append(runtime)
                self.up += 1
                if self.up == total:
                    self.all_up.set()
                await self.go.wait()
                if not self.stop.is_set():  # else the start failed: no scripts
                    script = self.script
                    fn = script[runtime.site] if isinstance(script, dict) else script
                    try:
                        await _run_guarded(runtime, fn, self.in_loop)
                    finally:
                        self.running -= 1
                        if self.running == 0:
                            self.all_ended.set()
                await self.stop.wait()
        except Exception as exc:  # a site that cannot start fails the simulation
            self.failed = exc
            self.all_up.set()
        finally:
            if linking:
                self.linking.release()

    async def run(
        self,
        main: Callable[[], Awaitable[Any]],
        script: Script,
        sites: list[tuple[str, str, dict[str, Any]]],
        *,
        in_loop: bool,
        on_up: Callable[[BaseException | None], None] | None = None,
    ) -> Any:
        """Start the sites, then run ``main`` (the workflow, or a wait for the end) beside
        their scripts; ``on_up`` hears once all sites linked (or why one could not)."""
        outcome: Any = None
        error: Exception | None = None
        with _quiet_gc(len(sites)) if in_loop else nullcontext():
            async with anyio.create_task_group() as cells:
                for name, parent, config in sites:
                    cells.start_soon(self._cell, name, parent, config, len(sites))
                if sites:
                    await self.all_up.wait()
                if in_loop:
                    gc.freeze()  # the linked topology: millions of objects, kept to the end
                if on_up is not None:
                    on_up(self.failed)
                try:
                    if self.failed is not None:  # raised below, outside the group
                        error = FlareError(f"a simulated site did not start: {self.failed!r}")
                    else:
                        self.in_loop = in_loop
                        outcome, error = await self._scripts(main, script, cells)
                finally:
                    self.stop.set()
                    self.go.set()
        if error is not None:
            raise error
        return outcome

    async def _scripts(
        self, main: Callable[[], Awaitable[Any]], script: Script, cells: anyio.abc.TaskGroup
    ) -> tuple[Any, Exception | None]:
        """Let every site run its script (in its own task) beside ``main``; its outcome or
        error."""
        outcome: Any = None
        error: Exception | None = None
        self.script = script
        self.running = len(self.runtimes)
        if not self.running:
            self.all_ended.set()
        self.go.set()
        try:
            outcome = await main()
        except Exception as exc:  # re-raised by the caller, not inside a group
            error = exc
        finally:
            for runtime in self.runtimes:
                runtime.stop()
            # Scripts end by themselves once told (their loops end, their last values
            # reach the server); if one still runs after the grace period, it is abandoned:
            # the sites are cancelled rather than closed.
            with anyio.move_on_after(SCRIPT_GRACE):
                await self.all_ended.wait()
            if not self.all_ended.is_set():
                cells.cancel_scope.cancel()
        return outcome, error


class _Joined:
    """Which cells have linked to the server or a relay (site processes joining)."""

    def __init__(self) -> None:
        self.cells: set[str] = set()
        self.exited: dict[str, int] = {}
        self.changed = anyio.Event()

    def saw(self, peer: str, role: str, up: bool) -> None:
        if role == "child":
            (self.cells.add if up else self.cells.discard)(peer)
            self._poke()

    def _poke(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def _watch(self, name: str, proc: anyio.abc.Process) -> None:
        self.exited[name] = await proc.wait()
        self._poke()

    async def wait(self, sites: dict[str, anyio.abc.Process], timeout: float) -> None:
        """Until every site process connected; fails at once if one exits first."""
        async with anyio.create_task_group() as tg:
            for name, proc in sites.items():
                tg.start_soon(self._watch, name, proc)
            with anyio.move_on_after(timeout):
                while not set(sites) <= self.cells and not self.exited:
                    await self.changed.wait()
            tg.cancel_scope.cancel()
        if self.exited:
            raise FlareError(f"site processes exited before connecting: {self.exited}")
        missing = sorted(set(sites) - self.cells)
        if missing:
            raise FlareError(f"site processes did not connect within {timeout:g} s: {missing}")


async def _with_site_processes(
    server: FLServer,
    workflow: Workflow,
    script: Script,
    sites: list[tuple[str, str, dict[str, Any]]],
    joined: _Joined,
    *,
    codec: str,
    join_timeout: float,
) -> Any:
    """Start one process per site, run the workflow once all joined, stop them."""
    async with _site_processes(sites, script, script_spec, codec, server.job) as procs:
        await joined.wait(
            {name: proc for (name, _, _), proc in zip(sites, procs, strict=True)}, join_timeout
        )
        try:
            return await workflow(server)
        finally:
            with anyio.CancelScope(shield=True):
                await server.stop_clients()
                with anyio.move_on_after(10):
                    for proc in procs:
                        await proc.wait()


@asynccontextmanager
async def _site_processes(
    sites: list[tuple[str, str, dict[str, Any]]],
    script: Any,
    spec_of: Callable[[Any], str],
    codec: str,
    job: str,
) -> AsyncIterator[list[anyio.abc.Process]]:
    procs: list[anyio.abc.Process] = []
    try:
        for name, parent, config in sites:
            fn = script[name] if isinstance(script, dict) else script
            env = {
                **os.environ,
                "FLARE_ASYNC_CONFIG": json.dumps(config),
                "FLARE_ASYNC_CODEC": codec,
                "FLARE_ASYNC_DIGEST": "0",
                "FLARE_ASYNC_JOB": job,
            }
            procs.append(
                await anyio.open_process(
                    [
                        sys.executable,
                        "-m",
                        "flare_async.fl.worker",
                        "--site",
                        name,
                        "--parent",
                        parent,
                        spec_of(fn),
                    ],
                    env=env,
                    stdin=None,
                    stdout=None,
                    stderr=None,
                )
            )
        yield procs
    finally:
        with anyio.CancelScope(shield=True):
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()


async def _run_guarded(
    runtime: ClientRuntime, script: Callable[[], object] | str, in_loop: bool = False
) -> None:
    """A script that raises is a crashed site: logged, and the round goes on without it."""
    try:
        if isinstance(script, str):
            await runtime.run_subprocess(script)
        else:
            await runtime.run_script(script, in_loop=in_loop)
    except Exception as exc:  # a crashed training script must not take the simulation down
        # (run_script has failed the site already, reporting the script's own words)
        runtime.cell._log.error("training script failed", site=runtime.site, exc_info=exc)
