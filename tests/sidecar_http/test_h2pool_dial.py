"""H2Pool's shared dial belongs to the pool, not to the request that happened to start it.

Regression: the dial ran inside the first requester's task, so that request's deadline
(per-try timeout, request timeout, the app hanging up) cancelled the handshake for every
request waiting on it, and the next waiter started again from zero. Under load, where a
handshake takes a good part of a per-try timeout, dials could keep being thrown away.
"""

from __future__ import annotations

import trio
import trio.testing

from sidecar.http.circuit import CircuitBreaker
from sidecar.http.h2io import H2Channel, H2Stream
from sidecar.http.upstream import ConnectFailed, Dialed, H2Pool

HEAD = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a")]


async def _ok(s: H2Stream) -> None:
    await s.send_headers([(b":status", b"200")], end_stream=True)


async def test_a_cancelled_requester_does_not_cancel_the_shared_dial(
    autojump_clock: trio.abc.Clock,
) -> None:
    calls: list[float] = []

    async with trio.open_nursery() as nursery:

        async def dial() -> Dialed:
            calls.append(trio.current_time())
            await trio.sleep(0.8)  # a slow handshake
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(H2Channel(server, "server", on_stream=_ok).run)
            return Dialed(client)

        breaker = CircuitBreaker()
        pool = H2Pool("a", dial, nursery, breaker=breaker)
        got: list[float] = []

        async def impatient() -> None:
            with trio.move_on_after(0.5):  # e.g. its per-try timeout
                await pool.open_stream(HEAD, end_stream=True)
                raise AssertionError("the dial takes 0.8s")

        async def patient() -> None:
            await trio.sleep(0.3)
            with trio.fail_after(2.0):
                stream = await pool.open_stream(HEAD, end_stream=True)
            got.append(trio.current_time())
            head = await stream.receive_head()
            assert head[0] == (b":status", b"200")

        async with trio.open_nursery() as requests:
            requests.start_soon(impatient)
            requests.start_soon(patient)
        assert calls == [0.0]  # one handshake, never restarted
        assert got == [0.8]  # the waiter got the first dial's connection
        assert pool.statistics().dials == 1
        assert breaker.pending == 0
        nursery.cancel_scope.cancel()


async def test_a_failed_dial_fails_every_waiter_once(autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    async with trio.open_nursery() as nursery:

        async def dial() -> Dialed:
            nonlocal calls
            calls += 1
            await trio.sleep(0.2)
            raise ConnectFailed("connect_refused")

        breaker = CircuitBreaker()
        pool = H2Pool("a", dial, nursery, breaker=breaker)
        errors: list[str] = []

        async def one() -> None:
            try:
                await pool.open_stream(HEAD, end_stream=True)
            except ConnectFailed as exc:
                errors.append(exc.reason)

        async with trio.open_nursery() as requests:
            for _ in range(5):
                requests.start_soon(one)
        assert errors == ["connect_refused"] * 5
        assert calls == 1 and pool.statistics().dial_failures == 1
        assert breaker.pending == 0 and breaker.connections == 0
        nursery.cancel_scope.cancel()
