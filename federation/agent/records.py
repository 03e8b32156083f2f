"""What one cluster's agent publishes, computed from the deployment config (pure).

* the cluster record (a fresh ``incarnation`` per agent process: the epoch);
* one gateway record (``gw-0``) from ``clusters[].gateway``, its healthy counts
  derived from the endpoints published for exported services;
* one export per service served in the cluster, ``exported_to`` as configured
  (empty: ports published for the own cluster only; the catalog's import rule
  keeps it invisible elsewhere);
* one endpoint per workload replica and served service: id ``<workload>-<i>``,
  inbound port ``inbound_port + i`` on loopback hosts (docs/config.md "Ports and
  hosts"), SPIFFE ID from the cluster's trust domain and the service account.

Whether a key is leased is part of the desired state: exports are not (they
describe configuration, not liveness), everything else is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from federation import keys
from federation.config.model import Cluster, FederationConfig, Workload
from federation.model import (
    ClusterRecord,
    EndpointRecord,
    ExportRecord,
    GatewayRecord,
    Locality,
    ServicePort,
)
from trust.spiffe import TrustDomain, workload_id

GATEWAY_ID = "gw-0"
"""The id of the one east-west gateway a config describes per cluster."""

Record = ClusterRecord | GatewayRecord | ExportRecord | EndpointRecord


@dataclass(frozen=True, slots=True)
class Desired:
    """One key the agent wants in the store."""

    record: Record
    """The record (``written_at`` is stamped when written)."""
    leased: bool
    """Attach the agent's lease (the key vanishes with the agent)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cluster_record(
    config: FederationConfig, cluster: str, incarnation: str, started_at: float
) -> ClusterRecord:
    c = config.cluster(cluster)
    return ClusterRecord(
        name=c.name,
        cloud=c.cloud,
        region=c.region,
        zones=tuple(c.zones),
        network=c.network,
        trust_domain=str(c.trust_domain),
        agent_address=c.agent.address,
        agent_port=c.agent.catalog_port,
        incarnation=incarnation,
        started_at=started_at,
    )


def workload_endpoints(
    config: FederationConfig, c: Cluster, w: Workload, *, healthy: bool = True
) -> list[EndpointRecord]:
    """The endpoints of one workload: one per replica and served service."""
    td = TrustDomain.parse("spiffe://" + str(c.trust_domain))
    spiffe = str(workload_id(td, w.namespace, w.service_account))
    locality = Locality(cloud=c.cloud, region=c.region, zone=w.zone, cluster=c.name)
    out = []
    for i in range(w.replicas):
        port = w.inbound_port + i if _is_loopback(w.address) else w.inbound_port
        for serves in w.serves:
            out.append(
                EndpointRecord(
                    cluster=c.name,
                    namespace=w.namespace,
                    service=serves.service,
                    endpoint_id=f"{w.name}-{i}",
                    address=w.address,
                    port=port,
                    locality=locality,
                    weight=w.weight,
                    healthy=healthy,
                    spiffe_id=spiffe,
                    network=c.network,
                )
            )
    return out


def static_records(
    config: FederationConfig,
    cluster: str,
    incarnation: str,
    started_at: float,
    *,
    declared_healthy: bool = False,
) -> dict[str, Desired]:
    """Everything the config says ``cluster`` publishes, by key (gateway counts included).

    Workload endpoints declared in the config are published *unhealthy* unless
    ``declared_healthy``: the config says where an endpoint may run, its sidecar's
    registration (see :class:`~federation.agent.registrar.EndpointRegistry`) says it
    does. A sidecar that dies drops its registration and the endpoint reverts to
    declared-unhealthy, so callers everywhere stop routing to it.
    """
    c = config.cluster(cluster)
    out: dict[str, Desired] = {}
    rec = cluster_record(config, cluster, incarnation, started_at)
    out[rec.key()] = Desired(rec, leased=True)
    served: set[tuple[str, str]] = set()
    for w in config.workloads_in(cluster):
        for ep in workload_endpoints(config, c, w, healthy=declared_healthy):
            out[ep.key()] = Desired(ep, leased=True)
            served.add((ep.namespace, ep.service))
    for svc in config.services:
        if (svc.namespace, svc.name) not in served:
            continue
        export = ExportRecord(
            cluster=cluster,
            namespace=svc.namespace,
            service=svc.name,
            ports=tuple(ServicePort(p.name, p.port, p.protocol) for p in svc.ports),
            exported_to=tuple(str(t) for t in svc.exported_to),
        )
        out[export.key()] = Desired(export, leased=False)
    gw = gateway_record(c, ())
    out[gw.key()] = Desired(gw, leased=True)
    return out


def gateway_record(c: Cluster, endpoints: Iterable[EndpointRecord]) -> GatewayRecord:
    counts: dict[str, int] = {}
    for ep in endpoints:
        if ep.healthy:
            ref = f"{ep.namespace}/{ep.service}"
            counts[ref] = counts.get(ref, 0) + 1
    modes = tuple(c.gateway.modes)
    return GatewayRecord(
        cluster=c.name,
        gateway_id=GATEWAY_ID,
        address=c.gateway.address,
        tunnel_port=c.gateway.tunnel_port if "tunnel" in modes else None,
        passthrough_port=c.gateway.passthrough_port if "passthrough" in modes else None,
        modes=modes,
        healthy_endpoints=dict(sorted(counts.items())),
        peer_alive={},
    )


def with_gateway_counts(
    c: Cluster, desired: Mapping[str, Desired], *, peer_alive: Mapping[str, bool] | None = None
) -> dict[str, Desired]:
    """``desired`` with the gateway's healthy counts recomputed from its exported endpoints
    and, when given, the peer liveness its gateway reports.

    Only services this cluster exports are counted: a count for an unexported
    service would tell other clusters it exists.
    """
    exported = {
        (d.record.namespace, d.record.service)
        for d in desired.values()
        if isinstance(d.record, ExportRecord) and d.record.exported_to
    }
    eps = [
        d.record
        for d in desired.values()
        if isinstance(d.record, EndpointRecord)
        and (d.record.namespace, d.record.service) in exported
    ]
    gw = gateway_record(c, eps)
    out = dict(desired)
    old = out.get(gw.key())
    if peer_alive is not None:
        gw = replace(gw, peer_alive=dict(sorted(peer_alive.items())))
    elif old is not None and isinstance(old.record, GatewayRecord):
        gw = replace(gw, peer_alive=old.record.peer_alive)
    out[gw.key()] = Desired(gw, leased=True)
    return out


def own_prefixes(cluster: str) -> tuple[str, ...]:
    """The prefixes under which only ``cluster``'s agent writes (besides its cluster key)."""
    return (
        keys.prefix("gateways", cluster),
        keys.prefix("exports", cluster),
        keys.prefix("endpoints", cluster),
    )
