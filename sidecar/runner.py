"""The sidecar process: wiring config, catalog, identity and listeners together.

:class:`Sidecar` owns one workload instance's outbound pools, inbound server,
revocation enforcer and admin view. It follows a catalog source (the agent's
:class:`~federation.catalog_client.CatalogClient`, or a :class:`StaticCatalog`)
and applies every new catalog live:

* trust bundles go through a :class:`~trust.bundle.BundleKeeper` (rollback and
  foreign-root refusals) and, when they change, into the
  :class:`~trust.tls.TlsContextHolder` in place: new handshakes use them, live
  connections keep theirs;
* revocations are installed in the :class:`~trust.enforcement.RevocationEnforcer`,
  which cancels the scope of every live connection (either direction) whose peer
  is now revoked;
* routes are rebuilt per upstream (:func:`sidecar.routing.build_routes`) and the
  balancers reset, live connections untouched;
* inbound admission gets the new cluster -> trust domain map.

Shutdown (:meth:`Sidecar.stop`, wired to SIGTERM by the CLI): listeners close
first, ``/ready`` turns 503, live relays get until ``drain_deadline`` to finish
(:meth:`RelayStats.drain`), the rest are closed, and :meth:`Sidecar.run` returns.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from federation.bootstrap import catalog_bundle_update
from federation.catalog import Catalog
from federation.config.model import FederationConfig, Service, ServicePort, Subset, Workload
from federation.config.scalars import ServiceRef
from federation.model import EndpointRecord, Locality, RecordError
from sidecar.admin import serve_admin
from sidecar.authz import InboundPolicy, ServedPort
from sidecar.health import HealthCheckConfig
from sidecar.http.accesslog import HttpMetrics
from sidecar.http.circuit import CircuitBreaker
from sidecar.http.routes import RouteTable as HttpRouteTable
from sidecar.http.routes import retry_budget_config
from sidecar.http.splits import in_subset
from sidecar.inbound import InboundServer, InboundSettings, serve_inbound
from sidecar.metrics import SidecarMetrics, log_event
from sidecar.outbound import PoolSettings, UpstreamPool, serve_outbound
from sidecar.outlier import OutlierConfig
from sidecar.ratelimit import RateLimitConfig, RateLimiter
from sidecar.relay import RelayStats
from sidecar.retry import RetryBudget
from sidecar.routing import Candidate, balancer_config_for, build_routes
from trust.bundle import BundleKeeper, Refused
from trust.enforcement import RevocationEnforcer
from trust.errors import RevocationError, TlsConfigError
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import TrustDomain, workload_id
from trust.tls import DEFAULT_HANDSHAKE_TIMEOUT, TlsContextHolder
from trust.validate import VerifiedPeer

if TYPE_CHECKING:
    # The HTTP data path (h11, h2) loads only for a workload with an HTTP listener:
    # an L4-only sidecar never imports it (idle RSS; tests/sidecar/test_entry_light.py).
    from sidecar.http.destination import PoolDestination
    from sidecar.http.proxy import HttpProxy
    from sidecar.http.server import InboundHttp, InboundTarget
    from trust.rotation import SvidRotator

__all__ = ["CatalogSource", "Sidecar", "SidecarOptions", "StaticCatalog", "health_config_from"]

log = logging.getLogger(__name__)


class CatalogSource(Protocol):
    """What the sidecar needs from a catalog provider (CatalogClient has this shape)."""

    @property
    def catalog(self) -> Catalog | None: ...

    async def wait_for(self, predicate: Callable[[Catalog], bool]) -> Catalog: ...


class StaticCatalog:
    """A catalog from a file or from code; :meth:`set` swaps it (tests, drills)."""

    def __init__(self, catalog: Catalog | None = None) -> None:
        self._catalog = catalog
        self._changed = trio.Event()

    @classmethod
    def from_file(cls, path: Path) -> StaticCatalog:
        """Load ``Catalog.to_json`` output; raises RecordError naming what is wrong."""
        return cls(Catalog.from_json(path.read_bytes()))

    @property
    def catalog(self) -> Catalog | None:
        return self._catalog

    def set(self, catalog: Catalog) -> None:
        """Replace the catalog; waiters see it at once."""
        self._catalog = catalog
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[Catalog], bool]) -> Catalog:
        while True:
            if self._catalog is not None and predicate(self._catalog):
                return self._catalog
            await self._changed.wait()

    async def follow_file(self, path: Path, interval: float = 1.0) -> None:
        """Reload ``path`` whenever its mtime changes (a bad file is logged and skipped)."""
        apath = trio.Path(path)
        last = (await apath.stat()).st_mtime_ns
        while True:
            await trio.sleep(interval)
            try:
                mtime = (await apath.stat()).st_mtime_ns
                if mtime == last:
                    continue
                last = mtime
                self.set(Catalog.from_json(await apath.read_bytes()))
            except (OSError, RecordError, ValueError) as exc:
                log_event("catalog_file_refused", path=str(path), detail=str(exc))


def health_config_from(cfg: FederationConfig) -> HealthCheckConfig:
    """Active endpoint checks use the federation's probe settings (the config has one
    probe section, ``settings.gateway_probe``; the same period, timeout, threshold and
    jitter suit sidecar endpoints)."""
    p = cfg.federation.settings.gateway_probe
    return HealthCheckConfig(
        interval=p.interval,
        timeout=p.timeout,
        jitter=p.jitter_percent / 100.0,
        unhealthy_threshold=p.failure_threshold,
        healthy_threshold=1,
    )


def outlier_config_from(service: Service) -> OutlierConfig | None:
    od = service.traffic_policy.outlier_detection
    if not od.enabled:
        return None
    return OutlierConfig(
        consecutive_connect_failures=od.consecutive_failures,
        consecutive_5xx=od.consecutive_failures,
        base_ejection_time=od.base_ejection_time,
        max_ejection_time=max(od.base_ejection_time, 300.0),
        max_ejection_percent=od.max_ejection_percent,
        decay_interval=od.interval,
    )


@dataclass(frozen=True)
class SidecarOptions:
    """Process-level settings that the deployment config does not carry."""

    replica: int = 0
    """Instance index; on a loopback address it offsets every port (docs/config.md)."""
    drain_deadline: float = 10.0
    """Seconds live connections get to finish after SIGTERM."""
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    """Inbound handshake limit."""
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    """Per-caller inbound connection rate."""
    health: HealthCheckConfig | None = None
    """Active checks; None means from the config's probe settings."""
    admin_host: str = "127.0.0.1"
    """Where the admin endpoint listens."""


def _offset(host: str, port: int, replica: int) -> int:
    loopback = host.startswith("127.") or host in ("::1", "localhost")
    return port + replica if loopback else port


class Sidecar:
    """One workload instance's proxy."""

    def __init__(
        self,
        cfg: FederationConfig,
        workload: str,
        holder: TlsContextHolder,
        source: CatalogSource,
        *,
        options: SidecarOptions | None = None,
        metrics: SidecarMetrics | None = None,
        rng: random.Random | None = None,
        now_fn: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.cfg = cfg
        self.options = options if options is not None else SidecarOptions()
        self.workload = self._find(cfg, workload)
        self.cluster = cfg.cluster(self.workload.cluster)
        self.holder = holder
        self.source = source
        self.metrics = metrics if metrics is not None else SidecarMetrics()
        self._rng = rng if rng is not None else random.Random()
        now_kw: dict[str, Any] = {"now_fn": now_fn} if now_fn is not None else {}
        self._now = now_fn if now_fn is not None else functools.partial(dt.datetime.now, dt.UTC)
        self.rotator: SvidRotator | None = None
        """Renews ``holder``'s SVID (set by the CLI); its statistics go into ``/stats``."""
        self.withdrawn = False
        """Endpoints withdrawn from the agent because the SVID is lapsing (set by the CLI)."""
        self.enforcer = RevocationEnforcer(on_close=self._on_revoked_close)
        self.keeper = BundleKeeper(on_refusal=self._on_bundle_refused)
        self.caller = Locality(
            cloud=self.cluster.cloud,
            region=self.cluster.region,
            zone=self.workload.zone,
            cluster=self.cluster.name,
        )
        replica = self.options.replica
        w = self.workload
        self.inbound_host = w.address
        self.inbound_port = _offset(w.address, w.inbound_port, replica)
        self.admin_port = (
            _offset(w.address, w.admin_port, replica) if w.admin_port is not None else None
        )
        served = []
        idle = 3600.0
        max_in = 0
        http_targets: dict[tuple[str, str, int], InboundTarget] = {}
        for s in w.serves:
            svc = cfg.service(ServiceRef(s.service, w.namespace))
            sp = svc.port(s.port)
            assert sp is not None  # the config checks guarantee it
            app_port = _offset(s.app.host, s.app.port, replica)
            served.append(ServedPort(w.namespace, s.service, sp.port, s.app.host, app_port))
            if sp.protocol == "http" or sp.protocol == "http2":
                from sidecar.http.server import InboundTarget

                http_targets[(w.namespace, s.service, sp.port)] = InboundTarget(
                    f"{s.service}.{w.namespace}", sp.protocol, s.app.host, app_port
                )
            idle = min(idle, svc.traffic_policy.timeouts.idle)
            max_in = max(max_in, svc.traffic_policy.circuit_breaking.max_connections)
        self.served = tuple(served)
        self.inbound = InboundServer(
            InboundSettings(
                local_cluster=self.cluster.name,
                max_connections=max_in or 1024,
                handshake_timeout=self.options.handshake_timeout,
                idle_timeout=idle,
            ),
            holder,
            self.enforcer,
            self._policy(None),
            RateLimiter(self.options.rate_limit),
            self.metrics,
            **now_kw,
        )
        http_seed = self._rng.random()  # drawn either way: later seeds stay the same
        self.inbound_http: InboundHttp | None = None
        """The inbound HTTP layer; None when no served port is HTTP."""
        if http_targets:
            from sidecar.http.server import InboundHttp

            self.inbound_http = InboundHttp(
                local_cluster=self.cluster.name,
                local_workload=w.name,
                rng=random.Random(http_seed),
                metrics=self.metrics,
                services=[t.service for t in http_targets.values()],
            )
            self.inbound.http = self.inbound_http
            self.inbound.http_targets = http_targets
        health = self.options.health or health_config_from(cfg)
        self.pools: list[tuple[UpstreamPool, str, int]] = []
        self.http_proxies: dict[str, HttpProxy] = {}
        """HTTP upstreams' request pipelines, by ``service.namespace``."""
        self.http_destinations: dict[str, PoolDestination] = {}
        http_labels = [
            f"{u.service.name}.{u.service.namespace}"
            for u in w.upstreams
            if _port_of(cfg.service(u.service), u.port).protocol in ("http", "http2")
        ]
        self.http_metrics = HttpMetrics(
            self.metrics.registry,
            source_cluster=self.cluster.name,
            destination_services=http_labels,
        )
        for up in w.upstreams:
            svc = cfg.service(up.service)
            sp = svc.port(up.port) if up.port is not None else svc.ports[0]
            assert sp is not None
            tp = svc.traffic_policy
            settings = PoolSettings(
                namespace=svc.namespace,
                service=svc.name,
                port=sp.port,
                source_cluster=self.cluster.name,
                connect_timeout=tp.timeouts.connect,
                connect_budget=max(3, tp.retries.attempts + 1),
                idle_timeout=tp.timeouts.idle,
                max_connections=tp.circuit_breaking.max_connections,
                outlier=outlier_config_from(svc),
                health=health,
            )
            pool = UpstreamPool(
                settings,
                self.caller,
                balancer_config_for(
                    svc, self.cluster, cfg.federation.settings.overprovisioning_factor
                ),
                holder,
                self.enforcer,
                self.metrics,
                rng=random.Random(self._rng.random()),
                **now_kw,
            )
            listen = up.listen
            self.pools.append((pool, listen.host, _offset(listen.host, listen.port, replica)))
            if sp.protocol in ("http", "http2"):
                self._add_http(svc, pool)
        self._stop = trio.Event()
        self.finished = trio.Event()
        """Set when :meth:`run` has drained and returned."""
        self._listening = False
        self._draining = False
        self._catalog: Catalog | None = None
        self.bound: dict[str, int] = {}
        """Bound ports by listener name (``inbound``, ``admin``, ``<service>.<ns>``)."""

    def _add_http(self, svc: Service, pool: UpstreamPool) -> None:
        """The request pipeline of an ``http``/``http2`` upstream (docs/http.md)."""
        from sidecar.http.destination import PoolDestination
        from sidecar.http.keepalive import keepalive_config
        from sidecar.http.proxy import HttpProxy

        tp = svc.traffic_policy
        breaker = CircuitBreaker(tp.circuit_breaking)
        destination = PoolDestination(
            pool,
            {s.name: s for s in svc.subsets},
            functools.partial(_in_subset, self.cfg, svc),
            breaker,
            keepalive_config(tp.connection_pool),
        )
        label = pool.settings.label
        self.http_destinations[label] = destination
        self.http_proxies[label] = HttpProxy(
            service=label,
            source_cluster=self.cluster.name,
            source_workload=self.workload.name,
            routes=HttpRouteTable(svc),
            destination=destination,
            breaker=breaker,
            budget=RetryBudget(retry_budget_config(tp.retries)),
            metrics=self.http_metrics,
            rng=random.Random(self._rng.random()),
        )

    @staticmethod
    def _find(cfg: FederationConfig, name: str) -> Workload:
        """``name`` or ``cluster/name`` (workload names may repeat across clusters)."""
        cluster, _, short = name.rpartition("/")
        matches = [w for w in cfg.workloads if w.name == short and cluster in ("", w.cluster)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise KeyError(f"no workload {name!r} in the config")
        clusters = ", ".join(w.cluster for w in matches)
        raise KeyError(f"workload {name!r} is in several clusters ({clusters}): use --cluster")

    @property
    def spiffe_id(self) -> str:
        """The identity this workload must present."""
        td = TrustDomain(self.cluster.trust_domain)
        return str(workload_id(td, self.workload.namespace, self.workload.service_account))

    # -- catalog ----------------------------------------------------------------------

    def _trust_domains(self, catalog: Catalog | None) -> dict[str, str]:
        out = {c.name: c.trust_domain for c in self.cfg.clusters}
        if catalog is not None:
            for name, view in catalog.clusters.items():
                if view.record is not None:
                    out[name] = view.record.trust_domain
        return out

    def _policy(self, catalog: Catalog | None) -> InboundPolicy:
        return InboundPolicy(
            local_cluster=self.cluster.name,
            served=self.served,
            cluster_trust_domains=self._trust_domains(catalog),
            authorization=self.cfg.authorization,
        )

    def apply_catalog(self, catalog: Catalog) -> None:
        """Apply one catalog: bundles, revocations, routes, admission (see module doc)."""
        self._catalog = catalog
        self.metrics.catalog_version.set(catalog.version)
        self._apply_bundles(catalog.bundles)
        self._apply_revocations(catalog.revocations)
        self.inbound.policy = self._policy(catalog)
        network = self.cluster.network
        view = catalog.clusters.get(self.cluster.name)
        if view is not None and view.record is not None:
            network = view.record.network
        for pool, _, _ in self.pools:
            s = pool.settings
            table = build_routes(
                catalog,
                namespace=s.namespace,
                service=s.service,
                port=s.port,
                source_cluster=self.cluster.name,
                source_network=network,
                local_gateway=(self.cluster.gateway.address, self.cluster.gateway.passthrough_port),
            )
            pool.update(table)
            if table.unroutable:
                log_event(
                    "unroutable_clusters",
                    destination_service=s.label,
                    clusters=list(table.unroutable),
                )
        log_event("catalog_applied", version=catalog.version, epoch=catalog.epoch)

    def _apply_bundles(self, docs: Mapping[str, bytes]) -> None:
        merged = catalog_bundle_update(self.keeper, self.holder.bundles, docs)
        if merged is None:
            return
        try:
            self.holder.update(bundles=merged)
        except TlsConfigError as exc:
            log_event("bundles_refused", detail=str(exc))
            return
        log_event("bundles_updated", domains=sorted(td.name for td in merged))

    def _apply_revocations(self, docs: Mapping[tuple[str, str], bytes]) -> None:
        found = []
        for (td_name, segment), raw in docs.items():
            try:
                rev = Revocation.from_json(raw)
            except (RevocationError, ValueError) as exc:
                log_event("revocation_refused", trust_domain=td_name, key=segment, detail=str(exc))
                continue
            if rev.trust_domain.name != td_name:
                log_event("revocation_refused", trust_domain=td_name, key=segment, detail="domain")
                continue
            found.append(rev)
        new = RevocationSet.of(found)
        if new == self.enforcer.revoked:
            return
        closed = self.enforcer.update(new)
        log_event("revocations_updated", count=len(new), closed_connections=closed)

    def _on_revoked_close(self, peer: VerifiedPeer) -> None:
        self.metrics.revoked_closed.inc()
        log_event("revoked_connection_closed", peer=str(peer.spiffe_id), serial=f"{peer.serial:x}")

    def _on_bundle_refused(self, refused: Refused) -> None:
        log_event(
            "bundle_refused",
            trust_domain=refused.trust_domain.name,
            reason=refused.reason,
            detail=refused.detail,
        )

    async def _follow_catalog(self) -> None:
        current = self._catalog
        while True:
            catalog = await self.source.wait_for(functools.partial(_is_not, current))
            current = catalog
            self.apply_catalog(catalog)

    # -- admin view ---------------------------------------------------------------------

    def svid_expired(self) -> bool:
        """The SVID in use is past its NotAfter: every peer refuses it (trust/validate.py)."""
        return self._now() >= self.holder.svid.not_after

    def ready(self) -> bool:
        # An expired SVID cannot complete a handshake with anyone: not ready.
        return (
            self._listening
            and not self._draining
            and self._catalog is not None
            and not self.svid_expired()
        )

    def _svid_status(self) -> dict[str, Any]:
        from cryptography import x509  # loaded by trust.tls already

        svid = self.holder.svid
        try:
            aki = svid.leaf.extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier
            ).value.key_identifier
        except x509.ExtensionNotFound:
            aki = None
        renewal = None
        if self.rotator is not None:
            st = self.rotator.statistics()
            renewal = {
                "renewals": st.renewals,
                "failures": st.failures,
                "consecutive_failures": st.consecutive_failures,
                "frozen": st.frozen,
                "last_error": st.last_error,
            }
        return {
            "spiffe_id": str(svid.spiffe_id),
            "svid_not_after": svid.not_after.isoformat(),
            "svid_serial": format(svid.serial, "x"),
            "svid_issuer_key_id": aki.hex() if aki else None,
            "svid_expired": self.svid_expired(),
            "svid_renewal": renewal,
            "withdrawn": self.withdrawn,
        }

    def stats(self) -> dict[str, Any]:
        upstreams = {}
        for pool, host, port in self.pools:
            bs = pool.balancer.statistics()
            upstreams[pool.settings.label] = {
                "listen": f"{host}:{self.bound.get(pool.settings.label, port)}",
                "active": pool.active,
                "tiers": [
                    {
                        "name": t.name,
                        "endpoints": t.endpoints,
                        "healthy": t.healthy,
                        "share": round(t.share, 2),
                        "panic": t.panic,
                    }
                    for t in bs.tiers
                ],
                "candidates": [
                    {
                        "name": c.name,
                        "cluster": c.target_cluster,
                        "target": f"{c.host}:{c.port}",
                        "via": c.via,
                        "weight": c.weight,
                        "catalog_healthy": h.catalog_healthy,
                        "active_check": h.active.value,
                        "ejected": h.ejected,
                        "effective": h.effective,
                        "connections": pool.balancer.active(c),
                    }
                    for c, h in pool.health().items()
                ],
                "relay": _relay_stats(pool.relay_stats),
            }
            dest = self.http_destinations.get(pool.settings.label)
            if dest is not None:
                proxy = self.http_proxies[pool.settings.label]
                upstreams[pool.settings.label]["http"] = {
                    "in_flight": proxy.in_flight,
                    "pools": dest.statistics(),
                }
        return {
            "workload": self.workload.name,
            "replica": self.options.replica,
            **self._svid_status(),
            "tls_generation": self.holder.generation,
            "catalog_version": self._catalog.version if self._catalog is not None else None,
            "draining": self._draining,
            "inbound": {
                "active": self.inbound.active,
                "probes": self.inbound.probes,
                "relay": _relay_stats(self.inbound.relay_stats),
                "http": _inbound_http_stats(self.inbound_http),
            },
            "revocations": len(self.enforcer.revoked),
            "upstreams": upstreams,
        }

    def catalog_obj(self) -> dict[str, Any] | None:
        return self._catalog.to_obj() if self._catalog is not None else None

    def config_obj(self) -> dict[str, Any]:
        return {
            "workload": self.workload.name,
            "cluster": self.cluster.name,
            "locality": str(self.caller),
            "spiffe_id": self.spiffe_id,
            "inbound": f"{self.inbound_host}:{self.inbound_port}",
            "admin_port": self.admin_port,
            "serves": [
                {
                    "service": f"{s.service}.{s.namespace}",
                    "port": s.port,
                    "app": f"{s.app_host}:{s.app_port}",
                }
                for s in self.served
            ],
            "upstreams": [
                {
                    "service": p.settings.label,
                    "port": p.settings.port,
                    "listen": f"{h}:{port}",
                    "connect_timeout": p.settings.connect_timeout,
                    "connect_budget": p.settings.connect_budget,
                    "max_connections": p.settings.max_connections,
                    "order": list(p.balancer.config.order),
                    "cluster_preference": list(p.balancer.config.cluster_preference),
                }
                for p, h, port in self.pools
            ],
            "drain_deadline": self.options.drain_deadline,
            "rate_limit": {
                "rate": self.options.rate_limit.rate,
                "burst": self.options.rate_limit.burst,
            },
        }

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def endpoint_records(self) -> list[EndpointRecord]:
        """What this instance registers with its agent: one endpoint per served service."""
        out = []
        for s in self.served:
            out.append(
                EndpointRecord(
                    cluster=self.cluster.name,
                    namespace=s.namespace,
                    service=s.service,
                    endpoint_id=f"{self.workload.name}-{self.options.replica}",
                    address=self.inbound_host,
                    port=self.bound.get("inbound", self.inbound_port),
                    locality=self.caller,
                    weight=self.workload.weight,
                    healthy=True,
                    spiffe_id=self.spiffe_id,
                    network=self.cluster.network,
                )
            )
        return out

    # -- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Begin graceful shutdown (idempotent)."""
        self._stop.set()

    async def run(
        self,
        *,
        bind_any_port: bool = False,
        task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`stop`, then drain and return.

        ``bind_any_port`` binds every listener on port 0 (tests); ``started`` gets the
        bound ports by listener name.
        """
        try:
            await self._run(bind_any_port, task_status)
        finally:
            self.finished.set()

    async def _run(self, bind_any_port: bool, task_status: trio.TaskStatus[dict[str, int]]) -> None:
        if self.source.catalog is not None:
            self.apply_catalog(self.source.catalog)
        async with trio.open_nursery() as root:
            root.start_soon(self._follow_catalog)
            for pool, _, _ in self.pools:
                root.start_soon(pool.run_background)
            if self.admin_port is not None:
                self.bound["admin"] = await root.start(
                    serve_admin,
                    self,
                    self.options.admin_host,
                    0 if bind_any_port else self.admin_port,
                )
            async with trio.open_nursery() as conns:
                for dest in self.http_destinations.values():
                    dest.nursery = conns
                if self.inbound_http is not None:
                    self.inbound_http.nursery = conns
                async with trio.open_nursery() as listeners:
                    for pool, host, port in self.pools:
                        label = pool.settings.label
                        proxy = self.http_proxies.get(label)
                        bind = 0 if bind_any_port else port
                        if proxy is not None:
                            from sidecar.http.server import serve_http_listener

                            self.bound[label] = await listeners.start(
                                serve_http_listener, proxy, host, bind, conns
                            )
                        else:
                            self.bound[label] = await listeners.start(
                                serve_outbound, pool, host, bind, conns
                            )
                    self.bound["inbound"] = await listeners.start(
                        serve_inbound,
                        self.inbound,
                        self.inbound_host,
                        0 if bind_any_port else self.inbound_port,
                        conns,
                    )
                    self._listening = True
                    log_event("sidecar_ready", workload=self.workload.name, ports=self.bound)
                    task_status.started(dict(self.bound))
                    await self._stop.wait()
                    self._draining = True
                    listeners.cancel_scope.cancel()
                # Graceful GOAWAY / Connection: close on every HTTP connection we serve.
                for proxy in self.http_proxies.values():
                    proxy.drain()
                if self.inbound_http is not None:
                    self.inbound_http.drain()
                deadline = trio.current_time() + self.options.drain_deadline
                groups = [p.relay_stats for p, _, _ in self.pools] + [self.inbound.relay_stats]
                results: list[Any] = []

                async def drain(stats: RelayStats) -> None:
                    results.append(await stats.drain(deadline))

                async def drain_http() -> None:
                    # BAD_INPUTS 31: requests in flight finish (or the deadline passes)
                    # before pooled connections are closed under them.
                    with trio.move_on_at(deadline):
                        for proxy in self.http_proxies.values():
                            await proxy.wait_idle()
                        if self.inbound_http is not None:
                            await self.inbound_http.wait_idle()

                async with trio.open_nursery() as d:
                    for stats in groups:
                        d.start_soon(drain, stats)
                    d.start_soon(drain_http)
                log_event(
                    "drained",
                    finished=sum(r.finished for r in results),
                    cancelled=sum(r.cancelled for r in results),
                )
                # Handlers still connecting (not yet relaying) end here too.
                conns.cancel_scope.cancel()
            root.cancel_scope.cancel()


def _port_of(svc: Service, name: str | None) -> ServicePort:
    sp = svc.port(name) if name is not None else svc.ports[0]
    assert sp is not None  # the config checks guarantee it
    return sp


def _inbound_http_stats(http: InboundHttp | None) -> dict[str, int]:
    if http is None:
        return {"connections": 0, "active_connections": 0, "streams": 0, "in_flight": 0}
    return {
        "connections": http.stats.connections,
        "active_connections": http.stats.active_connections,
        "streams": http.stats.streams,
        "in_flight": http.in_flight,
    }


def _in_subset(cfg: FederationConfig, svc: Service, cand: Candidate, subset: Subset) -> bool:
    """Subset membership from the config's workload labels. A direct candidate is one
    instance (endpoint id ``<workload>`` or ``<workload>-<replica>``); a whole remote
    cluster (gateway candidate) belongs when any of its workloads serving the service does."""
    serving = [
        w
        for w in cfg.workloads
        if w.cluster == cand.target_cluster
        and w.namespace == svc.namespace
        and any(s.service == svc.name for s in w.serves)
    ]
    if cand.kind == "direct":
        base = cand.name.rsplit("-", 1)[0]
        serving = [w for w in serving if w.name in (cand.name, base)]
    return any(in_subset(w.labels, subset) for w in serving)


def _is_not(held: Catalog | None, candidate: Catalog) -> bool:
    return candidate is not held


def _relay_stats(stats: RelayStats) -> dict[str, Any]:
    s = stats.statistics()
    return {
        "started": s.relays_started,
        "active": s.relays_active,
        "bytes_a_to_b": s.bytes_a_to_b,
        "bytes_b_to_a": s.bytes_b_to_a,
        "ended": {
            "eof_both": s.ended_eof_both,
            "idle_timeout": s.ended_idle_timeout,
            "a_broken": s.ended_a_broken,
            "b_broken": s.ended_b_broken,
            "cancelled": s.ended_cancelled,
        },
    }
