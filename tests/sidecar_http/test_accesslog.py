"""The access log line and the Prometheus adapter."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from sidecar.http.accesslog import AccessRecord, HttpMetrics, format_line
from sidecar.http.circuit import OverloadReason


def record(**over: object) -> AccessRecord:
    fields: dict[str, object] = dict(
        start_time=1_700_000_000.25,
        duration=0.0123,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00f067aa0ba902b7",
        parent_span_id=None,
        source_cluster="aws-use1",
        source_workload="web",
        destination_service="shop.prod",
        destination_cluster="gcp-euw1",
        destination_zone="europe-west1-b",
        upstream_endpoint="10.0.0.7:15006",
        locality_tier="cloud",
        route="canary",
        method="GET",
        path="/items",
        protocol="HTTP/1.1",
        status=200,
        grpc_status=None,
        retries=1,
        request_bytes=0,
        response_bytes=512,
        response_flags=("fault_delay",),
    )
    fields.update(over)
    return AccessRecord(**fields)  # type: ignore[arg-type]


def test_one_json_line_with_the_design_fields() -> None:
    line = format_line(record())
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["time"] == "2023-11-14T22:13:20.250Z"
    assert doc["duration_ms"] == 12.3
    assert doc["event"] == "http_request"
    for key in ("source_cluster", "destination_cluster", "destination_service", "locality_tier"):
        assert doc[key] == getattr(record(), key)
    assert (doc["status"], doc["retries"], doc["response_flags"]) == (200, 1, ["fault_delay"])
    assert "query" not in doc and "start_time" not in doc


def test_unknown_flags_are_a_bug() -> None:
    with pytest.raises(ValueError):
        record(response_flags=("typo",))


def test_metrics_from_records() -> None:
    reg = CollectorRegistry()
    m = HttpMetrics(reg, source_cluster="aws-use1", destination_services=["shop.prod"])
    labels = {
        "source_cluster": "aws-use1",
        "destination_cluster": "gcp-euw1",
        "destination_service": "shop.prod",
        "locality_tier": "cloud",
    }
    zero = {
        "source_cluster": "aws-use1",
        "destination_service": "shop.prod",
        "reason": "max_requests",
    }
    assert reg.get_sample_value("meshfed_sidecar_http_circuit_open_total", zero) == 0.0
    m.observe(record())
    m.observe(record(status=503, duration=0.5))
    m.retry_started("shop.prod")
    m.retry_budget_exhausted("shop.prod")
    m.circuit_opened("shop.prod", OverloadReason.MAX_REQUESTS)
    assert (
        reg.get_sample_value("meshfed_sidecar_http_requests_total", {**labels, "code": "200"}) == 1
    )
    assert (
        reg.get_sample_value("meshfed_sidecar_http_requests_total", {**labels, "code": "503"}) == 1
    )
    assert reg.get_sample_value("meshfed_sidecar_http_request_duration_seconds_count", labels) == 2
    assert reg.get_sample_value(
        "meshfed_sidecar_http_request_duration_seconds_sum", labels
    ) == pytest.approx(0.5123)
    svc = {"source_cluster": "aws-use1", "destination_service": "shop.prod"}
    assert reg.get_sample_value("meshfed_sidecar_http_retries_total", svc) == 1
    assert reg.get_sample_value("meshfed_sidecar_http_retry_budget_exhausted_total", svc) == 1
    assert reg.get_sample_value("meshfed_sidecar_http_circuit_open_total", zero) == 1
    assert (
        reg.get_sample_value("meshfed_sidecar_http_faults_injected_total", {**svc, "kind": "delay"})
        == 2
    )
