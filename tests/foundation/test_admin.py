"""The shared admin server: strict request line, GET/HEAD only, bounded head, routes by path."""

from __future__ import annotations

import trio
import trio.testing

from federation import admin

ROUTES: admin.Routes = {
    "/ready": lambda: admin.ready_answer(False, "not synced"),
    "/stats": lambda: admin.json_answer({"b": 1, "a": [1, 2]}),
}


def test_routes_answer_by_path_and_ignore_the_query() -> None:
    resp = admin.respond(ROUTES, "GET", "/stats?x=1")
    head, body = resp.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: application/json" in head
    assert body == b'{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    assert admin.respond(ROUTES, "GET", "/ready").startswith(b"HTTP/1.1 503 Service Unavailable")


def test_unknown_paths_methods_and_heads_are_refused() -> None:
    assert admin.respond(ROUTES, "GET", "/nope").startswith(b"HTTP/1.1 404")
    assert admin.respond(ROUTES, "POST", "/stats").startswith(b"HTTP/1.1 405")
    for head in (b"GET /stats\r\n\r\n", b"GET stats HTTP/1.1\r\n\r\n", b"\xff\xfe\r\n\r\n", b"GE"):
        assert admin.respond_to_head(ROUTES, head).startswith(b"HTTP/1.1 400")


def test_head_requests_get_headers_only() -> None:
    resp = admin.respond(ROUTES, "HEAD", "/stats")
    assert resp.endswith(b"\r\n\r\n") and b"Content-Length: " in resp


async def test_a_client_that_never_finishes_its_head_is_closed_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET /stats HTTP/1.1\r\n")  # never the blank line
    start = trio.current_time()
    await admin.handle(ROUTES, server)
    assert trio.current_time() - start == admin.READ_TIMEOUT
    assert (await client.receive_some(100)).startswith(b"HTTP/1.1 400")


async def test_serves_real_sockets() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(admin.serve, ROUTES, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b'"b": 1\n}\n')
        nursery.cancel_scope.cancel()
