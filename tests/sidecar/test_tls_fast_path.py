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

from sidecar.relay import ReceiveIntoStream, RelayEnd, relay
from sidecar.tlshalfclose import HalfCloseTls, fast_path_supported
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
