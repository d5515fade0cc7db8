"""A cell serves the schemes of the URLs it is given without ``drivers=`` (tcp, tls, ws, wss),
over real sockets; the drivers it is given win; anything else is refused with a message that
lists what exists and says what to pass."""

from __future__ import annotations

from typing import Any

import pytest

from flare_async import Cell, Context, HandlerTable, MemoryNetwork, Payload
from flare_async.errors import ConfigError, UnsupportedScheme
from flare_async.transport import DriverRegistry, TcpDriver
from tests.transport.test_transport_ws import Pki, client_context, make_pki, server_context

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return (request.param, {})  # real sockets: the real clock


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def echo_table() -> HandlerTable:
    table = HandlerTable()

    @table.request("t", "echo")
    async def echo(ctx: Context, msg: Payload) -> bytes:
        return f"{ctx.cell.name} <- {ctx.src}: ".encode() + msg.tobytes()

    return table


async def talk(listen: str, **tls: Any) -> tuple[str, str]:
    """A parent with only ``listen=``, a child with only ``parent=``: one request each way."""
    server_side = {k: v for k, v in tls.items() if k == "server_tls"}
    client_side = {k: v for k, v in tls.items() if k == "client_tls"}
    async with (
        Cell("server", listen=[listen], handlers=[echo_table()], **server_side) as server,
        Cell(
            "server.site-1", parent=server.listen_urls[0], handlers=[echo_table()], **client_side
        ) as site,
    ):
        await site.wait_parent()
        up = await site.request("server", "t", "echo", b"hi", timeout=10)
        down = await server.request("server.site-1", "t", "echo", b"yo", timeout=10)
        assert server.children == ["server.site-1"]
        return up.tobytes().decode(), down.tobytes().decode()


async def test_tcp_without_drivers() -> None:
    up, down = await talk("tcp://127.0.0.1:0")
    assert up == "server <- server.site-1: hi"
    assert down == "server.site-1 <- server: yo"


async def test_tls_without_drivers_takes_the_cells_contexts(pki: Pki) -> None:
    up, down = await talk(
        "tls://127.0.0.1:0", server_tls=server_context(pki), client_tls=client_context(pki)
    )
    assert (up, down) == ("server <- server.site-1: hi", "server.site-1 <- server: yo")


@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)  # aiohttp: asyncio only
async def test_ws_and_wss_without_drivers(pki: Pki) -> None:
    assert await talk("ws://127.0.0.1:0/flare") == (
        "server <- server.site-1: hi",
        "server.site-1 <- server: yo",
    )
    up, _ = await talk(
        "wss://127.0.0.1:0/flare", server_tls=server_context(pki), client_tls=client_context(pki)
    )
    assert up == "server <- server.site-1: hi"


def test_only_the_schemes_given_get_a_driver() -> None:
    assert Cell("server", listen=["tcp://127.0.0.1:0"]).drivers.schemes == {"tcp", "tls"}
    assert Cell("server").drivers.schemes == frozenset()
    net = MemoryNetwork()
    cell = Cell("server.a", listen=["memory://a"], parent="ws://127.0.0.1:1/f", drivers=[net])
    assert cell.drivers.schemes == {"memory", "ws", "wss"}
    assert cell.drivers.for_url("memory://a") is net


def test_the_drivers_given_win() -> None:
    mine = TcpDriver(connect_timeout=1.0)
    cell = Cell("server.a", listen=["tcp://127.0.0.1:0"], parent="tcp://x:1", drivers=[mine])
    assert cell.drivers.for_url("tcp://127.0.0.1:0") is mine
    assert cell.drivers.schemes == {"tcp", "tls"}


def test_an_unknown_scheme_names_what_exists_and_what_to_pass() -> None:
    with pytest.raises(UnsupportedScheme) as refused:
        Cell("server", listen=["tcp://127.0.0.1:0", "gopher://127.0.0.1:70"])
    text = str(refused.value)
    assert text.startswith("no driver for gopher:// (this cell serves: none)")
    for scheme in ("tcp://", "tls://", "ws://", "wss://", "memory://"):
        assert scheme in text
    assert "drivers=[" in text
    assert "server_tls=" in text
    assert "client_tls=" in text
    assert "MemoryNetwork" in text


def test_memory_without_its_network_says_to_pass_it() -> None:
    with pytest.raises(UnsupportedScheme) as refused:
        Cell("server.a", parent="memory://server")
    text = str(refused.value)
    assert "no driver for memory://" in text
    assert "MemoryNetwork" in text
    assert "drivers=[net]" in text
    # A registry a test builds by hand serves only what it is given, as before.
    with pytest.raises(UnsupportedScheme, match="this cell serves: memory"):
        DriverRegistry([MemoryNetwork()]).for_url("tcp://127.0.0.1:1")


def test_tls_and_wss_without_a_context_say_which_to_pass(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"listen on tls://127.0.0.1:0 .*server_tls="):
        Cell("server", listen=["tls://127.0.0.1:0"], client_tls=client_context(pki))
    with pytest.raises(ConfigError, match=r"dial wss://h:1/f .*client_tls="):
        Cell("server.a", parent="wss://h:1/f", server_tls=server_context(pki))
    # A driver given for the scheme needs nothing from the cell.
    tls = TcpDriver(server_tls=server_context(pki), client_tls=client_context(pki))
    assert (
        Cell("server", listen=["tls://127.0.0.1:0"], drivers=[tls]).drivers.for_url("tls://x:1")
        is tls
    )


def test_a_url_without_a_scheme() -> None:
    with pytest.raises(ConfigError, match="no scheme"):
        Cell("server", listen=["127.0.0.1:9000"])
