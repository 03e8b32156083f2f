"""Open a store from a URL: ``memory://`` or ``etcd://host:port[,host:port...]``.

``open_store`` is an async context manager because both backends own running
resources (the embedded lease timer, etcd's gRPC channel and watch threads)
that must stop when the caller is done::

    async with open_store("etcd://127.0.0.1:2379") as store:
        await store.put("/meshfed/v1/clusters/a", b"{}")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from federation.store.api import Store
from federation.store.embedded import open_embedded_store
from federation.store.etcd import EtcdConfig, open_etcd_store


class InvalidStoreURL(ValueError):
    """A ``--store`` URL that is not ``memory://`` or ``etcd://host:port[,host:port]``."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"invalid store URL {url!r}: {reason} "
            "(use memory:// or etcd://host:port[,host:port...])"
        )


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed store URL."""

    scheme: str
    """``memory`` or ``etcd``."""
    endpoints: tuple[str, ...] = ()
    """For etcd: ``host:port`` endpoints, in the order given."""


def parse_store_url(url: str) -> StoreURL:
    """Parse and validate a store URL without opening anything."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidStoreURL(url, "missing '://'")
    if scheme == "memory":
        if rest not in ("", "/"):
            raise InvalidStoreURL(url, "memory:// takes no host or path")
        return StoreURL("memory")
    if scheme != "etcd":
        raise InvalidStoreURL(url, f"unknown scheme {scheme!r}")
    rest = rest.rstrip("/")
    if not rest:
        raise InvalidStoreURL(url, "no etcd endpoint")
    endpoints = []
    for ep in rest.split(","):
        host, colon, port = ep.rpartition(":")
        if not colon or not host:
            raise InvalidStoreURL(url, f"endpoint {ep!r} needs host:port")
        if "/" in host or "@" in host or "?" in host:
            raise InvalidStoreURL(
                url, f"endpoint {ep!r}: paths, users and options are not supported"
            )
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidStoreURL(url, f"endpoint {ep!r}: port must be 1-65535")
        endpoints.append(f"{host}:{int(port)}")
    return StoreURL("etcd", tuple(endpoints))


@asynccontextmanager
async def open_store(url: str, *, etcd_config: EtcdConfig | None = None) -> AsyncIterator[Store]:
    """Open the store named by ``url`` for the duration of the ``async with``.

    For etcd, ``etcd_config`` supplies timeouts and retry counts (its endpoints
    are replaced by the URL's). Raises :class:`InvalidStoreURL` for a bad URL and
    :class:`~federation.store.api.StoreUnavailable` if etcd cannot be reached
    after the configured retries.
    """
    parsed = parse_store_url(url)
    if parsed.scheme == "memory":
        async with open_embedded_store() as embedded:
            yield embedded
        return
    config = (
        replace(etcd_config, endpoints=parsed.endpoints)
        if etcd_config is not None
        else EtcdConfig(endpoints=parsed.endpoints)
    )
    async with open_etcd_store(config) as etcd:
        yield etcd


__all__ = ["InvalidStoreURL", "StoreURL", "open_store", "parse_store_url"]
