"""The memory driver: the conformance suite, plus what is specific to memory:// addresses."""

from __future__ import annotations

import pytest

from flare_async.errors import ConfigError, ConnectError, LinkBroken, LinkClosed, UnsupportedScheme
from flare_async.testing import CONFORMANCE_CHECKS, driver_pair, run_check
from flare_async.transport import DriverRegistry, Link, MemoryLink, MemoryNetwork
from flare_async.wire import Limits

pytestmark = pytest.mark.anyio


async def abort(link: Link) -> None:
    assert isinstance(link, MemoryLink)
    link.abort()


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check) -> None:
    await run_check(check, driver_pair(MemoryNetwork(queue_size=8), "memory://srv"), abort)


async def test_connect_to_nothing_is_refused() -> None:
    net = MemoryNetwork()
    with pytest.raises(ConnectError, match="nothing listens"):
        await net.connect("memory://nobody", limits=Limits())


async def test_address_in_use_and_freed_on_close() -> None:
    net = MemoryNetwork()
    listener = await net.listen("memory://x", limits=Limits())
    with pytest.raises(ConnectError, match="already"):
        await net.listen("memory://x", limits=Limits())
    await listener.aclose()
    with pytest.raises(LinkClosed):
        await listener.accept()
    again = await net.listen("memory://x", limits=Limits())
    await again.aclose()


async def test_backlog_full_refuses_connect() -> None:
    net = MemoryNetwork(backlog=2)
    listener = await net.listen("memory://x", limits=Limits())
    await net.connect("memory://x", limits=Limits())
    await net.connect("memory://x", limits=Limits())
    with pytest.raises(ConnectError, match="backlog"):
        await net.connect("memory://x", limits=Limits())
    await listener.aclose()


async def test_unaccepted_links_break_when_listener_closes() -> None:
    net = MemoryNetwork()
    listener = await net.listen("memory://x", limits=Limits())
    client = await net.connect("memory://x", limits=Limits())
    await listener.aclose()
    with pytest.raises(LinkBroken):
        await client.receive()


async def test_sever_breaks_every_accepted_link() -> None:
    net = MemoryNetwork()
    listener = await net.listen("memory://x", limits=Limits())
    clients = [await net.connect("memory://x", limits=Limits()) for _ in range(3)]
    for _ in clients:
        await listener.accept()
    assert net.sever("memory://x") == 3
    for client in clients:
        with pytest.raises(LinkBroken):
            await client.receive()
    await listener.aclose()


def test_bad_urls_and_registry() -> None:
    with pytest.raises(ConfigError):
        MemoryNetwork._address("tcp://x")
    with pytest.raises(ConfigError):
        MemoryNetwork._address("memory://")
    registry = DriverRegistry([MemoryNetwork()])
    with pytest.raises(UnsupportedScheme, match="tcp"):
        registry.for_url("tcp://127.0.0.1:1")
    with pytest.raises(ConfigError):
        registry.register(MemoryNetwork())
    with pytest.raises(ConfigError, match="no scheme"):
        registry.for_url("server")
