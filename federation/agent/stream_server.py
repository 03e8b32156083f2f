"""The agent's catalog-stream server: the trio adapter around :mod:`stream_protocol`.

``await nursery.start(serve_catalog_stream, source, registrar, signer, tls, host, port)``
listens on TCP, and for each connection: TLS 1.3 (client certificate optional, so the
bootstrap CSR path can exist; every other request needs one, decided per request by
the protocol core), :func:`trust.tls.handshake_and_verify_optional` before any byte of
HTTP/2 is read, then one reader task (bytes -> ``ServerProtocol`` -> requests), one
writer task (the only one that writes to the socket) and one task per catalog
subscription. Everything that decides is in the sans-IO core; this module only waits.

Connections are bounded in total, per remote address before the handshake, and per
SPIFFE ID after it. A connection with no catalog stream open that sends nothing for
``idle_timeout`` is closed with GOAWAY. When a connection ends, everything it
registered is withdrawn (``registrar.drop_owner``), even on cancellation.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from cryptography.hazmat.primitives import serialization

from federation.agent.contracts import CatalogSource, EndpointRegistrar, SvidSigner
from federation.agent.stream_protocol import (
    PEM_CHAIN,
    DeregisterEndpoint,
    RegisterEndpoint,
    Request,
    ServerProtocol,
    SignCsr,
    StreamGone,
    StreamLimits,
    Subscribe,
    SubscriptionStatistics,
)
from federation.jointoken import JoinTokenError, JoinTokenFile
from federation.stream_codec import Heartbeat, Snapshot, Synced, encode
from trust.errors import CsrRefused, HandshakeRefused, TrustError
from trust.revocation import RevocationSet
from trust.spiffe import SpiffeId
from trust.tls import TlsContextHolder, handshake_and_verify_optional, server_context

__all__ = [
    "CatalogStreamServer",
    "ServerStatistics",
    "StreamServerConfig",
    "serve_catalog_stream",
]

log = logging.getLogger("meshfed.agent.stream")


@dataclass(frozen=True, slots=True)
class StreamServerConfig:
    """Timing and connection limits of the stream server."""

    limits: StreamLimits = field(default_factory=StreamLimits)
    """Per-connection protocol limits (body cap, queue bound, h2 settings)."""
    heartbeat_interval: float = 5.0
    """Seconds between heartbeats on a quiet subscription; clients drop a stream silent
    for a few of these."""
    handshake_timeout: float = 10.0
    """Seconds a peer gets to finish the TLS handshake (BAD_INPUTS 11)."""
    idle_timeout: float = 60.0
    """A connection without a catalog stream that sends nothing this long is closed."""
    max_connections: int = 4096
    """Open connections in total; more are closed at once."""
    max_connections_per_address: int = 256
    """Open connections from one remote address (checked before the handshake)."""
    max_connections_per_identity: int = 16
    """Open connections per SPIFFE ID (anonymous bootstrap callers share one budget)."""
    drop_owner_timeout: float = 10.0
    """How long withdrawing a closed connection's endpoints may take."""
    read_size: int = 64 * 1024
    """Bytes per receive call."""


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """Counters for metrics and tests."""

    open_connections: int
    """Connections past the handshake and still open."""
    accepted: int
    """Connections that passed the handshake, ever."""
    handshake_refusals: dict[str, int]
    """Refused handshakes by ``HandshakeRefused.reason``."""
    limit_refusals: dict[str, int]
    """Connections closed for a connection limit, by limit."""
    request_refusals: dict[str, int]
    """Refused requests by ``meshfed-reason`` (closed connections included)."""
    close_reasons: dict[str, int]
    """Why connections closed (guard or h2 reason, ``idle_timeout``, ``eof``)."""
    svids_issued: int
    """CSRs signed."""
    subscriptions: tuple[SubscriptionStatistics, ...]
    """Open subscriptions on every connection."""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CatalogStreamServer:
    """Serves connections; :func:`serve_catalog_stream` runs it on a TCP listener and
    tests call :meth:`handle_connection` with any ``trio.abc.Stream``."""

    def __init__(
        self,
        source: CatalogSource,
        registrar: EndpointRegistrar,
        signer: SvidSigner,
        tls: TlsContextHolder,
        *,
        join_tokens: JoinTokenFile | None = None,
        config: StreamServerConfig | None = None,
        now_fn: Callable[[], dt.datetime] = _utc_now,
        token_clock: Callable[[], float] = time.time,
        revoked_fn: Callable[[], RevocationSet | None] = lambda: None,
    ) -> None:
        self.source = source
        self.registrar = registrar
        self.signer = signer
        self.tls = tls
        self.join_tokens = join_tokens
        self.config = config or StreamServerConfig()
        self.now_fn = now_fn
        self.token_clock = token_clock
        """Wall clock for join-token expiry: tokens outlive restarts, so not trio time."""
        self.revoked_fn = revoked_fn
        self.cluster = source.snapshot().local_cluster
        self.port: int | None = None
        """The bound port, once :func:`serve_catalog_stream` is listening."""
        self._ctx: tuple[int, ssl.SSLContext] | None = None
        self._serial = itertools.count(1)
        self._live: set[_Connection] = set()
        self._per_address: collections.Counter[str] = collections.Counter()
        self._per_identity: collections.Counter[str] = collections.Counter()
        self._accepted = 0
        self._handshake_refusals: collections.Counter[str] = collections.Counter()
        self._limit_refusals: collections.Counter[str] = collections.Counter()
        self._request_refusals: collections.Counter[str] = collections.Counter()
        self._close_reasons: collections.Counter[str] = collections.Counter()
        self._svids_issued = 0
        self._snapshot_cache: tuple[str, int, bytes] | None = None

    def _server_context(self) -> ssl.SSLContext:
        # The holder's own server context requires a client certificate; this API
        # needs one that only asks for it. Rebuilt when the holder's SVID or bundles are.
        generation = self.tls.generation
        if self._ctx is None or self._ctx[0] != generation:
            ctx = server_context(self.tls.svid, self.tls.bundles, client_cert="optional")
            self._ctx = (generation, ctx)
        return self._ctx[1]

    def snapshot_line(self) -> tuple[int, bytes]:
        """The current snapshot, encoded once per version however many subscribers need it."""
        src = self.source
        cached = self._snapshot_cache
        if cached is None or cached[0] != src.epoch or cached[1] != src.version:
            catalog = src.snapshot()
            cached = (catalog.epoch, catalog.version, encode(Snapshot(catalog.version, catalog)))
            self._snapshot_cache = cached
        return cached[1], cached[2]

    def statistics(self) -> ServerStatistics:
        refusals = collections.Counter(self._request_refusals)
        subs: list[SubscriptionStatistics] = []
        for conn in self._live:
            stats = conn.proto.statistics() if conn.proto is not None else None
            if stats is not None:
                refusals.update(stats.refusals)
                subs.extend(stats.subscriptions)
        return ServerStatistics(
            open_connections=len(self._live),
            accepted=self._accepted,
            handshake_refusals=dict(self._handshake_refusals),
            limit_refusals=dict(self._limit_refusals),
            request_refusals=dict(refusals),
            close_reasons=dict(self._close_reasons),
            svids_issued=self._svids_issued,
            subscriptions=tuple(subs),
        )

    async def handle_listener_stream(self, stream: trio.SocketStream) -> None:
        """``trio.serve_listeners`` handler: :meth:`handle_connection` with the peer address."""
        try:
            address = str(stream.socket.getpeername()[0])
        except OSError:
            address = None
        await self.handle_connection(stream, address)

    async def handle_connection(
        self, transport: trio.abc.Stream, peer_address: str | None = None
    ) -> None:
        """Serve one connection to its end; never raises for anything the peer does."""
        cfg = self.config
        # Every connection, from accept to close, is counted under its address.
        open_total = sum(self._per_address.values())
        if open_total >= cfg.max_connections:
            self._limit_refusals["max_connections"] += 1
            await trio.aclose_forcefully(transport)
            return
        address = peer_address or "-"
        if peer_address is not None and (
            self._per_address[address] >= cfg.max_connections_per_address
        ):
            self._limit_refusals["max_connections_per_address"] += 1
            await trio.aclose_forcefully(transport)
            return
        self._per_address[address] += 1
        try:
            await self._handshake_and_serve(transport)
        finally:
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    async def _handshake_and_serve(self, transport: trio.abc.Stream) -> None:
        cfg = self.config
        stream = trio.SSLStream(transport, self._server_context(), server_side=True)
        try:
            verified = await handshake_and_verify_optional(
                stream,
                self.tls.bundles,
                self.now_fn,
                revoked=self.revoked_fn(),
                handshake_timeout=cfg.handshake_timeout,
            )
        except HandshakeRefused as exc:
            self._handshake_refusals[exc.reason] += 1
            log.info("catalog stream handshake refused: %s (%s)", exc.reason, exc.detail)
            return
        peer = verified.spiffe_id if verified is not None else None
        identity = str(peer) if peer is not None else "anonymous"
        if self._per_identity[identity] >= cfg.max_connections_per_identity:
            self._limit_refusals["max_connections_per_identity"] += 1
            await trio.aclose_forcefully(stream)
            return
        self._per_identity[identity] += 1
        self._accepted += 1
        conn = _Connection(self, stream, peer, f"{identity}#{next(self._serial)}")
        self._live.add(conn)
        try:
            await conn.run()
        finally:
            self._live.discard(conn)
            self._per_identity[identity] -= 1
            if self._per_identity[identity] <= 0:
                del self._per_identity[identity]
            if conn.proto is not None:
                self._request_refusals.update(conn.proto.statistics().refusals)
            self._close_reasons[conn.close_reason] += 1
            if conn.registered:
                # Shielded: a cancelled server must still withdraw what the peer owned,
                # or its endpoints would live on until their lease expired.
                with trio.CancelScope(shield=True), trio.move_on_after(cfg.drop_owner_timeout):
                    try:
                        await self.registrar.drop_owner(conn.owner)
                    except Exception:
                        log.exception("drop_owner(%s) failed", conn.owner)


class _Connection:
    """The tasks of one connection around its ``ServerProtocol``."""

    def __init__(
        self,
        server: CatalogStreamServer,
        stream: trio.SSLStream[trio.abc.Stream],
        peer: SpiffeId | None,
        owner: str,
    ) -> None:
        self.server = server
        self.stream = stream
        self.owner = owner
        """The registrar's owner id for everything this connection registers."""
        self.registered = False
        self.close_reason = "eof"
        self.proto: ServerProtocol | None = ServerProtocol(
            peer=peer,
            trust_domain=server.signer.trust_domain,
            cluster=server.cluster,
            limits=server.config.limits,
        )
        self._wake = trio.Event()
        self._resynced = trio.Event()
        self._subs: dict[int, trio.CancelScope] = {}

    def wake(self) -> None:
        """Tell the writer there may be something to send."""
        self._wake.set()

    async def run(self) -> None:
        proto = self.proto
        assert proto is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, nursery.cancel_scope)
                self.wake()  # our SETTINGS preface
                try:
                    await self._reader(nursery)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.close_reason = "broken"
                nursery.cancel_scope.cancel()
        finally:
            if proto.closed is not None:
                self.close_reason = proto.closed
            # Best effort: the GOAWAY (if any) and close_notify, then close.
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    data = proto.data_to_send()
                    if data:
                        await self.stream.send_all(data)
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass
            await trio.aclose_forcefully(self.stream)

    async def _reader(self, nursery: trio.Nursery) -> None:
        proto = self.proto
        assert proto is not None
        cfg = self.server.config
        while proto.closed is None:
            timeout = math.inf if proto.has_subscriptions else cfg.idle_timeout
            with trio.move_on_after(timeout) as scope:
                data = await self.stream.receive_some(cfg.read_size)
            if scope.cancelled_caught:
                proto.close(reason="idle_timeout")
                return
            if not data:
                return
            for request in proto.receive_data(bytes(data), trio.current_time()):
                self._dispatch(nursery, request)
            self.wake()

    async def _writer(self, connection_scope: trio.CancelScope) -> None:
        try:
            await self._write_loop()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = "broken"
        # Nothing more can be written (or the GOAWAY is out): end the connection.
        connection_scope.cancel()

    async def _write_loop(self) -> None:
        proto = self.proto
        assert proto is not None
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            more = True
            while more:
                resynced = False
                for sid in proto.resync_ready():
                    self._resync(sid)
                    resynced = True
                if resynced:
                    self._resynced.set()
                    self._resynced = trio.Event()
                more = proto.pump()
                data = proto.data_to_send()
                if data:
                    await self.stream.send_all(data)
                if proto.closed is not None:
                    return
                # Draining may have just made a stale subscription ready for its
                # snapshot; the peer owes us no WINDOW_UPDATE to say so.
                more = more or bool(proto.resync_ready())

    def _resync(self, sid: int) -> None:
        proto = self.proto
        assert proto is not None
        version, line = self.server.snapshot_line()
        lines = [line]
        if self.server.source.synced:
            lines.append(encode(Synced(version)))
        proto.resync(sid, lines, version)

    def _dispatch(self, nursery: trio.Nursery, request: Request) -> None:
        if isinstance(request, Subscribe):
            scope = trio.CancelScope()
            self._subs[request.stream_id] = scope
            nursery.start_soon(self._subscription, request, scope)
        elif isinstance(request, StreamGone):
            gone = self._subs.pop(request.stream_id, None)
            if gone is not None:
                gone.cancel()
        elif isinstance(request, RegisterEndpoint):
            self.registered = True
            nursery.start_soon(self._register, request)
        elif isinstance(request, DeregisterEndpoint):
            nursery.start_soon(self._deregister, request)
        else:
            self._sign(request)

    # -- request handlers ------------------------------------------------------------

    async def _register(self, request: RegisterEndpoint) -> None:
        proto = self.proto
        assert proto is not None
        try:
            await self.server.registrar.register(request.record, self.owner)
        except Exception as exc:
            log.exception("registrar refused %s", request.record.key())
            proto.refuse(request.stream_id, 503, "registrar_failed", repr(exc))
        else:
            proto.respond(request.stream_id, 204)
        self.wake()

    async def _deregister(self, request: DeregisterEndpoint) -> None:
        proto = self.proto
        assert proto is not None
        try:
            await self.server.registrar.deregister(request.key, self.owner)
        except Exception as exc:
            log.exception("registrar failed to withdraw %s", request.key)
            proto.refuse(request.stream_id, 503, "registrar_failed", repr(exc))
        else:
            proto.respond(request.stream_id, 204)
        self.wake()

    def _sign(self, request: SignCsr) -> None:
        # Synchronous on purpose: between checking and burning a token there is no
        # checkpoint, so two connections racing with one token cannot both win.
        proto = self.proto
        assert proto is not None
        server = self.server
        sid = request.stream_id
        try:
            if request.join_token is not None:
                if server.join_tokens is None:
                    proto.refuse(sid, 401, "join_tokens_disabled", "this agent takes no tokens")
                    return
                now = server.token_clock()
                identity = server.join_tokens.check(request.join_token, now)
                if identity != request.spiffe_id:
                    proto.refuse(
                        sid,
                        403,
                        "identity_mismatch",
                        f"the token is for {identity}, the CSR asks for {request.spiffe_id}",
                    )
                    return
                server.join_tokens.redeem(request.join_token, now)
            chain = server.signer.sign(request.csr_pem, request.spiffe_id)
        except JoinTokenError as exc:
            proto.refuse(sid, 403, f"token_{exc.reason}", exc.detail)
            return
        except CsrRefused as exc:
            proto.refuse(sid, 400, "csr_refused", str(exc))
            return
        except (TrustError, OSError) as exc:
            log.exception("signing a CSR for %s failed", request.spiffe_id)
            proto.refuse(sid, 503, "signer_failed", repr(exc))
            return
        finally:
            self.wake()
        server._svids_issued += 1
        body = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        proto.respond(sid, 200, body, PEM_CHAIN)

    async def _subscription(self, request: Subscribe, scope: trio.CancelScope) -> None:
        proto = self.proto
        assert proto is not None
        src = self.server.source
        sid = request.stream_id
        heartbeat = self.server.config.heartbeat_interval
        with scope:
            first = None
            if request.epoch is not None and request.version is not None:
                first = src.changes_since(request.version, request.epoch)
            if first is not None:
                proto.enqueue(sid, encode(first), first.to_version)
            else:
                snap_version, snap_line = self.server.snapshot_line()
                proto.enqueue(sid, snap_line, snap_version)
            synced_sent = False
            degraded_sent = False
            while True:
                if proto.is_stale(sid):
                    self.wake()
                    await self._resynced.wait()
                    continue
                held = proto.subscription_version(sid)
                if held is None:
                    return
                version = held
                synced, degraded = src.synced, src.degraded
                if src.version != version:
                    delta = src.changes_since(version, src.epoch)
                    if delta is None:
                        version, line = self.server.snapshot_line()
                    else:
                        version, line = delta.to_version, encode(delta)
                    if not proto.enqueue(sid, line, version):
                        continue
                if synced and not synced_sent:
                    synced_sent = proto.enqueue(sid, encode(Synced(version)))
                if degraded != degraded_sent and proto.enqueue(
                    sid, encode(Heartbeat(version, degraded))
                ):
                    degraded_sent = degraded
                self.wake()
                with trio.move_on_after(heartbeat) as quiet:
                    await src.wait_changed(version, synced, degraded)
                if quiet.cancelled_caught:
                    proto.enqueue(sid, encode(Heartbeat(version, src.degraded)))
                    self.wake()


async def serve_catalog_stream(
    source: CatalogSource,
    registrar: EndpointRegistrar,
    signer: SvidSigner,
    tls: TlsContextHolder,
    host: str | None,
    port: int,
    *,
    join_tokens: JoinTokenFile | None = None,
    config: StreamServerConfig | None = None,
    task_status: trio.TaskStatus[CatalogStreamServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (port 0 picks one) and serve until cancelled.

    ``task_status.started`` gets the :class:`CatalogStreamServer`; its ``port`` is the
    bound port and ``statistics()`` its counters.
    """
    server = CatalogStreamServer(
        source, registrar, signer, tls, join_tokens=join_tokens, config=config
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    sock = listeners[0].socket
    server.port = int(sock.getsockname()[1])
    log.info("catalog stream listening on %s:%d", host or "*", server.port)
    task_status.started(server)
    await trio.serve_listeners(server.handle_listener_stream, listeners)
