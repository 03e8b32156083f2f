"""A subscriber that never reads costs bounded memory; one real-socket run."""

from __future__ import annotations

import trio
import trio.testing
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.settings import SettingCodes

from federation.agent.stream_protocol import StreamLimits
from federation.agent.stream_server import (
    CatalogStreamServer,
    StreamServerConfig,
    serve_catalog_stream,
)
from federation.catalog_client import CatalogClient, ClientConfig
from federation.stream_codec import Snapshot, StreamDecoder
from tests.catalog_stream.harness import (
    AGENT,
    AGENT_TLS,
    BUNDLES,
    CA,
    TLS_A,
    WORKLOAD_B,
    FakeRegistrar,
    FakeSigner,
    FakeSource,
    holder_for,
    local_endpoint,
    make_client,
    memory_connector,
)

BOUND = 8192


async def test_a_subscriber_that_never_reads_is_bounded_and_others_keep_up(autojump_clock):
    source = FakeSource()
    source.reset(local_endpoint("e0"))
    config = StreamServerConfig(limits=StreamLimits(max_queued_bytes=BOUND))
    server = CatalogStreamServer(source, FakeRegistrar(), FakeSigner(), AGENT_TLS, config=config)
    async with trio.open_nursery() as nursery:
        # The stalled subscriber: a bare h2 client with a 4 KiB window that reads nothing.
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, a)
        tls = trio.SSLStream(b, holder_for(CA, WORKLOAD_B).client, server_hostname="agent")
        await tls.do_handshake()
        h2c = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2c.initiate_connection()
        h2c.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 4096})
        get = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"a"),
            (b":path", b"/v1/catalog"),
        ]
        h2c.send_headers(1, get, end_stream=True)
        await tls.send_all(h2c.data_to_send())

        client = make_client(memory_connector(server, nursery))
        await nursery.start(client.run)
        await client.synced.wait()

        high = 0
        for i in range(1, 150):
            source.put(local_endpoint(f"e{i}"))
            await trio.sleep(0.01)
            for sub in server.statistics().subscriptions:
                high = max(high, sub.queued_bytes)
        await client.wait_for(lambda c: c.version == source.version)
        assert client.catalog == source.snapshot()

        subs = server.statistics().subscriptions
        stalled = [s for s in subs if s.stale]
        assert len(subs) == 2 and len(stalled) == 1
        assert high <= BOUND and stalled[0].max_queued_bytes <= BOUND
        # While stale it is not even fed: it stays behind without costing more memory.
        assert stalled[0].dropped_messages > 0 and stalled[0].version < source.version

        # Once it reads again it catches up with one fresh snapshot.
        decoder = StreamDecoder()
        snapshots: list[Snapshot] = []
        with trio.fail_after(60):
            while len(snapshots) < 2:  # the initial one, then the resync
                for event in h2c.receive_data(await tls.receive_some(65536)):
                    if isinstance(event, DataReceived):
                        h2c.acknowledge_received_data(event.flow_controlled_length, 1)
                        snapshots += [
                            m for m in decoder.feed(event.data) if isinstance(m, Snapshot)
                        ]
                await tls.send_all(h2c.data_to_send())
        assert snapshots[1].catalog == source.snapshot()
        stalled = [s for s in server.statistics().subscriptions if s.resyncs]
        assert len(stalled) == 1 and stalled[0].resyncs == 1 and not stalled[0].stale
        nursery.cancel_scope.cancel()


async def test_real_socket_on_loopback(tmp_path):
    source = FakeSource()
    source.reset(local_endpoint("e1"))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            serve_catalog_stream,
            source,
            FakeRegistrar(),
            FakeSigner(),
            AGENT_TLS,
            "127.0.0.1",
            0,
        )
        assert server.port
        client = CatalogClient(
            "127.0.0.1",
            server.port,
            TLS_A,
            lambda: BUNDLES,
            AGENT,
            tmp_path / "c.json",
            config=ClientConfig(persist_interval=0.01),
        )
        await nursery.start(client.run)
        await client.synced.wait()
        source.put(local_endpoint("e2"))
        got = await client.wait_for(lambda c: c.version == source.version)
        assert got == source.snapshot() and client.connected
        while client.statistics().persisted == 0:
            await trio.sleep(0.01)
        assert server.statistics().accepted == 1
        nursery.cancel_scope.cancel()
