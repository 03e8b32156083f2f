"""The federation as the store holds it, for ``meshfed federation ...`` (pure; ``now`` passed in).

Built from one ``get_prefix("/meshfed/v1/")`` read, so every figure is from one
revision. Values that do not decode are counted, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes

from federation import keys
from federation.model import (
    ClusterRecord,
    EndpointRecord,
    ExportRecord,
    GatewayRecord,
    RecordError,
    decode_store_value,
)
from federation.names import InvalidName
from federation.store.api import KeyValue
from trust.bundle import TrustBundle
from trust.errors import BundleError, InvalidSpiffeId
from trust.spiffe import TrustDomain


@dataclass
class Overview:
    """Everything decodable under ``/meshfed/v1/`` at ``revision``."""

    revision: int
    clusters: dict[str, tuple[ClusterRecord, KeyValue]] = field(default_factory=dict)
    gateways: dict[str, list[GatewayRecord]] = field(default_factory=dict)
    exports: dict[tuple[str, str, str], ExportRecord] = field(default_factory=dict)
    endpoints: list[EndpointRecord] = field(default_factory=list)
    bundles: dict[str, TrustBundle | str] = field(default_factory=dict)
    """By trust domain: the bundle, or why it does not parse."""
    leased: set[str] = field(default_factory=set)
    bad: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, revision: int, items: Iterable[KeyValue]) -> Overview:
        ov = cls(revision)
        for kv in items:
            try:
                parsed = keys.parse(kv.key)
            except InvalidName:
                ov.bad.append(kv.key)
                continue
            if kv.lease:
                ov.leased.add(kv.key)
            if parsed.kind == "bundles":
                td_name = parsed["trust_domain"]
                try:
                    td = TrustDomain.parse("spiffe://" + td_name)
                    ov.bundles[td_name] = TrustBundle.from_json(td, kv.value)
                except (BundleError, InvalidSpiffeId) as exc:
                    ov.bundles[td_name] = f"malformed: {exc}"
                continue
            if parsed.kind in ("revocations", "policies"):
                continue
            try:
                entry = decode_store_value(parsed, kv.value)
            except RecordError as exc:
                ov.bad.append(f"{kv.key}: {exc}")
                continue
            if isinstance(entry, ClusterRecord):
                ov.clusters[entry.name] = (entry, kv)
            elif isinstance(entry, GatewayRecord):
                ov.gateways.setdefault(entry.cluster, []).append(entry)
            elif isinstance(entry, ExportRecord):
                ov.exports[(entry.cluster, entry.namespace, entry.service)] = entry
            elif isinstance(entry, EndpointRecord):
                ov.endpoints.append(entry)
        ov.endpoints.sort(key=lambda e: (e.namespace, e.service, e.cluster, e.endpoint_id))
        return ov

    def cluster_names(self) -> list[str]:
        named = set(self.clusters) | set(self.gateways)
        named |= {c for c, _, _ in self.exports} | {e.cluster for e in self.endpoints}
        return sorted(named)

    def status(self, now: float) -> dict[str, Any]:
        """Per cluster: record, liveness, ages, gateways, exported/imported counts."""
        out: dict[str, Any] = {}
        for name in self.cluster_names():
            found = self.clusters.get(name)
            rec = found[0] if found else None
            exported = [x for (c, _, _), x in self.exports.items() if c == name and x.exported_to]
            imported = [
                x for (c, _, _), x in self.exports.items() if c != name and x.exports_to(name)
            ]
            eps = [e for e in self.endpoints if e.cluster == name]
            out[name] = {
                "registered": rec is not None,
                "live": rec is not None and keys.cluster(name) in self.leased,
                "incarnation": rec.incarnation if rec else None,
                "uptime": round(now - rec.started_at, 1) if rec else None,
                "record_age": (
                    round(now - rec.written_at, 1) if rec and rec.written_at is not None else None
                ),
                "trust_domain": rec.trust_domain if rec else None,
                "region": f"{rec.cloud}/{rec.region}" if rec else None,
                "gateways": [
                    {
                        "id": g.gateway_id,
                        "address": g.address,
                        "modes": list(g.modes),
                        "tunnel_port": g.tunnel_port,
                        "passthrough_port": g.passthrough_port,
                    }
                    for g in sorted(self.gateways.get(name, []), key=lambda g: g.gateway_id)
                ],
                "exported": len(exported),
                "imported": len(imported),
                "endpoints": len(eps),
                "healthy_endpoints": sum(1 for e in eps if e.healthy),
            }
        return out

    def services(self) -> list[dict[str, Any]]:
        refs = sorted({(ns, svc) for (_, ns, svc) in self.exports})
        out = []
        for ns, svc in refs:
            by_cluster = {c: x for (c, n, s), x in self.exports.items() if (n, s) == (ns, svc)}
            out.append(
                {
                    "service": f"{svc}.{ns}",
                    "clusters": {
                        c: {
                            "exported_to": list(x.exported_to),
                            "ports": [f"{p.name}:{p.port}/{p.protocol}" for p in x.ports],
                            "endpoints": sum(
                                1
                                for e in self.endpoints
                                if (e.cluster, e.namespace, e.service) == (c, ns, svc)
                            ),
                        }
                        for c, x in sorted(by_cluster.items())
                    },
                }
            )
        return out

    def endpoints_of(self, namespace: str, service: str) -> list[EndpointRecord]:
        return [e for e in self.endpoints if (e.namespace, e.service) == (namespace, service)]

    def bundle_summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for td, b in sorted(self.bundles.items()):
            if isinstance(b, str):
                out[td] = {"error": b}
            else:
                out[td] = {"sequence": b.sequence, "roots": fingerprints(b.roots)}
        return out


def fingerprints(roots: Iterable[Any]) -> list[str]:
    """Short SHA-256 fingerprints of root certificates (the first 16 hex digits)."""
    return [r.fingerprint(hashes.SHA256()).hex()[:16] for r in roots]


def compare_bundles(
    store: Mapping[str, Mapping[str, Any]], agent: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Differences between the store's bundles and one agent's view (empty: agree)."""
    problems = []
    for td, want in sorted(store.items()):
        got = agent.get(td)
        if "error" in want:
            problems.append(f"{td}: store holds a malformed bundle ({want['error']})")
        elif got is None:
            problems.append(f"{td}: agent does not hold it (store has sequence {want['sequence']})")
        elif got.get("sequence") != want["sequence"] or list(got.get("roots", [])) != list(
            want["roots"]
        ):
            problems.append(
                f"{td}: agent holds sequence {got.get('sequence')} roots {got.get('roots')}, "
                f"store has sequence {want['sequence']} roots {want['roots']}"
            )
    return problems
