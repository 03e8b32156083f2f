"""Connection lifetime of the HTTP/2 hops over memory streams, in virtual time (MockClock,
autojump): keepalive PINGs and dead-peer eviction, idle close with GOAWAY, graceful
GOAWAY on both sides (RFC 9113 section 6.8), and HTTP/1.1 ``Connection: close`` on drain.
Every time asserted is exact."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h11
import trio
import trio.testing
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame
from test_http_pipeline import FakeUpstreams, Sink, make_proxy, request, respond, service

from federation.h2guard import GracefulH2Connection
from sidecar.http.h2io import MAX_STREAM_ID, H2Channel, H2Stream, StreamReset
from sidecar.http.keepalive import KeepaliveConfig
from sidecar.http.server import serve_app_connection
from sidecar.http.upstream import Dialed, H2Pool
from sidecar.routing import Candidate

HEAD = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a")]
KEEPALIVE = KeepaliveConfig(interval=5.0, timeout=3.0, idle_timeout=None)

Recorded = list[tuple[float, object]]


class Blackhole(trio.abc.Stream):
    """A transport whose peer can vanish without a trace: once ``silence()`` is called,
    writes are swallowed and reads never return (a host gone, a path blackholed)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.silent = False

    def silence(self) -> None:
        self.silent = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.silent:
            await trio.lowlevel.checkpoint()
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.silent:
            await trio.sleep_forever()
        data = await self.inner.receive_some(max_bytes)
        if self.silent:
            await trio.sleep_forever()
        return bytes(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def raw_server(stream: trio.abc.Stream, seen: Recorded) -> None:
    """A plain h2 server that answers every request 200 and records every event (with its
    virtual time), and ``"eof"`` when the client closes."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    while True:
        data = await stream.receive_some(65536)
        if not data:
            seen.append((trio.current_time(), "eof"))
            return
        for event in conn.receive_data(data):
            seen.append((trio.current_time(), event))
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                conn.send_headers(event.stream_id, [(b":status", b"200")], end_stream=True)
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)


def frames(data: bytes) -> list[Frame]:
    """The HTTP/2 frames in ``data`` (whole frames only)."""
    out = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


def of_type(seen: Recorded, kind: type) -> list[tuple[float, object]]:
    return [(t, e) for t, e in seen if isinstance(e, kind)]


# -- keepalive and idle close (client role, the pool) ---------------------------------------


async def test_a_silent_peer_is_evicted_and_its_request_fails_retryably(
    autojump_clock: trio.abc.Clock,
) -> None:
    holes: list[Blackhole] = []
    got_request = trio.Event()

    async def hang(s: H2Stream) -> None:
        got_request.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:

        async def dial() -> Dialed:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(H2Channel(server, "server", on_stream=hang).run)
            holes.append(Blackhole(client))
            return Dialed(holes[-1])

        pool = H2Pool("a", dial, nursery, keepalive=KEEPALIVE)
        stream = await pool.open_stream(HEAD, end_stream=True)
        await got_request.wait()
        await trio.sleep(1.0)
        holes[0].silence()  # the peer host vanishes: no FIN, no RST
        try:
            await stream.receive_head()
            raise AssertionError("the request cannot be answered")
        except StreamReset as exc:
            failed = (trio.current_time(), exc.refused, str(exc))
        # Last frame from the peer at 0 s, PING at 5 s, unanswered until 8 s: dead.
        assert failed[0] == 8.0
        # Not "refused": the peer may have processed it, so only idempotent requests
        # are retried (as reset, which the default retry_on includes).
        assert failed[1] is False and "keepalive_timeout" in failed[2]
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().connections == 0 and pool.statistics().dead == 1
        # The next request gets a fresh connection instead of the dead one.
        fresh = await pool.open_stream(HEAD, end_stream=True)
        assert pool.statistics().dials == 2 and fresh.channel is not stream.channel
        nursery.cancel_scope.cancel()


async def test_a_request_on_a_dead_connection_is_retried_on_another_endpoint(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Through the request pipeline: the retry layer takes the keepalive failure as a
    reset and answers from the other endpoint."""
    silenced: list[str] = []
    holes: dict[str, Blackhole] = {}

    def app(name: str) -> Callable[[H2Stream], Awaitable[None]]:
        async def serve(s: H2Stream) -> None:
            if not silenced:
                silenced.append(name)
                holes[name].silence()
                await trio.sleep_forever()
            await respond(s, 200, name.encode())

        return serve

    class Upstreams(FakeUpstreams):
        async def open_stream(
            self, c: Candidate, headers: list[tuple[bytes, bytes]], *, end_stream: bool
        ) -> H2Stream:
            pool = self.pools.get(c)
            if pool is None:
                name = c.name

                async def dial() -> Dialed:
                    client, server = trio.testing.memory_stream_pair()
                    self.nursery.start_soon(
                        H2Channel(server, "server", on_stream=self.apps[name]).run
                    )
                    holes[name] = Blackhole(client)
                    return Dialed(holes[name])

                pool = self.pools[c] = H2Pool(name, dial, self.nursery, keepalive=KEEPALIVE)
            return await pool.open_stream(headers, end_stream=end_stream)

    async with trio.open_nursery() as nursery:
        ups = Upstreams(nursery, {"a": app("a"), "b": app("b")})
        proxy = make_proxy(service(), ups)
        sink = Sink()
        await proxy.handle(request(), sink)
        other = "b" if silenced == ["a"] else "a"
        assert sink.status == 200 and bytes(sink.data) == other.encode()
        # Dead at 8 s, then the first backoff (25 ms, jitter pinned to its ceiling).
        assert trio.current_time() == 8.025
        dead_pool = ups.pools[ups.cands[silenced[0]]]
        await trio.testing.wait_all_tasks_blocked()
        assert dead_pool.statistics().dead == 1 and dead_pool.statistics().connections == 0
        nursery.cancel_scope.cancel()


async def test_idle_pooled_connection_is_pinged_then_closed_with_goaway(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: Recorded = []
    async with trio.open_nursery() as nursery:

        async def dial() -> Dialed:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(raw_server, server, seen)
            return Dialed(client)

        cfg = KeepaliveConfig(interval=5.0, timeout=3.0, idle_timeout=12.0)
        pool = H2Pool("a", dial, nursery, keepalive=cfg)
        s = await pool.open_stream(HEAD, end_stream=True)
        assert (await s.receive_head())[0] == (b":status", b"200")
        await trio.sleep(20.0)
        # Idle from 0 s: PINGs at 5 and 10 s (each answered), GOAWAY NO_ERROR at 12 s.
        assert [t for t, _ in of_type(seen, h2.events.PingReceived)] == [5.0, 10.0]
        goaways = of_type(seen, h2.events.ConnectionTerminated)
        assert len(goaways) == 1 and goaways[0][0] == 12.0
        event = goaways[0][1]
        assert isinstance(event, h2.events.ConnectionTerminated)
        assert event.error_code == ErrorCodes.NO_ERROR
        assert seen[-1] == (12.0, "eof")
        st = pool.statistics()
        assert (st.connections, st.idle_closed, st.dead) == (0, 1, 0)
        # A busy connection is never closed for idleness.
        s = await pool.open_stream(HEAD, end_stream=False)
        await trio.sleep(30.0)
        assert pool.statistics().connections == 1 and pool.statistics().dials == 2
        await s.end()
        nursery.cancel_scope.cancel()


# -- GOAWAY received by the pool (client role) ---------------------------------------------


async def test_streams_above_a_graceful_goaway_are_refused_the_others_finish(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    peer = GracefulH2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    peer.initiate_connection()
    channel = H2Channel(client, "client")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        first = await channel.open_stream(HEAD, end_stream=True)
        second = await channel.open_stream(HEAD, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        peer.receive_data(await server.receive_some(65536))
        # The peer processed stream 1 only, and says so.
        peer.send_goaway(1)
        await server.send_all(peer.data_to_send())
        await trio.testing.wait_all_tasks_blocked()
        assert not channel.can_open() and channel.closed is None
        try:
            await second.receive_head()
            raise AssertionError("stream 3 is above the last id")
        except StreamReset as exc:
            assert exc.refused and second.stream_id == 3
        # Stream 1 still completes on the same connection, then the connection closes.
        peer.send_headers(1, [(b":status", b"200")], end_stream=True)
        await server.send_all(peer.data_to_send())
        assert (await first.receive_head())[0] == (b":status", b"200")
        await channel.wait_closed()
        assert channel.closed == "peer_goaway"
        nursery.cancel_scope.cancel()


async def test_an_error_goaway_resets_processed_streams_and_refuses_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    peer.initiate_connection()
    channel = H2Channel(client, "client")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        first = await channel.open_stream(HEAD, end_stream=True)
        second = await channel.open_stream(HEAD, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        peer.receive_data(await server.receive_some(65536))
        peer.close_connection(error_code=ErrorCodes.INTERNAL_ERROR, last_stream_id=1)
        await server.send_all(peer.data_to_send())
        results = []
        for s in (first, second):
            try:
                await s.receive_head()
            except StreamReset as exc:
                results.append((s.stream_id, exc.refused, exc.error_code))
        assert results == [
            (1, False, ErrorCodes.INTERNAL_ERROR),
            (3, True, ErrorCodes.REFUSED_STREAM),
        ]
        await channel.wait_closed()
        assert channel.closed == "peer_goaway"
        nursery.cancel_scope.cancel()


# -- graceful drain (server role) ----------------------------------------------------------


async def drive(stream: trio.abc.Stream, conn: h2.connection.H2Connection, seen: Recorded) -> None:
    """The raw client's reader: feeds h2 (which answers PINGs) and records events."""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            seen.append((trio.current_time(), "eof"))
            return
        for event in conn.receive_data(data):
            seen.append((trio.current_time(), event))
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)


async def test_draining_server_goaways_twice_finishes_in_flight_and_refuses_new(
    autojump_clock: trio.abc.Clock,
) -> None:
    release = trio.Event()

    async def slow(s: H2Stream) -> None:
        await release.wait()
        await s.send_headers([(b":status", b"200")], end_stream=True)

    client, server = trio.testing.memory_stream_pair()
    channel = H2Channel(server, "server", on_stream=slow)
    # A client that keeps its h2 state open across a NO_ERROR GOAWAY, so it can still
    # (wrongly, or because it raced the GOAWAY) send a new stream.
    conn = GracefulH2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    seen: Recorded = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        conn.send_headers(1, HEAD, end_stream=True)
        await client.send_all(conn.data_to_send())
        nursery.start_soon(drive, client, conn, seen)
        await trio.sleep(1.0)
        channel.drain()
        await trio.sleep(1.0)
        goaways = [e for _, e in of_type(seen, h2.events.ConnectionTerminated)]
        assert [(e.error_code, e.last_stream_id) for e in goaways] == [
            (ErrorCodes.NO_ERROR, MAX_STREAM_ID),  # "stop opening streams", with a PING
            (ErrorCodes.NO_ERROR, 1),  # after the PING's ACK: the real last id
        ]
        assert all(t == 1.0 for t, _ in of_type(seen, h2.events.ConnectionTerminated))
        # A stream after the final GOAWAY is refused: never processed, safe to retry.
        conn.send_headers(3, HEAD, end_stream=True)
        await client.send_all(conn.data_to_send())
        await trio.testing.wait_all_tasks_blocked()
        resets = [e for _, e in of_type(seen, h2.events.StreamReset)]
        assert [(e.stream_id, e.error_code) for e in resets] == [(3, ErrorCodes.REFUSED_STREAM)]
        assert channel.closed is None  # stream 1 is still in flight
        await trio.sleep(5.0)
        release.set()
        await channel.wait_closed()
        responses = of_type(seen, h2.events.ResponseReceived)
        assert [(t, e.stream_id) for t, e in responses] == [(7.0, 1)]  # type: ignore[attr-defined]
        assert channel.closed == "drained"
        await trio.testing.wait_all_tasks_blocked()
        assert seen[-1] == (7.0, "eof")
        nursery.cancel_scope.cancel()


async def test_drain_sends_the_final_goaway_even_if_the_ping_is_never_answered(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = trio.testing.memory_stream_pair()

    async def never(s: H2Stream) -> None:
        await trio.sleep_forever()

    channel = H2Channel(server, "server", on_stream=never)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    conn.send_headers(1, HEAD, end_stream=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        await client.send_all(conn.data_to_send())
        await trio.sleep(2.0)
        channel.drain()
        # Read what the server sends but never answer (no PING ACK).
        chunks: list[tuple[float, bytes]] = []
        with trio.move_on_after(5.0):
            while True:
                data = bytes(await client.receive_some(65536))
                chunks.append((trio.current_time(), data))
        goaways = [
            (t, f.last_stream_id)
            for t, chunk in chunks
            for f in frames(chunk)
            if isinstance(f, GoAwayFrame) and f.error_code == ErrorCodes.NO_ERROR
        ]
        # The final GOAWAY goes out DRAIN_PING_TIMEOUT (1 s) after the first.
        assert goaways == [(2.0, MAX_STREAM_ID), (3.0, 1)]
        assert channel.closed is None  # stream 1 is still being served
        nursery.cancel_scope.cancel()


async def test_pool_moves_to_a_new_connection_when_its_peer_drains(
    autojump_clock: trio.abc.Clock,
) -> None:
    release = trio.Event()
    servers: list[H2Channel] = []

    async def slow(s: H2Stream) -> None:
        if s.channel is servers[0]:
            await release.wait()
        await s.send_headers([(b":status", b"200")], end_stream=True)

    async with trio.open_nursery() as nursery:

        async def dial() -> Dialed:
            client, server = trio.testing.memory_stream_pair()
            servers.append(H2Channel(server, "server", on_stream=slow))
            nursery.start_soon(servers[-1].run)
            return Dialed(client)

        pool = H2Pool("a", dial, nursery)
        in_flight = await pool.open_stream(HEAD, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        servers[0].drain()
        await trio.testing.wait_all_tasks_blocked()
        # New requests go to a new connection; the draining one finishes its stream.
        fresh = await pool.open_stream(HEAD, end_stream=True)
        assert (await fresh.receive_head())[0] == (b":status", b"200")
        assert fresh.channel is not in_flight.channel and pool.statistics().dials == 2
        release.set()
        assert (await in_flight.receive_head())[0] == (b":status", b"200")
        await in_flight.channel.wait_closed()
        await servers[0].wait_closed()
        await trio.testing.wait_all_tasks_blocked()
        assert servers[0].closed == "drained"
        assert in_flight.channel.closed in ("peer_goaway", "eof")
        assert pool.statistics().connections == 1
        nursery.cancel_scope.cancel()


# -- HTTP/1.1 app connections on drain -----------------------------------------------------


async def h1_exchange(stream: trio.abc.Stream, conn: h11.Connection) -> tuple[h11.Response, bool]:
    """One GET; returns the response and whether the server closed afterwards."""
    await stream.send_all(
        conn.send(h11.Request(method="GET", target="/x", headers=[("host", "web")]))
        + conn.send(h11.EndOfMessage())
    )
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Response):
            response = event
        if isinstance(event, h11.EndOfMessage):
            break
    assert response is not None
    closed = conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE
    return response, closed


async def test_h1_app_connection_gets_connection_close_on_drain(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = trio.Event()

    async def app(s: H2Stream) -> None:
        await gate.wait()
        await respond(s, 200, b"ok")

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": app})
        proxy = make_proxy(service(), ups)
        # Connection 1 has a request in flight when the drain starts; connection 2 is
        # idle between requests.
        c1, s1 = trio.testing.memory_stream_pair()
        c2, s2 = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_app_connection, s1, proxy)
        nursery.start_soon(serve_app_connection, s2, proxy)
        gate.set()
        h2conn = h11.Connection(h11.CLIENT)
        response, closed = await h1_exchange(c2, h2conn)
        assert response.status_code == 200 and not closed
        gate = trio.Event()
        h1conn = h11.Connection(h11.CLIENT)
        async with trio.open_nursery() as inner:
            results: list[tuple[h11.Response, bool]] = []

            async def first() -> None:
                results.append(await h1_exchange(c1, h1conn))

            inner.start_soon(first)
            await trio.sleep(1.0)
            proxy.drain()
            # The idle connection is closed at once.
            assert await c2.receive_some(65536) == b""
            await trio.sleep(1.0)
            gate.set()
        response, closed = results[0]
        assert response.status_code == 200
        assert (b"connection", b"close") in list(response.headers)
        assert closed
        assert await c1.receive_some(65536) == b""  # and closed after it
        await proxy.wait_idle()
        nursery.cancel_scope.cancel()


async def test_drained_proxy_answers_a_request_already_started_on_h2(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The app-facing h2 front end drains like the inbound side (one shared H2Channel)."""
    gate = trio.Event()

    async def app(s: H2Stream) -> None:
        await gate.wait()
        await respond(s, 200, b"ok")

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": app})
        proxy = make_proxy(service(), ups)
        c, s = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_app_connection, s, proxy)
        client = H2Channel(c, "client")
        nursery.start_soon(client.run)
        stream = await client.open_stream(
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"web"),
                (b":path", b"/x"),
            ],
            end_stream=True,
        )
        await trio.sleep(1.0)
        proxy.drain()
        await trio.sleep(1.0)
        assert not client.can_open()
        gate.set()
        assert (await stream.receive_head())[0] == (b":status", b"200")
        assert await stream.receive_data() == b"ok"
        with trio.fail_after(5):
            await proxy.wait_idle()
        await client.wait_closed()
        nursery.cancel_scope.cancel()
