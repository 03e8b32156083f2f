"""HalfCloseTls's fast data path (receive_into / send_all on the SSLObject) and the relay's
``receive_into`` source path, over memory streams and real sockets, against the
SSLStream path it replaces (``fast=False``)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from sidecarkit import Mesh, Ports, make_config

from sidecar.relay import ReceiveIntoStream, RelayEnd, RelayResult, RelayStats, relay
from sidecar.tlshalfclose import HalfCloseTls, fast_path_supported
from tests.relay.support import tcp_pair
from trust.tls import TlsContextHolder

Pair = tuple[HalfCloseTls[trio.abc.Stream], HalfCloseTls[trio.abc.Stream]]


@pytest.fixture(scope="module")
def holders() -> tuple[TlsContextHolder, TlsContextHolder]:
    mesh = Mesh.build(make_config(Ports.pick()))
    return (
        TlsContextHolder(mesh.svid_for("client"), mesh.bundles()),
        TlsContextHolder(mesh.svid_for("echo-z1"), mesh.bundles()),
    )


async def _tls_pair(
    holders: tuple[TlsContextHolder, TlsContextHolder],
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    fast: bool = True,
) -> Pair:
    client = holders[0].wrap_client(a, "echo.demo")
    server = holders[1].wrap_server(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return HalfCloseTls(client, fast=fast), HalfCloseTls(server, fast=fast)


async def _memory_pair(holders: tuple[TlsContextHolder, TlsContextHolder], fast: bool) -> Pair:
    a, b = trio.testing.memory_stream_pair()
    return await _tls_pair(holders, a, b, fast=fast)


async def _socket_pair(holders: tuple[TlsContextHolder, TlsContextHolder], fast: bool) -> Pair:
    a, b = trio.socket.socketpair()
    return await _tls_pair(holders, trio.SocketStream(a), trio.SocketStream(b), fast=fast)


MAKERS: dict[
    str,
    Callable[[tuple[TlsContextHolder, TlsContextHolder], bool], Awaitable[Pair]],
] = {"memory": _memory_pair, "socket": _socket_pair}


@pytest.mark.parametrize("transport", sorted(MAKERS))
async def test_fast_path_is_used_only_after_the_handshake(
    holders: tuple[TlsContextHolder, TlsContextHolder], transport: str
) -> None:
    x, y = await MAKERS[transport](holders, True)
    assert x.fast and y.fast
    assert isinstance(x, ReceiveIntoStream)
    fresh = holders[0].wrap_client(trio.testing.memory_stream_pair()[0], "echo.demo")
    assert not fast_path_supported(fresh)  # no handshake yet: the SSLStream path
    assert not HalfCloseTls(fresh).fast
    await x.aclose()
    await y.aclose()


@pytest.mark.parametrize("fast", [True, False])
async def test_two_way_stream_contract(
    holders: tuple[TlsContextHolder, TlsContextHolder], fast: bool
) -> None:
    async def maker() -> Pair:
        return await _memory_pair(holders, fast)

    async def clogged() -> Pair:
        a, b = trio.testing.lockstep_stream_pair()
        return await _tls_pair(holders, a, b, fast=fast)

    # Not check_half_closeable_stream: send_all after send_eof raises BrokenResourceError
    # (OpenSSL's "protocol is shutdown"), not ClosedResourceError, on both paths alike.
    await trio.testing.check_two_way_stream(maker, clogged)


@pytest.mark.parametrize("transport", sorted(MAKERS))
async def test_receive_into_returns_every_arrived_record_in_one_call(
    holders: tuple[TlsContextHolder, TlsContextHolder], transport: str
) -> None:
    x, y = await MAKERS[transport](holders, True)
    payload = os.urandom(100_000)  # 7 TLS records
    await x.send_all(payload)
    await x.send_eof()
    buf = bytearray(256 * 1024)
    got = bytearray()
    calls = 0
    while n := await y.receive_into(memoryview(buf)):
        got += buf[:n]
        calls += 1
    assert bytes(got) == payload
    assert calls < 7  # the SSLStream path returns one 16 KiB record per call
    await x.aclose()
    await y.aclose()


@pytest.mark.parametrize("transport", sorted(MAKERS))
async def test_small_buffer_leaves_the_rest_for_the_next_call(
    holders: tuple[TlsContextHolder, TlsContextHolder], transport: str
) -> None:
    x, y = await MAKERS[transport](holders, True)
    payload = os.urandom(40_000)
    await x.send_all(payload)
    buf = bytearray(1000)
    got = bytearray()
    while len(got) < len(payload):
        n = await y.receive_into(memoryview(buf))
        assert 0 < n <= 1000
        got += buf[:n]
    assert bytes(got) == payload
    await x.aclose()
    await y.aclose()


async def test_transport_eof_without_close_notify_is_broken(
    holders: tuple[TlsContextHolder, TlsContextHolder],
) -> None:
    x, y = await _socket_pair(holders, True)
    await x.send_all(b"last words")
    await x.stream.transport_stream.aclose()  # no close_notify: a truncation attack
    buf = memoryview(bytearray(1024))
    assert await y.receive_into(buf) == 10
    with pytest.raises(trio.BrokenResourceError) as info:
        await y.receive_into(buf)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    with pytest.raises(trio.BrokenResourceError):  # marked broken, as SSLStream does
        await y.send_all(b"x")
    await y.aclose()


async def test_corrupt_record_after_good_ones_delivers_the_good_bytes_first(
    holders: tuple[TlsContextHolder, TlsContextHolder],
) -> None:
    x, y = await _socket_pair(holders, True)
    await x.send_all(b"good")
    # Both arrive before the reader looks: the good record decrypts, the garbage
    # record is an error reported on the following call.
    await x.stream.transport_stream.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    await trio.sleep(0.05)
    buf = memoryview(bytearray(1024))
    assert await y.receive_into(buf) == 4
    assert bytes(buf[:4]) == b"good"
    with pytest.raises(trio.BrokenResourceError) as info:
        await y.receive_into(buf)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    await x.aclose()
    await y.aclose()


@pytest.mark.parametrize("fast", [True, False])
async def test_relay_through_a_tls_leg_on_real_sockets_is_byte_exact(
    holders: tuple[TlsContextHolder, TlsContextHolder], fast: bool
) -> None:
    """app <-> relay <-> TLS <-> relay <-> server, as a sidecar pair: bulk both ways, EOFs."""
    up = os.urandom(3_000_000)
    down = os.urandom(1_500_000)
    app_side, relay_a = (trio.SocketStream(s) for s in trio.socket.socketpair())
    relay_b, server_side = (trio.SocketStream(s) for s in trio.socket.socketpair())
    tls_out, tls_in = await _socket_pair(holders, fast)
    results = []
    received: dict[str, bytes] = {}

    async def run_relay(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
        results.append(await relay(a, b))

    async def endpoint(stream: trio.SocketStream, name: str, data: bytes) -> None:
        async def send() -> None:
            await stream.send_all(data)
            await stream.send_eof()

        async def receive() -> None:
            out = bytearray()
            while chunk := await stream.receive_some(1 << 16):
                out += chunk
            received[name] = bytes(out)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
        await stream.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, relay_a, tls_out)
            nursery.start_soon(run_relay, tls_in, relay_b)
            nursery.start_soon(endpoint, app_side, "app", up)
            nursery.start_soon(endpoint, server_side, "server", down)
    assert received["server"] == up
    assert received["app"] == down
    assert [r.reason for r in results] == [RelayEnd.EOF_BOTH, RelayEnd.EOF_BOTH]
    assert sorted(r.bytes_a_to_b for r in results) == [len(up), len(up)]


@pytest.mark.parametrize("fast", [True, False])
async def test_send_eof_keeps_records_already_received_but_unread(
    holders: tuple[TlsContextHolder, TlsContextHolder], fast: bool
) -> None:
    """unwrap's second SSL_shutdown used to swallow records buffered in the incoming BIO."""
    x, y = await _socket_pair(holders, fast)
    payload = os.urandom(60_000)
    await x.send_all(payload)
    await trio.sleep(0.05)
    first = await y.receive_some(1)  # pulls all the ciphertext in, returns one byte
    await y.send_eof()
    rest = bytearray(first)
    while len(rest) < len(payload):
        chunk = await y.receive_some(1 << 16)
        assert chunk
        rest += chunk
    assert bytes(rest) == payload
    assert await x.receive_some(10) == b""  # y's close_notify arrived
    await x.aclose()
    await y.aclose()


@pytest.mark.parametrize("first", ["app", "server"])
async def test_relay_pair_over_loopback_tcp_delivers_odd_sizes_and_half_closes_in_order(
    holders: tuple[TlsContextHolder, TlsContextHolder], first: str
) -> None:
    """app -TCP-> relay -TLS over TCP-> relay -TCP-> server, the sidecar pair's shape on
    the relay's syscall path: one side sends an odd-sized payload and half-closes, the
    other reads it to EOF and only then answers and closes. Byte-exact both ways, both
    relays end EOF_BOTH, and every counter says exactly what moved."""
    sizes = {"app": 2_345_679, "server": 1_234_567}  # not multiples of a record or chunk
    data = {name: os.urandom(size) for name, size in sizes.items()}
    app_side, relay_a = await tcp_pair()
    relay_b, server_side = await tcp_pair()
    tls_out, tls_in = await _tls_pair(holders, *await tcp_pair())
    assert tls_out.fast and tls_in.fast
    stats = RelayStats()
    results: dict[str, RelayResult] = {}
    received: dict[str, bytes] = {}
    order: list[str] = []

    async def run_relay(name: str, a: trio.abc.Stream, b: trio.abc.Stream) -> None:
        results[name] = await relay(a, b, idle_timeout=30.0, stats=stats)

    async def endpoint(stream: trio.SocketStream, name: str) -> None:
        if name != first:
            received[name] = await _read_to_eof(stream)
            order.append(f"{name} saw EOF")
        await stream.send_all(data[name])
        await stream.send_eof()
        order.append(f"{name} sent EOF")
        if name == first:
            received[name] = await _read_to_eof(stream)
            order.append(f"{name} saw EOF")
        await stream.aclose()

    async def _read_to_eof(stream: trio.SocketStream) -> bytes:
        out = bytearray()
        while chunk := await stream.receive_some(1 << 16):
            out += chunk
        return bytes(out)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, "out", relay_a, tls_out)
            nursery.start_soon(run_relay, "in", tls_in, relay_b)
            nursery.start_soon(endpoint, app_side, "app")
            nursery.start_soon(endpoint, server_side, "server")
    second = "server" if first == "app" else "app"
    assert order == [
        f"{first} sent EOF",
        f"{second} saw EOF",
        f"{second} sent EOF",
        f"{first} saw EOF",
    ]
    assert received["server"] == data["app"]
    assert received["app"] == data["server"]
    for name in ("out", "in"):
        assert results[name].reason is RelayEnd.EOF_BOTH
        assert results[name].bytes_a_to_b == sizes["app"]
        assert results[name].bytes_b_to_a == sizes["server"]
    snap = stats.statistics()
    assert (snap.bytes_a_to_b, snap.bytes_b_to_a) == (2 * sizes["app"], 2 * sizes["server"])
    assert (snap.relays_started, snap.relays_active, snap.ended_eof_both) == (2, 0, 2)


async def test_relay_with_ready_sockets_sees_cancellation_after_one_chunk() -> None:
    """The syscall path waits only on a socket that is not ready, so the relay loop must
    checkpoint once per chunk: a relay cancelled (revocation, drain) while its source
    holds a backlog and its destination has room stops after one chunk instead of
    copying the whole backlog first, closes both sides and counts as cancelled."""
    chunk = 4096
    app_side, relay_a = (trio.SocketStream(s) for s in trio.socket.socketpair())
    relay_b, server_side = (trio.SocketStream(s) for s in trio.socket.socketpair())
    await app_side.send_all(os.urandom(10 * chunk))  # the backlog: ten chunks, all ready
    stats = RelayStats()
    with trio.CancelScope() as scope:
        scope.cancel()
        await relay(relay_a, relay_b, chunk_size=chunk, stats=stats)
    assert scope.cancelled_caught
    snap = stats.statistics()
    assert (snap.relays_active, snap.ended_cancelled) == (0, 1)
    assert 0 < snap.bytes_a_to_b <= chunk
    with pytest.raises(trio.ClosedResourceError):
        await relay_a.send_all(b"x")  # the relay closed its sides
    await app_side.aclose()
    await server_side.aclose()
