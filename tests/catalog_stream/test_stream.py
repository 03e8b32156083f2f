"""The catalog stream end to end over memory streams with real TLS 1.3."""

from __future__ import annotations

import trio

from federation.agent.stream_server import CatalogStreamServer, StreamServerConfig
from federation.catalog import Catalog
from tests.catalog_stream.harness import (
    AGENT_TLS,
    FakeRegistrar,
    FakeSigner,
    FakeSource,
    local_endpoint,
    make_client,
    memory_connector,
)


def make_server(source, config=None, **kw):
    return CatalogStreamServer(
        source, FakeRegistrar(), FakeSigner(), AGENT_TLS, config=config, **kw
    )


async def test_snapshot_then_deltas_make_the_view_equal_the_source(autojump_clock):
    source = FakeSource()
    source.reset(local_endpoint("e1"))
    server = make_server(source)
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        await nursery.start(client.run)
        await client.synced.wait()
        assert client.catalog == source.snapshot()
        for i in range(2, 6):
            source.put(local_endpoint(f"e{i}"))
        source.delete(local_endpoint("e1").key())
        caught_up = await client.wait_for(lambda c: c.version == source.version)
        assert caught_up == source.snapshot()
        assert len(caught_up.endpoints("shop", "a")) == 4
        stats = client.statistics()
        assert stats.snapshots == 1 and stats.deltas >= 1 and stats.resyncs == 0
        assert not client.degraded
        nursery.cancel_scope.cancel()


async def test_synced_arrives_only_when_the_source_sync_gate_opens(autojump_clock):
    source = FakeSource()
    server = make_server(source)
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        await nursery.start(client.run)
        await client.wait_for(lambda c: True)
        await trio.sleep(30)  # heartbeats flow; the gate stays shut
        assert not client.synced.is_set()
        source.reset(local_endpoint("e1"))
        await client.synced.wait()
        assert client.catalog == source.snapshot()
        nursery.cancel_scope.cancel()


async def test_heartbeats_carry_agent_degradation(autojump_clock):
    source = FakeSource()
    source.reset(local_endpoint("e1"))
    server = make_server(source, StreamServerConfig(heartbeat_interval=1.0))
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        await nursery.start(client.run)
        await client.synced.wait()
        assert not client.degraded
        source.set_degraded(True)
        while not client.degraded:
            await trio.sleep(0.5)
        assert client.connected and client.catalog == source.snapshot()
        nursery.cancel_scope.cancel()


async def test_reconnect_with_same_epoch_gets_a_delta_other_epoch_a_snapshot(
    autojump_clock, tmp_path
):
    state = tmp_path / "catalog.json"
    source = FakeSource("inc-1")
    source.reset(local_endpoint("e1"))
    server = make_server(source)
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery), state_path=state)
        await nursery.start(client.run)
        await client.synced.wait()
        await trio.sleep(1)  # let the persister write
        nursery.cancel_scope.cancel()
    assert Catalog.from_json(state.read_bytes()) == source.snapshot()

    source.put(local_endpoint("e2"))  # changed while the proxy was away
    async with trio.open_nursery() as nursery:
        again = make_client(memory_connector(server, nursery), state_path=state)
        await nursery.start(again.run)
        assert again.statistics().loaded_from_disk
        await again.wait_for(lambda c: c.version == source.version)
        stats = again.statistics()
        assert (stats.snapshots, stats.deltas) == (0, 1)
        assert again.catalog == source.snapshot()
        nursery.cancel_scope.cancel()

    restarted = FakeSource("inc-2")  # a restarted agent: unrelated versions
    restarted.reset(local_endpoint("e3"))
    server2 = make_server(restarted)
    async with trio.open_nursery() as nursery:
        third = make_client(memory_connector(server2, nursery), state_path=state)
        await nursery.start(third.run)
        await third.wait_for(lambda c: c.epoch == "inc-2")
        stats = third.statistics()
        assert (stats.snapshots, stats.deltas) == (1, 0)
        assert third.catalog == restarted.snapshot()
        nursery.cancel_scope.cancel()


async def test_persisted_catalog_serves_while_the_agent_is_unreachable(autojump_clock, tmp_path):
    state = tmp_path / "catalog.json"
    source = FakeSource()
    source.reset(local_endpoint("e1"), local_endpoint("e2"))
    state.write_bytes(source.snapshot().to_json())
    attempts = 0

    async def refused():
        nonlocal attempts
        attempts += 1
        raise OSError(111, "Connection refused")

    async with trio.open_nursery() as nursery:
        client = make_client(refused, state_path=state, backoff_max=4.0)
        await nursery.start(client.run)
        assert client.catalog == source.snapshot()
        assert client.degraded and not client.connected
        await trio.sleep(60)
        stats = client.statistics()
        assert stats.loaded_from_disk and stats.connect_failures == attempts >= 10
        assert "Connection refused" in (stats.last_error or "")
        assert client.catalog == source.snapshot()
        nursery.cancel_scope.cancel()


async def test_a_corrupt_persisted_catalog_is_ignored(autojump_clock, tmp_path):
    state = tmp_path / "catalog.json"
    state.write_bytes(b'{"schema": 1, "entries": ')

    async def refused():
        raise OSError(111, "Connection refused")

    async with trio.open_nursery() as nursery:
        client = make_client(refused, state_path=state)
        await nursery.start(client.run)
        assert client.catalog is None and not client.statistics().loaded_from_disk
        nursery.cancel_scope.cancel()
