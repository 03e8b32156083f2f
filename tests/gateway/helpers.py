"""Catalogs and identities for the gateway tests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from federation import keys
from federation.catalog import Catalog
from federation.config.loader import load_config
from federation.config.model import FederationConfig
from federation.model import (
    ClusterRecord,
    EndpointRecord,
    Entry,
    ExportRecord,
    GatewayRecord,
    Locality,
    ServicePort,
)
from trust.bundle import TrustBundle
from trust.ca import CertificateAuthority
from trust.spiffe import TrustDomain, gateway_id, workload_id
from trust.svid import Svid, issue_svid
from trust.validate import TrustBundleSet

Record = ClusterRecord | GatewayRecord | ExportRecord | EndpointRecord

NOW = dt.datetime.now(dt.UTC)
ZONES = {"a": "za1", "b": "zb1", "c": "zc1"}


def td(cluster: str) -> str:
    return f"{cluster}.test.mesh"


def cluster_record(name: str, address: str = "127.0.0.1") -> ClusterRecord:
    return ClusterRecord(
        name=name,
        cloud="cloud-" + name,
        region="region-" + name,
        zones=(ZONES.get(name, "z1"),),
        network="net-" + name,
        trust_domain=td(name),
        agent_address=address,
        agent_port=15010,
        incarnation="inc-1",
        started_at=1.0,
    )


def gateway_record(
    cluster: str,
    modes: tuple[str, ...] = ("tunnel", "passthrough"),
    address: str = "127.0.0.1",
    tunnel_port: int = 15008,
    passthrough_port: int = 15443,
) -> GatewayRecord:
    return GatewayRecord(
        cluster=cluster,
        gateway_id="gw-0",
        address=address,
        tunnel_port=tunnel_port if "tunnel" in modes else None,
        passthrough_port=passthrough_port if "passthrough" in modes else None,
        modes=modes,  # type: ignore[arg-type]
        healthy_endpoints={},
        peer_alive={},
    )


def export(cluster: str, service: str, to: tuple[str, ...], port: int = 8080) -> ExportRecord:
    return ExportRecord(
        cluster=cluster,
        namespace="demo",
        service=service,
        ports=(ServicePort("http", port, "tcp"),),
        exported_to=to,
    )


def endpoint(
    cluster: str,
    service: str,
    eid: str,
    *,
    address: str = "127.0.0.1",
    port: int = 17100,
    zone: str | None = None,
    healthy: bool = True,
) -> EndpointRecord:
    return EndpointRecord(
        cluster=cluster,
        namespace="demo",
        service=service,
        endpoint_id=eid,
        address=address,
        port=port,
        locality=Locality("cloud-" + cluster, "region-" + cluster, zone or ZONES[cluster], cluster),
        weight=1,
        healthy=healthy,
        spiffe_id=str(workload_id(TrustDomain(td(cluster)), "demo", service)),
        network="net-" + cluster,
    )


def catalog(local: str, records: Iterable[Record], version: int = 1) -> Catalog:
    return Catalog(
        epoch="e1",
        version=version,
        local_cluster=local,
        entries={r.key(): r for r in records},
        last_seen={},
    )


def cas(*clusters: str) -> dict[str, CertificateAuthority]:
    return {c: CertificateAuthority.create(TrustDomain(td(c)), NOW)[0] for c in clusters}


def bundle_set(authorities: dict[str, CertificateAuthority]) -> TrustBundleSet:
    return TrustBundleSet({ca.trust_domain: (ca.root,) for ca in authorities.values()})


def gateway_svid(ca: CertificateAuthority) -> Svid:
    return issue_svid(ca, gateway_id(ca.trust_domain), NOW, dt.timedelta(hours=1))


def bundle_doc(ca_roots: tuple[CertificateAuthority, ...], sequence: int) -> bytes:
    """A SPIFFE bundle document of the (one) trust domain of ``ca_roots``, all their roots."""
    td_ = ca_roots[0].trust_domain
    return TrustBundle(td_, tuple(ca.root for ca in ca_roots), sequence).to_json().encode()


def catalog_with_bundles(
    local: str, records: Iterable[Record], bundles: dict[str, bytes], version: int = 1
) -> Catalog:
    """:func:`catalog` plus the trust-bundle entries the agent publishes (by trust domain)."""
    entries: dict[str, Entry] = {r.key(): r for r in records}
    entries.update({keys.bundle(name): doc for name, doc in bundles.items()})
    return Catalog(epoch="e1", version=version, local_cluster=local, entries=entries, last_seen={})


def write_gateway_config(
    path: Path, clusters: dict[str, str], trust_domains: dict[str, str] | None = None
) -> FederationConfig:
    """A config of ``clusters`` (name -> loopback host), tunnel+passthrough gateways."""
    lines = ["version: 1", "federation:", "  name: test", "clusters:"]
    for i, (c, host) in enumerate(clusters.items()):
        lines += [
            f"  - name: {c}",
            f"    cloud: cloud-{c}",
            f"    region: region-{c}",
            f"    zones: [{ZONES.get(c, 'z1')}]",
            f"    trust_domain: {(trust_domains or {}).get(c, td(c))}",
            f"    gateway: {{address: {host}, tunnel_port: {21000 + i}, "
            f"passthrough_port: {21100 + i}, admin_port: {21200 + i}, "
            "modes: [tunnel, passthrough]}",
            f"    agent: {{address: {host}, catalog_port: {21300 + i}, admin_port: {21400 + i}}}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)
