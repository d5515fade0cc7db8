"""The scheme registry a cell owns: URL scheme -> driver. No process-wide state.

A cell's registry serves ``tcp://``, ``tls://``, ``ws://`` and ``wss://`` by itself
(:meth:`DriverRegistry.for_cell`): the drivers a cell is given win, and a built-in one is made
for a scheme of the URLs it listens on or dials that none of them serves. ``memory://`` needs
the :class:`~flare_async.MemoryNetwork` the cells share, so it is always passed explicitly.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

from flare_async.errors import ConfigError, UnsupportedScheme
from flare_async.transport._base import Driver
from flare_async.transport._tcp import TcpDriver

BUILT_IN = ("tcp", "tls", "ws", "wss")
"""Schemes a cell serves without being given a driver (``tls`` and ``wss`` with TLS contexts)."""
_SECURE = ("tls", "wss")
_KNOWN = (
    "tcp:// and tls:// (TcpDriver), ws:// and wss:// (WebSocketDriver): built in, tls:// and "
    "wss:// with Cell(server_tls=, client_tls=); memory:// (a MemoryNetwork: pass "
    "drivers=[net], the same net to every cell on it)"
)


def url_scheme(url: str) -> str:
    """The scheme of ``url``, lower-cased.

    Raises:
        ConfigError: ``url`` has no scheme.
    """
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConfigError(f"URL {url!r} has no scheme (expected e.g. memory://name)")
    return scheme


class DriverRegistry:
    """Maps URL schemes to drivers for one cell."""

    def __init__(self, drivers: Iterable[Driver] = ()) -> None:
        self._by_scheme: dict[str, Driver] = {}
        for driver in drivers:
            self.register(driver)

    @classmethod
    def for_cell(
        cls,
        drivers: Iterable[Driver],
        *,
        listen: Iterable[str] = (),
        dial: Iterable[str] = (),
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> DriverRegistry:
        """``drivers``, and a built-in driver for each scheme of the URLs to ``listen`` on and
        to ``dial`` that they leave unserved: one :class:`~flare_async.transport.TcpDriver` for
        ``tcp``/``tls``, one :class:`~flare_async.transport.WebSocketDriver` for ``ws``/``wss``
        (aiohttp imported only then), both with ``server_tls`` (to listen) and ``client_tls``
        (to dial).

        Raises:
            UnsupportedScheme: a URL's scheme is neither served by ``drivers`` nor built in
                (the message lists the schemes that exist and what to pass).
            ConfigError: a built-in ``tls://`` or ``wss://`` URL without the context it needs.
        """
        registry = cls(drivers)
        wanted: set[str] = set()
        for urls, context, option, what in (
            (listen, server_tls, "server_tls", "listen on"),
            (dial, client_tls, "client_tls", "dial"),
        ):
            for url in urls:
                scheme = url_scheme(url)
                if scheme in registry._by_scheme:
                    continue
                if scheme not in BUILT_IN:
                    raise registry.unsupported(scheme)
                if scheme in _SECURE and context is None:
                    raise ConfigError(
                        f"to {what} {url} this cell needs a TLS context: pass Cell({option}=...) "
                        f"(e.g. security.{option.replace('_tls', '_context')}(kit)), or "
                        f"drivers=[a driver for {scheme}:// built with its contexts]"
                    )
                wanted.add(scheme)
        if wanted & {"tcp", "tls"}:
            registry.register(TcpDriver(server_tls=server_tls, client_tls=client_tls))
        if wanted & {"ws", "wss"}:
            from flare_async.transport._ws import WebSocketDriver  # noqa: PLC0415 - aiohttp

            registry.register(WebSocketDriver(server_ssl=server_tls, client_ssl=client_tls))
        return registry

    def register(self, driver: Driver, *, replace: bool = False) -> None:
        """Serve ``driver.schemes`` with ``driver``.

        Raises:
            ConfigError: a scheme is already served and ``replace`` is false.
        """
        for scheme in driver.schemes:
            if scheme in self._by_scheme and not replace:
                raise ConfigError(f"scheme {scheme!r} already has a driver")
            self._by_scheme[scheme] = driver

    def unsupported(self, scheme: str) -> UnsupportedScheme:
        """The error for a scheme no driver here serves: what exists and what to pass."""
        known = ", ".join(sorted(self._by_scheme)) or "none"
        if scheme == "memory":
            return UnsupportedScheme(
                f"no driver for memory:// (this cell serves: {known}): memory:// links live in "
                "a MemoryNetwork shared by the cells on it; pass drivers=[net] with the same "
                "net = MemoryNetwork() to each of them"
            )
        return UnsupportedScheme(
            f"no driver for {scheme}:// (this cell serves: {known}). Schemes that exist: "
            f"{_KNOWN}; for another scheme pass drivers=[a Driver whose schemes include "
            f"{scheme!r}]"
        )

    def for_url(self, url: str) -> Driver:
        """The driver serving ``url``'s scheme.

        Raises:
            UnsupportedScheme: no driver serves it.
        """
        scheme = url_scheme(url)
        try:
            return self._by_scheme[scheme]
        except KeyError:
            raise self.unsupported(scheme) from None

    @property
    def schemes(self) -> frozenset[str]:
        return frozenset(self._by_scheme)
