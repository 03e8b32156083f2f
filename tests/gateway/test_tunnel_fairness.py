"""Stream fairness on one tunnel connection: the writer frames queued DATA round-robin, so
a bulk stream's backlog cannot make a small exchange wait behind it.

Plain calls on the sans-IO protocol first, then the trio adapter over a lockstep memory
transport (MockClock): ordering and outcome assertions only, no wall-clock thresholds."""

from __future__ import annotations

import trio
from trio.testing import MockClock

from federation.h2guard import STREAM_WINDOW
from gateway.tunnel import TunnelConnection, TunnelStream
from gateway.tunnel_protocol import Data, EndOfStream, StreamReset, TunnelEvent, TunnelProtocol

from .test_tunnel_streams import tunnel_pair

QUANTUM = 16 * 1024


def connected() -> tuple[TunnelProtocol, TunnelProtocol]:
    """A client and a server protocol past the preface and SETTINGS exchange."""
    client = TunnelProtocol("client", send_quantum=QUANTUM)
    server = TunnelProtocol("server")
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    server.receive_data(client.data_to_send(), 0.0)
    return client, server


def open_stream(client: TunnelProtocol, server: TunnelProtocol, authority: str) -> int:
    sid = client.open_connect(authority)
    server.receive_data(client.data_to_send(), 0.0)
    server.accept(sid)
    client.receive_data(server.data_to_send(), 0.0)
    return sid


def data_order(events: list[TunnelEvent]) -> list[tuple[int, int]]:
    """(stream, bytes) of every DATA event, in wire order."""
    return [(e.stream_id, len(e.data)) for e in events if isinstance(e, Data)]


def test_small_stream_is_framed_within_one_turn_of_a_bulk_backlog() -> None:
    client, server = connected()
    bulk = open_stream(client, server, "bulk.demo.1.b.a.meshfed")
    small = open_stream(client, server, "small.demo.1.b.a.meshfed")
    assert client.queue_data(bulk, memoryview(b"b" * (2 * 1024 * 1024)))
    assert client.queue_data(small, memoryview(b"s" * 1000))

    # One write batch: the bulk stream gets one quantum, then the small stream its bytes.
    events = server.receive_data(client.data_to_send(max_data=64 * 1024), 0.0)
    order = data_order(events)
    assert order[0] == (bulk, QUANTUM)
    assert (small, 1000) in order
    assert sum(n for sid, n in order if sid == bulk) <= 64 * 1024
    assert client.queued(small) == 0
    assert client.queued(bulk) == 2 * 1024 * 1024 - sum(n for sid, n in order if sid == bulk)


def test_round_robin_alternates_quanta_between_busy_streams() -> None:
    client, server = connected()
    a = open_stream(client, server, "a.demo.1.b.a.meshfed")
    b = open_stream(client, server, "b.demo.1.b.a.meshfed")
    client.queue_data(a, memoryview(b"a" * (4 * QUANTUM)))
    client.queue_data(b, memoryview(b"b" * (4 * QUANTUM)))
    order = data_order(server.receive_data(client.data_to_send(), 0.0))
    assert [sid for sid, _ in order] == [a, b] * 4
    assert all(n == QUANTUM for _, n in order)


def test_end_stream_waits_for_the_queued_bytes() -> None:
    client, server = connected()
    sid = open_stream(client, server, "x.demo.1.b.a.meshfed")
    client.queue_data(sid, memoryview(b"x" * (3 * QUANTUM)))
    client.end_stream(sid)
    events = server.receive_data(client.data_to_send(), 0.0)
    assert sum(n for _, n in data_order(events)) == 3 * QUANTUM
    # END_STREAM is the last thing of the stream, after all its bytes.
    assert isinstance(events[-1], EndOfStream)
    assert client.queued(sid) == 0


def test_window_blocked_stream_does_not_hold_up_another() -> None:
    client, server = connected()
    stuck = open_stream(client, server, "stuck.demo.1.b.a.meshfed")
    other = open_stream(client, server, "other.demo.1.b.a.meshfed")
    # Fill the stuck stream's whole window (never acknowledged by the server) and more.
    client.queue_data(stuck, memoryview(b"s" * (STREAM_WINDOW + 5000)))
    server.receive_data(client.data_to_send(), 0.0)
    assert client.send_window(stuck) == 0
    assert client.queued(stuck) == 5000
    client.queue_data(other, memoryview(b"o" * 3000))
    order = data_order(server.receive_data(client.data_to_send(), 0.0))
    assert order == [(other, 3000)]
    assert client.queued(stuck) == 5000


def test_queued_bytes_are_dropped_when_the_peer_resets_the_stream() -> None:
    client, server = connected()
    sid = open_stream(client, server, "x.demo.1.b.a.meshfed")
    client.queue_data(sid, memoryview(b"x" * (STREAM_WINDOW + 10)))
    server.receive_data(client.data_to_send(), 0.0)
    server.reset(sid)
    events = client.receive_data(server.data_to_send(), 0.0)
    assert StreamReset(sid, 8) in events
    assert client.queued(sid) == 0
    assert not client.wants_write()


async def test_small_exchange_overtakes_a_bulk_stream_on_one_connection(
    autojump_clock: MockClock,
) -> None:
    """The server pushes a whole stream window of bulk data in one ``send_all``; a small
    request opened afterwards on the same connection gets its answer while most of the
    bulk is still on its way (before: behind the whole backlog)."""
    bulk_total = STREAM_WINDOW
    seen: list[str] = []

    async def handler(conn: TunnelConnection, s: TunnelStream, authority: str) -> None:
        conn.accept(s)
        if authority.startswith("bulk"):
            await s.send_all(b"B" * bulk_total)
            await s.send_eof()
        else:
            request = await s.receive_some(100)
            await s.send_all(b"re:" + request)
            await s.send_eof()
        await trio.sleep_forever()

    async with tunnel_pair(handler, lockstep=True) as (client, _):
        bulk = await client.open_stream("bulk.demo.1.b.a.meshfed")
        small = await client.open_stream("small.demo.1.b.a.meshfed")
        await small.send_all(b"ping")
        answer = await small.receive_some(100)
        # The bulk bytes that reached the client before the answer (nobody reads them yet).
        bulk_before_answer = bulk.buffered
        seen.append("small")
        got = 0
        while data := await bulk.receive_some(256 * 1024):
            got += len(data)
        seen.append("bulk done")

    assert answer == b"re:ping"
    assert seen == ["small", "bulk done"]
    assert bulk_before_answer < bulk_total // 2
    assert got == bulk_total


def test_copy_queued_detaches_the_callers_buffer() -> None:
    client, server = connected()
    sid = open_stream(client, server, "x.demo.1.b.a.meshfed")
    buf = bytearray(b"a" * (STREAM_WINDOW + 100))
    client.queue_data(sid, memoryview(buf))
    server.receive_data(client.data_to_send(), 0.0)  # the window takes all but 100
    client.copy_queued(sid)
    buf[:] = b"z" * len(buf)  # the caller reuses its buffer (a cancelled send_all)
    client.receive_data(b"", 0.0)
    server.acknowledge(sid, STREAM_WINDOW)
    client.receive_data(server.data_to_send(), 0.0)
    events = server.receive_data(client.data_to_send(), 0.0)
    assert [e.data for e in events if isinstance(e, Data)] == [b"a" * 100]
