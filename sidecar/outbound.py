"""Outbound: one local listener per upstream; pick, connect with inner mTLS, relay.

The trio adapter around the pure cores (``routing``, ``balancer``, ``outlier``,
``health``). An :class:`UpstreamPool` holds one upstream's balancer, outlier
detector and active health checks; :meth:`UpstreamPool.connect` runs the
connect plan for one new app connection:

* picks come from :func:`~sidecar.balancer.connect_attempts` (locality tiers,
  spillover, P2C), each excluding those already tried, so a retry stays in the
  tier while it has another candidate and then spills to the next;
* each attempt is TCP connect + inner TLS (SNI = the candidate's MeshSni) +
  SPIFFE check of the peer against the candidate's expected IDs, all within the
  service's connect timeout;
* a failed attempt is reported to outlier detection (``CONNECT``) and retried
  on the next pick, within ``budget`` attempts and ``budget x connect timeout``
  overall, BEFORE the app sees anything: the app's connection was accepted but
  not a byte was read from it, so a retry is invisible to it. Only when every
  attempt failed is the app's connection reset.

Active health checks are TCP connects to each candidate's connect target (the
destination sidecar's inbound port, or the gateway's listener); the inbound
side recognises such a probe (connect, then close without a byte) and does not
count it as a refusal. Effective health = catalog AND active AND not ejected
(``sidecar.health.EndpointHealth``), pushed into the balancer on every change.
Catalog updates replace the candidate set (:meth:`UpstreamPool.update`) without
touching live connections: a live relay holds its own streams.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import trio

from federation.model import Locality
from sidecar.balancer import Balancer, BalancerConfig, connect_attempts
from sidecar.health import ActiveHealthCheck, CheckResult, EndpointHealth, HealthCheckConfig
from sidecar.http.circuit import report_response
from sidecar.metrics import SidecarMetrics, log_event
from sidecar.outlier import (
    Ejected,
    FailureKind,
    OutlierConfig,
    OutlierDetector,
    OutlierEvent,
)
from sidecar.outlier import Returned as _Returned
from sidecar.relay import RelayEnd, RelayStats, relay
from sidecar.routing import Candidate, RouteTable
from sidecar.tlshalfclose import HalfCloseTls
from trust.enforcement import RevocationEnforcer
from trust.errors import HandshakeRefused
from trust.spiffe import SpiffeId
from trust.tls import TlsContextHolder, handshake_and_verify
from trust.validate import VerifiedPeer

__all__ = ["Connected", "DialFailed", "PoolSettings", "UpstreamPool", "serve_outbound"]

_LINGER_ABORT: Final = b"\x01\x00\x00\x00\x00\x00\x00\x00"


class DialFailed(Exception):
    """:meth:`UpstreamPool.dial` failed; ``reason`` is the stable label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """One upstream's connect, limit and health settings (from the service's traffic policy)."""

    namespace: str
    """Namespace of the upstream service."""
    service: str
    """Upstream service name."""
    port: int
    """Service port number (goes into the SNI)."""
    source_cluster: str
    """The caller's cluster (metrics label)."""
    connect_timeout: float = 1.0
    """One attempt: TCP connect plus inner handshake."""
    connect_budget: int = 3
    """Attempts per app connection (first try included)."""
    idle_timeout: float = 3600.0
    """Close a relay with no traffic for this long."""
    max_connections: int = 1024
    """Concurrent relayed connections for this upstream; more are reset at once."""
    outlier: OutlierConfig | None = field(default_factory=OutlierConfig)
    """Outlier detection, or None when disabled."""
    health: HealthCheckConfig | None = field(default_factory=HealthCheckConfig)
    """Active TCP health checks, or None for none."""

    @property
    def label(self) -> str:
        """``service.namespace``: the ``destination_service`` label."""
        return f"{self.service}.{self.namespace}"


@dataclass(frozen=True, slots=True)
class Connected:
    """A verified inner-mTLS connection to one candidate."""

    stream: trio.SSLStream[trio.SocketStream]
    """The inner TLS stream, handshake done and peer verified."""
    candidate: Candidate
    """Where it goes."""
    tier_name: str
    """Locality tier of the pick."""
    tier_index: int
    """0 is the nearest tier."""
    peer: VerifiedPeer
    """Who answered."""
    attempts: int
    """Attempts it took (1 = first try)."""
    connect_seconds: float
    """Duration of the successful attempt."""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UpstreamPool:
    """Balancer + outlier detection + active health for one upstream service."""

    def __init__(
        self,
        settings: PoolSettings,
        caller: Locality,
        balancer_config: BalancerConfig,
        holder: TlsContextHolder,
        enforcer: RevocationEnforcer,
        metrics: SidecarMetrics,
        *,
        rng: random.Random | None = None,
        now_fn: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        self.settings = settings
        self.balancer: Balancer[Candidate] = Balancer(caller, balancer_config)
        self.outlier: OutlierDetector[Candidate] | None = (
            OutlierDetector(settings.outlier) if settings.outlier is not None else None
        )
        self.holder = holder
        self.enforcer = enforcer
        self.metrics = metrics
        self.relay_stats = RelayStats()
        self._rng = rng if rng is not None else random.Random()
        self._now_fn = now_fn
        self._health: dict[Candidate, EndpointHealth] = {}
        self._checks: dict[Candidate, ActiveHealthCheck] = {}
        self._next_check: dict[Candidate, float] = {}
        self._wake = trio.Event()
        self.active = 0
        self.table: RouteTable = RouteTable((), {})

    # -- state ------------------------------------------------------------------------

    def update(self, table: RouteTable) -> None:
        """Install a new candidate set (a full reset; survivors keep health and history)."""
        self.table = table
        old = self._health
        self._health = {
            c: replace(old.get(c, EndpointHealth()), catalog_healthy=table.catalog_healthy[c])
            for c in table.candidates
        }
        self.balancer.update(
            table.candidates, healthy={c: h.effective for c, h in self._health.items()}
        )
        if self.outlier is not None:
            self.outlier.update(table.candidates)
            for c in table.candidates:
                if self.outlier.is_ejected(c):
                    self._set(c, ejected=True)
        if self.settings.health is not None:
            self._checks = {
                c: self._checks.get(c) or ActiveHealthCheck(self.settings.health)
                for c in table.candidates
            }
            now = trio.current_time()
            self._next_check = {
                c: self._next_check.get(c, self._checks[c].first_check_at(now, self._rng))
                for c in table.candidates
            }
        self._publish()
        self._wake.set()

    def _set(self, cand: Candidate, **changes: object) -> None:
        current = self._health.get(cand)
        if current is None:
            return
        new = replace(current, **changes)  # type: ignore[arg-type]
        self._health[cand] = new
        self.balancer.set_healthy(cand, new.effective)

    def _publish(self) -> None:
        self.metrics.healthy_endpoints.labels(self.settings.label).set(
            sum(1 for h in self._health.values() if h.effective)
        )

    def health(self) -> dict[Candidate, EndpointHealth]:
        """Health sources per candidate (a copy), for the admin endpoint and tests."""
        return dict(self._health)

    def _apply_outlier(self, events: Sequence[OutlierEvent[Candidate]]) -> None:
        s = self.settings
        for event in events:
            if isinstance(event, Ejected):
                self._set(event.endpoint, ejected=True)
                self.metrics.ejections.labels(
                    s.source_cluster, event.endpoint.target_cluster, s.label
                ).inc()
                log_event(
                    "outlier_ejected",
                    destination_service=s.label,
                    endpoint=event.endpoint.name,
                    destination_cluster=event.endpoint.target_cluster,
                    until=round(event.until, 3),
                    times=event.times_ejected,
                )
            elif isinstance(event, _Returned):
                self._set(event.endpoint, ejected=False)
                log_event(
                    "outlier_returned", destination_service=s.label, endpoint=event.endpoint.name
                )
        self._publish()
        self._wake.set()

    # -- connecting -------------------------------------------------------------------

    async def _attempt(
        self, cand: Candidate
    ) -> tuple[trio.SSLStream[trio.SocketStream], VerifiedPeer]:
        s = self.settings
        with trio.fail_after(s.connect_timeout):
            tcp = await trio.open_tcp_stream(cand.host, cand.port)
            with contextlib.suppress(OSError):  # latency: no Nagle on a ping-pong path
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.holder.wrap_client(tcp, cand.sni)
            peer = await handshake_and_verify(
                tls,
                self.holder.bundles,
                self._now_fn,
                expected=frozenset(SpiffeId.parse(i) for i in cand.expected_ids),
                revoked=self.enforcer.revoked,
                handshake_timeout=s.connect_timeout,
            )
        return tls, peer

    async def connect(self) -> Connected | None:
        """Run the connect plan for one new connection; None when every attempt failed.

        The balancer's active count is incremented for the returned candidate;
        call :meth:`release` when the connection ends.
        """
        s = self.settings
        deadline = trio.current_time() + s.connect_budget * s.connect_timeout
        attempts = 0
        for pick in connect_attempts(self.balancer, self._rng, s.connect_budget):
            if trio.current_time() >= deadline:
                break
            attempts += 1
            cand = pick.endpoint
            self.balancer.on_start(cand)
            start = trio.current_time()
            reason = "ok"
            try:
                tls, peer = await self._attempt(cand)
            except trio.TooSlowError:
                reason = "timeout"
            except HandshakeRefused as exc:
                reason = exc.reason
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                reason = "connect_refused"
            if reason != "ok":
                self.balancer.on_finish(cand)
                self.metrics.connect_retries.labels(
                    s.source_cluster, cand.target_cluster, s.label, reason
                ).inc()
                log_event(
                    "connect_failed",
                    destination_service=s.label,
                    endpoint=cand.name,
                    destination_cluster=cand.target_cluster,
                    locality_tier=pick.tier_name,
                    reason=reason,
                    attempt=attempts,
                )
                if self.outlier is not None:
                    self._apply_outlier(
                        self.outlier.on_failure(cand, FailureKind.CONNECT, trio.current_time())
                    )
                continue
            took = trio.current_time() - start
            if self.outlier is not None:
                self._apply_outlier(
                    self.outlier.on_success(cand, FailureKind.CONNECT, trio.current_time())
                )
            self.metrics.connect_seconds.labels(
                s.source_cluster, cand.target_cluster, s.label, pick.tier_name
            ).observe(took)
            if pick.tier_index > 0:
                self.metrics.failovers.labels(
                    s.source_cluster, cand.target_cluster, s.label, pick.tier_name
                ).inc()
            return Connected(tls, cand, pick.tier_name, pick.tier_index, peer, attempts, took)
        return None

    def release(self, cand: Candidate) -> None:
        """The connection to ``cand`` ended."""
        self.balancer.on_finish(cand)

    async def dial(self, cand: Candidate) -> tuple[trio.SSLStream[trio.SocketStream], VerifiedPeer]:
        """One verified inner-mTLS connection to ``cand`` (no pick, no retry: the HTTP
        layer retries per request). Success or failure is reported like a
        :meth:`connect` attempt (outlier ``CONNECT``, metrics, log); raises
        :class:`DialFailed` with the stable reason."""
        s = self.settings
        start = trio.current_time()
        try:
            tls, peer = await self._attempt(cand)
        except trio.TooSlowError:
            reason = "timeout"
        except HandshakeRefused as exc:
            reason = exc.reason
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "connect_refused"
        else:
            if self.outlier is not None:
                self._apply_outlier(
                    self.outlier.on_success(cand, FailureKind.CONNECT, trio.current_time())
                )
            self.metrics.connect_seconds.labels(
                s.source_cluster, cand.target_cluster, s.label, "http"
            ).observe(trio.current_time() - start)
            return tls, peer
        self.metrics.connect_retries.labels(
            s.source_cluster, cand.target_cluster, s.label, reason
        ).inc()
        log_event(
            "connect_failed",
            destination_service=s.label,
            endpoint=cand.name,
            destination_cluster=cand.target_cluster,
            reason=reason,
        )
        if self.outlier is not None:
            self._apply_outlier(
                self.outlier.on_failure(cand, FailureKind.CONNECT, trio.current_time())
            )
        raise DialFailed(reason)

    def report_http(self, cand: Candidate, status: int, grpc_status: int | None) -> None:
        """Feed one upstream HTTP response to outlier detection (5xx: failure)."""
        if self.outlier is not None:
            self._apply_outlier(
                report_response(self.outlier, cand, status, trio.current_time(), grpc_status)
            )

    # -- background: ejection returns and active checks ----------------------------------

    async def run_background(self) -> None:
        """Return ejected endpoints on time and run active health checks, until cancelled."""
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                if self.outlier is not None:
                    returned = self.outlier.poll(now)
                    if returned:
                        self._apply_outlier(list(returned))
                for cand, at in list(self._next_check.items()):
                    if at <= now:
                        self._next_check[cand] = math.inf  # in flight
                        nursery.start_soon(self._probe, cand)
                wake_at = min(
                    [*self._next_check.values(), math.inf]
                    + [
                        d
                        for d in [self.outlier.next_deadline() if self.outlier else None]
                        if d is not None
                    ]
                )
                self._wake = trio.Event()
                with trio.move_on_at(wake_at):
                    await self._wake.wait()

    async def _probe(self, cand: Candidate) -> None:
        cfg = self.settings.health
        assert cfg is not None
        result = CheckResult.SUCCESS
        try:
            with trio.fail_after(cfg.timeout):
                sock = await trio.open_tcp_stream(cand.host, cand.port)
            await trio.aclose_forcefully(sock)
        except trio.TooSlowError:
            result = CheckResult.TIMEOUT
        except OSError:
            result = CheckResult.FAILURE
        check = self._checks.get(cand)
        if check is None or cand not in self._next_check:
            return  # the catalog dropped it while we probed
        transition = check.record(result)
        now = trio.current_time()
        self._next_check[cand] = check.next_check_at(now, self._rng)
        if transition is not None:
            self._set(cand, active=transition.after)
            self._publish()
            self.metrics.health_transitions.labels(
                cand.target_cluster, self.settings.label, transition.after.value
            ).inc()
            log_event(
                "health_changed",
                destination_service=self.settings.label,
                endpoint=cand.name,
                state=transition.after.value,
            )
        self._wake.set()

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.settings.label} active={self.active} {self.balancer!r}>"


def _abort(stream: trio.SocketStream) -> None:
    # RST rather than FIN: the app must see a failed connection, not an empty answer.
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)


async def handle_outbound(pool: UpstreamPool, app: trio.SocketStream) -> None:
    """Serve one app connection accepted on the upstream's listener."""
    s = pool.settings
    m = pool.metrics
    if pool.active >= s.max_connections:
        m.outbound_refusals.labels(s.label, "max_connections").inc()
        log_event("outbound_refused", destination_service=s.label, reason="max_connections")
        _abort(app)
        await trio.aclose_forcefully(app)
        return
    pool.active += 1
    try:
        conn = await pool.connect()
        if conn is None:
            reason = "no_healthy_upstream" if not pool.table.candidates else "connect_failed"
            m.outbound_refusals.labels(s.label, reason).inc()
            log_event("outbound_refused", destination_service=s.label, reason=reason)
            _abort(app)
            await trio.aclose_forcefully(app)
            return
        labels = (
            "outbound",
            s.source_cluster,
            conn.candidate.target_cluster,
            s.label,
            conn.tier_name,
        )
        m.opened.labels(*labels).inc()
        m.active.labels("outbound", s.label).inc()
        result = None
        try:
            with pool.enforcer.track(conn.peer):
                result = await relay(
                    app,
                    HalfCloseTls(conn.stream),
                    idle_timeout=s.idle_timeout,
                    stats=pool.relay_stats,
                )
        finally:
            pool.release(conn.candidate)
            m.active.labels("outbound", s.label).dec()
            m.closed.labels(*labels).inc()
            if result is not None:
                m.sent.labels(*labels).inc(result.bytes_a_to_b)
                m.received.labels(*labels).inc(result.bytes_b_to_a)
            log_event(
                "connection",
                direction="outbound",
                source_cluster=s.source_cluster,
                destination_cluster=conn.candidate.target_cluster,
                destination_service=s.label,
                locality_tier=conn.tier_name,
                endpoint=conn.candidate.name,
                peer=str(conn.peer.spiffe_id),
                attempts=conn.attempts,
                connect_ms=round(conn.connect_seconds * 1000, 3),
                end=result.reason.value if result is not None else RelayEnd.CANCELLED.value,
                bytes_sent=result.bytes_a_to_b if result is not None else None,
                bytes_received=result.bytes_b_to_a if result is not None else None,
            )
    finally:
        pool.active -= 1


async def serve_outbound(
    pool: UpstreamPool,
    host: str,
    port: int,
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` for the app; connections run in ``handler_nursery`` so that
    cancelling this task stops accepting without touching live connections."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await handle_outbound(pool, stream)

    # The socket is bound and listening already: connections queue in the backlog.
    task_status.started(bound)
    await trio.serve_listeners(handler, listeners, handler_nursery=handler_nursery)
