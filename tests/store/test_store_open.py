"""Store URLs: parsing is strict, and open_store hands back the right backend."""

from __future__ import annotations

import pytest
from etcd_server import EtcdServer

from federation.store import (
    EmbeddedStore,
    EtcdStore,
    InvalidStoreURL,
    Store,
    StoreClosed,
    open_store,
    parse_store_url,
)
from federation.store.etcd import grpc_target


def test_parse_memory_and_etcd_urls() -> None:
    assert parse_store_url("memory://").scheme == "memory"
    parsed = parse_store_url("etcd://127.0.0.1:2379,127.0.0.2:22379/")
    assert parsed.scheme == "etcd"
    assert parsed.endpoints == ("127.0.0.1:2379", "127.0.0.2:22379")


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:2379",
        "redis://x:1",
        "etcd://",
        "etcd://host",
        "etcd://host:0",
        "etcd://host:99999",
        "etcd://host:abc",
        "etcd://user@host:2379",
        "memory://somewhere",
    ],
)
def test_bad_store_urls_are_refused_with_the_accepted_forms(url: str) -> None:
    with pytest.raises(InvalidStoreURL, match="memory:// or etcd://"):
        parse_store_url(url)


def test_grpc_target_fails_over_only_between_ip_literals() -> None:
    assert grpc_target(["etcd.local:2379"]) == "etcd.local:2379"
    assert grpc_target(["10.0.0.1:2379", "10.0.0.2:2379"]) == "ipv4:10.0.0.1:2379,10.0.0.2:2379"
    with pytest.raises(ValueError, match="IP address"):
        grpc_target(["a.local:2379", "b.local:2379"])


async def test_open_store_memory_gives_an_embedded_store_closed_on_exit() -> None:
    async with open_store("memory://") as store:
        assert isinstance(store, EmbeddedStore) and isinstance(store, Store)
        await store.put("/a", b"1")
    with pytest.raises(StoreClosed):
        await store.get("/a")


@pytest.mark.etcd
async def test_open_store_etcd_gives_an_etcd_store_closed_on_exit(
    etcd_server: EtcdServer,
) -> None:
    async with open_store(etcd_server.url) as store:
        assert isinstance(store, EtcdStore) and isinstance(store, Store)
        await store.put("/a", b"1")
    with pytest.raises(StoreClosed):
        await store.get("/a")
