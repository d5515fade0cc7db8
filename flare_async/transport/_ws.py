"""The ``ws://`` and ``wss://`` driver: links over WebSocket, on aiohttp.

For sites that can only make outbound HTTP(S) connections, possibly through a proxy: the link is
an ordinary WebSocket (HTTP/1.1 upgrade), and ``wss://`` through an HTTP proxy is a ``CONNECT``
tunnel. Everything comes in as arguments; no environment variable (``HTTPS_PROXY``...) is read.
aiohttp runs on asyncio only, so this driver refuses to work under trio.

The pieces, each a module of its own: the link (``_ws_link``: one message per frame, sending,
receiving, closing), its two ends (``_ws_ends``: how a close ends on each side), what happens
before the hello (``_ws_admit``: caps, deadline, the frame check), and the listener
(``_ws_listen``).
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio
import sniffio
from aiohttp import web

from flare_async.errors import ConfigError, ConnectError
from flare_async.transport._base import Driver, Link, Listener
from flare_async.transport._ws_ends import ClientLink
from flare_async.transport._ws_link import WebSocketLink, format_address, max_msg_size
from flare_async.transport._ws_listen import WebSocketListener
from flare_async.wire import Limits

__all__ = ["WebSocketDriver", "WebSocketLink"]


def _require_asyncio() -> None:
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library != "asyncio":
        raise ConfigError("ws:// needs the asyncio backend (aiohttp runs on asyncio only)")


class WebSocketDriver(Driver):
    """Serves ``ws://HOST:PORT/PATH`` and ``wss://HOST:PORT/PATH`` URLs with aiohttp.

    Args:
        server_ssl: TLS context for ``wss://`` listeners (set ``verify_mode`` and CA for mTLS).
        client_ssl: TLS context for ``wss://`` connections (CA to trust, our certificate).
        proxy: HTTP proxy URL for connections (``wss://`` goes through it with ``CONNECT``).
        path: the WebSocket route when a URL names no path.
        heartbeat: seconds between WebSocket pings; a missing pong breaks the link. ``None``:
            no pings (the runtime's own heartbeat then detects dead peers).
        max_queue: accepted WebSockets waiting for ``accept()``; beyond it upgrades get 503.
        close_timeout: how long a closing handshake waits for the peer's close frame.
        connect_timeout: bound on ``connect`` (TCP, proxy, TLS and upgrade); ``None``: none.
    """

    schemes = ("ws", "wss")

    def __init__(
        self,
        *,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        proxy: str | None = None,
        path: str = "/flare",
        heartbeat: float | None = None,
        max_queue: int = 64,
        close_timeout: float = 10.0,
        connect_timeout: float | None = 30.0,
    ) -> None:
        if max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        if not path.startswith("/"):
            raise ConfigError(f"path {path!r} must start with '/'")
        if heartbeat is not None and heartbeat <= 0:
            raise ConfigError("heartbeat must be positive (or None)")
        if close_timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise ConfigError("close_timeout and connect_timeout must be positive")
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.proxy = proxy
        self.path = path
        self.heartbeat = heartbeat
        self.max_queue = max_queue
        self.close_timeout = close_timeout
        self.connect_timeout = connect_timeout
        self._closing_tasks: set[asyncio.Task[None]] = set()

    def _parse(self, url: str) -> tuple[str, str, int, str]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            raise ConfigError(f"{url!r} is not a ws:// or wss:// URL")
        host = parts.hostname
        if not host:
            raise ConfigError(f"{url!r} names no host")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{url!r} has an invalid port") from None
        if port is None:
            port = 443 if scheme == "wss" else 80
        return scheme, host, port, parts.path or self.path

    async def connect(self, url: str, *, limits: Limits) -> Link:
        _require_asyncio()
        scheme, _, _, path = self._parse(url)
        ssl_arg: ssl.SSLContext | bool = True
        if scheme == "wss":
            if self.client_ssl is None:
                raise ConfigError("wss:// needs a client_ssl context")
            ssl_arg = self.client_ssl
        parts = urlsplit(url)
        target = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        try:
            with anyio.fail_after(self.connect_timeout):
                ws = await session.ws_connect(
                    target,
                    ssl=ssl_arg,
                    proxy=self.proxy,
                    max_msg_size=max_msg_size(limits),
                    autoclose=False,
                    autoping=True,
                    heartbeat=self.heartbeat,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.close_timeout),
                )
        except aiohttp.WSServerHandshakeError as exc:
            await session.close()
            raise ConnectError(
                f"{url}: the server refused the WebSocket upgrade (HTTP {exc.status} {exc.message})"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:  # OSError: also TimeoutError, SSLError
            await session.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise ConnectError(f"cannot connect to {url}: {reason}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await session.close()
            raise
        local = format_address(ws.get_extra_info("sockname"), scheme)
        return ClientLink(ws, session, self._closing_tasks, local, url, limits, self.close_timeout)

    async def listen(self, url: str, *, limits: Limits) -> Listener:
        _require_asyncio()
        scheme, host, port, path = self._parse(url)
        if scheme == "wss" and self.server_ssl is None:
            raise ConfigError("wss:// needs a server_ssl context")
        app = web.Application()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.close_timeout)
        url_host = f"[{host}]" if ":" in host else host
        listener = WebSocketListener(url, scheme, limits, self, runner)
        app.router.add_get(path, listener.handle)
        await runner.setup()
        try:
            bound = await listener.start(host, port, self.server_ssl if scheme == "wss" else None)
        except OSError as exc:
            await runner.cleanup()
            raise ConnectError(f"cannot listen on {url}: {exc}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            raise
        listener.url = f"{scheme}://{url_host}:{bound}{path}"
        return listener
