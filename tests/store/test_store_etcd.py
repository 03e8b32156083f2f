"""etcd-only behaviour: crashes and restarts, unreachable servers, leaks, the protobuf shim.

Real etcd, real time: no mock clock here. ``trio.fail_after`` only guards hangs.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
from etcd_server import EtcdServer
from store_view import View

from federation.store import (
    EtcdConfig,
    KeyValue,
    Put,
    Reset,
    Store,
    StoreUnavailable,
    open_etcd_store,
    open_store,
)

pytestmark = pytest.mark.etcd

HANG_GUARD = 30
_T = TypeVar("_T")


async def _retry(
    fn: Callable[..., Awaitable[_T]], *args: Any, attempts: int = 100, **kwargs: Any
) -> _T:
    """Call a store method until etcd answers again after a restart (bounded by count)."""
    for _ in range(attempts - 1):
        try:
            return await fn(*args, **kwargs)
        except StoreUnavailable:
            await trio.sleep(0.05)
    return await fn(*args, **kwargs)


async def _truth(store: Store, prefix: str) -> dict[str, KeyValue]:
    _, kvs = await store.get_prefix(prefix)
    return {kv.key: kv for kv in kvs}


async def test_watch_resumes_after_etcd_is_killed_and_restarted(etcd_server: EtcdServer) -> None:
    async with open_store(etcd_server.url) as store:
        for key in ("/r/a", "/r/b", "/r/c"):
            await store.put(key, b"v1")
        view = View()
        async with store.watch_prefix("/r/") as events, trio.open_nursery() as nursery:
            nursery.start_soon(view.follow, events)
            with trio.fail_after(HANG_GUARD):
                await view.wait_for(await _truth(store, "/r/"))
            # Writes right before the crash, some of which the watch may not deliver.
            await store.put("/r/a", b"v2")
            await store.delete("/r/b")
            await store.put("/r/d", b"v1")
            await trio.to_thread.run_sync(etcd_server.kill)
            await trio.to_thread.run_sync(etcd_server.start)
            # Writes right after the restart.
            await _retry(store.delete, "/r/c")
            await _retry(store.put, "/r/e", b"v1")
            await _retry(store.put, "/r/a", b"v3")
            truth = await _retry(_truth, store, "/r/")
            with trio.fail_after(HANG_GUARD):
                await view.wait_for(truth)
            nursery.cancel_scope.cancel()
    assert sorted(view.held) == ["/r/a", "/r/d", "/r/e"]
    assert view.held["/r/a"].value == b"v3"
    assert len(view.resets) >= 2  # the initial Reset and at least one after the restart
    assert view.duplicate_puts() == []


async def test_unreachable_etcd_fails_after_the_configured_attempts() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = EtcdConfig(endpoints=(f"127.0.0.1:{port}",), connect_attempts=3, backoff_initial=0.01)
    with pytest.raises(StoreUnavailable) as info:
        async with open_etcd_store(config):
            pytest.fail("must not connect")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "after 3 attempts" in message
    assert "memory://" in message


async def test_leases_kept_alive_survive_an_etcd_restart(etcd_server: EtcdServer) -> None:
    async with open_store(etcd_server.url) as store:
        lease = await store.grant_lease(3)
        await store.put("/l/a", b"1", lease=lease.id)
        await trio.to_thread.run_sync(etcd_server.restart)
        assert await _retry(store.keepalive, lease.id) == 3
        kv = await store.get("/l/a")
        assert kv is not None and kv.lease == lease.id


async def test_leaving_a_watch_cancels_it_in_etcd(etcd_server: EtcdServer) -> None:
    async with open_store(etcd_server.url) as store:
        for _ in range(3):
            async with store.watch_prefix("/w/") as events:
                assert isinstance(await events.__anext__(), Reset)
                await store.put("/w/a", b"1")
                assert isinstance(await events.__anext__(), Put)
                assert await trio.to_thread.run_sync(etcd_server.watchers) == 1
        assert store.statistics().open_streams == 0  # type: ignore[attr-defined]
        assert store.statistics().open_watches == 0  # type: ignore[attr-defined]
        # etcd drops the watcher when our cancelled stream's RST reaches it.
        with trio.fail_after(HANG_GUARD):
            while await trio.to_thread.run_sync(etcd_server.watchers) != 0:
                await trio.sleep(0.02)


async def test_cancelling_the_consumer_cancels_the_watch(etcd_server: EtcdServer) -> None:
    async with open_store(etcd_server.url) as store:

        async def consume() -> None:
            async with store.watch_prefix("/w/") as events:
                async for _ in events:
                    pass

        with trio.move_on_after(0.5):
            await consume()
        assert store.statistics().open_streams == 0  # type: ignore[attr-defined]
        with trio.fail_after(HANG_GUARD):
            while await trio.to_thread.run_sync(etcd_server.watchers) != 0:
                await trio.sleep(0.02)


async def test_etcd3_client_round_trips_with_protobuf_4_or_later(etcd_server: EtcdServer) -> None:
    from google.protobuf import __version__ as protobuf_version

    from federation.store.etcd_compat import import_etcd3

    assert int(protobuf_version.split(".")[0]) >= 4
    etcd3 = import_etcd3()
    # etcd3's own client code paths work on the regenerated messages.
    client = etcd3.client("127.0.0.1", etcd_server.client_port, timeout=5)
    try:
        await trio.to_thread.run_sync(client.put, "/compat/a", b"hello")
        value, meta = await trio.to_thread.run_sync(client.get, "/compat/a")
        assert value == b"hello" and meta.version == 1
    finally:
        client.close()
    async with open_store(etcd_server.url) as store, store.watch_prefix("/compat/") as events:
        reset = await events.__anext__()
        assert isinstance(reset, Reset) and reset.items[0].value == b"hello"
        await store.put("/compat/b", b"world")
        event = await events.__anext__()
        assert isinstance(event, Put) and event.kv.value == b"world"


async def test_out_of_band_compaction_mid_watch_loses_nothing(etcd_server: EtcdServer) -> None:
    async with open_store(etcd_server.url) as store:
        view = View()
        async with store.watch_prefix("/c/") as events, trio.open_nursery() as nursery:
            nursery.start_soon(view.follow, events)
            for i in range(10):
                await store.put(f"/c/{i % 3}", str(i).encode())
            await store.delete("/c/1")
            rev = await store.current_revision()
            await trio.to_thread.run_sync(etcd_server.compact, rev)
            await store.put("/c/9", b"after")
            with trio.fail_after(HANG_GUARD):
                await view.wait_for(await _truth(store, "/c/"))
            nursery.cancel_scope.cancel()
        assert view.duplicate_puts() == []


async def test_large_prefix_reads_are_paged_at_one_revision(etcd_server: EtcdServer) -> None:
    # A page size far below the key count forces many Range calls; the result must
    # still be every key, in order, read at the revision of the first page.
    config = EtcdConfig(endpoints=(etcd_server.endpoint,), page_size=7)
    async with open_etcd_store(config) as store:
        for i in range(50):
            await store.put(f"/p/k{i:03d}", b"v%d" % i)
        await store.put("/q/outside", b"x")
        revision, items = await store.get_prefix("/p/")
        assert [kv.key for kv in items] == [f"/p/k{i:03d}" for i in range(50)]
        assert [kv.value for kv in items] == [b"v%d" % i for i in range(50)]
        assert revision == await store.current_revision()
