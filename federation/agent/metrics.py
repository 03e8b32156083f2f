"""Prometheus metrics of one agent, in its own ``CollectorRegistry`` (names ``meshfed_agent_*``).

Counters and the lag histogram are fed as things happen; gauges that depend on
"now" (peer last-seen age, sync state) are recomputed by :meth:`refresh` just
before each scrape, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from federation.agent.registration import Phase

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.peer_synced = Gauge(
            "meshfed_agent_peer_synced",
            "1 while the peer cluster's data is held and confirmed by a live watch, else 0.",
            ["source_cluster"],
            registry=r,
        )
        self.peer_last_seen_age = Gauge(
            "meshfed_agent_peer_last_seen_age_seconds",
            "Seconds since the peer cluster's data was last confirmed.",
            ["source_cluster"],
            registry=r,
        )
        self.sync_lag = Histogram(
            "meshfed_agent_sync_lag_seconds",
            "Writer's written_at to applied here, for remote records (wall clocks).",
            ["source_cluster"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.catalog_version = Gauge(
            "meshfed_agent_catalog_version",
            "Current catalog version (within its epoch).",
            registry=r,
        )
        self.catalog_entries = Gauge(
            "meshfed_agent_catalog_entries", "Visible entries in the catalog.", registry=r
        )
        self.synced = Gauge(
            "meshfed_agent_synced",
            "1 once the first full sync with the store is done.",
            registry=r,
        )
        self.store_up = Gauge(
            "meshfed_agent_store_up", "1 while the store answers the agent's calls.", registry=r
        )
        self.lease_renewals = Counter(
            "meshfed_agent_lease_renewals_total", "Successful lease keepalives.", registry=r
        )
        self.lease_failures = Counter(
            "meshfed_agent_lease_renewal_failures_total",
            "Failed lease keepalives by reason (unavailable, lease_lost).",
            ["reason"],
            registry=r,
        )
        self.fenced = Gauge(
            "meshfed_agent_fenced",
            "1 while the agent may not write its cluster's keys.",
            registry=r,
        )
        self.fences = Counter(
            "meshfed_agent_fences_total",
            "Times the agent was fenced, by reason.",
            ["reason"],
            registry=r,
        )
        self.phase = Gauge(
            "meshfed_agent_registration_phase",
            "1 for the current registration phase.",
            ["phase"],
            registry=r,
        )
        self.registrations = Counter(
            "meshfed_agent_registrations_total",
            "Successful claims of the cluster record.",
            registry=r,
        )
        self.writes = Counter(
            "meshfed_agent_store_writes_total",
            "Compare-and-swap writes and deletes of the cluster's own keys, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.bundle_refusals = Counter(
            "meshfed_agent_bundle_refusals_total",
            "Trust bundles refused (the last good one is kept), by domain and reason.",
            ["trust_domain", "reason"],
            registry=r,
        )
        self.rejected_records = Counter(
            "meshfed_agent_rejected_records_total",
            "Store keys or values the catalog could not use.",
            registry=r,
        )
        self.expired_clusters = Counter(
            "meshfed_agent_expired_clusters_total",
            "Remote clusters dropped as stale (settings.remote_stale_after).",
            registry=r,
        )
        self.persist_failures = Counter(
            "meshfed_agent_catalog_persist_failures_total",
            "Failed writes of <state-dir>/catalog.json.",
            registry=r,
        )

    def set_phase(self, phase: Phase) -> None:
        for p in Phase:
            self.phase.labels(p.value).set(1 if p is phase else 0)
        self.fenced.set(1 if phase is Phase.FENCED else 0)

    def refresh_peers(self, now: float, last_seen: Mapping[str, float], live: bool) -> None:
        """Recompute per-peer gauges from the catalog's ``last_seen``."""
        self.peer_synced.clear()
        self.peer_last_seen_age.clear()
        for cluster, seen in last_seen.items():
            self.peer_last_seen_age.labels(cluster).set(max(0.0, now - seen))
            self.peer_synced.labels(cluster).set(1 if live else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
