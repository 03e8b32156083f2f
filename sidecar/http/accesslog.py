"""The HTTP access log line and the HTTP metrics, from one record per request.

The adapter fills one :class:`AccessRecord` when a request finishes (successfully or
not) and hands it to :func:`format_line` (one JSON object per line, keys sorted) and
to :meth:`HttpMetrics.observe`. Field names and label names are DESIGN's
(``source_cluster``, ``destination_cluster``, ``destination_service``,
``locality_tier``, ``code``), so a log line and a metric series join on them.

The log has the normalised path and never the query (query strings carry tokens),
nor any header value other than the trace ids.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.http.circuit import OverloadReason

NO_RESPONSE: Final = 0
"""``status`` when no response was sent (the client went away first)."""

LOCAL_TIER: Final = "local"
"""``locality_tier`` for requests answered by the sidecar itself (fault, circuit open,
no route destination, bad request), where no endpoint was picked."""

RESPONSE_FLAGS: Final[tuple[str, ...]] = (
    "bad_request",
    "circuit_open",
    "fault_abort",
    "fault_delay",
    "no_healthy_upstream",
    "no_route_destination",
    "request_timeout",
    "per_try_timeout",
    "retry_budget_exhausted",
    "upstream_reset",
    "upstream_connect_failure",
    "downstream_disconnect",
)
"""Every value of ``response_flags`` (Envoy's %RESPONSE_FLAGS%, spelled out)."""


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """Everything known about one finished request."""

    start_time: float
    """Wall-clock start, seconds since the epoch (logs only; never used for decisions)."""
    duration: float
    """Seconds from the request head to the last response byte (adapter's clock)."""
    trace_id: str
    """W3C trace id."""
    span_id: str
    """This hop's span id."""
    parent_span_id: str | None
    """The caller's span id, None when this hop started the trace."""
    source_cluster: str
    """Caller's cluster."""
    source_workload: str
    """Caller's workload."""
    destination_service: str
    """``<service>.<namespace>``."""
    destination_cluster: str
    """Cluster of the endpoint that answered last ("" when none was picked)."""
    destination_zone: str
    """Zone of that endpoint ("" when none)."""
    upstream_endpoint: str
    """``host:port`` of that endpoint ("" when none)."""
    locality_tier: str
    """Tier name of the last pick (``zone``, ``preferred:eu-1``...), or :data:`LOCAL_TIER`."""
    route: str | None
    """Matched route name, None for the service default."""
    method: str
    """Request method."""
    path: str
    """Normalised path, without the query."""
    protocol: str
    """``HTTP/1.1`` or ``HTTP/2``."""
    status: int
    """Status sent to the caller, :data:`NO_RESPONSE` if none."""
    grpc_status: int | None
    """gRPC status for gRPC calls, else None."""
    retries: int
    """Retry attempts made (0 when the first attempt was final)."""
    request_bytes: int
    """Request body bytes received from the caller."""
    response_bytes: int
    """Response body bytes sent to the caller."""
    response_flags: tuple[str, ...] = ()
    """What went wrong or was injected, from :data:`RESPONSE_FLAGS`."""

    def __post_init__(self) -> None:
        unknown = set(self.response_flags) - set(RESPONSE_FLAGS)
        if unknown:
            raise ValueError(f"unknown response flags {sorted(unknown)}")

    @property
    def code(self) -> str:
        """The metric label ``code``: the HTTP status sent, as text."""
        return str(self.status)


_FIELDS: Final = fields(AccessRecord)


def format_line(record: AccessRecord) -> str:
    """One JSON line (no newline): the record's fields plus ``time`` and ``duration_ms``."""
    # Shallow field copy: dataclasses.asdict deep-copies every value, which profiled at
    # ~15 % of a proxied request's CPU (bench/results/http.md); every field is a scalar
    # or a tuple of strings, so nothing needs copying.
    out = {f.name: getattr(record, f.name) for f in _FIELDS}
    start = out.pop("start_time")
    out["time"] = (
        dt.datetime.fromtimestamp(start, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
    out["duration_ms"] = round(out.pop("duration") * 1000.0, 3)
    out["response_flags"] = list(record.response_flags)
    out["event"] = "http_request"
    return json.dumps(out, sort_keys=True, separators=(",", ":"), allow_nan=False)


REQUEST_LABELS: Final = (
    "source_cluster",
    "destination_cluster",
    "destination_service",
    "locality_tier",
    "code",
)
DURATION_LABELS: Final = REQUEST_LABELS[:-1]
DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class HttpMetrics:
    """The sidecar's HTTP metrics on ``registry`` (names ``meshfed_sidecar_http_*``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        source_cluster: str,
        destination_services: Iterable[str] = (),
    ) -> None:
        self.source_cluster = source_cluster
        self.requests = Counter(
            "meshfed_sidecar_http_requests_total",
            "HTTP requests answered to the local app, by final status.",
            REQUEST_LABELS,
            registry=registry,
        )
        self.duration = Histogram(
            "meshfed_sidecar_http_request_duration_seconds",
            "Time from request head to last response byte, retries included.",
            DURATION_LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "meshfed_sidecar_http_retries_total",
            "Retry attempts started.",
            ("source_cluster", "destination_service"),
            registry=registry,
        )
        self.budget_exhausted = Counter(
            "meshfed_sidecar_http_retry_budget_exhausted_total",
            "Retries the policy allowed but the retry budget refused.",
            ("source_cluster", "destination_service"),
            registry=registry,
        )
        self.circuit_open = Counter(
            "meshfed_sidecar_http_circuit_open_total",
            "Requests refused with 503 by a circuit breaker limit.",
            ("source_cluster", "destination_service", "reason"),
            registry=registry,
        )
        self.faults = Counter(
            "meshfed_sidecar_http_faults_injected_total",
            "Faults injected by drills.",
            ("source_cluster", "destination_service", "kind"),
            registry=registry,
        )
        # Pre-create the zero series so rate() alerts work from the first event.
        for svc in destination_services:
            self.retries.labels(source_cluster, svc)
            self.budget_exhausted.labels(source_cluster, svc)
            for reason in OverloadReason:
                self.circuit_open.labels(source_cluster, svc, reason.value)
            for kind in ("delay", "abort"):
                self.faults.labels(source_cluster, svc, kind)

    def observe(self, record: AccessRecord) -> None:
        """Count one finished request (everything derivable from its record)."""
        base = (
            record.source_cluster,
            record.destination_cluster,
            record.destination_service,
            record.locality_tier,
        )
        self.requests.labels(*base, record.code).inc()
        self.duration.labels(*base).observe(record.duration)
        if "fault_delay" in record.response_flags:
            self.faults.labels(record.source_cluster, record.destination_service, "delay").inc()
        if "fault_abort" in record.response_flags:
            self.faults.labels(record.source_cluster, record.destination_service, "abort").inc()

    def retry_started(self, destination_service: str) -> None:
        """A retry attempt was admitted by policy and budget."""
        self.retries.labels(self.source_cluster, destination_service).inc()

    def retry_budget_exhausted(self, destination_service: str) -> None:
        """The budget refused a retry the policy allowed."""
        self.budget_exhausted.labels(self.source_cluster, destination_service).inc()

    def circuit_opened(self, destination_service: str, reason: OverloadReason) -> None:
        """A circuit breaker limit refused a request (or a connection)."""
        self.circuit_open.labels(self.source_cluster, destination_service, reason.value).inc()


__all__ = [
    "DURATION_BUCKETS",
    "LOCAL_TIER",
    "NO_RESPONSE",
    "RESPONSE_FLAGS",
    "AccessRecord",
    "HttpMetrics",
    "format_line",
]
