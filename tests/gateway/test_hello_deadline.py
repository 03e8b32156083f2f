"""read_client_hello: one deadline from accept, whatever the client trickles (MockClock)."""

from __future__ import annotations

import ssl

import pytest
import trio
from trio.testing import MockClock, memory_stream_pair

from gateway.passthrough import HelloRefused, read_client_hello

SNI = "web.demo.8080.b.a.meshfed"


def hello(server_hostname: str | None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_complete_hello_is_parsed(autojump_clock: MockClock) -> None:
    a, b = memory_stream_pair()
    data = hello(SNI)
    await a.send_all(data)
    info, sni = await read_client_hello(b)
    assert sni.format() == SNI and info.raw == data


async def test_trickling_client_is_cut_at_the_deadline(autojump_clock: MockClock) -> None:
    """One byte per second does not extend the 5 s deadline."""
    a, b = memory_stream_pair()
    data = hello(SNI)
    start = trio.current_time()

    async def trickle() -> None:
        for i in range(len(data)):
            await a.send_all(data[i : i + 1])
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(HelloRefused) as info:
            await read_client_hello(b, deadline_s=5.0)
        nursery.cancel_scope.cancel()
    assert info.value.reason == "hello_timeout"
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_stalled_client_is_cut_at_the_deadline(autojump_clock: MockClock) -> None:
    a, b = memory_stream_pair()
    await a.send_all(hello(SNI)[:20])
    start = trio.current_time()
    with pytest.raises(HelloRefused) as info:
        await read_client_hello(b, deadline_s=5.0)
    assert info.value.reason == "hello_timeout"
    assert trio.current_time() - start == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_tls"),
        (hello(None), "no_sni"),
        (hello("example.com"), "bad_sni"),
        (hello("WEB.demo.8080.b.a.meshfed"), "bad_sni"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "bad_client_hello"),
    ],
    ids=["plaintext", "no-sni", "foreign-sni", "uppercase-sni", "not-client-hello"],
)
async def test_unroutable_hellos_are_refused(
    autojump_clock: MockClock, data: bytes, reason: str
) -> None:
    a, b = memory_stream_pair()
    await a.send_all(data)
    with pytest.raises(HelloRefused) as info:
        await read_client_hello(b)
    assert info.value.reason == reason
