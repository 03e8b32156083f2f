"""Fault proxy: every fault observably happens, on real loopback sockets (real clock) and,
for timing, over memory streams under a MockClock."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
import trio
import trio.testing

from chaos.faultproxy import (
    AdminError,
    BadFault,
    FaultLink,
    FaultProxyClient,
    FaultSetting,
    TokenBucket,
    serve_admin,
    serve_fault_proxy,
)


async def echo_server(received: list[bytes], *, task_status=trio.TASK_STATUS_IGNORED):
    async def handler(stream):
        # the proxy resets its upstream legs too (reset fault): that ends this echo, quietly
        with contextlib.suppress(trio.BrokenResourceError):
            async with stream:
                async for chunk in stream:
                    received.append(chunk)
                    await stream.send_all(chunk)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


async def until(predicate: Callable[[], bool]) -> None:
    # waits for an event the proxy reports; fail_after only guards against a hang
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.005)


@pytest.fixture
async def proxy(nursery):
    received: list[bytes] = []
    upstream = await nursery.start(echo_server, received)
    link = FaultLink(random.Random(1))
    port = await nursery.start(serve_fault_proxy, link, "127.0.0.1", 0, "127.0.0.1", upstream)
    admin = await nursery.start(serve_admin, link, "127.0.0.1", 0)
    return link, port, FaultProxyClient("127.0.0.1", admin), received


async def test_pass_forwards_both_ways(proxy):
    link, port, _, received = proxy
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(b"ping")
        assert await s.receive_some(10) == b"ping"
    assert b"".join(received) == b"ping"
    await until(lambda: link.status().bytes_down == 4)
    assert link.status().bytes_up == 4


async def test_blackhole_holds_bytes_until_pass(proxy):
    link, port, client, received = proxy
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(b"a")
        assert await s.receive_some(10) == b"a"
        await client.set_fault(FaultSetting("blackhole"))
        await s.send_all(b"hello")
        await until(lambda: link.status().bytes_held == 5)
        assert b"".join(received) == b"a"  # nothing passed while the fault was on
        status = await client.set_fault(FaultSetting("pass"))
        assert status["fault"]["mode"] == "pass"
        assert await s.receive_some(10) == b"hello"
    assert link.status().bytes_held == 0


async def test_blackhole_holds_new_connections_without_connecting_upstream(proxy):
    link, port, client, _received = proxy
    await client.set_fault(FaultSetting("blackhole"))
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await until(lambda: link.status().connections_held == 1)
        await client.set_fault(FaultSetting("pass"))
        await s.send_all(b"late")
        assert await s.receive_some(10) == b"late"


async def test_reset_sends_rst_to_live_and_new_connections(proxy):
    link, port, client, _ = proxy
    live = await trio.open_tcp_stream("127.0.0.1", port)
    await live.send_all(b"x")
    assert await live.receive_some(10) == b"x"
    status = await client.set_fault(FaultSetting("reset"))
    assert status["connections_reset"] == 1 and status["fault"]["mode"] == "reset"
    with pytest.raises(trio.BrokenResourceError) as info:
        await live.receive_some(10)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    new = await trio.open_tcp_stream("127.0.0.1", port)
    with pytest.raises(trio.BrokenResourceError) as info:
        await new.receive_some(10)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert link.status().connections_reset == 2
    await live.aclose()
    await new.aclose()


async def test_latency_and_bandwidth_are_counted_on_real_sockets(proxy):
    _link, port, client, _ = proxy
    await client.set_fault(FaultSetting("latency", delay=0.01, jitter=0.005))
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(b"slow")
        assert await s.receive_some(10) == b"slow"
    status = await client.status()
    assert status["chunks_delayed"] == 2  # one chunk each way
    assert 0.02 <= status["delay_total"] <= 0.03  # the proxy's own accounting, not a clock


async def test_admin_api_refuses_bad_settings(proxy):
    _, _, client, _ = proxy
    with pytest.raises(AdminError) as info:
        await client._call("PUT", "/fault", b'{"mode": "latency"}')
    assert info.value.status == 400 and "delay" in str(info.value)
    with pytest.raises(AdminError) as info:
        await client._call("PUT", "/fault", b'{"mode": "pass", "colour": 1}')
    assert info.value.status == 400
    with pytest.raises(AdminError) as info:
        await client._call("GET", "/nope", b"")
    assert info.value.status == 404
    assert (await client.status())["generation"] == 0  # nothing was applied


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "latency"},
        {"mode": "pass", "delay": 1.0},
        {"mode": "bandwidth"},
        {"mode": "latency", "delay": -1.0},
        {"mode": "nope"},
        {"mode": "bandwidth", "bytes_per_second": 1.5},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(BadFault):
        FaultSetting(**kwargs)


def test_token_bucket_waits_in_proportion_to_debt():
    bucket = TokenBucket(rate=1000, burst=1000, now=0.0)
    assert bucket.reserve(1000, 0.0) == 0.0
    assert bucket.reserve(500, 0.0) == 0.5
    assert bucket.reserve(500, 1.5) == 0.0  # refilled 1500, capped at burst


# -- memory streams under a MockClock: exact timing ----------------------------------------


async def _memory_link(nursery: trio.Nursery, link: FaultLink) -> trio.abc.Stream:
    """client <-> link <-> upstream echo, all memory streams."""
    client, proxy_side = trio.testing.memory_stream_pair()
    up_proxy, up_server = trio.testing.memory_stream_pair()

    async def connect():
        return up_proxy

    async def echo():
        async for chunk in up_server:
            await up_server.send_all(chunk)

    nursery.start_soon(link.handle, proxy_side, connect)
    nursery.start_soon(echo)
    return client


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_latency_releases_data_exactly_after_the_delay(autojump_clock, nursery):
    link = FaultLink(random.Random(7))
    link.set_fault(FaultSetting("latency", delay=0.1))
    client = await _memory_link(nursery, link)
    start = trio.current_time()
    await client.send_all(b"x")
    assert await client.receive_some(10) == b"x"
    assert trio.current_time() - start == pytest.approx(0.2)  # 0.1 up + 0.1 down


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_bandwidth_cap_paces_bytes(autojump_clock, nursery):
    link = FaultLink(random.Random(7))
    link.set_fault(FaultSetting("bandwidth", bytes_per_second=1000, burst=1000))
    client = await _memory_link(nursery, link)
    start = trio.current_time()
    await client.send_all(b"y" * 3000)
    got = b""
    while len(got) < 3000:
        got += await client.receive_some(5000)
    # each way: 1000 bytes of burst, then 2000 at 1000 B/s = 2s; the way back starts at 2s
    assert trio.current_time() - start == pytest.approx(4.0)
    assert link.status().throttle_wait_total == pytest.approx(4.0)
