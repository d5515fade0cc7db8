"""The scheme registry a cell owns: URL scheme -> driver. No process-wide state."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from flare_async.errors import ConfigError, UnsupportedScheme
from flare_async.transport._base import Driver


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

    def register(self, driver: Driver, *, replace: bool = False) -> None:
        """Serve ``driver.schemes`` with ``driver``.

        Raises:
            ConfigError: a scheme is already served and ``replace`` is false.
        """
        for scheme in driver.schemes:
            if scheme in self._by_scheme and not replace:
                raise ConfigError(f"scheme {scheme!r} already has a driver")
            self._by_scheme[scheme] = driver

    def for_url(self, url: str) -> Driver:
        """The driver serving ``url``'s scheme.

        Raises:
            UnsupportedScheme: no driver serves it.
        """
        scheme = url_scheme(url)
        try:
            return self._by_scheme[scheme]
        except KeyError:
            known = ", ".join(sorted(self._by_scheme)) or "none"
            raise UnsupportedScheme(
                f"no driver for {scheme}:// (this cell serves: {known})"
            ) from None

    @property
    def schemes(self) -> frozenset[str]:
        return frozenset(self._by_scheme)
