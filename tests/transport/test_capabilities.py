"""The optional capabilities of a link (``PushDelivery``, ``Splicing``): which links really have
them, and that a link of each kind passes the runtime check of what it implements."""

from __future__ import annotations

import pytest

from flare_async.lowlevel import PushDelivery as LowlevelPushDelivery
from flare_async.lowlevel import Splicing as LowlevelSplicing
from flare_async.testing import driver_pair
from flare_async.transport import Link, MemoryLink, PushDelivery, Splicing, TcpDriver
from flare_async.transport._tcp_asyncio import AsyncioTcpLink
from flare_async.transport._tcp_trio import TrioTcpLink
from flare_async.transport._tls import TlsLink
from flare_async.transport._ws_link import WebSocketLink

PUSH = ("deliver_to",)
SPLICE = ("splices", "pass_through", "take_passing", "send_passing")


def test_the_capabilities_are_the_layer_packages_own() -> None:
    assert LowlevelPushDelivery is PushDelivery
    assert LowlevelSplicing is Splicing


def test_only_the_raw_asyncio_link_has_them() -> None:
    """Link itself has neither: a cell asks ``isinstance(link, Splicing)`` (once per link),
    and only the raw ``tcp://`` link on asyncio says yes."""
    for name in PUSH + SPLICE:
        assert hasattr(AsyncioTcpLink, name), name
        for cls in (Link, TrioTcpLink, TlsLink, WebSocketLink, MemoryLink):
            assert not hasattr(cls, name), (cls.__name__, name)


@pytest.mark.anyio
async def test_a_raw_asyncio_link_pushes_and_splices(anyio_backend_name: str) -> None:
    asyncio = anyio_backend_name == "asyncio"
    async with driver_pair(TcpDriver(), "tcp://127.0.0.1:0")() as (a, b):
        assert isinstance(a, PushDelivery) is asyncio
        assert isinstance(b, Splicing) is asyncio
        if isinstance(a, PushDelivery) and isinstance(b, Splicing):
            assert a.deliver_to(None)
            assert b.pass_through(None) is b.splices
