"""The agent publishes its gateway's peer liveness; withdrawn when the gateway is silent."""

from __future__ import annotations

import json

import pytest
import trio

from federation.agent.gatewaywatch import AdminFetchError, parse_peer_alive, watch_gateway
from federation.agent.records import static_records, with_gateway_counts
from federation.model import GatewayRecord
from tests.agent.helpers import demo_config


async def _serve_stats(payload: dict[str, object], *, task_status=trio.TASK_STATUS_IGNORED):
    body = json.dumps(payload).encode()

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        await stream.send_all(head + b"content-length: %d\r\n\r\n" % len(body) + body)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_liveness_is_published_on_change_and_withdrawn_when_the_gateway_goes_silent():
    seen: list[dict[str, bool]] = []
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as server:
            port = await server.start(
                _serve_stats, {"peer_alive": {"gcp-euw1": True, "onprem-dc1": False}}
            )
            outer.start_soon(
                lambda: watch_gateway("127.0.0.1", port, 0.05, seen.append, answer_within=1.0)
            )
            with trio.fail_after(10):
                while not seen:
                    await trio.sleep(0.01)
            server.cancel_scope.cancel()  # the gateway dies
        with trio.fail_after(10):
            while len(seen) < 2:
                await trio.sleep(0.01)
        outer.cancel_scope.cancel()
    assert seen[0] == {"gcp-euw1": True, "onprem-dc1": False}
    assert seen[1] == {}  # withdrawn, not left stale
    assert len(seen) == 2  # unchanged answers are not re-published


@pytest.mark.parametrize(
    "stats",
    [[], {"peer_alive": []}, {"peer_alive": {"a": "yes"}}, {"no": "field"}],
)
def test_malformed_stats_are_refused(stats):
    with pytest.raises(AdminFetchError):
        parse_peer_alive(stats)


def test_the_gateway_record_carries_the_reported_liveness():
    config = demo_config()
    cluster = config.cluster("aws-use1")
    desired = static_records(config, "aws-use1", "inc-test", 0.0)
    out = with_gateway_counts(cluster, desired, peer_alive={"gcp-euw1": False})
    gw = next(d.record for d in out.values() if isinstance(d.record, GatewayRecord))
    assert gw.peer_alive == {"gcp-euw1": False}
    kept = with_gateway_counts(cluster, out)  # no news: the last report stays
    gw = next(d.record for d in kept.values() if isinstance(d.record, GatewayRecord))
    assert gw.peer_alive == {"gcp-euw1": False}
