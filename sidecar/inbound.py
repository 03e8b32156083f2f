"""Inbound: the workload's mTLS listener; verify, admit, rate-limit, relay to the app.

Per accepted connection, in this order (each refusal is counted in
``meshfed_sidecar_inbound_refusals_total{reason}`` and logged as one JSON line):

1. connection limit (``max_connections``), before spending any CPU on TLS;
2. a peer that connects and closes without a byte is an active health probe:
   closed quietly, not a refusal;
3. :func:`trust.tls.handshake_and_verify` of the caller (no client cert,
   untrusted domain, forged cross-domain SVID, revoked, expired, timeout...:
   the trust layer's stable reasons);
4. admission (:class:`sidecar.authz.InboundPolicy`): SNI, served service,
   source cluster vs the caller's trust domain, authorization policies;
5. per-caller connection rate limit (:class:`sidecar.ratelimit.RateLimiter`);
6. connect to the local app (``app_unavailable`` if it does not answer);
7. relay, inside the revocation enforcer's scope for the caller, so a later
   revocation closes it.

The SNI the caller sent is captured server-side by ``SSLContext.sni_callback``,
per connection: the callback receives the connection's ``ssl.SSLObject``, which
keys a weak map read after the handshake.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from sidecar.authz import InboundPolicy, Refuse
from sidecar.metrics import SidecarMetrics, log_event
from sidecar.ratelimit import RateLimiter
from sidecar.relay import RelayEnd, RelayStats, relay
from sidecar.tlshalfclose import HalfCloseTls
from trust.enforcement import RevocationEnforcer
from trust.errors import HandshakeRefused
from trust.tls import DEFAULT_HANDSHAKE_TIMEOUT, TlsContextHolder, handshake_and_verify
from trust.validate import VerifiedPeer

if TYPE_CHECKING:  # the HTTP layer (h11, h2) loads only with an HTTP port (sidecar/runner.py)
    from sidecar.http.server import InboundHttp, InboundTarget

__all__ = ["InboundServer", "InboundSettings", "capture_sni", "serve_inbound", "sni_of"]

_SNI: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def _remember_sni(obj: object, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    if server_name is not None:
        _SNI[obj] = server_name


def capture_sni(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Install the SNI-capturing callback on a server context (idempotent); returns it.

    TlsContextHolder builds fresh contexts on every SVID/bundle update, so this is
    applied to whichever context is current at wrap time.
    """
    if ctx.sni_callback is not _remember_sni:
        ctx.sni_callback = _remember_sni
    return ctx


def sni_of(stream: trio.SSLStream[trio.abc.Stream]) -> str | None:
    """The SNI the client sent on ``stream`` (after its handshake), if any.

    ``_ssl_object`` is trio's private attribute holding the ``ssl.SSLObject``;
    trust/tls.py reads it the same way for the peer chain.
    """
    obj = getattr(stream, "_ssl_object", None)
    return _SNI.get(obj) if obj is not None else None


@dataclass(frozen=True, slots=True)
class InboundSettings:
    """Limits of the inbound listener."""

    local_cluster: str
    """This workload's cluster (metrics label)."""
    max_connections: int = 1024
    """Concurrent inbound connections (handshakes included)."""
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    """A caller must finish its handshake within this."""
    app_connect_timeout: float = 1.0
    """Connecting to the local app."""
    idle_timeout: float = 3600.0
    """Close a relay with no traffic for this long."""


_PROBE_PEEK: Final = socket.MSG_PEEK


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class InboundServer:
    """The inbound listener's state and per-connection handler."""

    def __init__(
        self,
        settings: InboundSettings,
        holder: TlsContextHolder,
        enforcer: RevocationEnforcer,
        policy: InboundPolicy,
        limiter: RateLimiter[str],
        metrics: SidecarMetrics,
        *,
        now_fn: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        self.settings = settings
        self.holder = holder
        self.enforcer = enforcer
        self.policy = policy
        self.limiter = limiter
        self.metrics = metrics
        self.relay_stats = RelayStats()
        self.active = 0
        self.probes = 0
        self._now_fn = now_fn
        self.http: InboundHttp | None = None
        """Serves HTTP ports (set by the runner when the workload serves any)."""
        self.http_targets: Mapping[tuple[str, str, int], InboundTarget] = {}
        """HTTP ports by (namespace, service, port): these get HTTP/2, not a relay."""

    async def _is_probe(self, stream: trio.abc.Stream) -> bool:
        """True if the peer closed without sending a byte (a TCP health probe)."""
        if not isinstance(stream, trio.SocketStream):
            return False
        sock = stream.socket
        with trio.move_on_after(self.settings.handshake_timeout):
            try:
                return await sock.recv(1, _PROBE_PEEK) == b""
            except OSError:
                return True
        return False  # stalled: let the handshake timeout deal with it

    async def handle(self, transport: trio.abc.Stream) -> None:
        """Serve one accepted connection (any trio stream: sockets, or memory in tests)."""
        m = self.metrics
        if self.active >= self.settings.max_connections:
            m.refuse_inbound("max_connections")
            await trio.aclose_forcefully(transport)
            return
        self.active += 1
        try:
            await self._handle(transport)
        finally:
            self.active -= 1

    async def _handle(self, transport: trio.abc.Stream) -> None:
        m = self.metrics
        if await self._is_probe(transport):
            self.probes += 1
            await trio.aclose_forcefully(transport)
            return
        tls = trio.SSLStream(transport, capture_sni(self.holder.server), server_side=True)
        try:
            peer = await handshake_and_verify(
                tls,
                self.holder.bundles,
                self._now_fn,
                revoked=self.enforcer.revoked,
                handshake_timeout=self.settings.handshake_timeout,
            )
        except HandshakeRefused as exc:
            m.refuse_inbound(exc.reason, detail=exc.detail)
            return
        sni = sni_of(tls)
        decision = self.policy.admit(sni, peer.spiffe_id)
        if isinstance(decision, Refuse):
            m.refuse_inbound(
                decision.reason, caller=str(peer.spiffe_id), sni=sni, detail=decision.detail
            )
            await trio.aclose_forcefully(tls)
            return
        caller = str(peer.spiffe_id)
        if not self.limiter.try_acquire(caller, trio.current_time()):
            m.refuse_inbound("rate_limited", caller=caller, sni=sni)
            await trio.aclose_forcefully(tls)
            return
        served = decision.served
        target = self.http_targets.get((served.namespace, served.service, served.port))
        if target is not None and self.http is not None:
            await self._serve_http(tls, peer, decision.sni.source_cluster, target)
            return
        try:
            with trio.fail_after(self.settings.app_connect_timeout):
                app = await trio.open_tcp_stream(served.app_host, served.app_port)
        except (OSError, trio.TooSlowError) as exc:
            m.refuse_inbound("app_unavailable", caller=caller, sni=sni, detail=str(exc))
            await trio.aclose_forcefully(tls)
            return
        service = f"{served.service}.{served.namespace}"
        labels = (
            "inbound",
            decision.sni.source_cluster,
            self.settings.local_cluster,
            service,
            "inbound",
        )
        m.opened.labels(*labels).inc()
        m.active.labels("inbound", service).inc()
        result = None
        try:
            with self.enforcer.track(peer):
                result = await relay(
                    HalfCloseTls(tls),
                    app,
                    idle_timeout=self.settings.idle_timeout,
                    stats=self.relay_stats,
                )
        finally:
            m.active.labels("inbound", service).dec()
            m.closed.labels(*labels).inc()
            if result is not None:
                m.sent.labels(*labels).inc(result.bytes_a_to_b)
                m.received.labels(*labels).inc(result.bytes_b_to_a)
            log_event(
                "connection",
                direction="inbound",
                source_cluster=decision.sni.source_cluster,
                destination_cluster=self.settings.local_cluster,
                destination_service=service,
                caller=caller,
                rule=decision.rule,
                end=result.reason.value if result is not None else RelayEnd.CANCELLED.value,
                bytes_in=result.bytes_a_to_b if result is not None else None,
                bytes_out=result.bytes_b_to_a if result is not None else None,
            )

    async def _serve_http(
        self,
        tls: trio.SSLStream[trio.abc.Stream],
        peer: VerifiedPeer,
        source_cluster: str,
        target: InboundTarget,
    ) -> None:
        """An admitted caller on an HTTP port: HTTP/2 per request to the app
        (docs/http.md); the connection still counts as one inbound connection."""
        assert self.http is not None
        m = self.metrics
        labels = ("inbound", source_cluster, self.settings.local_cluster, target.service, "inbound")
        m.opened.labels(*labels).inc()
        m.active.labels("inbound", target.service).inc()
        try:
            with self.enforcer.track(peer):
                await self.http.serve(tls, target, source_cluster)
        finally:
            m.active.labels("inbound", target.service).dec()
            m.closed.labels(*labels).inc()


async def serve_inbound(
    server: InboundServer,
    host: str,
    port: int,
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port``; handlers run in ``handler_nursery`` (see serve_outbound)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)
    await trio.serve_listeners(server.handle, listeners, handler_nursery=handler_nursery)
