"""The keepalive/idle core of pooled HTTP/2 connections (sidecar/http/keepalive.py), with
plain calls and exact times; plus the inbound HTTP metrics' shape (promtool)."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from federation.config.model import ConnectionPool
from sidecar.http.accesslog import DURATION_BUCKETS
from sidecar.http.keepalive import Action, Keepalive, KeepaliveConfig, keepalive_config
from sidecar.metrics import HTTP_DURATION_BUCKETS, SidecarMetrics

CFG = KeepaliveConfig(interval=5.0, timeout=3.0, idle_timeout=60.0)


def test_ping_after_interval_of_silence_then_dead_after_timeout() -> None:
    k = Keepalive(CFG, now=100.0)
    k.streams_changed(1, 100.0)
    assert k.next_deadline() == 105.0
    assert k.poll(104.9) is Action.NONE
    assert k.poll(105.0) is Action.PING
    # One PING at a time: the deadline is now the ACK's.
    assert k.next_deadline() == 108.0
    assert k.poll(107.0) is Action.NONE
    # Other frames do not stand in for the ACK.
    k.received(107.5)
    assert k.poll(108.0) is Action.DEAD
    # Final: it stays dead.
    k.ping_acked(109.0)
    assert k.poll(200.0) is Action.DEAD
    assert k.next_deadline() == -math.inf


def test_traffic_postpones_the_ping_and_an_ack_rearms_it() -> None:
    k = Keepalive(CFG, now=0.0)
    k.streams_changed(2, 0.0)
    k.received(4.0)
    assert k.poll(5.0) is Action.NONE
    assert k.next_deadline() == 9.0
    assert k.poll(9.0) is Action.PING
    k.ping_acked(9.5)
    assert k.ping_sent is None
    assert k.next_deadline() == 14.5
    assert k.poll(14.5) is Action.PING


def test_idle_close_counts_from_the_last_stream_end() -> None:
    k = Keepalive(KeepaliveConfig(interval=None, timeout=3.0, idle_timeout=30.0), now=0.0)
    assert k.next_deadline() == 30.0  # a fresh connection is idle
    k.streams_changed(1, 10.0)
    assert k.next_deadline() == math.inf  # no PINGs configured, a stream is live
    assert k.poll(45.0) is Action.NONE
    k.streams_changed(0, 50.0)
    assert k.next_deadline() == 80.0
    assert k.poll(79.0) is Action.NONE
    assert k.poll(80.0) is Action.IDLE
    assert k.poll(81.0) is Action.IDLE


def test_dead_wins_over_idle() -> None:
    k = Keepalive(KeepaliveConfig(interval=5.0, timeout=3.0, idle_timeout=7.0), now=0.0)
    assert k.poll(5.0) is Action.PING
    assert k.poll(8.0) is Action.DEAD


def test_pings_off_and_idle_off_means_no_deadline() -> None:
    k = Keepalive(KeepaliveConfig(interval=None, idle_timeout=None), now=0.0)
    assert k.next_deadline() == math.inf
    assert k.poll(1e9) is Action.NONE


@pytest.mark.parametrize(
    "kwargs",
    [{"interval": 0.0}, {"interval": -1.0}, {"timeout": 0.0}, {"idle_timeout": math.inf}],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        KeepaliveConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_map_to_the_core() -> None:
    assert keepalive_config(ConnectionPool()) == KeepaliveConfig(5.0, 3.0, 300.0)
    off = ConnectionPool(keepalive_interval=None, keepalive_timeout=1.0, idle_timeout=None)
    assert keepalive_config(off) == KeepaliveConfig(None, 1.0, None)


def test_inbound_and_outbound_histograms_share_buckets() -> None:
    assert HTTP_DURATION_BUCKETS == DURATION_BUCKETS


def test_inbound_http_metrics_have_the_design_labels_and_pass_promtool() -> None:
    m = SidecarMetrics()
    m.http_inbound_active.labels("web.demo").inc()
    m.http_inbound_observe(
        source_cluster="c2",
        destination_cluster="c1",
        destination_service="web.demo",
        code="200",
        duration=0.004,
    )
    labels = {
        "source_cluster": "c2",
        "destination_cluster": "c1",
        "destination_service": "web.demo",
        "locality_tier": "inbound",
    }
    r = m.registry
    assert (
        r.get_sample_value("meshfed_sidecar_http_inbound_requests_total", {**labels, "code": "200"})
        == 1
    )
    assert (
        r.get_sample_value(
            "meshfed_sidecar_http_inbound_request_duration_seconds_bucket",
            {**labels, "le": "0.005"},
        )
        == 1
    )
    assert (
        r.get_sample_value(
            "meshfed_sidecar_http_inbound_requests_active", {"destination_service": "web.demo"}
        )
        == 1
    )
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=m.text(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
