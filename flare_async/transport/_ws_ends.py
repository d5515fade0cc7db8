"""The two ends of a WebSocket link, which differ in how a close ends.

:meth:`WebSocketLink.aclose` marks the link closed, starts the WebSocket closing handshake
(a normal close frame, 1000) and returns without waiting for the peer's answer, since the peer
answers only once its owner reads. The handshake is finished in the background, bounded by
``close_timeout``: on the accepting side (:class:`ServerLink`) by the aiohttp handler that
serves the link, on the connecting side (:class:`ClientLink`) by a small task the driver keeps,
which then closes the link's ``aiohttp.ClientSession``. :meth:`WebSocketLink.wait_closed` waits
for that end. A close frame from the peer with code 1000/1001 (or none) is an orderly close
(``LinkClosed``); any other code, an EOF or reset without a close frame, or a missed heartbeat
is ``LinkBroken``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, web

from flare_async.errors import LinkBroken
from flare_async.transport._ws_admit import Admitted
from flare_async.transport._ws_link import WebSocketLink
from flare_async.wire import Limits


class ServerLink(WebSocketLink):
    """The accepting end: the aiohttp handler that accepted it serves it until it is closed."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        local_address: str,
        peer_address: str,
        limits: Limits,
        close_timeout: float,
        admitted: Admitted,
    ) -> None:
        super().__init__(ws, local_address, peer_address, limits, close_timeout)
        self._close_requested = asyncio.Event()
        self._admitted = admitted
        admitted.upgraded = True

    def _start_finisher(self) -> None:
        self._close_requested.set()

    def refuse(self, why: str) -> None:
        """The listener will not hand the link out: it breaks, closed with 1013 (try later)."""
        self._fail(LinkBroken, why)
        self._begin_close(WSCloseCode.TRY_AGAIN_LATER)

    def hello_done(self) -> None:
        self._admitted.hello_done()

    def _refused_why(self) -> str | None:
        return self._admitted.violation

    async def serve(self) -> None:
        """Run in the aiohttp handler: keep it alive while the link is open, then close."""
        try:
            await self._close_requested.wait()
        finally:
            # Only a cancelled handler gets here with the link still open.
            self._fail(LinkBroken, "the web server stopped serving the link")
            try:
                await self._close_websocket()
            finally:
                self._finished.set()


class ClientLink(WebSocketLink):
    """The connecting end: owns an ``aiohttp.ClientSession``, closed with the link."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        session: aiohttp.ClientSession,
        tasks: set[asyncio.Task[None]],
        local_address: str,
        peer_address: str,
        limits: Limits,
        close_timeout: float,
    ) -> None:
        super().__init__(ws, local_address, peer_address, limits, close_timeout)
        self._session = session
        self._tasks = tasks

    def _start_finisher(self) -> None:
        task = asyncio.get_running_loop().create_task(
            self._finish(), name=f"close ws link to {self.peer_address}"
        )
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(_forget_task(self._tasks))

    async def _finish(self) -> None:
        try:
            # Sends the close frame, then reads (and drops) until the peer's close frame, then
            # closes the connection (RFC 6455 lets the server close TCP first).
            await self._close_websocket()
        finally:
            try:
                await self._session.close()
            finally:
                self._finished.set()


def _forget_task(tasks: set[asyncio.Task[None]]) -> Any:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it; the link is closed anyway

    return done
