"""Pooled upstream connections for the HTTP layer: HTTP/2 to a peer (or an h2c app), HTTP/1.1
keep-alive to a local app.

:class:`H2Pool` is one destination's set of multiplexed HTTP/2 connections (between
sidecars: over the inner mTLS, one pool per balancer candidate, since the SNI and the
expected identity belong to the candidate). A request takes a stream on a connection
that has room; a new connection is dialled only when every connection is at the peer's
MAX_CONCURRENT_STREAMS, and only one dial runs at a time, so a burst of N requests
costs one handshake, not N. Requests that arrive while a dial is in flight wait for it
(they are *pending* in the circuit breaker's sense) and share its outcome: a failed
dial fails them all with the same :class:`ConnectFailed`, rather than each of them
dialling a dead endpoint again.

Each pooled connection runs the keepalive of :mod:`sidecar.http.keepalive` (when the
pool is given a :class:`~sidecar.http.keepalive.KeepaliveConfig`): a connection whose
PING goes unanswered is dead and leaves the pool at once, its requests fail as resets
(retried elsewhere by the retry layer, idempotent requests only); one without streams
for ``idle_timeout`` is closed with GOAWAY ``NO_ERROR``. A connection that received a
GOAWAY takes no new stream (its requests above the GOAWAY's last id fail as refused,
which any request may retry), so the next request dials a new one.

:class:`H1AppPool` keeps idle keep-alive connections to a local HTTP/1.1 app; an idle
connection the app has closed is noticed (EOF peek) and dropped before reuse.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final

import trio

from sidecar.http.circuit import CircuitBreaker, Open
from sidecar.http.h1 import H1ClientConnection, H1Limits
from sidecar.http.h2io import H2Channel, H2Stream
from sidecar.http.headers import Header
from sidecar.http.keepalive import KeepaliveConfig

__all__ = [
    "ConnectFailed",
    "Dial",
    "Dialed",
    "H1AppConnection",
    "H1AppPool",
    "H2Pool",
    "H2PoolStatistics",
    "Overloaded",
]


@dataclass(frozen=True, slots=True)
class Dialed:
    """A fresh transport to the destination."""

    stream: trio.abc.Stream
    """Connected (and, between sidecars, handshaken and verified)."""
    scope: AbstractContextManager[object] | None = None
    """Entered for the connection's life (the revocation enforcer's ``track(peer)``):
    cancelling it ends the connection."""


Dial = Callable[[], Awaitable[Dialed]]


class ConnectFailed(Exception):
    """No connection to the destination (TCP, TLS or identity): the request never left."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        """Stable reason (``timeout``, ``connect_refused``, a handshake reason...)."""


class Overloaded(Exception):
    """A circuit breaker limit refused the request while it waited for a connection."""

    def __init__(self, verdict: Open) -> None:
        super().__init__(verdict.reason.value)
        self.verdict = verdict


@dataclass(frozen=True, slots=True)
class H2PoolStatistics:
    """Counts for the admin endpoint and tests."""

    connections: int
    """Open connections now."""
    dials: int
    """Successful dials so far (each one a TLS handshake between sidecars)."""
    dial_failures: int
    """Failed dials so far."""
    streams: int
    """Streams opened so far."""
    dead: int = 0
    """Connections dropped because a keepalive PING went unanswered."""
    idle_closed: int = 0
    """Connections closed after ``idle_timeout`` without streams."""
    draining: int = 0
    """Open connections that take no new stream (a GOAWAY went either way)."""


class H2Pool:
    """Multiplexed HTTP/2 connections to one destination (see the module docstring).

    Connections run in ``nursery`` (the sidecar's connection nursery), so they outlive
    the request that dialled them.
    """

    def __init__(
        self,
        name: str,
        dial: Dial,
        nursery: trio.Nursery,
        *,
        breaker: CircuitBreaker | None = None,
        keepalive: KeepaliveConfig | None = None,
    ) -> None:
        self.name = name
        self._dial = dial
        self._nursery = nursery
        self._breaker = breaker
        self.keepalive = keepalive
        """PING/idle settings of every connection (None: neither)."""
        self.dead = 0
        self.idle_closed = 0
        self.channels: list[H2Channel] = []
        self._dialing: trio.Event | None = None
        self._dial_error: ConnectFailed | None = None
        self._room = trio.Event()
        self._closed = False
        self.dials = 0
        self.dial_failures = 0
        self.streams = 0

    def _notify(self) -> None:
        self._room.set()
        self._room = trio.Event()

    def _best(self) -> H2Channel | None:
        # Fill the busiest connection that still has room: fewer live connections, and
        # idle ones can be closed.
        best: H2Channel | None = None
        for ch in self.channels:
            if ch.can_open() and (best is None or ch.active_streams > best.active_streams):
                best = ch
        return best

    async def open_stream(self, headers: Sequence[Header], *, end_stream: bool) -> H2Stream:
        """A new request stream; raises :class:`ConnectFailed` or :class:`Overloaded`."""
        pending = False
        try:
            while True:
                if self._closed:
                    raise ConnectFailed("pool_closed")
                ch = self._best()
                if ch is not None:
                    self.streams += 1
                    return await ch.open_stream(headers, end_stream=end_stream)
                if self._dialing is None:
                    if self._breaker is not None:
                        verdict = self._breaker.admit_connection()
                        if isinstance(verdict, Open):
                            # At the connection limit: wait as pending for a stream to free.
                            pending = self._admit_pending(pending)
                            await self._room.wait()
                            continue
                    self._start_dial()
                else:
                    pending = self._admit_pending(pending)
                event = self._dialing
                assert event is not None
                await event.wait()
                if self._dial_error is not None and self._dialing is None:
                    raise self._dial_error
        finally:
            if pending and self._breaker is not None:
                self._breaker.release_pending()

    def _admit_pending(self, already: bool) -> bool:
        if already or self._breaker is None:
            return already
        verdict = self._breaker.admit_pending()
        if isinstance(verdict, Open):
            raise Overloaded(verdict)
        return True

    def _start_dial(self) -> None:
        """Dial in the pool's nursery: the requester that needed the connection only
        waits for it, so its deadline (per-try or request timeout, the app hanging up)
        does not throw away a handshake other requests are waiting on. The dial itself
        is bounded by the connect timeout (``UpstreamPool.dial``)."""
        event = self._dialing = trio.Event()
        self._dial_error = None
        self._nursery.start_soon(self._dial_one, event)

    async def _dial_one(self, event: trio.Event) -> None:
        try:
            try:
                dialed = await self._dial()
            except ConnectFailed as exc:
                self.dial_failures += 1
                self._dial_error = exc
                if self._breaker is not None:
                    self._breaker.release_connection()
                return
            except Exception as exc:
                # Not a ConnectFailed: still fail the waiters, never the nursery.
                self.dial_failures += 1
                self._dial_error = ConnectFailed(f"dial_error: {type(exc).__name__}")
                if self._breaker is not None:
                    self._breaker.release_connection()
                return
            except BaseException:
                if self._breaker is not None:
                    self._breaker.release_connection()
                raise
            self.dials += 1
            if self._closed:
                await trio.aclose_forcefully(dialed.stream)
                if self._breaker is not None:
                    self._breaker.release_connection()
                return
            channel = H2Channel(dialed.stream, "client", keepalive=self.keepalive)
            channel.on_capacity = self._notify
            self.channels.append(channel)
            await self._nursery.start(self._run, channel, dialed.scope)
        finally:
            self._dialing = None
            event.set()

    async def _run(
        self,
        channel: H2Channel,
        scope: AbstractContextManager[object] | None,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            with scope if scope is not None else contextlib.nullcontext():
                await channel.run(task_status=task_status)
        finally:
            with contextlib.suppress(ValueError):
                self.channels.remove(channel)
            if channel.closed == "keepalive_timeout":
                self.dead += 1
            elif channel.closed == "idle_timeout":
                self.idle_closed += 1
            if self._breaker is not None:
                self._breaker.release_connection()
            self._notify()

    async def aclose(self) -> None:
        """Close every connection (live streams are reset)."""
        self._closed = True
        for ch in list(self.channels):
            await ch.aclose()
        self._notify()

    def statistics(self) -> H2PoolStatistics:
        return H2PoolStatistics(
            len(self.channels),
            self.dials,
            self.dial_failures,
            self.streams,
            dead=self.dead,
            idle_closed=self.idle_closed,
            draining=sum(1 for ch in self.channels if ch.draining),
        )

    def __repr__(self) -> str:
        return (
            f"<H2Pool {self.name} connections={len(self.channels)} dials={self.dials} "
            f"failures={self.dial_failures} streams={self.streams} dead={self.dead} "
            f"idle_closed={self.idle_closed}>"
        )


@dataclass(slots=True)
class H1AppConnection:
    """One HTTP/1.1 connection to the local app, with its sans-IO state."""

    stream: trio.SocketStream
    """The TCP stream."""
    h1: H1ClientConnection
    """Framing state of the current exchange."""
    reused: bool
    """It carried an earlier exchange (the app may close such a connection at any time)."""


_IDLE_MAX: Final = 64


class H1AppPool:
    """Keep-alive HTTP/1.1 connections to one local app."""

    def __init__(
        self, host: str, port: int, *, connect_timeout: float = 1.0, limits: H1Limits | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.limits = limits
        self._idle: list[H1AppConnection] = []
        self.connects = 0

    @staticmethod
    def _still_open(stream: trio.SocketStream) -> bool:
        # An idle keep-alive connection has nothing to read: readable means EOF (the app
        # closed it, and a request written there would be lost) or unsolicited bytes
        # (not trustworthy either). A zero-timeout poll, no wait.
        try:
            readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    async def acquire(self) -> H1AppConnection:
        """An idle connection if a live one is left, else a new one; raises
        :class:`ConnectFailed` (``app_unavailable``)."""
        while self._idle:
            conn = self._idle.pop()
            if self._still_open(conn.stream):
                conn.reused = True
                return conn
            await trio.aclose_forcefully(conn.stream)
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError) as exc:
            raise ConnectFailed("app_unavailable") from exc
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        return H1AppConnection(stream, H1ClientConnection(self.limits), reused=False)

    async def release(self, conn: H1AppConnection) -> None:
        """Return a connection after an exchange: kept if reusable, else closed."""
        if conn.h1.reusable and len(self._idle) < _IDLE_MAX:
            conn.h1.start_next_cycle()
            self._idle.append(conn)
            return
        await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)
