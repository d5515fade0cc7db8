"""A checkpoint folder over real TCP, server -> relay -> two sites, with the server-relay link
cut 6 MiB into the last shard: the transfer resumes where the relay stood (not from the start of
the file, nor of the folder) and every site ends with every file byte for byte."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from flare_async import Cell
from flare_async.checkpoints import StoredCheckpoint, checkpoint_handlers, scan, send_checkpoint
from flare_async.testing import FaultCounters, FaultProxy
from flare_async.transport import TcpDriver
from tests.checkpoints._ckpt import digests

pytestmark = pytest.mark.anyio
SITES = ["server.eu.site-1", "server.eu.site-2"]
WINDOW = 2 << 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})  # real sockets, real clock


def folder(root: Path) -> Path:
    """Three 8 MiB shards of random bytes, an index and a config, in a folder below."""
    src = root / "ckpt"
    (src / "tokenizer").mkdir(parents=True)
    for i in range(1, 4):
        (src / f"model-0000{i}-of-00003.safetensors").write_bytes(os.urandom(8 << 20))
    (src / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (src / "tokenizer" / "tokenizer.json").write_text("{}")
    return src


async def test_a_cut_link_mid_shard_resumes_and_every_file_arrives_byte_for_byte(
    tmp_path: Path,
) -> None:
    src = folder(tmp_path)
    total = scan(src).total
    driver = TcpDriver()
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            Cell("server", listen=["tcp://127.0.0.1:0"], drivers=[driver])
        )
        proxy = await stack.enter_async_context(FaultProxy(server.listen_urls[0]))
        relay = await stack.enter_async_context(
            Cell("server.eu", listen=["tcp://127.0.0.1:0"], parent=proxy.url, drivers=[driver])
        )
        for site in SITES:
            cell = Cell(
                site,
                parent=relay.listen_urls[0],
                drivers=[driver],
                handlers=[checkpoint_handlers(tmp_path / site)],
            )
            await stack.enter_async_context(cell)
            with anyio.fail_after(10):
                await cell.wait_parent()
        with anyio.fail_after(10):
            await relay.wait_parent()
        out: dict[str, Any] = {}
        seen: list[tuple[int, int]] = []

        async def send() -> None:
            out.update(
                await send_checkpoint(
                    server,
                    src,
                    SITES,
                    window=WINDOW,
                    idle=30,
                    probe=0.1,
                    progress=lambda done, of: seen.append((done, of)),
                )
            )

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)

                def into_the_last_shard(c: FaultCounters) -> bool:
                    return c.bytes["down"] >= (16 << 20) + (6 << 20)

                await proxy.wait_until(into_the_last_shard)
                assert proxy.reset() == 1
    # progress within each shard, fanned out by the relay (its commits), never backwards
    assert len(seen) > 3 * 4
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (total, total)
    for site in SITES:
        assert isinstance(out[site], StoredCheckpoint)
        assert digests(tmp_path / site / "ckpt") == digests(src)
    assert proxy.counters.resets == 1
    assert proxy.counters.connections >= 2  # the relay came back
    assert relay.statistics().streams.resumes >= 1  # the cut stream was resumed ...
    # ... not started again: a stream per file, the open and the commit
    counts = server.statistics().streams  # small files (and the manifest) go inline
    assert counts.sent + counts.inline_sent == len(scan(src).files) + 2
    # and what crossed the cut link twice is about the window lost in flight (1 MiB in 30
    # runs, 3.2 MiB once); starting the shard again would have been 6 MiB more
    assert proxy.counters.bytes["down"] < total + 2 * WINDOW
