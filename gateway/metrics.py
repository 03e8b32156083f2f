"""The gateway's Prometheus metrics (``meshfed_gateway_*``), one registry per gateway.

A registry per instance (not the global one) so several gateways can live in one
process (tests, ``meshfed up``) without clashing. Labels follow DESIGN.md's
scheme: ``source_cluster``, ``destination_cluster``, ``destination_service``
(``<namespace>/<name>``), plus ``mode`` (``passthrough``/``tunnel``),
``direction`` (``inbound``: to a local sidecar; ``outbound``: to another
cluster), ``peer_cluster`` for tunnel connections and probes, and ``reason`` for
refusals and failures (a closed set: ``gateway.router.REFUSAL_REASONS``,
``trust.errors.HANDSHAKE_REASONS``, ``federation.h2guard.CloseReason``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    """All metrics of one gateway; adapters call the counters directly."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "meshfed_gateway_connections_total",
            "Connections routed (passthrough listener) or streams accepted (tunnel listener).",
            ["mode", "direction", "source_cluster", "destination_cluster", "destination_service"],
            registry=r,
        )
        self.active = Gauge(
            "meshfed_gateway_connections_active",
            "Connections being relayed now.",
            ["mode", "direction"],
            registry=r,
        )
        self.bytes = Counter(
            "meshfed_gateway_bytes_total",
            "Bytes relayed, counted when a connection ends; to_destination or from_destination.",
            ["mode", "direction", "destination_service", "flow"],
            registry=r,
        )
        self.refusals = Counter(
            "meshfed_gateway_refusals_total",
            "Connections or CONNECT streams refused, by stable reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.handshake_failures = Counter(
            "meshfed_gateway_handshake_failures_total",
            "Gateway-to-gateway TLS handshakes refused, by reason and side.",
            ["side", "peer_cluster", "reason"],
            registry=r,
        )
        self.tunnel_connections = Counter(
            "meshfed_gateway_tunnel_connections_total",
            "HTTP/2 tunnel connections established, per peer cluster and our role.",
            ["peer_cluster", "role"],
            registry=r,
        )
        self.tunnel_connections_active = Gauge(
            "meshfed_gateway_tunnel_connections_active",
            "HTTP/2 tunnel connections open now.",
            ["peer_cluster", "role"],
            registry=r,
        )
        self.tunnel_streams = Counter(
            "meshfed_gateway_tunnel_streams_total",
            "CONNECT streams opened, per peer cluster and our role.",
            ["peer_cluster", "role"],
            registry=r,
        )
        self.tunnel_closes = Counter(
            "meshfed_gateway_tunnel_closes_total",
            "Tunnel connections ended, by reason (guard/h2 reasons, keepalive_timeout, ...).",
            ["peer_cluster", "role", "reason"],
            registry=r,
        )
        self.probe_latency = Histogram(
            "meshfed_gateway_probe_duration_seconds",
            "Duration of successful probes (TLS handshake + HTTP/2 PING) of peer gateways.",
            ["peer_cluster", "gateway"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.probe_failures = Counter(
            "meshfed_gateway_probe_failures_total",
            "Failed probes of peer gateways, by reason.",
            ["peer_cluster", "gateway", "reason"],
            registry=r,
        )
        self.peer_alive = Gauge(
            "meshfed_gateway_peer_alive",
            "1 if the peer gateway answers probes, 0 if it is considered dead.",
            ["peer_cluster", "gateway"],
            registry=r,
        )
        self.healthy_endpoints = Gauge(
            "meshfed_gateway_healthy_endpoints",
            "Healthy local endpoints per exported service, as the gateway publishes them.",
            ["destination_service"],
            registry=r,
        )

    def refuse(self, listener: str, reason: str) -> None:
        """Count one refusal."""
        self.refusals.labels(listener, reason).inc()

    def text(self) -> bytes:
        """The Prometheus exposition of this registry."""
        return generate_latest(self.registry)
