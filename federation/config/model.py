"""The deployment-config model: one federation, as frozen dataclasses.

This module is the single source of truth for the config format: the parser
(``loader.py``) and the JSON Schema (``schema.py``) are both derived from the
field types, defaults and docstrings below. Field docstrings are shown in the
schema, so they are written for the person editing the YAML.

Invariants of a loaded config (checked by ``checks.py``; ``load_config`` never
returns a config that breaks one): names are unique where documented, every
cross reference resolves, derived defaults (``network``, ``trust_domain``,
``bind``, ``service_account``) are filled in, and no two listeners on one host
share a port.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Literal

from federation.config.scalars import (
    Address,
    Duration,
    ExportTarget,
    HeaderName,
    Host,
    HttpPath,
    Items,
    LabelKey,
    LabelValue,
    Name,
    Percent,
    Port,
    PositiveDuration,
    Range,
    ServiceName,
    ServiceRef,
    SpiffeId,
    TrustDomain,
)

Protocol = Literal["tcp", "http", "http2"]
GatewayMode = Literal["passthrough", "tunnel"]
LocalityLevel = Literal["zone", "cluster", "region", "cloud"]
RetryOn = Literal["connect-failure", "refused-stream", "reset", "5xx", "gateway-error"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
Action = Literal["allow", "deny"]

#: Field metadata key: the YAML key when it differs from the Python name.
YAML_KEY = "yaml_key"
#: Field metadata key: the default ('' in the dataclass) is computed from other fields at load
#: time; the value describes it for the docs and the schema.
DERIVED = "derived"

_EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


# -- federation-wide settings --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayProbeSettings:
    """Active probing of remote gateways by each cluster's gateway."""

    interval: PositiveDuration = 5.0
    """Time between probes of one peer gateway."""
    timeout: PositiveDuration = 1.0
    """A probe not answered within this time counts as failed."""
    failure_threshold: Annotated[int, Range(1, 100)] = 3
    """Consecutive failed probes after which the peer gateway is considered dead."""
    jitter_percent: Percent = 10.0
    """Random spread added to ``interval`` so that probes from many gateways do not align."""


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the federation store lives."""

    backend: Literal["embedded", "etcd"] = "embedded"
    """``embedded`` (in-process, for single-machine runs such as ``meshfed up``) or ``etcd``."""
    endpoints: Annotated[tuple[Address, ...], Items(unique=True)] = ()
    """etcd client endpoints (``host:port``); required when ``backend`` is ``etcd``."""
    dial_timeout: PositiveDuration = 2.0
    """How long one connection attempt to the store may take."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Federation-wide timing and identity settings; every key has a default."""

    lease_ttl: PositiveDuration = 10.0
    """TTL of the leases that hold each agent's cluster, gateway and endpoint keys; a cluster
    cut off from the store for this long disappears for the others."""
    sync_gate_timeout: PositiveDuration = 30.0
    """How long a starting proxy waits for its first catalog snapshot before serving from its
    on-disk cache (or reporting not ready if it has none)."""
    remote_stale_after: Duration | None = None
    """Drop remote catalog data not refreshed for this long; off (null) by default so proxies
    keep routing on the last known catalog while the store is down (static stability)."""
    svid_ttl: PositiveDuration = 3600.0
    """Lifetime of workload, gateway and agent X.509-SVIDs."""
    svid_renew_fraction: Annotated[float, Range(0.1, 0.9)] = 0.5
    """Fraction of an SVID's lifetime after which it is renewed (jittered)."""
    svid_backdate: Duration = 60.0
    """How far NotBefore is backdated to tolerate peer clock skew; must be below ``svid_ttl``."""
    ca_ttl: PositiveDuration = 8760 * 3600.0
    """Lifetime of a cluster's root CA certificate."""
    bundle_refresh_hint: PositiveDuration = 300.0
    """``spiffe_refresh_hint`` published in each trust bundle."""
    overprovisioning_factor: Annotated[float, Range(1.0, 10.0)] = 1.4
    """A locality tier keeps ``min(100, healthy% x factor)`` of the traffic and spills the
    rest to the next tier (Envoy's overprovisioning factor)."""
    gateway_probe: GatewayProbeSettings = GatewayProbeSettings()
    """Active probing of peer gateways."""
    store: StoreSettings = StoreSettings()
    """The federation store."""


@dataclass(frozen=True, slots=True)
class FederationSpec:
    """The federation as a whole."""

    name: Name
    """Federation name; part of the default trust domains (``<cluster>.<name>.mesh``)."""
    settings: Settings = Settings()
    """Federation-wide settings."""


# -- clusters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """A cluster's east-west gateway."""

    address: Host
    """Address other clusters' gateways and sidecars use to reach this gateway."""
    bind: Host = field(default="", metadata={DERIVED: "the gateway's address"})
    """Address the gateway listens on (e.g. '0.0.0.0' behind a load balancer); defaults to
    ``address``."""
    tunnel_port: Port = 15008
    """Port of the HTTP/2 CONNECT tunnel listener (gateway-to-gateway mTLS)."""
    passthrough_port: Port = 15443
    """Port of the SNI passthrough listener (routes by SNI, never decrypts)."""
    admin_port: Port = 15021
    """Port for health, readiness and metrics."""
    modes: Annotated[tuple[GatewayMode, ...], Items(min_items=1, unique=True)] = (
        "tunnel",
        "passthrough",
    )
    """Which listeners run; a peer uses the first mode in its own list that this gateway offers."""


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """A cluster's federation agent."""

    address: Host
    """Address the agent listens on; sidecars and the gateway of this cluster connect to it."""
    catalog_port: Port = 15010
    """Port of the HTTP/2 mTLS catalog stream and CSR signing endpoint."""
    admin_port: Port = 15014
    """Port for health, readiness and metrics."""


@dataclass(frozen=True, slots=True)
class Cluster:
    """One cluster: one agent, one gateway, one CA (unless trust domains are shared)."""

    name: Name
    """Cluster name, unique in the federation."""
    cloud: Name
    """Cloud or site, e.g. ``aws``, ``gcp``, ``azure``, ``onprem``."""
    region: Name
    """Region within the cloud, e.g. ``us-east-1``."""
    zones: Annotated[tuple[Name, ...], Items(min_items=1, unique=True)]
    """Zones this cluster spans; workloads name one of them."""
    gateway: GatewaySpec
    """The east-west gateway."""
    agent: AgentSpec
    """The federation agent."""
    network: Name = field(default="", metadata={DERIVED: "the cluster's name"})
    """Clusters on the same network reach each other's sidecars directly; across networks
    traffic goes through the gateways. Defaults to the cluster's name."""
    trust_domain: TrustDomain = field(
        default="", metadata={DERIVED: "'<cluster>.<federation>.mesh'"}
    )
    """SPIFFE trust domain of this cluster's workloads; clusters may share one. Defaults to
    ``<cluster>.<federation>.mesh``."""
    failover: Annotated[tuple[Name, ...], Items(unique=True)] = ()
    """Preferred order of other clusters when local endpoints are unhealthy; clusters not
    listed follow in locality order (same region, then same cloud, then the rest)."""


# -- services ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a service."""

    name: Name
    """Port name, unique in the service; workloads and upstreams refer to it."""
    port: Port
    """Service port number, unique in the service (used in SNI and the catalog)."""
    protocol: Protocol = "tcp"
    """``tcp`` (opaque bytes), ``http`` (HTTP/1.1) or ``http2`` (h2c, e.g. gRPC); HTTP
    protocols get per-request routing, retries and splits."""


@dataclass(frozen=True, slots=True)
class Failover:
    """How callers fall back from near to far endpoints of this service."""

    order: Annotated[tuple[LocalityLevel, ...], Items(min_items=1, unique=True)] = (
        "zone",
        "cluster",
        "region",
        "cloud",
    )
    """Locality tiers, nearest first: each tier holds the endpoints sharing that level with
    the caller; endpoints matching none form the last tier."""
    cluster_preference: Annotated[tuple[Name, ...], Items(unique=True)] = ()
    """Explicit order of remote clusters, overriding the caller cluster's ``failover`` for
    this service."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-connection and per-request time limits."""

    connect: PositiveDuration = 1.0
    """Limit on establishing one upstream connection (then the next endpoint is tried)."""
    request: PositiveDuration = 15.0
    """Limit on a whole HTTP request including retries (HTTP ports only)."""
    idle: PositiveDuration = 3600.0
    """A connection without traffic for this long is closed."""


@dataclass(frozen=True, slots=True)
class Retries:
    """Retries of failed HTTP requests and of failed connects."""

    attempts: Annotated[int, Range(0, 10)] = 2
    """Retries after the first try (0 disables retries)."""
    per_try_timeout: PositiveDuration | None = None
    """Limit on each try; null means only the request timeout applies."""
    backoff_base: PositiveDuration = 0.025
    """First backoff; doubles per retry, with full jitter."""
    backoff_max: PositiveDuration = 0.25
    """Backoff ceiling; not below ``backoff_base``."""
    budget_percent: Percent = 20.0
    """Retries may add at most this share of the request rate (retry budget)."""
    min_retries_per_second: Annotated[int, Range(0, 10000)] = 10
    """Retries always allowed per second regardless of the budget, so low traffic can retry."""
    retry_on: Annotated[tuple[RetryOn, ...], Items(unique=True)] = (
        "connect-failure",
        "refused-stream",
        "reset",
    )
    """Failures that are retried; ``5xx`` and ``gateway-error`` are only safe for idempotent
    requests."""


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive health checking: eject endpoints that keep failing."""

    enabled: bool = True
    """Whether outlier detection runs for this service."""
    consecutive_failures: Annotated[int, Range(1, 1000)] = 5
    """Connect failures or 5xx in a row that eject an endpoint."""
    interval: PositiveDuration = 10.0
    """How often ejections are re-evaluated."""
    base_ejection_time: PositiveDuration = 30.0
    """First ejection length; multiplied by the number of times the endpoint was ejected."""
    max_ejection_percent: Percent = 50.0
    """At most this share of a service's endpoints is ejected at once."""


@dataclass(frozen=True, slots=True)
class CircuitBreaking:
    """Per-caller limits that fail fast instead of queueing without bound."""

    max_connections: Annotated[int, Range(1, 1_000_000)] = 1024
    """Concurrent upstream connections."""
    max_pending_requests: Annotated[int, Range(0, 1_000_000)] = 1024
    """HTTP requests waiting for a connection."""
    max_requests: Annotated[int, Range(1, 1_000_000)] = 1024
    """Concurrent HTTP requests (HTTP/2: streams)."""


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """Callers' pooled HTTP/2 connections to this service's sidecars (HTTP ports only)."""

    keepalive_interval: PositiveDuration | None = 5.0
    """Send a PING on a pooled connection that received nothing for this long, so a peer
    that vanished without a reset is noticed; null disables PINGs."""
    keepalive_timeout: PositiveDuration = 3.0
    """A PING unanswered this long: the connection is dead and leaves the pool; its requests
    fail as resets and are retried elsewhere per ``retries.retry_on`` (idempotent only)."""
    idle_timeout: PositiveDuration | None = 300.0
    """Close (GOAWAY) a pooled connection that carried no request for this long; null keeps
    idle connections open."""


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """How callers talk to this service."""

    timeouts: Timeouts = Timeouts()
    """Time limits."""
    retries: Retries = Retries()
    """Retry policy."""
    outlier_detection: OutlierDetection = OutlierDetection()
    """Passive health checking."""
    circuit_breaking: CircuitBreaking = CircuitBreaking()
    """Concurrency limits."""
    connection_pool: ConnectionPool = ConnectionPool()
    """Keepalive PINGs and idle close of pooled HTTP/2 connections."""


@dataclass(frozen=True, slots=True)
class Subset:
    """A named group of a service's workloads, selected by workload labels."""

    name: Name
    """Subset name, unique in the service; route splits refer to it."""
    labels: Mapping[LabelKey, LabelValue]
    """Workloads carrying all of these labels belong to the subset."""


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A condition on one request header."""

    name: HeaderName
    """Lower-case header name."""
    exact: str | None = None
    """The header must have exactly this value."""
    prefix: str | None = None
    """The header value must start with this; with neither ``exact`` nor ``prefix`` the
    header only has to be present."""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What requests a route applies to; every given condition must hold."""

    prefix: HttpPath | None = None
    """The path starts with this."""
    exact: HttpPath | None = None
    """The path (without query) equals this; exclusive with ``prefix``."""
    method: HttpMethod | None = None
    """The request method."""
    headers: tuple[HeaderMatch, ...] = ()
    """Header conditions."""


@dataclass(frozen=True, slots=True)
class WeightedSubset:
    """One destination of a traffic split."""

    subset: Name
    """A subset of the service."""
    weight: Annotated[int, Range(0, 10000)]
    """Relative weight; the weights of a split need not sum to 100."""


@dataclass(frozen=True, slots=True)
class FaultDelay:
    """Injected latency."""

    duration: PositiveDuration
    """Added delay."""
    percent: Percent
    """Share of matching requests delayed."""


@dataclass(frozen=True, slots=True)
class FaultAbort:
    """Injected failures."""

    status: Annotated[int, Range(200, 599)]
    """HTTP status returned instead of forwarding."""
    percent: Percent
    """Share of matching requests aborted."""


@dataclass(frozen=True, slots=True)
class Fault:
    """Fault injection for drills; applied by the caller's sidecar."""

    delay: FaultDelay | None = None
    """Latency injection."""
    abort: FaultAbort | None = None
    """Failure injection."""


@dataclass(frozen=True, slots=True)
class Route:
    """An HTTP route; of the routes whose match holds, the most specific wins (exact path,
    then longer prefix, then method, then more headers, then config order: docs/http.md);
    unmatched requests go to all endpoints."""

    name: Name
    """Route name, unique in the service."""
    match: RouteMatch = RouteMatch()
    """Conditions; empty matches every request."""
    split: tuple[WeightedSubset, ...] = ()
    """Weighted destinations; empty means all endpoints of the service."""
    timeout: PositiveDuration | None = None
    """Overrides ``traffic_policy.timeouts.request`` for this route."""
    fault: Fault | None = None
    """Fault injection."""


@dataclass(frozen=True, slots=True)
class Service:
    """A service: its ports, who may import it, and how callers reach it."""

    name: Name
    """Service name, unique within its namespace."""
    namespace: Name
    """Namespace."""
    ports: Annotated[tuple[ServicePort, ...], Items(min_items=1)]
    """Ports (names and numbers unique)."""
    exported_to: Annotated[tuple[ExportTarget, ...], Items(unique=True)] = ()
    """Clusters whose workloads may call this service across clusters: cluster names, or
    ``["*"]`` for every cluster. Empty (the default): not exported, callable only inside the
    clusters that run it."""
    failover: Failover = Failover()
    """Locality failover."""
    traffic_policy: TrafficPolicy = TrafficPolicy()
    """Timeouts, retries, outlier detection, circuit breaking."""
    subsets: tuple[Subset, ...] = ()
    """Named workload subsets for route splits."""
    routes: tuple[Route, ...] = ()
    """HTTP routes (only for services with an ``http`` or ``http2`` port)."""

    @property
    def ref(self) -> ServiceRef:
        """``<name>.<namespace>``."""
        return ServiceRef(self.name, self.namespace)

    def port(self, name: str) -> ServicePort | None:
        """The port called ``name``, if any."""
        return next((p for p in self.ports if p.name == name), None)

    def is_exported_to(self, cluster: str) -> bool:
        """Whether workloads in ``cluster`` may call this service across clusters."""
        return "*" in self.exported_to or cluster in self.exported_to


# -- workloads -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Serves:
    """A service port that a workload's app serves behind its sidecar."""

    service: Name
    """A service in the workload's namespace."""
    port: Name
    """Name of the service's port."""
    app: Address
    """Where the local app listens (plain text); the sidecar forwards inbound calls here."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """A service the workload calls, through a local listener of its sidecar."""

    service: ServiceName
    """``<service>.<namespace>``."""
    listen: Address
    """Local address of the sidecar's outbound listener for this service."""
    port: Name | None = None
    """Name of the service port; may be omitted when the service has exactly one port."""


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload: an app with its sidecar, in one zone of one cluster."""

    name: Name
    """Workload name, unique within its cluster and namespace."""
    cluster: Name
    """Cluster it runs in."""
    zone: Name
    """One of the cluster's zones."""
    namespace: Name
    """Namespace (part of its SPIFFE ID)."""
    address: Host
    """Address of its sidecar's inbound listener, reachable by peers on the same network and
    by its cluster's gateway."""
    inbound_port: Port
    """Port of the sidecar's inbound mTLS listener."""
    service_account: Name = field(default="", metadata={DERIVED: "the workload's name"})
    """Service account: the identity is ``spiffe://<trust-domain>/ns/<namespace>/sa/<this>``.
    Defaults to the workload's name."""
    admin_port: Port | None = None
    """Sidecar health/metrics port; null for none."""
    serves: tuple[Serves, ...] = ()
    """Service ports this workload serves."""
    upstreams: tuple[Upstream, ...] = ()
    """Services it calls, each through a local listener."""
    replicas: Annotated[int, Range(1, 100)] = 1
    """Number of identical instances. On a loopback address (one machine) instance ``i``
    (from 0) adds ``i`` to every port of the workload (inbound, admin, app and listen ports);
    elsewhere each instance runs on a host of its own with the same ports."""
    weight: Annotated[int, Range(1, 128)] = 1
    """Load-balancing weight of each instance."""
    labels: Mapping[LabelKey, LabelValue] = field(default_factory=lambda: _EMPTY_LABELS)
    """Labels for service subsets, e.g. ``{version: v2}``."""


# -- authorization -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySource:
    """Callers a policy applies to; a caller matching any listed entry matches."""

    spiffe_ids: Annotated[tuple[SpiffeId, ...], Items(unique=True)] = ()
    """Exact caller SPIFFE IDs."""
    trust_domains: Annotated[tuple[TrustDomain, ...], Items(unique=True)] = ()
    """Any caller from these trust domains."""
    namespaces: Annotated[tuple[Name, ...], Items(unique=True)] = ()
    """Any caller in these namespaces, in any trust domain of the federation."""


@dataclass(frozen=True, slots=True)
class Policy:
    """An authorization rule enforced by the destination sidecar on the caller's SPIFFE ID.
    Deny rules win over allow rules."""

    name: Name
    """Policy name, unique in the federation (also its store key)."""
    namespace: Name
    """Namespace of the protected service."""
    service: Name
    """The protected service."""
    action: Action
    """``allow`` or ``deny`` the matching callers."""
    source: PolicySource = field(default=PolicySource(), metadata={YAML_KEY: "from"})
    """Matching callers (YAML key ``from``); at least one entry is required."""


@dataclass(frozen=True, slots=True)
class ServiceDefault:
    """The action for callers no policy matches, for one service."""

    namespace: Name
    """Namespace of the service."""
    service: Name
    """The service."""
    action: Action
    """Action for unmatched callers."""


@dataclass(frozen=True, slots=True)
class Authorization:
    """Authorization policies. Fail closed: without a rule, calls are denied."""

    default_action: Action = "deny"
    """Action for callers no policy matches, for services without a ``service_defaults``
    entry."""
    service_defaults: tuple[ServiceDefault, ...] = ()
    """Per-service overrides of ``default_action``."""
    policies: tuple[Policy, ...] = ()
    """Allow and deny rules."""


# -- the document --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """One YAML document: one federation."""

    version: Literal[1]
    """Config format version; always 1."""
    federation: FederationSpec
    """The federation's name and settings."""
    clusters: Annotated[tuple[Cluster, ...], Items(min_items=1)]
    """The clusters."""
    services: tuple[Service, ...] = ()
    """The services."""
    workloads: tuple[Workload, ...] = ()
    """The workloads with their sidecars."""
    authorization: Authorization = Authorization()
    """Authorization policies."""

    def cluster(self, name: str) -> Cluster:
        """The cluster called ``name``; KeyError if there is none."""
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)

    def service(self, ref: ServiceRef) -> Service:
        """The service ``ref``; KeyError if there is none."""
        for s in self.services:
            if s.ref == ref:
                return s
        raise KeyError(str(ref))

    def workloads_in(self, cluster: str) -> tuple[Workload, ...]:
        """Workloads running in ``cluster``, in document order."""
        return tuple(w for w in self.workloads if w.cluster == cluster)

    def clusters_serving(self, ref: ServiceRef) -> tuple[str, ...]:
        """Clusters with at least one workload serving ``ref``, in cluster order."""
        serving = {
            w.cluster
            for w in self.workloads
            if w.namespace == ref.namespace and any(s.service == ref.name for s in w.serves)
        }
        return tuple(c.name for c in self.clusters if c.name in serving)

    def authorization_default(self, ref: ServiceRef) -> Action:
        """The action for callers of ``ref`` that no policy matches."""
        for d in self.authorization.service_defaults:
            if d.namespace == ref.namespace and d.service == ref.name:
                return d.action
        return self.authorization.default_action
