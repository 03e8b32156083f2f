"""A one-screen text summary of a federation's topology (for ``meshfed config validate``)."""

from __future__ import annotations

from collections.abc import Sequence

from federation.config.model import FederationConfig, Service


def summarize(config: FederationConfig) -> str:
    """Clusters, services and workload placement as aligned plain-text tables."""
    instances = sum(w.replicas for w in config.workloads)
    lines = [
        f"federation {config.federation.name}: {len(config.clusters)} clusters, "
        f"{len(config.services)} services, {len(config.workloads)} workloads "
        f"({instances} instances)",
        "",
    ]
    lines += _table(
        ("CLUSTER", "CLOUD", "REGION", "ZONES", "NETWORK", "TRUST DOMAIN", "GATEWAY"),
        [
            (
                c.name,
                c.cloud,
                c.region,
                ",".join(c.zones),
                c.network,
                c.trust_domain,
                " ".join(
                    f"{mode}={c.gateway.address}:"
                    f"{c.gateway.tunnel_port if mode == 'tunnel' else c.gateway.passthrough_port}"
                    for mode in c.gateway.modes
                ),
            )
            for c in config.clusters
        ],
    )
    lines.append("")
    lines += _table(
        ("SERVICE", "PORTS", "RUNS IN", "EXPORTED TO"),
        [
            (
                str(s.ref),
                ",".join(f"{p.name}:{p.port}/{p.protocol}" for p in s.ports),
                ",".join(config.clusters_serving(s.ref)) or "-",
                _exports(s),
            )
            for s in config.services
        ],
    )
    lines.append("")
    placement: list[tuple[str, ...]] = []
    for c in config.clusters:
        for zone in c.zones:
            here = [w for w in config.workloads if w.cluster == c.name and w.zone == zone]
            if here:
                names = ", ".join(
                    f"{w.namespace}/{w.name}" + (f" x{w.replicas}" if w.replicas > 1 else "")
                    for w in here
                )
                placement.append((c.name, zone, names))
    lines += _table(("CLUSTER", "ZONE", "WORKLOADS"), placement)
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _exports(service: Service) -> str:
    if not service.exported_to:
        return "(not exported)"
    if "*" in service.exported_to:
        return "* (all clusters)"
    return ",".join(service.exported_to)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
