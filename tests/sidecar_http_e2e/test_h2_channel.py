"""H2Channel (the trio HTTP/2 adapter) against a raw h2 peer over memory streams:
BAD_INPUTS 17 (header limits: 431, connection lives on), 19/20 (floods: GOAWAY), and
flow control as back-pressure (a reader that stops reading bounds what is buffered).
Virtual time (autojump): "quiet for a moment" means every task is blocked."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import trio
import trio.testing

from sidecar.http.h2io import H2Channel, H2Stream


def raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    return conn


REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


async def exchange(
    stream: trio.abc.Stream, conn: h2.connection.H2Connection
) -> list[h2.events.Event]:
    """Send what is queued, then read until the peer has been quiet for a moment."""
    await stream.send_all(conn.data_to_send())
    events: list[h2.events.Event] = []
    while True:
        with trio.move_on_after(0.2):
            data = await stream.receive_some(65536)
            if not data:
                return events
            events += conn.receive_data(data)
            out = conn.data_to_send()
            if out:
                await stream.send_all(out)
            continue
        return events


async def ok_handler(s: H2Stream) -> None:
    await s.send_headers([(b":status", b"200")], end_stream=True)


async def test_oversized_header_block_gets_431_and_the_connection_lives_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    refused: list[str] = []
    channel = H2Channel(server, "server", on_stream=ok_handler, on_refused=refused.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        conn = raw_client()
        big = [*REQ, *[(f"x-h{i}".encode(), b"v" * 100) for i in range(200)]]
        conn.send_headers(1, big, end_stream=True)
        conn.send_headers(3, REQ, end_stream=True)
        events = await exchange(client, conn)
        statuses = {
            e.stream_id: dict(e.headers)[b":status"]
            for e in events
            if isinstance(e, h2.events.ResponseReceived)
        }
        assert statuses == {1: b"431", 3: b"200"}
        assert channel.closed is None
        assert refused == ["too_many_header_fields"]
        nursery.cancel_scope.cancel()


async def test_ping_flood_closes_the_connection(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    channel = H2Channel(server, "server", on_stream=ok_handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        conn = raw_client()
        for i in range(150):
            conn.ping(i.to_bytes(8, "big"))
        events = await exchange(client, conn)
        goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        await channel.wait_closed()
        assert channel.closed == "ping_flood"
        nursery.cancel_scope.cancel()


async def test_a_handler_that_stops_reading_bounds_the_buffer_to_the_window() -> None:
    client, server = trio.testing.memory_stream_pair()
    got: list[H2Stream] = []

    async def never_reads(s: H2Stream) -> None:
        got.append(s)
        await trio.sleep_forever()

    channel = H2Channel(server, "server", on_stream=never_reads)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        upstream = H2Channel(client, "client")
        nursery.start_soon(upstream.run)
        s = await upstream.open_stream([(b":method", b"POST"), *REQ[1:]], end_stream=False)
        sent = 0

        async def send_forever() -> None:
            nonlocal sent
            while True:
                await s.send_data(b"x" * 65536)
                sent += 65536

        nursery.start_soon(send_forever)
        await trio.testing.wait_all_tasks_blocked()
        # The sender is stuck at the 4 MiB stream window: nothing more was accepted.
        assert sent == 4 * 1024 * 1024
        assert got[0].received_bytes == sent
        nursery.cancel_scope.cancel()
