"""trio adapter for the CONNECT tunnel: connections, tunnel streams, the per-peer pool, the server.

Layers (the protocol decisions are in ``gateway/tunnel_protocol.py``):

* :class:`TunnelStream` is one CONNECT stream as a ``trio.abc.HalfCloseableStream``,
  so :func:`sidecar.relay.relay` carries it like any socket: ``send_eof`` is
  END_STREAM, EOF on receive is the peer's END_STREAM. ``receive_some`` acknowledges
  (WINDOW_UPDATE) the bytes it returned *last time* when it is called again: the
  relay calls it only after it wrote those bytes to the local socket, so a local
  reader that stops reading stops the acknowledgements of its own stream only
  (BAD_INPUTS 23). Memory per stream is bounded by its 4 MiB window, per
  connection by the 16 MiB connection window. ``send_all`` queues its bytes in the
  protocol (no copy) and returns once the writer has written the batch that framed
  the last of them; the protocol frames queued DATA round-robin over the streams, so
  a bulk stream cannot push a small one behind its backlog.
* :class:`TunnelConnection` runs one protocol over one TLS stream with three tasks:
  a reader (feeds bytes, dispatches events, never writes), a writer (the only task
  that writes, so a peer that stops reading cannot block the reader into a
  deadlock; woken only when there is output, at most ``WRITE_BATCH`` of DATA per
  write), and a keepalive (client: PING every ``keepalive_interval``, dead after
  ``keepalive_timeout`` without an ACK; server: drain after ``idle_timeout``
  without streams). Control frames queued while the peer does not read are capped
  (``max_pending_output``; past it the connection is closed, ``write_backlog``).
* :class:`TunnelPool` keeps long-lived client connections per peer gateway, opens
  another when one is at MAX_CONCURRENT_STREAMS or draining, fails fast for a peer
  the prober marked dead (or that just failed to dial), and drains connections
  made with an old certificate when the gateway's SVID rotates.
* :func:`serve_tunnel` accepts peer gateways: TLS 1.3 mTLS, the peer must present
  the gateway SVID of a federated trust domain that the catalog maps to a cluster
  (or, when the cluster's leased record is missing, the deployment config does).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import trio
from h2.errors import ErrorCodes

from federation.catalog import Catalog
from federation.model import GatewayRecord
from gateway.metrics import GatewayMetrics
from gateway.tunnel_protocol import (
    ConnectionClosed,
    ConnectRequest,
    ConnectResponse,
    Data,
    EndOfStream,
    GoawayReceived,
    PingAcked,
    StreamRefusedLocally,
    StreamReset,
    TunnelEvent,
    TunnelProtocol,
    WindowOpened,
)
from trust.errors import HandshakeRefused
from trust.spiffe import TrustDomain, gateway_id
from trust.tls import TlsContextHolder, handshake_and_verify

__all__ = [
    "PeerDown",
    "TunnelConnection",
    "TunnelError",
    "TunnelOptions",
    "TunnelPool",
    "TunnelRefused",
    "TunnelStream",
    "cluster_of_trust_domain",
    "serve_tunnel",
]

log = logging.getLogger("meshfed.gateway.tunnel")

READ_SIZE: Final = 256 * 1024
WRITE_BATCH: Final = 256 * 1024
"""DATA bytes the writer frames per transport write: bounds how long a stream whose bytes
arrive during a write waits for its turn (the protocol schedules round-robin)."""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class TunnelOptions:
    """Timeouts and limits of tunnel connections (seconds on trio's clock)."""

    connect_timeout: float = 2.0
    """TCP connect plus TLS handshake to a peer gateway."""
    handshake_timeout: float = 5.0
    """Server: TLS handshake and the client's HTTP/2 preface."""
    stream_open_timeout: float = 5.0
    """Client: CONNECT sent until its answer (the peer connects to its sidecar meanwhile)."""
    keepalive_interval: float = 10.0
    """Client: PING period on each pooled connection."""
    keepalive_timeout: float = 5.0
    """Client: a PING unanswered this long means the connection is dead (evicted)."""
    idle_timeout: float = 300.0
    """Either side: a connection without streams this long is drained and closed."""
    down_for: float = 1.0
    """After a failed dial, new streams to that gateway fail at once for this long."""
    max_pending_output: int = 8 * 1024 * 1024
    """Bytes queued to a peer that does not read before the connection is closed."""
    drain_timeout: float = 30.0
    """A draining connection closes after this even with streams left."""


class TunnelError(Exception):
    """A tunnel stream could not be opened; ``reason`` is a stable refusal reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class PeerDown(TunnelError):
    """The peer gateway is known dead (prober) or just failed to dial: fail fast."""


class TunnelRefused(TunnelError):
    """The peer gateway answered the CONNECT with a refusal (``status``, ``reason``)."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        super().__init__(reason or f"status_{status}", f"peer answered {status}")


# -- one stream --------------------------------------------------------------------------------


class TunnelStream(trio.abc.HalfCloseableStream):
    """One CONNECT stream of a :class:`TunnelConnection` (see the module docstring)."""

    def __init__(self, conn: TunnelConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._chunks: collections.deque[tuple[memoryview, int]] = collections.deque()
        """Received, not yet returned: (payload view, padding to acknowledge with it)."""
        self._buffered = 0
        self._to_ack = 0
        """Flow-controlled bytes returned by the last receive_some, acknowledged on the next."""
        self._eof = False
        self._reset_code: int | None = None
        self._sent_eof = False
        self._closed = False
        self._response: ConnectResponse | None = None
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._receiving = False
        self._sending = False
        self._framed_in: int | None = None
        """Writer batch that framed the last queued byte of the current send_all."""

    @property
    def buffered(self) -> int:
        """Bytes received and held for the local side (bounded by the stream window)."""
        return self._buffered

    # Called by the connection's reader.
    def _on_data(self, data: bytes, flow_length: int) -> None:
        self._chunks.append((memoryview(data), flow_length - len(data)))
        self._buffered += len(data)
        self._recv_lot.unpark_all()

    def _on_eof(self) -> None:
        self._eof = True
        self._recv_lot.unpark_all()

    def _on_reset(self, code: int) -> None:
        self._reset_code = code
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    def _on_window(self) -> None:
        self._send_lot.unpark_all()

    def _broken(self) -> bool:
        return self._reset_code is not None or self.conn.protocol.closed is not None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("tunnel stream was closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this tunnel stream")
        self._receiving = True
        try:
            if self._to_ack:
                # The caller came back for more: the previous bytes are written.
                self.conn.acknowledge(self.stream_id, self._to_ack)
                self._to_ack = 0
            while not self._chunks:
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    return b""
                if self._broken():
                    raise trio.BrokenResourceError(
                        f"tunnel stream {self.stream_id} reset (code {self._reset_code})"
                    )
                await self._recv_lot.park()
            limit = max_bytes if max_bytes is not None else READ_SIZE
            parts: list[memoryview] = []
            taken = flow = 0
            while self._chunks and taken < limit:
                view, pad = self._chunks[0]
                if len(view) <= limit - taken:
                    self._chunks.popleft()
                    parts.append(view)
                    taken += len(view)
                    flow += len(view) + pad
                else:
                    n = limit - taken
                    parts.append(view[:n])
                    self._chunks[0] = (view[n:], pad)
                    taken += n
                    flow += n
            self._buffered -= taken
            self._to_ack = flow
            await trio.lowlevel.checkpoint()
            return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("tunnel stream was closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this tunnel stream")
        if self._sent_eof:
            raise trio.ClosedResourceError("send_eof was called")
        self._sending = True
        try:
            view = memoryview(data).cast("B")
            if self._broken():
                raise trio.BrokenResourceError(f"tunnel stream {self.stream_id} reset")
            proto = self.conn.protocol
            if view:
                # The protocol keeps the view (no copy) and frames it in the stream's
                # round-robin turn; we return once the batch holding its last byte was
                # written, so the caller may reuse its buffer and a stream has at most
                # one chunk in memory (as before the scheduler, but without waiting for
                # the writer to go idle, which on a busy connection means after other streams).
                if not proto.queue_data(self.stream_id, view):
                    raise trio.BrokenResourceError(f"tunnel stream {self.stream_id} reset")
                self._framed_in = None
                self.conn.wake_writer()
                try:
                    while not self._written():
                        if self._broken():
                            raise trio.BrokenResourceError(f"tunnel stream {self.stream_id} reset")
                        self.conn._send_waiters.add(self)
                        try:
                            await self._send_lot.park()
                        finally:
                            self.conn._send_waiters.discard(self)
                except BaseException:
                    # Cancelled: the caller owns its buffer again; what is still
                    # queued goes out from a copy (the stream's bytes stay in order).
                    proto.copy_queued(self.stream_id)
                    raise
            await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    def _written(self) -> bool:
        framed = self._framed_in
        return framed is not None and self.conn._batch_written >= framed

    async def wait_send_all_might_not_block(self) -> None:
        while self.conn.protocol.send_window(self.stream_id) == 0 and not self._broken():
            await self._send_lot.park()

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("tunnel stream was closed")
        if not self._sent_eof:
            self._sent_eof = True
            self.conn.protocol.end_stream(self.stream_id)
            self.conn.wake_writer()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            proto = self.conn.protocol
            if not (self._eof and self._sent_eof) and self._reset_code is None:
                proto.reset(self.stream_id, ErrorCodes.CANCEL)
            # Whatever the local side will never read still holds connection window.
            unread = self._to_ack + sum(len(v) + pad for v, pad in self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self._to_ack = 0
            if unread:
                proto.acknowledge(self.stream_id, unread)
            proto.release(self.stream_id)
            self.conn._stream_done(self)
            self._recv_lot.unpark_all()
            self._send_lot.unpark_all()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return (
            f"<TunnelStream {self.stream_id} buffered={self._buffered} "
            f"eof={self._eof} sent_eof={self._sent_eof} reset={self._reset_code}>"
        )


# -- one connection ---------------------------------------------------------------------------

ConnectHandler = Callable[["TunnelConnection", TunnelStream, str], Awaitable[None]]
"""Server: serve one CONNECT (connection, its stream, the ``:authority``); must accept or refuse."""


class TunnelConnection:
    """One HTTP/2 tunnel connection over a TLS stream (either role); see the module docstring."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        protocol: TunnelProtocol,
        *,
        peer_cluster: str,
        options: TunnelOptions,
        metrics: GatewayMetrics | None = None,
        handler: ConnectHandler | None = None,
        generation: int = 0,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.peer_cluster = peer_cluster
        self.options = options
        self.metrics = metrics
        self.handler = handler
        self.generation = generation
        self.streams: dict[int, TunnelStream] = {}
        self.close_reason: str | None = None
        self.last_rtt: float | None = None
        self._wake = trio.Event()
        self._send_waiters: set[TunnelStream] = set()
        """Streams whose send_all waits for its bytes to be framed and written."""
        self._batch = 0
        self._batch_written = 0
        self._flush_lot = trio.lowlevel.ParkingLot()
        self._queued_gen = 0
        self._written_gen = 0
        self._done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_active = trio.current_time()
        self._drain_started: float | None = None
        self._ping_acked = trio.Event()
        self._writer_done = trio.Event()

    @property
    def role(self) -> Literal["client", "server"]:
        return self.protocol.role

    @property
    def closed(self) -> bool:
        return self._done.is_set() or self.protocol.closed is not None

    async def wait_closed(self) -> None:
        """Return once the connection has ended."""
        await self._done.wait()

    def usable(self) -> bool:
        """May the pool open a new stream here?"""
        return not self.closed and self.protocol.can_open()

    # -- writing ----------------------------------------------------------------------------

    def wake_writer(self) -> None:
        """Something was queued: let the writer run (a no-op if it is awake already)."""
        self._queued_gen += 1
        self._wake.set()

    def _wake_if_output(self) -> None:
        # Most reads and acknowledgements produce no output (h2 sends WINDOW_UPDATE only
        # past half a window): waking the writer for nothing costs a task switch each.
        if self.protocol.wants_write():
            self.wake_writer()

    async def flushed(self) -> None:
        """Wait until everything queued so far was written (or the connection ended)."""
        self.wake_writer()
        target = self._queued_gen
        while self._written_gen < target and not self._writer_done.is_set():
            await self._flush_lot.park()

    def _note_framed(self) -> list[TunnelStream]:
        """Waiting senders whose bytes are all in the batch being written."""
        proto = self.protocol
        done = [
            s for s in self._send_waiters if s._framed_in is None and not proto.queued(s.stream_id)
        ]
        for stream in done:
            stream._framed_in = self._batch
        return done

    async def _writer(self) -> None:
        try:
            while True:
                gen = self._queued_gen
                self._batch += 1
                data = self.protocol.data_to_send(WRITE_BATCH)
                framed = self._note_framed() if self._send_waiters else []
                if data:
                    await self.transport.send_all(data)
                self._batch_written = self._batch
                for stream in framed:
                    stream._send_lot.unpark_all()
                if data:
                    continue
                self._written_gen = gen
                self._flush_lot.unpark_all()
                if self.protocol.closed is not None:
                    return
                if self._queued_gen == gen:
                    await self._wake.wait()
                    self._wake = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._end("write_failed")
        finally:
            self._writer_done.set()
            self._flush_lot.unpark_all()

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.protocol.acknowledge(stream_id, n)
        self._wake_if_output()

    # -- reading ----------------------------------------------------------------------------

    async def _reader(self) -> None:
        first = True
        try:
            while not self.closed:
                if first and self.role == "server":
                    # A peer that finished TLS but never speaks HTTP/2 is cut at the deadline.
                    with trio.move_on_after(self.options.handshake_timeout):
                        data = await self.transport.receive_some(READ_SIZE)
                        first = False
                    if first:
                        self.protocol.close("preface_timeout")
                        self._end("preface_timeout")
                        return
                else:
                    data = await self.transport.receive_some(READ_SIZE)
                if not data:
                    self._end("peer_closed")
                    return
                events = self.protocol.receive_data(data, trio.current_time())
                for event in events:
                    self._dispatch(event)
                if self.protocol.pending_output > self.options.max_pending_output:
                    self.protocol.close("write_backlog", ErrorCodes.ENHANCE_YOUR_CALM)
                    self._end("write_backlog")
                self._wake_if_output()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._end("read_failed")

    def _dispatch(self, event: TunnelEvent) -> None:
        if isinstance(event, Data):
            self._last_active = trio.current_time()
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_data(event.data, event.flow_length)
            else:
                self.protocol.acknowledge(event.stream_id, event.flow_length)
        elif isinstance(event, WindowOpened):
            if event.stream_id is None:
                for s in self.streams.values():
                    s._on_window()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_window()
        elif isinstance(event, EndOfStream):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_eof()
        elif isinstance(event, StreamReset):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._on_reset(event.error_code)
        elif isinstance(event, ConnectResponse):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._response = event
                if event.status != 200:
                    stream._on_reset(int(ErrorCodes.REFUSED_STREAM))
                stream._recv_lot.unpark_all()
        elif isinstance(event, ConnectRequest):
            self._last_active = trio.current_time()
            stream = TunnelStream(self, event.stream_id)
            self.streams[event.stream_id] = stream
            if self.metrics is not None:
                self.metrics.tunnel_streams.labels(self.peer_cluster, self.role).inc()
            if self.handler is not None and self._nursery is not None:
                self._nursery.start_soon(self._serve_stream, stream, event.authority)
            else:
                self.protocol.refuse(event.stream_id, 503, "draining")
        elif isinstance(event, PingAcked):
            self.last_rtt = event.rtt
            if not self.protocol.outstanding_pings:
                self._ping_acked.set()
        elif isinstance(event, GoawayReceived):
            self._maybe_finish_drain()
        elif isinstance(event, StreamRefusedLocally):
            if self.metrics is not None:
                self.metrics.refuse("tunnel", event.reason)
        elif isinstance(event, ConnectionClosed):
            self._end(event.reason)

    async def _serve_stream(self, stream: TunnelStream, authority: str) -> None:
        assert self.handler is not None
        try:
            await self.handler(self, stream, authority)
        finally:
            await stream.aclose()

    # -- stream lifecycle --------------------------------------------------------------------

    async def open_stream(self, authority: str) -> TunnelStream:
        """Client: open a CONNECT stream and wait for the peer's answer."""
        sid = self.protocol.open_connect(authority)
        stream = TunnelStream(self, sid)
        self.streams[sid] = stream
        self._last_active = trio.current_time()
        if self.metrics is not None:
            self.metrics.tunnel_streams.labels(self.peer_cluster, self.role).inc()
        self.wake_writer()
        try:
            with trio.fail_after(self.options.stream_open_timeout):
                while stream._response is None and not stream._broken():
                    await stream._recv_lot.park()
        except trio.TooSlowError:
            await stream.aclose()
            raise TunnelError("tunnel_failed", "no answer to CONNECT in time") from None
        response = stream._response
        if response is None or response.status != 200:
            await stream.aclose()
            if response is not None:
                raise TunnelRefused(response.status, response.reason)
            if stream._reset_code == ErrorCodes.REFUSED_STREAM:
                raise TunnelError("draining", "peer refused the stream (draining)")
            raise TunnelError("tunnel_failed", f"connection ended ({self.close_reason})")
        return stream

    def accept(self, stream: TunnelStream) -> None:
        self.protocol.accept(stream.stream_id)
        self.wake_writer()

    def refuse(self, stream: TunnelStream, status: int, reason: str) -> None:
        self.protocol.refuse(stream.stream_id, status, reason)
        self.wake_writer()

    def _stream_done(self, stream: TunnelStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self._last_active = trio.current_time()
        self.wake_writer()
        self._maybe_finish_drain()

    def drain(self) -> None:
        """Graceful GOAWAY: running streams finish, then the connection closes."""
        if self.closed:
            return
        self.protocol.start_drain()
        self._drain_started = trio.current_time()
        self.wake_writer()
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if self.protocol.draining and not self.streams and not self.closed:
            self.protocol.close("drained")
            self._end("drained")

    def _end(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        for stream in list(self.streams.values()):
            stream._on_reset(int(ErrorCodes.CANCEL))
        self.wake_writer()
        self._flush_lot.unpark_all()
        self._ping_acked.set()
        self._done.set()

    async def _timers(self) -> None:
        opts = self.options
        while not self.closed:
            if self.role == "client":
                await trio.sleep(opts.keepalive_interval)
                if self.closed:
                    return
                if self.protocol.outstanding_pings:
                    # The previous PING got no answer in a whole interval: dead.
                    self._end("keepalive_timeout")
                    return
                self.protocol.ping(trio.current_time())
                self.wake_writer()
                with trio.move_on_after(opts.keepalive_timeout):
                    await self._ping_acked.wait()
                self._ping_acked = trio.Event()
                if self.protocol.outstanding_pings and not self.closed:
                    self._end("keepalive_timeout")
                    return
            else:
                await trio.sleep(min(opts.idle_timeout, 1.0))
            now = trio.current_time()
            if not self.streams and now - self._last_active >= opts.idle_timeout:
                self.drain()
            if self._drain_started is not None and now - self._drain_started >= opts.drain_timeout:
                self.protocol.close("drain_timeout")
                self._end("drain_timeout")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the connection ends; the transport is closed on return."""
        m = self.metrics
        if m is not None:
            m.tunnel_connections.labels(self.peer_cluster, self.role).inc()
            m.tunnel_connections_active.labels(self.peer_cluster, self.role).inc()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timers)
                task_status.started()
                await self._done.wait()
                # Let the writer send what is queued and the final GOAWAY, briefly: the
                # writer returns once the protocol is closed and its output written.
                self.protocol.close(self.close_reason or "local")
                self.wake_writer()
                with trio.move_on_after(1.0):
                    await self._writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._end(self.close_reason or "cancelled")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.transport)
            if m is not None:
                m.tunnel_connections_active.labels(self.peer_cluster, self.role).dec()
                m.tunnel_closes.labels(self.peer_cluster, self.role, self.close_reason).inc()

    def __repr__(self) -> str:
        return (
            f"<TunnelConnection {self.role} peer={self.peer_cluster} gen={self.generation} "
            f"streams={len(self.streams)} {self.protocol!r} closed={self.close_reason}>"
        )


# -- the client pool --------------------------------------------------------------------------

PeerKey = tuple[str, str, str, int]
"""(cluster, gateway_id, address, tunnel_port): one peer gateway."""


def peer_key(gw: GatewayRecord) -> PeerKey:
    assert gw.tunnel_port is not None
    return (gw.cluster, gw.gateway_id, gw.address, gw.tunnel_port)


class TunnelPool:
    """Client connections to peer gateways, one (or more, past MAX_CONCURRENT_STREAMS) each.

    ``await nursery.start(pool.run)`` hosts the connection tasks. :meth:`open_stream`
    is what the passthrough listener calls for an outbound route.
    """

    def __init__(
        self,
        tls: TlsContextHolder,
        *,
        options: TunnelOptions | None = None,
        metrics: GatewayMetrics | None = None,
        now_fn: Callable[[], dt.datetime] = _utc_now,
        rng: random.Random | None = None,
        connect: Callable[[str, int], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        self.tls = tls
        self.options = options or TunnelOptions()
        self.metrics = metrics
        self.now_fn = now_fn
        self.rng = rng or random.Random()
        self._connect = connect or self._tcp_connect
        self._conns: dict[PeerKey, list[TunnelConnection]] = {}
        self._locks: dict[PeerKey, trio.Lock] = {}
        self._down_until: dict[PeerKey, float] = {}
        self._dead: set[PeerKey] = set()
        self._nursery: trio.Nursery | None = None

    async def _tcp_connect(self, host: str, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def set_alive(self, key: PeerKey, alive: bool) -> None:
        """The prober's verdict. A dead peer's connections are dropped, new streams fail fast."""
        if alive:
            self._dead.discard(key)
            self._down_until.pop(key, None)
            return
        self._dead.add(key)
        for conn in self._conns.pop(key, []):
            conn.protocol.close("peer_dead")
            conn._end("peer_dead")

    def is_down(self, key: PeerKey) -> bool:
        return key in self._dead or self._down_until.get(key, -math.inf) > trio.current_time()

    def connections(self, key: PeerKey | None = None) -> list[TunnelConnection]:
        """Live connections (of one peer, or all), for stats and tests."""
        if key is not None:
            return [c for c in self._conns.get(key, []) if not c.closed]
        return [c for conns in self._conns.values() for c in conns if not c.closed]

    def rotate(self) -> int:
        """The SVID changed: drain every connection made with an older certificate."""
        drained = 0
        for conns in self._conns.values():
            for conn in conns:
                if conn.generation != self.tls.generation and not conn.protocol.draining:
                    conn.drain()
                    drained += 1
        return drained

    async def open_stream(
        self, gateways: tuple[GatewayRecord, ...], trust_domain: str, authority: str
    ) -> TunnelStream:
        """A CONNECT stream for ``authority`` through one of ``gateways`` (tried in turn).

        Raises :class:`PeerDown` when every gateway is down, :class:`TunnelRefused`
        when a peer refuses (no other gateway of the cluster would answer otherwise),
        or :class:`TunnelError`.
        """
        order = list(gateways)
        self.rng.shuffle(order)
        order.sort(key=lambda gw: self.is_down(peer_key(gw)))
        last: TunnelError = PeerDown("peer_down", "no gateway to try")
        for gw in order:
            key = peer_key(gw)
            if self.is_down(key):
                last = PeerDown("peer_down", f"{gw.cluster}/{gw.gateway_id} is down")
                continue
            for _ in range(2):  # one retry when a draining connection refuses the stream
                try:
                    conn = await self._connection(key, trust_domain)
                    return await conn.open_stream(authority)
                except TunnelRefused:
                    raise
                except PeerDown as exc:
                    last = exc
                    break
                except TunnelError as exc:
                    last = exc
                    if exc.reason != "draining":
                        break
        raise last

    async def _connection(self, key: PeerKey, trust_domain: str) -> TunnelConnection:
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            conns = [c for c in self._conns.get(key, []) if not c.closed]
            self._conns[key] = conns
            for conn in conns:
                if conn.usable() and conn.generation == self.tls.generation:
                    return conn
            if self.is_down(key):
                raise PeerDown("peer_down", f"{key[0]}/{key[1]} is down")
            conn = await self._dial(key, trust_domain)
            conns.append(conn)
            return conn

    async def _dial(self, key: PeerKey, trust_domain: str) -> TunnelConnection:
        cluster, _, host, port = key
        assert self._nursery is not None, "start the pool with nursery.start(pool.run)"
        expected = {gateway_id(TrustDomain(trust_domain))}
        generation = self.tls.generation
        try:
            with trio.fail_after(self.options.connect_timeout):
                tcp = await self._connect(host, port)
                tls_stream = self.tls.wrap_client(tcp, f"{cluster}.gateway.meshfed")
                await handshake_and_verify(
                    tls_stream,
                    self.tls.bundles,
                    self.now_fn,
                    expected=expected,
                    handshake_timeout=self.options.connect_timeout,
                )
        except HandshakeRefused as exc:
            self._failed(key, exc.reason)
            raise PeerDown("peer_down", f"handshake with {cluster} refused: {exc.reason}") from exc
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self._failed(key, "connect_failed")
            raise PeerDown("peer_down", f"cannot reach {cluster} at {host}:{port}: {exc}") from exc
        conn = TunnelConnection(
            tls_stream,
            TunnelProtocol("client"),
            peer_cluster=cluster,
            options=self.options,
            metrics=self.metrics,
            generation=generation,
        )
        await self._nursery.start(conn.run)
        return conn

    def _failed(self, key: PeerKey, reason: str) -> None:
        self._down_until[key] = trio.current_time() + self.options.down_for
        if self.metrics is not None:
            self.metrics.handshake_failures.labels("client", key[0], reason).inc()

    def __repr__(self) -> str:
        return f"<TunnelPool peers={len(self._conns)} conns={len(self.connections())}>"


# -- the server -------------------------------------------------------------------------------


def cluster_of_trust_domain(
    catalog: Catalog | None,
    trust_domain: str,
    configured: Mapping[str, str] | None = None,
) -> str | None:
    """The cluster that names ``trust_domain`` (None if none or ambiguous).

    The catalog's ClusterRecords say it first; ``configured`` (cluster -> trust domain
    from the deployment config) fills in clusters without a record, so a peer whose
    agent lost its lease (a partition from the store, BAD_INPUTS 27) is still known
    while its data plane works, as the sidecar does for inbound policy.

    With shared trust domains a gateway SVID does not say which cluster it is, so
    the tunnel refuses such peers rather than guess (docs/gateway.md).
    """
    domains = dict(configured or {})
    if catalog is not None:
        for view in catalog.clusters.values():
            if view.record is not None:
                domains[view.name] = view.record.trust_domain
    found = [name for name, td in domains.items() if td == trust_domain]
    return found[0] if len(found) == 1 else None


async def serve_tunnel(
    listeners: list[trio.SocketListener],
    tls: TlsContextHolder,
    catalog_fn: Callable[[], Catalog | None],
    handler: ConnectHandler,
    *,
    options: TunnelOptions | None = None,
    metrics: GatewayMetrics | None = None,
    now_fn: Callable[[], dt.datetime] = _utc_now,
    connections: set[TunnelConnection] | None = None,
    handler_nursery: trio.Nursery | None = None,
    trust_domains: Mapping[str, str] | None = None,
    local_cluster: str | None = None,
) -> None:
    """Accept peer gateways on ``listeners`` until cancelled.

    ``trust_domains`` (cluster -> trust domain, from the deployment config) maps a
    peer to its cluster when the catalog has no record for it
    (:func:`cluster_of_trust_domain`); ``local_cluster`` is refused as a peer even
    before the first catalog.

    ``connections`` (if given) holds the live server connections, so the runner can
    drain them on shutdown or certificate rotation; ``handler_nursery`` (if given)
    runs the connections, so cancelling this accept loop leaves them running.
    """
    opts = options or TunnelOptions()
    live = connections if connections is not None else set()

    async def serve_one(tcp: trio.SocketStream) -> None:
        stream = tls.wrap_server(tcp)
        local = catalog_fn()
        expected = {gateway_id(td) for td in tls.bundles}
        try:
            peer = await handshake_and_verify(
                stream,
                tls.bundles,
                now_fn,
                expected=expected,
                handshake_timeout=opts.handshake_timeout,
            )
        except HandshakeRefused as exc:
            if metrics is not None:
                metrics.handshake_failures.labels("server", "unknown", exc.reason).inc()
            log.info(
                "tunnel handshake refused",
                extra={"event": "handshake_refused", "reason": exc.reason, "detail": exc.detail},
            )
            return
        td = peer.spiffe_id.trust_domain.name
        cluster = cluster_of_trust_domain(local, td, trust_domains)
        own = local.local_cluster if local is not None else local_cluster
        if cluster is None or cluster in (own, local_cluster):
            if metrics is not None:
                metrics.handshake_failures.labels("server", "unknown", "unknown_peer_cluster").inc()
            await trio.aclose_forcefully(stream)
            return
        conn = TunnelConnection(
            stream,
            TunnelProtocol("server"),
            peer_cluster=cluster,
            options=opts,
            metrics=metrics,
            handler=handler,
            generation=tls.generation,
        )
        live.add(conn)
        try:
            await conn.run()
        finally:
            live.discard(conn)

    async def guarded(tcp: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await serve_one(tcp)

    await trio.serve_listeners(guarded, listeners, handler_nursery=handler_nursery)
