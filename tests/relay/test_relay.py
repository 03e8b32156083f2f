"""sidecar.relay.relay: directions, half-close, idle timeout, failures, back-pressure, drain."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing
from trio.testing import MockClock, lockstep_stream_pair, memory_stream_pair

from sidecar.relay import DrainResult, RelayEnd, RelayResult, RelayStats, relay

from .support import drain_to_eof, tcp_pair


class CountingStream(trio.abc.HalfCloseableStream):
    """Delegates to ``inner`` and counts the bytes the relay has taken from it."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.received = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class NoHalfClose(trio.abc.Stream):
    """A stream that, like trio.SSLStream, cannot send EOF without closing."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_copies_both_directions_and_propagates_eof() -> None:
    client, a = memory_stream_pair()
    b, server = memory_stream_pair()
    stats = RelayStats()
    request, response = os.urandom(300_000), os.urandom(700_000)
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await relay(a, b, chunk_size=64 * 1024, stats=stats))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.send_all(request)
        await client.send_eof()
        assert await drain_to_eof(server) == request  # EOF reached the server
        await server.send_all(response)
        await server.send_eof()
        assert await drain_to_eof(client) == response

    assert results[0].reason is RelayEnd.EOF_BOTH
    assert (results[0].bytes_a_to_b, results[0].bytes_b_to_a) == (300_000, 700_000)
    st = stats.statistics()
    assert (st.relays_started, st.relays_active, st.ended_eof_both) == (1, 0, 1)
    assert (st.bytes_a_to_b, st.bytes_b_to_a) == (300_000, 700_000)


async def test_half_closed_side_keeps_receiving_while_other_sends() -> None:
    """Client finishes sending first; the server streams its answer afterwards."""
    client, a = memory_stream_pair()
    b, server = memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay, a, b)
        await client.send_all(b"GET")
        await client.send_eof()
        assert await drain_to_eof(server) == b"GET"
        for i in range(5):
            await server.send_all(b"part%d;" % i)
            await trio.testing.wait_all_tasks_blocked()
            assert await client.receive_some() == b"part%d;" % i
        await server.send_eof()
        assert await client.receive_some() == b""


async def test_eof_not_forwarded_to_a_stream_that_cannot_half_close() -> None:
    client, a = memory_stream_pair()
    b, server = memory_stream_pair()
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await relay(NoHalfClose(a), b))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await server.send_all(b"bye")
        await server.send_eof()
        assert await client.receive_some() == b"bye"
        await trio.testing.wait_all_tasks_blocked()
        # The relay could not forward EOF to the client; the other direction still runs.
        await client.send_all(b"still here")
        assert await server.receive_some() == b"still here"
        await client.send_eof()
        assert await server.receive_some() == b""
    assert results[0].reason is RelayEnd.EOF_BOTH
    assert await client.receive_some() == b""  # closed at the end


async def test_idle_timeout_resets_on_traffic_either_way(autojump_clock: MockClock) -> None:
    client, a = memory_stream_pair()
    b, server = memory_stream_pair()
    stats = RelayStats()
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await relay(a, b, idle_timeout=10.0, stats=stats))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(4)
        await client.send_all(b"x")  # t=4: a -> b
        assert await server.receive_some() == b"x"
        await trio.sleep(7)
        await server.send_all(b"y")  # t=11: b -> a, after the first deadline (10) would have hit
        assert await client.receive_some() == b"y"
    assert trio.current_time() == 21.0
    assert results[0].reason is RelayEnd.IDLE_TIMEOUT
    assert results[0].duration == 21.0
    assert await client.receive_some() == b""
    assert await server.receive_some() == b""
    assert stats.statistics().ended_idle_timeout == 1


async def test_broken_side_ends_relay_and_closes_both() -> None:
    client, a = memory_stream_pair()
    b, server = memory_stream_pair()
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await relay(a, b))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await server.aclose()  # the upstream vanishes
        await trio.testing.wait_all_tasks_blocked()
        assert await client.receive_some() == b""  # its EOF was forwarded
        await client.send_all(b"into the void")
    assert results[0].reason is RelayEnd.B_BROKEN
    assert results[0].bytes_a_to_b == 0
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"more")  # the relay closed a too


async def test_receive_failure_is_the_source_side() -> None:
    async def reset_by_peer() -> None:
        raise trio.BrokenResourceError("reset by peer")

    recv = trio.testing.MemoryReceiveStream(receive_some_hook=reset_by_peer)
    a = trio.StapledStream(trio.testing.MemorySendStream(), recv)
    b, server = memory_stream_pair()
    recv.put_data(b"pending")
    result = await relay(a, b)
    assert result.reason is RelayEnd.A_BROKEN
    assert await server.receive_some() == b""


async def test_caller_cancellation_closes_both_and_reraises() -> None:
    client, a = memory_stream_pair()
    b, server = memory_stream_pair()
    stats = RelayStats()
    returned: list[RelayResult] = []

    async def run() -> None:
        returned.append(await relay(a, b, stats=stats))

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await client.send_all(b"hello")
            assert await server.receive_some() == b"hello"
            scope.cancel()
    assert scope.cancelled_caught and returned == []
    assert await client.receive_some() == b""
    assert await server.receive_some() == b""
    st = stats.statistics()
    assert (st.ended_cancelled, st.relays_active) == (1, 0)


async def test_reader_that_stops_leaves_one_chunk_in_flight_and_other_way_flows() -> None:
    """BAD_INPUTS 23: a never-reading peer back-pressures; memory stays one chunk."""
    chunk = 64 * 1024
    client, a_inner = memory_stream_pair()
    a = CountingStream(a_inner)
    b, server = lockstep_stream_pair()  # send_all completes only as the server reads
    stats = RelayStats()
    payload = os.urandom(4 * 1024 * 1024)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: relay(a, b, chunk_size=chunk, stats=stats))
        await client.send_all(payload)  # lands in the test's own memory stream buffer
        await trio.testing.wait_all_tasks_blocked()
        assert 0 < a.received <= chunk
        assert stats.statistics().bytes_a_to_b == 0
        # The stalled direction does not stall the other one.
        async with trio.open_nursery() as inner:
            inner.start_soon(server.send_all, b"pong")
            assert await client.receive_some() == b"pong"
        await trio.testing.wait_all_tasks_blocked()
        assert a.received <= chunk
        # Once the server reads, everything arrives intact.
        got = bytearray()
        while len(got) < len(payload):
            got += await server.receive_some()
        assert bytes(got) == payload
        nursery.cancel_scope.cancel()


async def test_drain_waits_for_finishers_then_cancels_the_rest(
    autojump_clock: MockClock,
) -> None:
    stats = RelayStats()
    c1, a1 = memory_stream_pair()
    b1, s1 = memory_stream_pair()
    c2, a2 = memory_stream_pair()
    b2, _s2 = memory_stream_pair()
    results: dict[str, RelayResult] = {}
    drained: list[DrainResult] = []

    async def run(name: str, a: trio.abc.Stream, b: trio.abc.Stream) -> None:
        results[name] = await relay(a, b, stats=stats)

    async def finish_quickly() -> None:
        await trio.sleep(3)
        await c1.send_eof()
        await s1.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "quick", a1, b1)
        nursery.start_soon(run, "stuck", a2, b2)
        await trio.testing.wait_all_tasks_blocked()
        assert stats.statistics().relays_active == 2
        nursery.start_soon(finish_quickly)
        drained.append(await stats.drain(trio.current_time() + 30))
    assert trio.current_time() == 30.0
    assert drained == [DrainResult(finished=1, cancelled=1)]
    assert results["quick"].reason is RelayEnd.EOF_BOTH
    assert results["stuck"].reason is RelayEnd.CANCELLED
    assert await c2.receive_some() == b""
    st = stats.statistics()
    assert (st.draining, st.ended_cancelled, st.relays_active) == (True, 1, 0)


async def test_drain_with_nothing_live_returns_at_once(autojump_clock: MockClock) -> None:
    assert await RelayStats().drain(trio.current_time() + 30) == DrainResult(0, 0)
    assert trio.current_time() == 0.0


async def test_real_sockets_use_the_reusable_buffer_path_intact() -> None:
    """SocketStream sources read with recv_into; bytes and half-close are unchanged."""
    client, a = await tcp_pair()
    b, server = await tcp_pair()
    up, down = os.urandom(8 * 1024 * 1024), os.urandom(3 * 1024 * 1024 + 7)
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await relay(a, b, chunk_size=100_000))

    async def client_side() -> None:
        await client.send_all(up)
        await client.send_eof()

    async def server_side() -> None:
        await server.send_all(down)
        await server.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        nursery.start_soon(client_side)
        nursery.start_soon(server_side)
        got_down = await drain_to_eof(client)
        got_up = await drain_to_eof(server)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert got_down == down
    assert results[0].reason is RelayEnd.EOF_BOTH
    assert (results[0].bytes_a_to_b, results[0].bytes_b_to_a) == (len(up), len(down))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        trio.run(lambda: relay(*memory_stream_pair(), chunk_size=0))
    with pytest.raises(ValueError):
        trio.run(lambda: relay(*memory_stream_pair(), idle_timeout=0))


async def test_write_blocked_by_a_peer_that_does_not_read_counts_as_idle(
    autojump_clock: MockClock,
) -> None:
    """The idle deadline is exact: ``idle_timeout`` after the last byte moved (the read at
    t=2), even though a write is still waiting for the peer to read."""
    client, a = memory_stream_pair()
    b, server = lockstep_stream_pair()  # send_all waits until the peer reads
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await relay(a, b, idle_timeout=5.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(2)
        await client.send_all(b"stuck")
    assert results[0].reason is RelayEnd.IDLE_TIMEOUT
    assert results[0].duration == 7.0
    assert (results[0].bytes_a_to_b, results[0].bytes_b_to_a) == (0, 0)
    assert await client.receive_some() == b""  # closed at the end
    await server.aclose()
