"""The WebSocket listener: an aiohttp application on a socket and accept loop of our own.

An ``aiohttp.web.Application`` with one WebSocket route (the URL's path, or the driver's
``path`` when the URL has none), served by ``AppRunner`` on a socket and accept loop of our own
(see :meth:`WebSocketListener.start`). Plain HTTP requests on that path get
``426 Upgrade Required``, other paths ``404``. Accepted WebSockets wait for
:meth:`Listener.accept` in a bounded queue of ``max_queue`` links; beyond it the upgrade is
refused with ``503`` (so ``connect`` raises ``ConnectError``). ``Listener.aclose`` stops the
site (the listening socket closes; connections not yet accepted are closed with code 1013) but
keeps links already accepted open, as the driver contract requires: aiohttp's
``AppRunner.cleanup`` would close them, so it runs only when no accepted link is left; otherwise
the server's remaining state goes away with the last link.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Final, Protocol

import anyio
from aiohttp import web
from anyio.lowlevel import checkpoint

from flare_async import _logging
from flare_async._concurrency import Channel, ChannelClosed
from flare_async.errors import LinkClosed
from flare_async.transport._base import Admission, Link, Listener
from flare_async.transport._listening import ACCEPT_SKIP, Pending, listening_socket
from flare_async.transport._ws_admit import Admitted, Handler
from flare_async.transport._ws_ends import ServerLink
from flare_async.transport._ws_link import format_address, max_msg_size
from flare_async.wire import Limits

_BACKLOG: Final = 128
_ACCEPT_RETRY: Final = 0.1


class Settings(Protocol):
    """What a listener takes from its driver (``WebSocketDriver``'s options)."""

    @property
    def max_queue(self) -> int: ...

    @property
    def close_timeout(self) -> float: ...

    @property
    def heartbeat(self) -> float | None: ...


class WebSocketListener(Listener):
    def __init__(
        self, url: str, scheme: str, limits: Limits, driver: Settings, runner: web.AppRunner
    ) -> None:
        self.url = url
        self._scheme = scheme
        self.limits = limits
        self._driver = driver
        self._runner = runner
        self._backlog: Channel[ServerLink] = Channel(driver.max_queue)
        self._links: set[ServerLink] = set()
        """Links whose handler is running (queued or accepted)."""
        self._closed = False
        self._sock: socket.socket | None = None
        self._ssl: ssl.SSLContext | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._pending: Pending | None = None

    def guard(self, admission: Admission) -> bool:
        self._pending = Pending(admission)
        return True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of the WebSocket route."""
        driver = self._driver
        ws = web.WebSocketResponse(
            timeout=driver.close_timeout,
            autoclose=False,
            autoping=True,
            heartbeat=driver.heartbeat,
            compress=False,
            max_msg_size=max_msg_size(self.limits),
        )
        if not ws.can_prepare(request):
            return web.Response(
                status=426,
                text="this endpoint speaks WebSocket only\n",
                headers={"Upgrade": "websocket", "Connection": "Upgrade"},
            )
        if self._closed or len(self._backlog) >= self._backlog.size:
            return web.Response(status=503, text="listener closed or accept backlog full\n")
        await ws.prepare(request)
        transport = request.transport
        peer = format_address(
            transport.get_extra_info("peername") if transport else None, self._scheme
        )
        handler = request.protocol
        admitted = handler.admitted if isinstance(handler, Handler) else None
        if admitted is None:  # not one of our connections: cannot happen
            return web.Response(status=500, text="unknown connection\n")
        link = ServerLink(ws, self.url, peer, self.limits, driver.close_timeout, admitted)
        try:
            offered = self._backlog.put_nowait(link)
        except ChannelClosed:
            offered = False
        if not offered:  # closed or filled while the upgrade was answered
            link.refuse("listener did not take the link")
        self._links.add(link)
        try:
            await link.serve()
        finally:
            self._links.discard(link)
        return ws

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Listen on our own socket and accept in a task of ours (not aiohttp's ``TCPSite``): a
        connection is counted, capped and given its deadline at the TCP accept, before its TLS
        handshake and HTTP upgrade, which aiohttp does not bound."""
        infos = await anyio.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, addr = infos[0]
        sock = listening_socket(family, addr, _BACKLOG)
        self._sock = sock
        self._ssl = ssl_context
        self._accepting = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name=f"accept {self.url}"
        )
        port_: int = sock.getsockname()[1]
        return port_

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        log = _logging.get_logger()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP:
                    continue
                log.warning("ws listener cannot accept", url=self.url, reason=str(exc))
                await asyncio.sleep(_ACCEPT_RETRY)  # out of descriptors: let some close
                continue
            source = str(addr[0])
            peer = format_address(addr, self._scheme)
            pending = self._pending
            if pending is not None:
                why = pending.admit(source)
                if why is not None:  # closed at once: no handler, no handshake
                    conn.close()
                    log.warning("connection refused before hello", peer=peer, reason=why)
                    continue
            admitted = Admitted(source, peer, pending)
            if pending is not None:
                admitted.timer = loop.call_later(pending.admission.timeout, admitted.expire)
            task = loop.create_task(self._start_connection(conn, admitted))
            admitted.starting = task
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_connection(self, conn: socket.socket, admitted: Admitted) -> None:
        """Hand the socket to aiohttp (after the TLS handshake, for wss)."""
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            timeout = admitted.pending.admission.timeout if admitted.pending else None
            await loop.connect_accepted_socket(
                lambda: Handler(server, admitted=admitted, loop=loop, access_log=None),
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=timeout if self._ssl is not None else None,
            )
        except (OSError, asyncio.CancelledError) as exc:  # TLS failed, timed out, or closing
            conn.close()
            admitted.closed()
            if not isinstance(exc, asyncio.CancelledError):
                _logging.get_logger().info(
                    "connection failed before the upgrade", peer=admitted.peer, reason=str(exc)
                )
        finally:
            admitted.starting = None

    async def accept(self) -> Link:
        try:
            return await self._backlog.get()
        except ChannelClosed:
            raise LinkClosed(f"listener {self.url} is closed") from None

    async def aclose(self) -> None:
        if self._closed:
            await checkpoint()
            return
        self._closed = True
        self._backlog.close()
        for pending in self._backlog.clear():
            pending.refuse("listener closed before the link was accepted")
        with anyio.CancelScope(shield=True):
            if self._accepting is not None:
                self._accepting.cancel()
                await asyncio.wait((self._accepting,))
            if self._sock is not None:
                self._sock.close()
            for task in list(self._starting):
                task.cancel()
            if self._starting:
                await asyncio.wait(self._starting)
            if not self._links:
                await self._runner.cleanup()
        await checkpoint()
