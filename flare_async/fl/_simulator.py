"""The simulator: a server and N client cells in one process over ``memory://``, each client's
training script in a worker thread, running a workflow to the end.

The same workflow, script and cells run in a deployment; only the transport and the place the
script runs differ.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio

from flare_async.cell import Cell, system_handlers
from flare_async.fl._client import ClientRuntime
from flare_async.fl._relay import RelayAggregator
from flare_async.fl._server import FLServer, RoundResult
from flare_async.transport import MemoryNetwork

Workflow = Callable[[FLServer], Awaitable[Any]]


async def simulate(
    workflow: Workflow,
    script: Callable[[], object] | str | dict[str, Callable[[], object] | str],
    *,
    clients: int = 2,
    config: dict[str, Any] | None = None,
    codec: str = "tensors",
    job: str = "sim",
    seed: int | None = 0,
    on_round: Callable[[RoundResult], None] | None = None,
    relays: int = 0,
) -> Any:
    """Run ``workflow`` with ``clients`` simulated sites (``server.site-1`` ...; with
    ``relays``, ``server.relay-1.site-1`` ..., sites spread over the relays round-robin, each
    relay folding its sites' results into one partial sum for the server).

    Args:
        script: the training script: a function using :mod:`flare_async.client`, run in a
            worker thread, or ``"MODULE:FUNCTION"``, run in its own Python process per site
            (``flare_async.fl.worker``); or one of those per site name.
        config: what each script's ``get_config()`` returns (plus ``site_index`` and
            ``sites``, the number of sites).
        codec: how models travel both ways (``tensors``, ``q8``, ``nf4`` ...).

    Returns:
        what the workflow returns.
    """
    net = MemoryNetwork()
    relay_names = [f"server.relay-{j + 1}" for j in range(relays)]
    parents = [relay_names[i % relays] if relays else "server" for i in range(clients)]
    names = [f"{parents[i]}.site-{i + 1}" for i in range(clients)]
    async with AsyncExitStack() as stack:
        server_cell = Cell("server", listen=["memory://server"], drivers=[net])
        # Bytes never leave this process: chunk CRCs stay, the whole-model SHA-256 goes.
        server = FLServer(
            server_cell,
            names,
            job=job,
            codec=codec,
            seed=seed,
            on_round=on_round,
            digest=False,
            hierarchical=relays > 0,
        )
        server_cell.mount(server.handlers())
        await stack.enter_async_context(server_cell)
        for relay in relay_names:
            relay_cell = Cell(
                relay,
                listen=[f"memory://{relay}"],
                parent="memory://server",
                drivers=[net],
                handlers=[system_handlers()],
            )
            relay_cell.mount(RelayAggregator(relay_cell, "server", digest=False).handlers())
            await stack.enter_async_context(relay_cell)
            await relay_cell.wait_parent()
        runtimes: list[ClientRuntime] = []
        for i, name in enumerate(names):
            cell = Cell(name, parent=f"memory://{parents[i]}", drivers=[net])
            runtime = ClientRuntime(
                cell,
                "server",
                config={**(config or {}), "site_index": i, "sites": clients},
                codec=codec,
                digest=False,
            )
            cell.mount(runtime.handlers())
            await stack.enter_async_context(cell)
            await cell.wait_parent()
            runtimes.append(runtime)
        outcome: Any = None
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            for runtime in runtimes:
                fn = script[runtime.site] if isinstance(script, dict) else script
                tg.start_soon(_run_guarded, runtime, fn)
            try:
                outcome = await workflow(server)
            except Exception as exc:  # re-raised as it is below, not inside a group
                error = exc
            finally:
                for runtime in runtimes:
                    runtime.stop()
                # Scripts that finished their loop end by themselves; a hung one is abandoned.
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return outcome


async def _run_guarded(runtime: ClientRuntime, script: Callable[[], object] | str) -> None:
    """A script that raises is a crashed site: logged, and the round goes on without it."""
    try:
        if isinstance(script, str):
            await runtime.run_subprocess(script)
        else:
            await runtime.run_script(script)
    except Exception as exc:  # a crashed training script must not take the simulation down
        runtime.cell._log.error("training script failed", site=runtime.site, exc_info=exc)
        await runtime.report_failure(f"training script failed: {type(exc).__name__}: {exc}")
