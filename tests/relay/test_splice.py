"""gateway.splice.splice_relay over real loopback sockets, zero-copy and fallback paths."""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest
import trio

from gateway.splice import detach_socket, splice_relay, splice_supported
from sidecar.relay import RelayEnd, RelayResult, RelayStats

from .support import drain_to_eof, tcp_pair

BIG = 64 * 1024 * 1024
SPLICE = pytest.param(True, marks=pytest.mark.skipif(not splice_supported(), reason="no os.splice"))
PATHS = [SPLICE, False]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def hop() -> tuple[trio.SocketStream, socket.socket, socket.socket, trio.SocketStream]:
    """client <-> [relay's a | relay's b] <-> server, the relay's ends detached from trio."""
    client, a = await tcp_pair()
    b, server = await tcp_pair()
    return client, detach_socket(a), detach_socket(b), server


async def send_pattern(stream: trio.SocketStream, total: int, seed: bytes) -> bytes:
    """Send ``total`` pseudo-random bytes then EOF; return their sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * 8192  # 256 KiB, varied per call
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        digest.update(piece)
        await stream.send_all(piece)
        sent += len(piece)
    await stream.send_eof()
    return digest.digest()


async def hash_to_eof(stream: trio.SocketStream) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    total = 0
    while data := await stream.receive_some(1 << 20):
        digest.update(data)
        total += len(data)
    return total, digest.digest()


def test_splice_is_supported_on_linux() -> None:
    assert splice_supported() is hasattr(os, "splice")


@pytest.mark.parametrize("use_splice", PATHS)
async def test_64_mib_each_way_intact(use_splice: bool) -> None:
    fds_before = open_fds()
    client, a, b, server = await hop()
    stats = RelayStats()
    out: dict[str, object] = {}

    async def run() -> None:
        out["result"] = await splice_relay(a, b, stats=stats, use_splice=use_splice)

    async def put(name: str, stream: trio.SocketStream, seed: bytes) -> None:
        out[name] = await send_pattern(stream, BIG, seed)

    async def get(name: str, stream: trio.SocketStream) -> None:
        out[name] = await hash_to_eof(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        nursery.start_soon(put, "sent_up", client, b"up")
        nursery.start_soon(put, "sent_down", server, b"down")
        nursery.start_soon(get, "got_up", server)
        nursery.start_soon(get, "got_down", client)
    assert out["got_up"] == (BIG, out["sent_up"])
    assert out["got_down"] == (BIG, out["sent_down"])
    result = out["result"]
    assert isinstance(result, RelayResult)
    assert (result.reason, result.bytes_a_to_b, result.bytes_b_to_a) == (
        RelayEnd.EOF_BOTH,
        BIG,
        BIG,
    )
    st = stats.statistics()
    assert (st.bytes_a_to_b, st.bytes_b_to_a, st.ended_eof_both) == (BIG, BIG, 1)
    await client.aclose()
    await server.aclose()
    assert open_fds() == fds_before  # both sockets and both pipes closed


@pytest.mark.parametrize("use_splice", PATHS)
async def test_half_close_then_answer_with_initial_bytes_first(use_splice: bool) -> None:
    client, a, b, server = await hop()
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await splice_relay(a, b, initial_to_b=b"HELLO|", use_splice=use_splice))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.send_all(b"request")
        await client.send_eof()
        assert await drain_to_eof(server) == b"HELLO|request"  # EOF crossed the hop
        answer = os.urandom(5 * 1024 * 1024)

        async def respond() -> None:
            await server.send_all(answer)  # the half-closed client still receives
            await server.send_eof()

        nursery.start_soon(respond)  # concurrently: 5 MiB exceeds the socket buffers
        assert await drain_to_eof(client) == answer
    assert results[0].reason is RelayEnd.EOF_BOTH
    assert (results[0].bytes_a_to_b, results[0].bytes_b_to_a) == (13, len(answer))


@pytest.mark.parametrize("use_splice", PATHS)
async def test_idle_timeout_closes_both(use_splice: bool) -> None:
    client, a, b, server = await hop()
    # A real clock here: the timeout only bounds the test, its length is not asserted.
    result = await splice_relay(a, b, idle_timeout=0.05, use_splice=use_splice)
    assert result.reason is RelayEnd.IDLE_TIMEOUT
    with pytest.raises(trio.BrokenResourceError):  # the relay closed with RST
        await drain_to_eof(client)
    with pytest.raises(trio.BrokenResourceError):
        await drain_to_eof(server)


@pytest.mark.parametrize("use_splice", PATHS)
async def test_upstream_reset_is_b_broken(use_splice: bool) -> None:
    client, a, b, server = await hop()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await server.aclose()  # RST toward the relay
    results: list[RelayResult] = []

    async def run() -> None:
        results.append(await splice_relay(a, b, use_splice=use_splice))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with pytest.raises(trio.BrokenResourceError):
            while True:  # until the relay's RST reaches us
                await client.send_all(b"x" * 65536)
    assert results[0].reason is RelayEnd.B_BROKEN


async def test_cancellation_closes_sockets_and_pipes() -> None:
    fds_before = open_fds()
    client, a, b, server = await hop()
    stats = RelayStats()
    with trio.move_on_after(0.05) as scope:
        await splice_relay(a, b, stats=stats)
    assert scope.cancelled_caught
    assert stats.statistics().ended_cancelled == 1
    await client.aclose()
    await server.aclose()
    assert open_fds() == fds_before


async def test_use_splice_true_without_support_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.splice as mod

    monkeypatch.setattr(mod, "splice_supported", lambda: False)
    client, a, b, server = await hop()
    with pytest.raises(OSError):
        await mod.splice_relay(a, b, use_splice=True)
    for thing in (a, b):
        thing.close()
    await client.aclose()
    await server.aclose()
