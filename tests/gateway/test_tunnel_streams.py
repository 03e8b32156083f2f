"""The tunnel adapter over memory streams: bytes both ways, half-close, back-pressure
isolation, keepalive, graceful drain. Virtual time (MockClock) throughout."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio.testing import MockClock, lockstep_stream_pair, memory_stream_pair

from federation.h2guard import STREAM_WINDOW
from gateway.tunnel import TunnelConnection, TunnelError, TunnelOptions, TunnelStream
from gateway.tunnel_protocol import TunnelProtocol

Handler = Callable[[TunnelConnection, TunnelStream, str], Awaitable[None]]


async def echo_handler(conn: TunnelConnection, stream: TunnelStream, authority: str) -> None:
    conn.accept(stream)
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


@asynccontextmanager
async def tunnel_pair(
    handler: Handler,
    *,
    options: TunnelOptions | None = None,
    lockstep: bool = False,
) -> AsyncIterator[tuple[TunnelConnection, TunnelConnection]]:
    """A client and a server TunnelConnection joined by in-memory streams."""
    a, b = lockstep_stream_pair() if lockstep else memory_stream_pair()
    opts = options or TunnelOptions()
    client = TunnelConnection(a, TunnelProtocol("client"), peer_cluster="srv", options=opts)
    server = TunnelConnection(
        b, TunnelProtocol("server"), peer_cluster="cli", options=opts, handler=handler
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(client.run)
        yield client, server
        nursery.cancel_scope.cancel()


async def test_bytes_both_ways_and_half_close(autojump_clock: MockClock) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, bigger than one frame and one read
    async with tunnel_pair(echo_handler) as (client, _):
        stream = await client.open_stream("echo.demo.80.b.a.meshfed")
        got = bytearray()

        async def reader() -> None:
            while data := await stream.receive_some(65536):
                got.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await stream.send_all(payload)
            # Half-close: the server sees EOF, answers with its own EOF after echoing all.
            await stream.send_eof()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        await stream.aclose()
        assert client.streams == {}


async def test_server_half_close_reaches_client_as_eof(autojump_clock: MockClock) -> None:
    async def greet_and_close(conn: TunnelConnection, s: TunnelStream, authority: str) -> None:
        conn.accept(s)
        await s.send_all(authority.encode())
        await s.send_eof()
        # Our write side is closed, the read side still works (half-close).
        assert await s.receive_some(100) == b"after-eof"
        assert await s.receive_some(100) == b""

    async with tunnel_pair(greet_and_close) as (client, _):
        stream = await client.open_stream("x.y.1.b.a.meshfed")
        assert await stream.receive_some(100) == b"x.y.1.b.a.meshfed"
        assert await stream.receive_some(100) == b""
        await stream.send_all(b"after-eof")
        await stream.send_eof()
        await trio.sleep(1)
        await stream.aclose()


async def test_refused_connect_carries_status_and_reason(autojump_clock: MockClock) -> None:
    async def refuse(conn: TunnelConnection, s: TunnelStream, authority: str) -> None:
        conn.refuse(s, 403, "not_exported")

    async with tunnel_pair(refuse) as (client, _):
        with pytest.raises(TunnelError) as info:
            await client.open_stream("x.y.1.b.a.meshfed")
        assert info.value.reason == "not_exported"


async def test_never_reading_peer_stalls_only_its_own_stream(autojump_clock: MockClock) -> None:
    """BAD_INPUTS 23: stream A's local reader never reads; stream B keeps flowing and the
    server holds at most one stream window for A."""
    stalled: dict[str, TunnelStream] = {}

    async def handler(conn: TunnelConnection, s: TunnelStream, authority: str) -> None:
        conn.accept(s)
        if authority.startswith("stall"):
            stalled["s"] = s
            await trio.sleep_forever()  # never reads: its window must close
        total = 0
        while data := await s.receive_some(65536):
            total += len(data)
        await s.send_all(str(total).encode())
        await s.send_eof()

    async with tunnel_pair(handler) as (client, server):
        a = await client.open_stream("stall.demo.1.b.a.meshfed")
        b = await client.open_stream("flow.demo.1.b.a.meshfed")
        sent_a = 0

        async def flood_a() -> None:
            nonlocal sent_a
            chunk = b"a" * 65536
            while True:
                await a.send_all(chunk)
                sent_a += len(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood_a)
            await trio.sleep(5)
            # A is stuck at its window; its bytes sit in the server, bounded.
            assert stalled["s"].buffered <= STREAM_WINDOW
            assert sent_a <= STREAM_WINDOW + 65536
            # B moves 32 MiB (twice the connection window) while A stays stuck.
            chunk = b"b" * 262144
            for _ in range(128):
                await b.send_all(chunk)
            await b.send_eof()
            assert await b.receive_some(100) == str(128 * 262144).encode()
            assert stalled["s"].buffered <= STREAM_WINDOW
            nursery.cancel_scope.cancel()
        assert not server.closed and not client.closed


async def test_lockstep_transport_backpressure_completes(autojump_clock: MockClock) -> None:
    """Over a lockstep (zero-buffer) transport the writer task and flow control still move
    everything: no deadlock when both directions are busy at once."""
    payload = b"z" * (3 * 1024 * 1024)
    async with tunnel_pair(echo_handler, lockstep=True) as (client, _):
        stream = await client.open_stream("echo.demo.80.b.a.meshfed")
        got = 0

        async def reader() -> None:
            nonlocal got
            while data := await stream.receive_some(65536):
                got += len(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await stream.send_all(payload)
            await stream.send_eof()
        assert got == len(payload)


async def test_keepalive_evicts_a_dead_connection(autojump_clock: MockClock) -> None:
    """A peer that stops answering PINGs is declared dead after interval + timeout."""
    opts = TunnelOptions(keepalive_interval=2.0, keepalive_timeout=1.0)
    a, b = memory_stream_pair()
    client = TunnelConnection(a, TunnelProtocol("client"), peer_cluster="srv", options=opts)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        # Nobody reads b: the PING is never answered.
        with trio.fail_after(10):
            await client._done.wait()
    assert client.close_reason == "keepalive_timeout"
    assert trio.current_time() - start == pytest.approx(3.0)
    await b.aclose()


async def test_graceful_drain_finishes_running_streams(autojump_clock: MockClock) -> None:
    async with tunnel_pair(echo_handler) as (client, server):
        stream = await client.open_stream("echo.demo.80.b.a.meshfed")
        # The server drains (shutdown or certificate rotation).
        server.drain()
        await trio.sleep(0.1)
        assert not client.usable()
        # The running stream still works both ways after the GOAWAY.
        await stream.send_all(b"still here")
        assert await stream.receive_some(100) == b"still here"
        await stream.send_eof()
        assert await stream.receive_some(100) == b""
        await stream.aclose()
        await trio.sleep(0.1)
        assert server.close_reason == "drained"
        assert client.closed


async def test_idle_connection_is_closed(autojump_clock: MockClock) -> None:
    opts = TunnelOptions(idle_timeout=30.0, keepalive_interval=10.0)
    async with tunnel_pair(echo_handler, options=opts) as (client, server):
        await trio.sleep(35)
        assert server.closed and client.closed


def test_send_data_never_exceeds_a_window_that_is_not_a_frame_multiple() -> None:
    """Regression: the initial 65535-byte connection window is not a multiple of the
    16 KiB frame size; the last frame must be cut at the window, not at a frame."""
    client = TunnelProtocol("client")
    # Before the peer's SETTINGS and WINDOW_UPDATE: both windows are 65535 bytes.
    sid = client.open_connect("x.y.1.b.a.meshfed")
    window = client.send_window(sid)
    assert window % 16384 != 0
    taken = client.send_data(sid, memoryview(b"x" * (window + 100_000)))
    assert taken == window
    assert client.send_data(sid, memoryview(b"more")) == 0
