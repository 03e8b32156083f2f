"""Where an outbound connection may go: catalog + caller -> balancer candidates.

This is the one place where the sidecar (and the gateway engineer's work) decide
how a caller reaches a service's endpoints. Pure: no trio, no sockets, no clock.

Rules (docs/sidecar.md "Routing"):

* An endpoint on the caller's **network** (the caller's cluster, or another
  cluster that shares its network) is one balancer candidate of its own: connect
  straight to ``address:port`` (the destination sidecar's inbound mTLS port) and
  require exactly the endpoint's ``spiffe_id``.
* A remote cluster on **another network** is ONE candidate for the whole cluster,
  reached through gateways. Its locality is the cluster's cloud/region with zone
  ``"*"`` (so it can never fall in the caller's zone tier), its weight is the
  number of the service's healthy endpoints there, and it is healthy while that
  number is positive. The connect target is the target cluster's own passthrough
  listener when one of its gateways offers ``passthrough``; otherwise the caller's
  **local** gateway's passthrough (SNI) listener, which tunnels to the target
  over HTTP/2 CONNECT. Either way the bytes are the inner mTLS, end to end; the
  expected peer is any ``spiffe_id`` of the service's endpoints in the target
  cluster (every exported endpoint is in the catalog).
* Every candidate carries the SNI the inner ClientHello sends:
  ``MeshSni(service, namespace, port, target_cluster, source_cluster)``.

A remote cluster that needs a gateway but has no usable route (no passthrough
gateway there and none locally) yields no candidate; it is reported in
:attr:`RouteTable.unroutable` so the adapter can log it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from federation.catalog import Catalog
from federation.config.model import Cluster as ClusterSpec
from federation.config.model import Service as ServiceSpec
from federation.model import EndpointRecord, GatewayRecord, Locality
from sidecar.balancer import BalancerConfig
from sidecar.locality import TierRule
from sidecar.sni import MeshSni

__all__ = [
    "ANY_ZONE",
    "Candidate",
    "RouteTable",
    "balancer_config_for",
    "build_routes",
]

ANY_ZONE: Final = "*"
"""Zone of a whole-cluster (gateway) candidate: matches no caller zone."""

CandidateKind = Literal["direct", "gateway"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One thing the balancer can pick for a new outbound connection.

    Hashable and compared by value, so the balancer, the outlier detector and the
    health checkers can key on it; a catalog change that alters any field makes a
    new candidate (its health history starts afresh, which is what a moved
    endpoint deserves).
    """

    kind: CandidateKind
    """``direct`` (a sidecar on our network) or ``gateway`` (a remote cluster)."""
    target_cluster: str
    """Cluster that serves the connection."""
    name: str
    """Endpoint id for ``direct``; ``cluster:<name>`` for ``gateway``; for logs/admin."""
    locality: Locality
    """Where it runs (zone ``*`` for a whole cluster)."""
    weight: int
    """Balancer weight: the endpoint's weight, or the cluster's healthy endpoint count."""
    host: str
    """Address to open TCP to."""
    port: int
    """Port to open TCP to."""
    sni: str
    """Server name of the inner TLS ClientHello (a formatted :class:`MeshSni`)."""
    expected_ids: frozenset[str] = field(default=frozenset())
    """SPIFFE IDs the inner TLS peer may present (never empty for a built candidate)."""
    via: str = "direct"
    """``direct``, ``passthrough`` (the target's gateway) or ``local-gateway`` (tunnel)."""


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The candidates for one upstream, with their catalog health."""

    candidates: tuple[Candidate, ...]
    """In a stable order (cluster, then endpoint id)."""
    catalog_healthy: Mapping[Candidate, bool]
    """Health per candidate as the catalog says (endpoint flag, or healthy count > 0)."""
    unroutable: tuple[str, ...] = ()
    """Remote clusters with endpoints but no gateway route (sorted)."""


def balancer_config_for(
    service: ServiceSpec,
    caller_cluster: ClusterSpec,
    overprovisioning_factor: float,
) -> BalancerConfig:
    """The balancer settings for calls from ``caller_cluster`` to ``service``.

    The config's order (``zone, cluster, region, cloud`` by default) maps onto the
    tier rules; ``preferred`` (the service's ``cluster_preference``, else the
    caller cluster's ``failover`` list) goes right after ``cluster``, i.e. once
    the caller's own cluster is exhausted, as the config documents; ``any`` comes
    last because the config says endpoints matching no level form the last tier.
    Health is measured by weight so a remote cluster counts for its endpoints.
    """
    preference = tuple(
        c
        for c in (service.failover.cluster_preference or caller_cluster.failover)
        if c != caller_cluster.name
    )
    order: list[TierRule] = []
    for level in service.failover.order:
        order.append(level)
        if level == "cluster" and preference:
            order.append("preferred")
    if preference and "preferred" not in order:
        order.append("preferred")
    order.append("any")
    return BalancerConfig(
        order=tuple(order),
        cluster_preference=preference if "preferred" in order else (),
        overprovisioning_factor=overprovisioning_factor,
        weighted_health=True,
    )


def _passthrough_gateway(gateways: Iterable[GatewayRecord]) -> GatewayRecord | None:
    for gw in sorted(gateways, key=lambda g: g.gateway_id):
        if "passthrough" in gw.modes and gw.passthrough_port is not None:
            return gw
    return None


def build_routes(
    catalog: Catalog,
    *,
    namespace: str,
    service: str,
    port: int,
    source_cluster: str,
    source_network: str,
    local_gateway: tuple[str, int] | None = None,
) -> RouteTable:
    """Candidates for calling ``service.namespace`` port ``port`` from ``source_cluster``.

    ``local_gateway`` is the own cluster's gateway SNI listener (host, port) from the
    deployment config. It is used for outbound tunnels even when the local gateway
    does not offer passthrough to *remote* callers (a tunnel-only gateway still
    listens there for its own sidecars, and its GatewayRecord then carries no
    passthrough port). Without it, the local GatewayRecord's passthrough port is used.

    Endpoints of clusters on ``source_network`` are direct candidates; each other
    cluster with endpoints of the service becomes one gateway candidate (see the
    module docstring). Deterministic: the same catalog gives the same table.
    """
    endpoints = catalog.endpoints(namespace, service)
    clusters = catalog.clusters
    candidates: list[Candidate] = []
    healthy: dict[Candidate, bool] = {}
    remote: dict[str, list[EndpointRecord]] = {}
    for ep in endpoints:
        if ep.network == source_network:
            cand = Candidate(
                kind="direct",
                target_cluster=ep.cluster,
                name=ep.endpoint_id,
                locality=ep.locality,
                weight=ep.weight,
                host=ep.address,
                port=ep.port,
                sni=MeshSni(service, namespace, port, ep.cluster, source_cluster).format(),
                expected_ids=frozenset({ep.spiffe_id}),
            )
            candidates.append(cand)
            healthy[cand] = ep.healthy
        else:
            remote.setdefault(ep.cluster, []).append(ep)

    local_view = clusters.get(source_cluster)
    local_gw_record = _passthrough_gateway(local_view.gateways) if local_view is not None else None
    local_gw: tuple[str, int] | None = local_gateway
    local_peer_alive: dict[str, bool] = {}
    for gw_record in local_view.gateways if local_view is not None else ():
        for peer, alive in gw_record.peer_alive.items():
            local_peer_alive[peer] = local_peer_alive.get(peer, False) or alive
    if local_gw is None and local_gw_record is not None:
        assert local_gw_record.passthrough_port is not None
        local_gw = (local_gw_record.address, local_gw_record.passthrough_port)
    unroutable: list[str] = []
    for cluster_name in sorted(remote):
        eps = remote[cluster_name]
        view = clusters.get(cluster_name)
        target_gw = _passthrough_gateway(view.gateways) if view is not None else None
        if target_gw is not None:
            host, gw_port, via = target_gw.address, target_gw.passthrough_port, "passthrough"
        elif local_gw is not None:
            (host, gw_port), via = local_gw, "local-gateway"
        else:
            unroutable.append(cluster_name)
            continue
        assert gw_port is not None  # _passthrough_gateway only returns gateways with one
        record = view.record if view is not None else None
        first = eps[0].locality
        cloud = record.cloud if record is not None else first.cloud
        region = record.region if record is not None else first.region
        count = sum(1 for e in eps if e.healthy)
        cand = Candidate(
            kind="gateway",
            target_cluster=cluster_name,
            name=f"cluster:{cluster_name}",
            locality=Locality(cloud=cloud, region=region, zone=ANY_ZONE, cluster=cluster_name),
            # The balancer needs weight >= 1; an all-unhealthy cluster is marked unhealthy.
            weight=max(1, count),
            host=host,
            port=gw_port,
            sni=MeshSni(service, namespace, port, cluster_name, source_cluster).format(),
            expected_ids=frozenset(e.spiffe_id for e in eps),
            via=via,
        )
        candidates.append(cand)
        # Our gateway probes every peer gateway; one it reports dead takes its whole
        # cluster out of rotation (federation/agent/gatewaywatch.py publishes this).
        healthy[cand] = count > 0 and local_peer_alive.get(cluster_name, True)
    return RouteTable(tuple(candidates), healthy, tuple(unroutable))
