"""The inbound HTTP hop (peer h2 -> local HTTP/1.1 app) counts what it answers in
``meshfed_sidecar_http_inbound_*`` and drains gracefully. The caller is an H2Channel
over a memory stream; the app is a real trio socket server on port 0 (so real time)."""

from __future__ import annotations

import h11
import trio
import trio.testing

from sidecar.http.h2io import H2Channel
from sidecar.http.server import InboundHttp, InboundTarget
from sidecar.metrics import SidecarMetrics

REQ = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"web"), (b":path", b"/a")]


async def h1_app(
    gate: trio.Event, arrived: list[str], *, task_status: trio.TaskStatus[int]
) -> None:
    """Answers 200 once ``gate`` is set; records each request's target."""

    async def handler(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                arrived.append(event.target.decode())
            if isinstance(event, h11.EndOfMessage):
                await gate.wait()
                await stream.send_all(
                    conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                    + conn.send(h11.Data(data=b"ok"))
                    + conn.send(h11.EndOfMessage())
                )
                conn.start_next_cycle()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


def sample(m: SidecarMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


async def test_inbound_requests_are_counted_with_status_duration_and_in_flight() -> None:
    metrics = SidecarMetrics()
    gate, arrived = trio.Event(), []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(h1_app, gate, arrived)
        inbound = InboundHttp(
            local_cluster="c1", local_workload="web", metrics=metrics, services=["web.demo"]
        )
        inbound.nursery = nursery
        target = InboundTarget("web.demo", "http", "127.0.0.1", port)
        dead = InboundTarget("web.demo", "http", "127.0.0.1", 1)  # nothing listens on port 1
        active = {"destination_service": "web.demo"}
        assert sample(metrics, "meshfed_sidecar_http_inbound_requests_active", **active) == 0
        for t in (target, dead):
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(inbound.serve, server, t, "c2")
            caller = H2Channel(client, "client")
            nursery.start_soon(caller.run)
            stream = await caller.open_stream(REQ, end_stream=True)
            if t is target:
                with trio.fail_after(10):
                    while not arrived:
                        await trio.sleep(0.01)
                assert (
                    sample(metrics, "meshfed_sidecar_http_inbound_requests_active", **active) == 1
                )
                gate.set()
            head = await stream.receive_head()
            assert head[0] == (b":status", b"200" if t is target else b"503")
        base = {
            "source_cluster": "c2",
            "destination_cluster": "c1",
            "destination_service": "web.demo",
            "locality_tier": "inbound",
        }
        for code in ("200", "503"):
            assert (
                sample(metrics, "meshfed_sidecar_http_inbound_requests_total", **base, code=code)
                == 1
            )
        assert (
            sample(metrics, "meshfed_sidecar_http_inbound_request_duration_seconds_count", **base)
            == 2
        )
        assert sample(metrics, "meshfed_sidecar_http_inbound_requests_active", **active) == 0
        nursery.cancel_scope.cancel()


async def test_inbound_drain_finishes_the_request_in_flight_and_refuses_new_streams() -> None:
    gate, arrived = trio.Event(), []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(h1_app, gate, arrived)
        inbound = InboundHttp(local_cluster="c1", local_workload="web")
        inbound.nursery = nursery
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(
            inbound.serve, server, InboundTarget("web.demo", "http", "127.0.0.1", port), "c2"
        )
        caller = H2Channel(client, "client")
        nursery.start_soon(caller.run)
        first = await caller.open_stream(REQ, end_stream=True)
        with trio.fail_after(10):
            while not arrived:
                await trio.sleep(0.01)
        inbound.drain()
        with trio.fail_after(10):
            while caller.can_open():
                await trio.sleep(0.01)
        gate.set()
        assert (await first.receive_head())[0] == (b":status", b"200")
        assert await first.receive_data() == b"ok"
        with trio.fail_after(10):
            await inbound.wait_idle()  # in-flight done and the connection closed
            await caller.wait_closed()
        assert inbound.stats.active_connections == 0 and arrived == ["/a"]
        nursery.cancel_scope.cancel()
