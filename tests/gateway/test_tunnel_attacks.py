"""BAD_INPUTS 17-20 against the tunnel server: a RAW h2 client (the h2 library, and
hand-made frames where h2 refuses to misbehave) attacks one connection while another
tunnel connection keeps flowing."""

from __future__ import annotations

import contextlib
import struct

import pytest
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from trio.testing import MockClock, memory_stream_pair

from gateway.tunnel import TunnelConnection, TunnelOptions
from gateway.tunnel_protocol import TunnelProtocol

from .test_tunnel_streams import echo_handler, tunnel_pair

CONNECT = [(":method", "CONNECT"), (":authority", "echo.demo.80.b.a.meshfed")]


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([ftype, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def raw_client() -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


async def run_attack(attack: bytes, *, read_answers: bool = True) -> tuple[TunnelConnection, bytes]:
    """Send ``attack`` (after a valid preface) to a fresh tunnel server; meanwhile a
    second, honest tunnel connection must keep echoing. Returns the attacked server
    connection and everything it answered."""
    a, b = memory_stream_pair()
    server = TunnelConnection(
        b,
        TunnelProtocol("server"),
        peer_cluster="evil",
        options=TunnelOptions(),
        handler=echo_handler,
    )
    answered = bytearray()
    async with tunnel_pair(echo_handler) as (good_client, _), trio.open_nursery() as nursery:
        await nursery.start(server.run)

        async def read() -> None:
            while True:
                try:
                    data = await a.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                answered.extend(data)

        nursery.start_soon(read)
        pre = raw_client()
        await a.send_all(pre.data_to_send())
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await a.send_all(attack)
        with trio.fail_after(30):
            await server.wait_closed()
        # The honest connection is unaffected.
        stream = await good_client.open_stream("echo.demo.80.b.a.meshfed")
        await stream.send_all(b"still flowing")
        assert await stream.receive_some(100) == b"still flowing"
        await stream.aclose()
        assert not good_client.closed
        nursery.cancel_scope.cancel()
    return server, bytes(answered)


def goaway_code(answered: bytes) -> int | None:
    """Error code of the last GOAWAY frame in ``answered``."""
    i, code = 0, None
    while i + 9 <= len(answered):
        length = int.from_bytes(answered[i : i + 3], "big")
        if answered[i + 3] == 0x7 and i + 9 + 8 <= len(answered):
            code = int.from_bytes(answered[i + 13 : i + 17], "big")
        i += 9 + length
    return code


async def test_oversized_header_block_closes_connection(autojump_clock: MockClock) -> None:
    c = raw_client()
    c.data_to_send()
    c.send_headers(1, [*CONNECT, ("x-big", "v" * 100_000)])
    server, answered = await run_attack(c.data_to_send())
    assert server.close_reason == "header_block_too_large"
    assert goaway_code(answered) == 0xB  # ENHANCE_YOUR_CALM


async def test_header_list_over_soft_limit_gets_431_and_connection_lives(
    autojump_clock: MockClock,
) -> None:
    """BAD_INPUTS 17: 40 KiB of headers is over the 32 KiB soft limit but within h2's
    hard limit: that stream is answered 431, the connection stays up."""
    a, b = memory_stream_pair()
    server = TunnelConnection(
        b,
        TunnelProtocol("server"),
        peer_cluster="x",
        options=TunnelOptions(),
        handler=echo_handler,
    )
    c = raw_client()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        c.send_headers(1, [*CONNECT, ("x-big", "v" * 40_000)])
        await a.send_all(c.data_to_send())
        statuses: list[object] = []
        with trio.fail_after(5):
            while not statuses:
                for event in c.receive_data(await a.receive_some(65536)):
                    headers = getattr(event, "headers", None)
                    if headers:
                        statuses.extend(v for k, v in headers if k in (":status", b":status"))
                await a.send_all(c.data_to_send())
        assert statuses == ["431"] or statuses == [b"431"]
        assert not server.closed
        nursery.cancel_scope.cancel()


async def test_continuation_without_end_headers_closes(autojump_clock: MockClock) -> None:
    # HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
    attack = frame(0x1, 0x0, 1, b"\x82") + b"".join(
        frame(0x9, 0x0, 1, b"\x00" * 100) for _ in range(100)
    )
    server, answered = await run_attack(attack)
    assert server.close_reason == "continuation_flood"
    assert goaway_code(answered) == 0xB


async def test_rapid_reset_closes(autojump_clock: MockClock) -> None:
    c = raw_client()
    c.data_to_send()
    for i in range(400):
        sid = 1 + 2 * i
        c.send_headers(sid, CONNECT)
        c.reset_stream(sid)
    server, _ = await run_attack(c.data_to_send())
    assert server.close_reason in ("rst_flood", "rapid_reset")


@pytest.mark.parametrize(
    ("name", "attack", "reason"),
    [
        (
            "ping",
            b"".join(frame(0x6, 0, 0, i.to_bytes(8, "big")) for i in range(300)),
            "ping_flood",
        ),
        ("settings", b"".join(frame(0x4, 0, 0, b"") for _ in range(100)), "settings_flood"),
        (
            "window_update",
            b"".join(frame(0x8, 0, 0, struct.pack(">I", 1)) for _ in range(500)),
            "window_update_flood",
        ),
    ],
)
async def test_control_frame_floods_close(
    autojump_clock: MockClock, name: str, attack: bytes, reason: str
) -> None:
    server, answered = await run_attack(attack)
    assert server.close_reason == reason
    assert goaway_code(answered) == 0xB


async def test_stalled_tls_peer_without_preface_is_cut(autojump_clock: MockClock) -> None:
    """A peer that connects but never sends the HTTP/2 preface is closed at the deadline."""
    a, b = memory_stream_pair()
    opts = TunnelOptions(handshake_timeout=5.0)
    server = TunnelConnection(
        b, TunnelProtocol("server"), peer_cluster="x", options=opts, handler=echo_handler
    )
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await server.wait_closed()
        nursery.cancel_scope.cancel()
    assert server.close_reason == "preface_timeout"
    assert trio.current_time() - start == pytest.approx(5.0)
    await a.aclose()
