"""The sidecar's Prometheus metrics and JSON event log: the observability adapter.

One :class:`SidecarMetrics` per sidecar process, on its own registry (so tests
and several sidecars in one process do not collide). Names follow
``meshfed_sidecar_<what>_<unit>``; connection metrics carry the DESIGN label set
``source_cluster, destination_cluster, destination_service, locality_tier`` plus
``direction`` (``outbound``/``inbound``). Inbound connections have no locality
tier; they use ``locality_tier="inbound"``.

Every refusal reason is pre-created at 0, so a dashboard shows a flat line rather
than no series, and an alert on a rate works from the first refusal.

:func:`log_event` writes one JSON object per line (``event`` plus fields) to the
``meshfed.sidecar`` logger; the CLI attaches a handler that prints the message
as is.
"""

from __future__ import annotations

import json
import logging
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sidecar.authz import ADMISSION_REASONS
from trust.errors import HANDSHAKE_REASONS

__all__ = [
    "INBOUND_REFUSAL_REASONS",
    "OUTBOUND_REFUSAL_REASONS",
    "SidecarMetrics",
    "log_event",
]

log = logging.getLogger("meshfed.sidecar")

INBOUND_REFUSAL_REASONS: Final[tuple[str, ...]] = (
    *HANDSHAKE_REASONS,
    *ADMISSION_REASONS,
    "rate_limited",
    "max_connections",
    "app_unavailable",
)
"""Every ``reason`` of ``meshfed_sidecar_inbound_refusals_total``."""

OUTBOUND_REFUSAL_REASONS: Final[tuple[str, ...]] = (
    "max_connections",
    "no_healthy_upstream",
    "connect_failed",
)
"""Every ``reason`` of ``meshfed_sidecar_outbound_refusals_total``."""

CONN_LABELS: Final = (
    "direction",
    "source_cluster",
    "destination_cluster",
    "destination_service",
    "locality_tier",
)

CONNECT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

HTTP_INBOUND_LABELS: Final = (
    "source_cluster",
    "destination_cluster",
    "destination_service",
    "locality_tier",
    "code",
)
"""Labels of ``meshfed_sidecar_http_inbound_requests_total``: the outbound
``meshfed_sidecar_http_requests_total`` set, ``locality_tier`` always ``inbound``."""

HTTP_DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""The outbound HTTP histogram's buckets (``sidecar.http.accesslog.DURATION_BUCKETS``, kept
equal by a test), so both hops' latencies compare bucket for bucket."""


def log_event(event: str, **fields: object) -> None:
    """One JSON line: ``{"event": ..., **fields}`` (keys sorted; values made JSON-safe)."""
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"event": event, **fields}, sort_keys=True, default=str))


class SidecarMetrics:
    """Every sidecar metric, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.opened = Counter(
            "meshfed_sidecar_connections_opened_total",
            "Connections relayed (after connect or admission).",
            CONN_LABELS,
            registry=r,
        )
        self.closed = Counter(
            "meshfed_sidecar_connections_closed_total",
            "Relayed connections that ended.",
            CONN_LABELS,
            registry=r,
        )
        self.active = Gauge(
            "meshfed_sidecar_connections_active",
            "Relayed connections open now.",
            ("direction", "destination_service"),
            registry=r,
        )
        self.sent = Counter(
            "meshfed_sidecar_sent_bytes_total",
            "Bytes sent towards the destination (app->upstream outbound, caller->app inbound).",
            CONN_LABELS,
            registry=r,
        )
        self.received = Counter(
            "meshfed_sidecar_received_bytes_total",
            "Bytes sent back towards the caller.",
            CONN_LABELS,
            registry=r,
        )
        self.connect_seconds = Histogram(
            "meshfed_sidecar_connect_duration_seconds",
            "TCP connect plus inner mTLS handshake to the chosen upstream.",
            ("source_cluster", "destination_cluster", "destination_service", "locality_tier"),
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "meshfed_sidecar_failovers_total",
            "Outbound connections served outside the nearest tier.",
            ("source_cluster", "destination_cluster", "destination_service", "locality_tier"),
            registry=r,
        )
        self.connect_retries = Counter(
            "meshfed_sidecar_connect_retries_total",
            "Failed connect attempts that were retried on another endpoint.",
            ("source_cluster", "destination_cluster", "destination_service", "reason"),
            registry=r,
        )
        self.ejections = Counter(
            "meshfed_sidecar_outlier_ejections_total",
            "Endpoints ejected by passive outlier detection.",
            ("source_cluster", "destination_cluster", "destination_service"),
            registry=r,
        )
        self.health_transitions = Counter(
            "meshfed_sidecar_health_transitions_total",
            "Active health check verdict changes.",
            ("destination_cluster", "destination_service", "to"),
            registry=r,
        )
        self.inbound_refusals = Counter(
            "meshfed_sidecar_inbound_refusals_total",
            "Inbound connections refused, by reason.",
            ("reason",),
            registry=r,
        )
        self.outbound_refusals = Counter(
            "meshfed_sidecar_outbound_refusals_total",
            "App connections the sidecar could not serve, by reason.",
            ("destination_service", "reason"),
            registry=r,
        )
        self.revoked_closed = Counter(
            "meshfed_sidecar_revoked_connections_closed_total",
            "Live connections closed because their peer was revoked.",
            registry=r,
        )
        self.catalog_version = Gauge(
            "meshfed_sidecar_catalog_version", "Version of the catalog in use.", registry=r
        )
        self.healthy_endpoints = Gauge(
            "meshfed_sidecar_upstream_healthy_candidates",
            "Healthy balancer candidates per upstream.",
            ("destination_service",),
            registry=r,
        )
        self.http_inbound_requests = Counter(
            "meshfed_sidecar_http_inbound_requests_total",
            "HTTP requests from peer sidecars answered, by the status sent back.",
            HTTP_INBOUND_LABELS,
            registry=r,
        )
        self.http_inbound_duration = Histogram(
            "meshfed_sidecar_http_inbound_request_duration_seconds",
            "Inbound HTTP requests: request head to last response byte (the local app's time).",
            HTTP_INBOUND_LABELS[:-1],
            buckets=HTTP_DURATION_BUCKETS,
            registry=r,
        )
        self.http_inbound_active = Gauge(
            "meshfed_sidecar_http_inbound_requests_active",
            "Inbound HTTP requests in flight now.",
            ("destination_service",),
            registry=r,
        )
        for reason in INBOUND_REFUSAL_REASONS:
            self.inbound_refusals.labels(reason)

    def refuse_inbound(self, reason: str, **fields: object) -> None:
        """Count and log one inbound refusal."""
        self.inbound_refusals.labels(reason).inc()
        log_event("inbound_refused", reason=reason, **fields)

    def http_inbound_observe(
        self,
        *,
        source_cluster: str,
        destination_cluster: str,
        destination_service: str,
        code: str,
        duration: float,
    ) -> None:
        """Count one finished inbound HTTP request (``code``: the status sent, ``0``
        when none was)."""
        base = (source_cluster, destination_cluster, destination_service, "inbound")
        self.http_inbound_requests.labels(*base, code).inc()
        self.http_inbound_duration.labels(*base).observe(duration)

    def text(self) -> bytes:
        """Prometheus exposition text."""
        return generate_latest(self.registry)
