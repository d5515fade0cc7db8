"""The ``tcp://`` and ``tls://`` driver: its listener, and connecting.

Its links are ``TcpLink`` objects (``_tcp_base``): for ``tcp``, the raw-socket link of the
running backend (``_tcp_asyncio``, ``_tcp_trio``); for ``tls``, on asyncio an ``AsyncioTlsLink``
(``_tls_asyncio``: the raw link's reader callback with an ``SSLObject``), on any other backend a
``TlsLink`` (``_tls``: anyio's ``TLSStream``). An accepted ``tls`` link does its TLS handshake
later, on first use, so the accept loop never waits on a client.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import SocketStream
from anyio.lowlevel import checkpoint
from anyio.streams.tls import TLSStream

from flare_async import _logging
from flare_async.errors import ConfigError, ConnectError, LinkClosed
from flare_async.transport._base import Admission, Driver, Link, Listener
from flare_async.transport._listening import ACCEPT_SKIP, Pending, listening_socket
from flare_async.transport._tcp_base import TcpLink, error_reason, on_asyncio
from flare_async.transport._tls import TlsLink
from flare_async.transport._tls_asyncio import AsyncioTlsLink
from flare_async.wire import Limits


def split_hostport(url: str, schemes: Sequence[str]) -> tuple[str, int, str]:
    """``(host, port, scheme)`` of a ``tcp://`` or ``tls://`` URL.

    Raises:
        ConfigError: another scheme, or no host or port.
    """
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ConfigError(f"{url!r} is not a {'/'.join(schemes)} URL")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{url!r}: {exc}") from None
    if not parts.hostname or port is None:
        raise ConfigError(f"{url!r} needs a host and a port, e.g. tcp://127.0.0.1:8002")
    return parts.hostname, port, parts.scheme


def _format_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpListener(Listener):
    """Accepts TCP connections on one address; TLS handshakes happen per link, later."""

    def __init__(
        self, sock: socket.socket, scheme: str, limits: Limits, server_tls: ssl.SSLContext | None
    ) -> None:
        self._sock = sock
        self._scheme = scheme
        self._limits = limits
        # The link class is the listener's to choose, once: TLS or the backend's raw link.
        self._make_link: Callable[..., TcpLink] = TcpLink
        if server_tls is not None and on_asyncio():
            self._make_link = functools.partial(
                AsyncioTlsLink, context=server_tls, server_side=True
            )
        elif server_tls is not None:
            self._make_link = functools.partial(TlsLink, server_tls=server_tls)
        host, port = sock.getsockname()[:2]
        self.url = _format_url(scheme, host, port)
        self._closed = False
        self._pending: Pending | None = None

    def guard(self, admission: Admission) -> bool:
        self._pending = Pending(admission)
        return True

    async def accept(self) -> Link:
        while True:
            if self._closed:
                raise LinkClosed(f"listener {self.url} is closed")
            try:
                sock, addr = self._sock.accept()
            except BlockingIOError:
                try:
                    await anyio.wait_readable(self._sock)
                except (anyio.ClosedResourceError, OSError, ValueError):
                    raise LinkClosed(f"listener {self.url} is closed") from None
                continue
            except OSError as exc:
                if self._closed:
                    raise LinkClosed(f"listener {self.url} is closed") from None
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await anyio.sleep(0.1)  # out of descriptors: back off, keep the listener
                    continue
                if exc.errno in ACCEPT_SKIP:
                    continue  # that one connection failed before we got it; serve the rest
                raise
            peer = _format_url(self._scheme, addr[0], addr[1])
            pending = self._pending
            guarded: dict[str, Any] = {}
            if pending is not None:
                source = str(addr[0])
                why = pending.admit(source)
                if why is not None:  # closed at once: no buffer, no task, no handshake
                    sock.close()
                    _logging.get_logger().warning(
                        "connection refused before hello", peer=peer, reason=why
                    )
                    continue
                guarded = {
                    "hello_limits": pending.admission.limits,
                    "on_hello": functools.partial(pending.release, source),
                }
            _configure(sock)
            return self._make_link(
                sock, self._limits, local_address=self.url, peer_address=peer, **guarded
            )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
        await checkpoint()


class TcpDriver(Driver):
    """Serves ``tcp://HOST:PORT`` and, given TLS contexts, ``tls://HOST:PORT`` (mutual TLS).

    Args:
        server_tls: context for accepted ``tls://`` links (must require client certificates).
        client_tls: context for ``tls://`` links this side opens.
        backlog: the listening sockets' backlog.
        connect_timeout: seconds to establish a connection (TCP and TLS handshake).
    """

    schemes = ("tcp", "tls")

    def __init__(
        self,
        *,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
        backlog: int = 128,
        connect_timeout: float = 10.0,
    ) -> None:
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.backlog = backlog
        self.connect_timeout = connect_timeout

    async def listen(self, url: str, *, limits: Limits) -> Listener:
        host, port, scheme = split_hostport(url, self.schemes)
        if scheme == "tls" and self.server_tls is None:
            raise ConfigError(f"{url}: tls:// needs a server TLS context (from a startup kit)")
        try:
            infos = await anyio.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, addr = infos[0]
            sock = listening_socket(family, addr, self.backlog)
        except (OSError, socket.gaierror) as exc:
            raise ConnectError(f"cannot listen on {url}: {error_reason(exc)}") from None
        return TcpListener(sock, scheme, limits, self.server_tls if scheme == "tls" else None)

    async def connect(self, url: str, *, limits: Limits) -> Link:
        host, port, scheme = split_hostport(url, self.schemes)
        if scheme == "tls" and self.client_tls is None:
            raise ConfigError(f"{url}: tls:// needs a client TLS context (from a startup kit)")
        try:
            with anyio.fail_after(self.connect_timeout):
                return await self._connect(host, port, scheme, limits)
        except TimeoutError:
            raise ConnectError(
                f"cannot connect to {url}: no connection within {self.connect_timeout} s"
            ) from None
        except (OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise ConnectError(f"cannot connect to {url}: {error_reason(exc)}") from None

    async def _connect(self, host: str, port: int, scheme: str, limits: Limits) -> Link:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        stream: SocketStream | None = None
        tls: TLSStream | None = None
        try:
            _configure(sock)
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))  # noqa: TRY301 - one error path below
            local = _format_url(scheme, *sock.getsockname()[:2])
            peer = _format_url(scheme, host, port)
            if scheme == "tls" and on_asyncio():
                assert self.client_tls is not None
                link = AsyncioTlsLink(
                    sock,
                    limits,
                    local_address=local,
                    peer_address=peer,
                    context=self.client_tls,
                    server_side=False,
                    server_hostname=host,
                )
                await link.handshake()  # a refused certificate may still come late (see below)
                return link
            if scheme == "tls":
                stream = await SocketStream.from_socket(sock)
                tls = await TLSStream.wrap(
                    stream,
                    server_side=False,
                    hostname=host,
                    ssl_context=self.client_tls,
                    standard_compatible=False,
                )
                # The peer may still refuse our certificate right after the handshake (TLS 1.3
                # sends that verdict late); the first receive then reports it as a break.
        except BaseException:
            if stream is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await stream.aclose()
            else:
                sock.close()
            raise
        if tls is None:
            return TcpLink(sock, limits, local_address=local, peer_address=peer)
        return TlsLink(sock, limits, local_address=local, peer_address=peer, tls=tls, stream=stream)


__all__ = ["TcpDriver", "TcpListener", "split_hostport"]
