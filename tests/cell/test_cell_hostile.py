"""Peers that lie, flood or misbehave: each is refused or contained; the cell keeps serving."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from flare_async import Cell, Context, HandlerTable, MemoryNetwork, Payload, errors
from flare_async.cell._links import handshake_connector
from flare_async.transport import Link
from flare_async.wire import Error, Frame, Limits, Request, make_hello
from tests._topo import tree, url

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


async def raw_child(net: MemoryNetwork, parent: str, name: str) -> Link:
    link = await net.connect(url(parent), limits=Limits())
    await handshake_connector(link, make_hello(name, "child", Limits()))
    return link


def request(src: str, dst: str, msg_id: int = 1, topic: str = "who") -> Frame:
    return Frame(
        Request(
            id=msg_id,
            src=src,
            dst=dst,
            route=[src],
            budget=30.0,
            headers={},
            channel="t",
            topic=topic,
        )
    )


def recording_table(calls: list[str], release: anyio.Event | None = None) -> HandlerTable:
    t = HandlerTable()

    @t.request("t", "who")
    async def who(ctx: Context, msg: Payload) -> bytes:
        calls.append(ctx.src)
        if release is not None:
            await release.wait()
        return ctx.cell.name.encode()

    return t


async def test_a_child_cannot_send_in_another_cells_name() -> None:
    net = MemoryNetwork()
    calls: list[str] = []
    names = ["server", "server.good", "server.victim"]
    async with tree(net, names, {"server.good": [recording_table(calls)]}) as cells:
        evil = await raw_child(net, "server", "server.evil")
        await evil.send(request(src="server.victim", dst="server.good"))  # poses as a sibling
        ended: BaseException | None = None
        while ended is None:
            try:
                await evil.receive()
            except errors.TransportError as exc:
                ended = exc
        await anyio.wait_all_tasks_blocked()
        assert calls == []  # the forged request was never delivered
        assert cells["server"].children == ["server.good", "server.victim"]  # liar dropped
        reply = await cells["server"].request("server.good", "t", "who")
        assert reply.tobytes() == b"server.good"  # everyone else is served as before


async def test_an_error_from_off_the_path_cannot_fail_a_request() -> None:
    net = MemoryNetwork()
    calls: list[str] = []
    release = anyio.Event()
    table = recording_table(calls, release)
    async with tree(net, ["server", "server.good"], {"server.good": [table]}) as cells:
        server = cells["server"]
        evil = await raw_child(net, "server", "server.evil")
        outcome: list[Any] = []

        async def call() -> None:
            outcome.append((await server.request("server.good", "t", "who")).tobytes())

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            (msg_id,) = server._router.pending._waiters  # the id a guessing attacker would need
            forged = Error(
                id=1,
                src="server.evil",
                dst="server",
                route=["server.evil"],
                budget=None,
                headers={},
                corr=msg_id,
                status=6,
                message="forged",
            )
            await evil.send(Frame(forged))
            await anyio.wait_all_tasks_blocked()
            assert outcome == []  # still waiting: the forged error was ignored
            release.set()
        assert outcome == [b"server.good"]
        await evil.aclose()


async def test_a_handler_overrunning_its_deadline_does_not_doom_the_next_job() -> None:
    t = HandlerTable()
    done: list[str] = []

    @t.request("t", "stubborn")
    async def stubborn(ctx: Context, msg: Payload) -> bytes:
        with anyio.CancelScope(shield=True):  # ignores its deadline
            await anyio.sleep(5)
        done.append("stubborn")
        return b"late"

    @t.request("t", "quick")
    async def quick(ctx: Context, msg: Payload) -> bytes:
        await anyio.sleep(1)
        done.append("quick")
        return b"quick"

    async with tree(
        MemoryNetwork(), ["server", "server.e"], {"server.e": [t]}, max_concurrency=1
    ) as cells:
        server = cells["server"]
        results: dict[str, Any] = {}

        async def call(topic: str, timeout: float) -> None:
            try:
                results[topic] = (
                    await server.request("server.e", "t", topic, timeout=timeout)
                ).tobytes()
            except errors.FlareError as exc:
                results[topic] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "stubborn", 1.0)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, "quick", 60.0)  # queued behind it on the only worker
        assert isinstance(results["stubborn"], errors.DeadlineExceeded)
        assert results["quick"] == b"quick"  # ran in a fresh scope, to completion
        assert done == ["stubborn", "quick"]


async def test_frames_arriving_during_shutdown_are_harmless() -> None:
    net = MemoryNetwork()
    calls: list[str] = []
    async with tree(net, ["server"], {"server": [recording_table(calls)]}) as cells:
        talker = await raw_child(net, "server", "server.talker")
        for i in range(50):
            await talker.send(request("server.talker", "server", msg_id=i))
        # Leaving the block now must not raise although requests are still arriving.
        del cells
    await talker.aclose()


async def test_a_peer_that_never_reads_cannot_pile_up_tasks() -> None:
    net = MemoryNetwork(queue_size=4)
    async with Cell("server", listen=[url("server")], drivers=[net], heartbeat=None) as server:
        flooder = await raw_child(net, "server", "server.flood")
        sent = 0
        with anyio.move_on_after(1):
            for i in range(5000):  # each asks for a handler that does not exist
                await flooder.send(request("server.flood", "server", msg_id=i, topic="nope"))
                sent += 1
        await anyio.wait_all_tasks_blocked()
        stats = server.statistics()
        assert sent == 5000
        assert server._router.answer_tasks <= 1024
        assert stats.errors_returned == 5000
        assert stats.undeliverable >= 5000 - 1024 - 4
        await flooder.aclose()
