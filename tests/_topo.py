"""Helpers to build small cell trees over one MemoryNetwork for tests."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from flare_async import Cell, Context, HandlerTable, IncomingStream, MemoryNetwork


def url(name: str) -> str:
    return f"memory://{name}"


@asynccontextmanager
async def tree(
    net: MemoryNetwork,
    names: Sequence[str],
    handlers: dict[str, Sequence[HandlerTable]] | None = None,
    **cell_kwargs: Any,
) -> AsyncIterator[dict[str, Cell]]:
    """Start cells parents-first; each listens on memory://NAME and connects to its parent."""
    handlers = handlers or {}
    cells: dict[str, Cell] = {}
    async with AsyncExitStack() as stack:
        for name in names:
            parent, dot, _ = name.rpartition(".")
            cell = Cell(
                name,
                listen=[url(name)],
                parent=url(parent) if dot else None,
                drivers=[net],
                handlers=handlers.get(name, handlers.get("*", ())),
                **cell_kwargs,
            )
            cells[name] = await stack.enter_async_context(cell)
            if dot:
                assert cell.parent_name == parent, f"{name} did not connect to {parent}"
        yield cells


async def serve_until(cell: Cell, stop: Any, *, task_status: Any) -> None:
    """Run ``cell`` in its own task until ``stop`` (an anyio.Event) is set; start with tg.start."""
    async with cell:
        task_status.started()
        await stop.wait()


def sink_table() -> HandlerTable:
    """A stream handler ``t/sink`` answering ``"<bytes> <sha256>"`` of what it read."""
    table = HandlerTable()

    @table.stream("t", "sink")
    async def sink(ctx: Context, stream: IncomingStream) -> bytes:
        digest = hashlib.sha256()
        n = 0
        async for chunk in stream:
            digest.update(chunk)
            n += chunk.nbytes
        return f"{n} {digest.hexdigest()}".encode()

    return table
