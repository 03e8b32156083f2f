"""One cluster's east-west gateway: listeners, tunnel pool, prober, admin, drain.

``await nursery.start(gateway.run)`` binds every listener first and reports the
bound ports (:class:`BoundPorts`), so tests can pass port 0 without a readiness
race. Listeners:

* passthrough (``passthrough_port``), always: local sidecars' outbound connections
  to other clusters arrive here, and, if ``passthrough`` is a mode, remote callers'
  connections to this cluster (``gateway/passthrough.py``);
* tunnel (``tunnel_port``), if ``tunnel`` is a mode: peer gateways' HTTP/2
  connections (``gateway/tunnel.py``); each CONNECT is routed with
  ``via="tunnel"`` and the authenticated peer cluster;
* admin (``admin_port``): ``/ready``, ``/stats``, ``/metrics``.

:meth:`Gateway.stop` is the graceful shutdown (BAD_INPUTS 31): listeners close,
every tunnel connection gets a GOAWAY, relays get ``drain_timeout`` to finish,
then the rest are cut. :meth:`Gateway.rotate` installs a new SVID and/or roots: new
handshakes use them at once, connections made with the old ones drain (GOAWAY) so
new streams go to new connections.

Identity (docs/gateway.md "Identity"): with ``renew`` the gateway runs a
:class:`~trust.rotation.SvidRotator` on its :class:`TlsContextHolder` (the CLI's
``renew`` is a CSR to the agent, :func:`federation.bootstrap.agent_renewer`); every
renewal drains the tunnel connections made with the old certificate. With ``source``
(the agent's :class:`~federation.catalog_client.CatalogClient` or a followed
:class:`~sidecar.runner.StaticCatalog`) it applies every new catalog's trust bundles
through a :class:`~trust.bundle.BundleKeeper` (rollbacks and foreign roots refused,
the last good bundle kept), so a CA rotation anywhere reaches peer validation
without a restart.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from federation.bootstrap import catalog_bundle_update
from federation.catalog import Catalog
from federation.config.model import Cluster, GatewayProbeSettings
from federation.model import Locality
from gateway.admin import serve_admin
from gateway.metrics import GatewayMetrics
from gateway.passthrough import (
    HelloRefused,
    PassthroughOptions,
    connect_inbound,
    handle_passthrough,
)
from gateway.probe import Prober, gateway_status
from gateway.router import Inbound, LocalBalancers, Refused, decide
from gateway.tunnel import (
    TunnelConnection,
    TunnelOptions,
    TunnelPool,
    TunnelStream,
    serve_tunnel,
)
from sidecar.relay import RelayStats, relay
from sidecar.sni import BadSni, MeshSni
from trust.bundle import BundleKeeper
from trust.bundle import Refused as BundleRefused
from trust.errors import TlsConfigError
from trust.rotation import RenewalSchedule, SvidRotator
from trust.svid import Svid
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

if TYPE_CHECKING:
    from sidecar.runner import CatalogSource

__all__ = ["BoundPorts", "Gateway", "GatewayOptions", "refusal_status"]

log = logging.getLogger("meshfed.gateway")

_STATUS: Final[dict[str, int]] = {
    "bad_sni": 400,
    "bad_connect": 400,
    "source_mismatch": 403,
    "transit": 403,
    "not_exported": 403,
    "passthrough_disabled": 403,
    "unknown_cluster": 404,
    "unknown_service": 404,
    "unknown_port": 404,
}


def refusal_status(reason: str) -> int:
    """HTTP status answering a refused CONNECT (503 for anything transient)."""
    return _STATUS.get(reason, 503)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """Knobs beyond the deployment config (tests and benchmarks override ports)."""

    bind: str | None = None
    """Listen address; default ``clusters[].gateway.bind``."""
    passthrough_port: int | None = None
    """Override ``passthrough_port`` (0: any free port)."""
    tunnel_port: int | None = None
    """Override ``tunnel_port``."""
    admin_port: int | None = None
    """Override ``admin_port``."""
    passthrough: PassthroughOptions = field(default_factory=PassthroughOptions)
    """SNI listener limits."""
    tunnel: TunnelOptions = field(default_factory=TunnelOptions)
    """Tunnel timeouts and limits."""
    probe: GatewayProbeSettings | None = None
    """Override ``settings.gateway_probe``."""
    drain_timeout: float = 10.0
    """On stop: how long live connections may finish."""
    renewal: RenewalSchedule | None = None
    """When to renew the SVID (with ``renew``); default :class:`RenewalSchedule`."""


@dataclass(frozen=True, slots=True)
class BoundPorts:
    """Where the gateway listens (tunnel is None without the ``tunnel`` mode)."""

    passthrough: int
    tunnel: int | None
    admin: int


class Gateway:
    """The east-west gateway of one cluster (see the module docstring)."""

    def __init__(
        self,
        cluster: Cluster,
        probe_settings: GatewayProbeSettings,
        tls: TlsContextHolder,
        catalog_fn: Callable[[], Catalog | None],
        *,
        options: GatewayOptions | None = None,
        rng: random.Random | None = None,
        now_fn: Callable[[], dt.datetime] = _utc_now,
        source: CatalogSource | None = None,
        renew: Callable[[], Awaitable[Svid]] | None = None,
        trust_domains: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.options = options or GatewayOptions()
        self.probe_settings = self.options.probe or probe_settings
        self.tls = tls
        self.catalog_fn = catalog_fn
        self.trust_domains = dict(trust_domains or {})
        """Cluster -> trust domain from the deployment config: the tunnel's fallback for
        peers whose ClusterRecord is missing (an agent cut from the store)."""
        self.rng = rng or random.Random()
        self.now_fn = now_fn
        self.modes = tuple(cluster.gateway.modes)
        self.metrics = GatewayMetrics(cluster.name)
        # A gateway has no zone of its own; it sits in the cluster's first zone, so
        # same-zone sidecars of that zone are preferred, then the rest of the cluster.
        self.locality = Locality(cluster.cloud, cluster.region, cluster.zones[0], cluster.name)
        self.balancers = LocalBalancers(self.locality)
        self.pool = TunnelPool(
            tls, options=self.options.tunnel, metrics=self.metrics, now_fn=now_fn, rng=self.rng
        )
        self.prober = Prober(
            tls,
            self.probe_settings,
            catalog_fn,
            pool=self.pool,
            metrics=self.metrics,
            rng=self.rng,
            now_fn=now_fn,
        )
        self.relay_stats = RelayStats()
        self.server_connections: set[TunnelConnection] = set()
        self.source = source
        """Followed for trust bundles (``catalog_fn`` is what routing reads)."""
        self.keeper = BundleKeeper(on_refusal=self._on_bundle_refused)
        self.rotator: SvidRotator | None = None
        if renew is not None:
            self.rotator = SvidRotator(
                tls,
                renew,
                rng=random.Random(self.rng.random()),
                schedule=self.options.renewal,
                now_fn=now_fn,
                on_renewed=self._on_renewed,
            )
        self.ports: BoundPorts | None = None
        self._stop = trio.Event()
        self._listening = False

    # -- admin view ----------------------------------------------------------------------------

    def ready(self) -> bool:
        """Listening, and routing on a catalog."""
        return self._listening and self.catalog_fn() is not None and not self._stop.is_set()

    def status(self) -> tuple[dict[str, int], dict[str, bool]]:
        """``gateway_status`` for this gateway: what the agent publishes in its record."""
        catalog = self.catalog_fn()
        if catalog is None:
            return {}, {}
        return gateway_status(catalog, self.cluster.name, self.prober.results())

    def stats(self) -> dict[str, Any]:
        healthy, alive = self.status()
        for ref, count in healthy.items():
            self.metrics.healthy_endpoints.labels(ref).set(count)
        relays = self.relay_stats.statistics()
        catalog = self.catalog_fn()
        return {
            "cluster": self.cluster.name,
            "modes": list(self.modes),
            "ready": self.ready(),
            "svid": str(self.tls.svid.spiffe_id),
            "svid_not_after": self.tls.svid.not_after.isoformat(),
            "svid_generation": self.tls.generation,
            "svid_renewal": self._renewal_stats(),
            "trust_domains": sorted(td.name for td in self.tls.bundles),
            "bundle_refusals": {
                f"{td}/{reason}": n for (td, reason), n in self.keeper.refusal_counts().items()
            },
            "catalog_version": None if catalog is None else [catalog.epoch, catalog.version],
            "healthy_endpoints": healthy,
            "peer_alive": alive,
            "peers": self.prober.snapshot(),
            "tunnel_connections": {
                "client": [repr(c) for c in self.pool.connections()],
                "server": [repr(c) for c in self.server_connections],
            },
            "relays": {
                "active": relays.relays_active,
                "started": relays.relays_started,
                "bytes_a_to_b": relays.bytes_a_to_b,
                "bytes_b_to_a": relays.bytes_b_to_a,
            },
        }

    def metrics_text(self) -> bytes:
        self.stats()  # refresh the gauges computed from the catalog
        return self.metrics.text()

    # -- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin the graceful shutdown; :meth:`run` returns when it is complete."""
        self._stop.set()

    def rotate(self, svid: Svid | None = None, bundles: TrustBundleSet | None = None) -> None:
        """New SVID and/or bundles: new handshakes use them, old connections drain.

        Raises TlsConfigError (and changes nothing) if the contexts cannot be built.
        Without arguments it only drains connections made before the holder's last
        update (the :class:`SvidRotator` updates the holder itself).
        """
        if svid is not None or bundles is not None:
            self.tls.update(svid=svid, bundles=bundles)
        drained = self.pool.rotate()
        for conn in list(self.server_connections):
            if conn.generation != self.tls.generation and not conn.protocol.draining:
                conn.drain()
                drained += 1
        log.info(
            "certificate rotated",
            extra={
                "event": "rotated",
                "drained": drained,
                "generation": self.tls.generation,
                "svid_not_after": self.tls.svid.not_after.isoformat(),
                "trust_domains": sorted(td.name for td in self.tls.bundles),
            },
        )

    def apply_bundles(self, catalog: Catalog) -> bool:
        """Offer ``catalog``'s trust bundles; on a change install them (old tunnel
        connections drain: every live tunnel was authenticated against roots in force).
        True if the roots in force changed."""
        merged = catalog_bundle_update(self.keeper, self.tls.bundles, catalog.bundles)
        if merged is None:
            return False
        try:
            self.rotate(bundles=merged)
        except TlsConfigError as exc:
            log.warning("bundles refused", extra={"event": "bundles_refused", "detail": str(exc)})
            return False
        return True

    def _on_renewed(self, svid: Svid) -> None:
        # The rotator has put the new SVID in the holder: drain what the old one made.
        self.rotate()

    def _on_bundle_refused(self, refused: BundleRefused) -> None:
        log.warning(
            "bundle refused",
            extra={
                "event": "bundle_refused",
                "trust_domain": refused.trust_domain.name,
                "reason": refused.reason,
                "detail": refused.detail,
            },
        )

    def _renewal_stats(self) -> dict[str, Any] | None:
        if self.rotator is None:
            return None
        st = self.rotator.statistics()
        return {
            "renewals": st.renewals,
            "failures": st.failures,
            "consecutive_failures": st.consecutive_failures,
            "next_attempt_at": st.next_attempt_at and st.next_attempt_at.isoformat(),
            "last_error": st.last_error,
        }

    async def _follow_catalog(self, source: CatalogSource) -> None:
        current = source.catalog
        if current is not None:
            self.apply_bundles(current)
        while True:
            current = await source.wait_for(functools.partial(_is_not, current))
            self.apply_bundles(current)

    # -- serving -------------------------------------------------------------------------------

    async def _handle_connect(
        self, conn: TunnelConnection, stream: TunnelStream, authority: str
    ) -> None:
        peer = conn.peer_cluster
        try:
            sni = MeshSni.parse(authority)
        except BadSni as exc:
            self._refuse_stream(conn, stream, "bad_sni", exc.reason)
            return
        catalog = self.catalog_fn()
        if catalog is None:
            self._refuse_stream(conn, stream, "unknown_cluster", "no catalog yet")
            return
        self.balancers.update(catalog)
        route = decide(catalog, sni, via="tunnel", modes=self.modes, authenticated_source=peer)
        if isinstance(route, Refused):
            self._refuse_stream(conn, stream, route.reason, route.detail)
            return
        assert isinstance(route, Inbound)
        opts = self.options.passthrough
        try:
            upstream, ep = await connect_inbound(
                route,
                self.balancers,
                self.rng,
                attempts=opts.connect_attempts,
                connect_timeout=opts.connect_timeout,
            )
        except HelloRefused as exc:
            self._refuse_stream(conn, stream, exc.reason, exc.detail)
            return
        service = f"{sni.namespace}/{sni.service}"
        m = self.metrics
        m.connections.labels("tunnel", "inbound", peer, sni.target_cluster, service).inc()
        m.active.labels("tunnel", "inbound").inc()
        try:
            conn.accept(stream)
            result = await relay(
                stream, upstream, idle_timeout=opts.idle_timeout, stats=self.relay_stats
            )
            log.debug(
                "inbound relay ended", extra={"reason": result.reason.value, "detail": repr(result)}
            )
            m.bytes.labels("tunnel", "inbound", service, "to_destination").inc(result.bytes_a_to_b)
            m.bytes.labels("tunnel", "inbound", service, "from_destination").inc(
                result.bytes_b_to_a
            )
        finally:
            self.balancers.on_finish(route, ep)
            m.active.labels("tunnel", "inbound").dec()

    def _refuse_stream(
        self, conn: TunnelConnection, stream: TunnelStream, reason: str, detail: str
    ) -> None:
        conn.refuse(stream, refusal_status(reason), reason)
        self.metrics.refuse("tunnel", reason)
        log.info(
            "tunnel stream refused",
            extra={
                "event": "refused",
                "listener": "tunnel",
                "reason": reason,
                "source_cluster": conn.peer_cluster,
                "detail": detail,
            },
        )

    async def _serve_tunnel(
        self, listeners: list[trio.SocketListener], conns: trio.Nursery
    ) -> None:
        await serve_tunnel(
            listeners,
            self.tls,
            self.catalog_fn,
            self._handle_connect,
            options=self.options.tunnel,
            metrics=self.metrics,
            now_fn=self.now_fn,
            connections=self.server_connections,
            handler_nursery=conns,
            trust_domains=self.trust_domains,
            local_cluster=self.cluster.name,
        )

    async def _serve_passthrough(
        self, listeners: list[trio.SocketListener], conns: trio.Nursery
    ) -> None:
        async def handle(client: trio.SocketStream) -> None:
            await handle_passthrough(
                client,
                catalog_fn=self.catalog_fn,
                modes=self.modes,
                balancers=self.balancers,
                pool=self.pool,
                options=self.options.passthrough,
                metrics=self.metrics,
                relay_stats=self.relay_stats,
                rng=self.rng,
            )

        await trio.serve_listeners(handle, listeners, handler_nursery=conns)

    async def run(
        self, *, task_status: trio.TaskStatus[BoundPorts] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`stop` (graceful) or cancellation."""
        gw = self.cluster.gateway
        o = self.options
        host = o.bind or gw.bind or gw.address
        pt_port = gw.passthrough_port if o.passthrough_port is None else o.passthrough_port
        tn_port = gw.tunnel_port if o.tunnel_port is None else o.tunnel_port
        ad_port = gw.admin_port if o.admin_port is None else o.admin_port
        pt = await trio.open_tcp_listeners(pt_port, host=host)
        tn = await trio.open_tcp_listeners(tn_port, host=host) if "tunnel" in self.modes else []
        ad = await trio.open_tcp_listeners(ad_port, host=host)
        self.ports = BoundPorts(
            pt[0].socket.getsockname()[1],
            tn[0].socket.getsockname()[1] if tn else None,
            ad[0].socket.getsockname()[1],
        )
        async with trio.open_nursery() as nursery:
            if self.source is not None:
                nursery.start_soon(self._follow_catalog, self.source)
            if self.rotator is not None:
                await nursery.start(self.rotator.run)
            await nursery.start(self.pool.run)
            await nursery.start(self.prober.run)
            nursery.start_soon(serve_admin, self, ad)
            # Connection handlers live in their own nursery, outside the accept loops, so
            # stopping the listeners does not cut the connections they accepted.
            async with trio.open_nursery() as conns:
                with trio.CancelScope() as listening:
                    async with trio.open_nursery() as accept:
                        accept.start_soon(self._serve_passthrough, pt, conns)
                        if tn:
                            accept.start_soon(self._serve_tunnel, tn, conns)
                        self._listening = True
                        log.info(
                            "gateway listening",
                            extra={"event": "listening", "ports": str(self.ports)},
                        )
                        task_status.started(self.ports)
                        await self._stop.wait()
                        listening.cancel()
                # Graceful drain: listeners are closed; tunnel connections get GOAWAY
                # (they close once their streams end); relays get drain_timeout.
                self._listening = False
                for conn in list(self.server_connections) + self.pool.connections():
                    conn.drain()
                result = await self.relay_stats.drain(trio.current_time() + o.drain_timeout)
                log.info(
                    "gateway drained",
                    extra={
                        "event": "drained",
                        "finished": result.finished,
                        "cut": result.cancelled,
                    },
                )
                with trio.move_on_after(1.0):
                    for conn in list(self.server_connections) + self.pool.connections():
                        await conn.wait_closed()
                conns.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


def _is_not(held: Catalog | None, candidate: Catalog) -> bool:
    return candidate is not held
