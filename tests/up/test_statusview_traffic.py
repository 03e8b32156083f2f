"""The view model from recorded admin payloads; the traffic recorder; demo apps and the
one-shot client over real sockets; the Prometheus scrape config."""

from __future__ import annotations

import datetime as dt
from functools import partial
from pathlib import Path

import trio
import yaml

from federation.cli.up.demoapps import Identity, echo_line, serve_app
from federation.cli.up.live import render_view
from federation.cli.up.plan import Component, Stage
from federation.cli.up.prom import scrape_config
from federation.cli.up.statusview import Payload, build_view, sync_lag_from_metrics
from federation.cli.up.traffic import CallResult, Flow, TrafficRecorder, call_once, percentile

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)

AGENT_METRICS = """\
# HELP meshfed_agent_sync_lag_seconds now - written_at of remote records
# TYPE meshfed_agent_sync_lag_seconds histogram
meshfed_agent_sync_lag_seconds_bucket{le="+Inf",source_cluster="gcp-euw1"} 4.0
meshfed_agent_sync_lag_seconds_count{source_cluster="gcp-euw1"} 4.0
meshfed_agent_sync_lag_seconds_sum{source_cluster="gcp-euw1"} 0.02
"""

GW_ID = "spiffe://aws-use1.demo.mesh/ns/meshfed-system/sa/east-west-gateway"

# Shapes recorded from a real `meshfed up` run (trimmed).
MANIFEST = {
    "run_dir": "/tmp/meshfed-up-x",
    "offset": 0,
    "store": "embedded",
    "store_url": "memory://",
    "clusters": [{"name": "aws-use1", "cloud": "aws", "region": "us-east-1"}],
    "gateway_svids": {"aws-use1": {"spiffe_id": GW_ID, "not_after": "2026-03-01T12:05:00+00:00"}},
    "components": [
        {
            "name": "agent/aws-use1",
            "kind": "agent",
            "cluster": "aws-use1",
            "zone": None,
            "admin": "127.0.0.2:17011",
            "runtime": {"state": "ready", "pid": 10, "starts": 1},
        },
        {
            "name": "gateway/aws-use1",
            "kind": "gateway",
            "cluster": "aws-use1",
            "zone": None,
            "admin": "127.0.0.2:17003",
            "runtime": {"state": "ready", "pid": 11, "starts": 1},
        },
        {
            "name": "sidecar/aws-use1/whoami-a-0",
            "kind": "sidecar",
            "cluster": "aws-use1",
            "zone": "us-east-1a",
            "admin": "127.0.0.1:17400",
            "runtime": {"state": "died", "pid": 12, "exit_code": -9, "starts": 1},
        },
        {
            "name": "sidecar/aws-use1/frontend-0",
            "kind": "sidecar",
            "cluster": "aws-use1",
            "zone": "us-east-1a",
            "admin": "127.0.0.1:17150",
            "runtime": {"state": "ready", "pid": 13, "starts": 1},
        },
        {
            "name": "traffic",
            "kind": "traffic",
            "cluster": None,
            "zone": None,
            "admin": "127.0.0.1:17405",
            "runtime": {"state": "ready", "pid": 14, "starts": 1},
        },
    ],
}

PAYLOADS = {
    "agent/aws-use1": Payload(
        data={
            "phase": "active",
            "store": {"up": True, "last_error": None},
            "synced": True,
            "catalog": {"version": 19, "entries": 23},
            "peers": {"gcp-euw1": {"last_seen_age": 0.7}},
        },
        metrics=AGENT_METRICS,
    ),
    "gateway/aws-use1": Payload(
        data={"ready": True, "peer_alive": {"gcp-euw1": True, "onprem-dc1": False}}
    ),
    "sidecar/aws-use1/frontend-0": Payload(
        data={
            "spiffe_id": "spiffe://aws-use1.demo.mesh/ns/demo/sa/frontend",
            "svid_not_after": "2026-03-01T13:00:00+00:00",
        }
    ),
    "traffic": Payload(
        data={
            "window_seconds": 10.0,
            "flows": [
                {
                    "flow": "aws-use1/frontend->whoami.demo",
                    "service": "whoami.demo",
                    "source_cluster": "aws-use1",
                    "source_workload": "frontend",
                    "requests": 40,
                    "errors": 4,
                    "error_rate": 0.1,
                    "p50_ms": 40.0,
                    "p99_ms": 90.0,
                    "served_by": {"aws-use1/us-east-1b": 30, "gcp-euw1/europe-west1-b": 6},
                    "serving": "aws-use1/us-east-1b",
                    "last_error": "connect: refused",
                    "failovers": [
                        {"at": 1.0, "from": "aws-use1/us-east-1a", "to": "aws-use1/us-east-1b"}
                    ],
                }
            ],
        }
    ),
}


def test_view_aggregates_clusters_traffic_certs_and_alerts() -> None:
    view = build_view(MANIFEST, PAYLOADS, NOW)
    (cluster,) = view.clusters
    assert (cluster.agent_phase, cluster.store_up, cluster.catalog_version) == ("active", True, 19)
    assert cluster.sync_lag == {"gcp-euw1": 0.005}
    assert cluster.gateway_peers == {"gcp-euw1": True, "onprem-dc1": False}
    assert (cluster.sidecars_ready, cluster.sidecars_total) == (1, 2)
    (svc,) = view.services
    assert svc.by_cluster == {"aws-use1": 30, "gcp-euw1": 6}
    assert view.traffic_by_cluster == {"aws-use1": 30, "gcp-euw1": 6}
    assert svc.failovers[0]["to"] == "aws-use1/us-east-1b"
    certs = {c.owner: c.expires_in for c in view.certs}
    assert certs == {"gateway/aws-use1": 300.0, "sidecar/aws-use1/frontend-0": 3600.0}
    alerts = "\n".join(view.alerts)
    assert "sidecar/aws-use1/whoami-a-0 died unexpectedly (exit -9)" in alerts
    assert "peer gateway of onprem-dc1 is not answering" in alerts
    assert "10% errors" in alerts
    assert "gateway/aws-use1: SVID expires soon" in alerts


def test_ready_process_without_admin_answer_is_unresponsive() -> None:
    view = build_view(MANIFEST, {"gateway/aws-use1": Payload()}, NOW)
    states = {p.name: p.state for p in view.processes}
    assert states["gateway/aws-use1"] == "unresponsive"
    assert states["traffic"] == "ready"  # not asked: no payload at all


def test_view_renders_and_serialises() -> None:
    view = build_view(MANIFEST, PAYLOADS, NOW)
    obj = view.to_obj()
    assert obj["clusters"][0]["name"] == "aws-use1"
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_view(view))
    text = console.export_text()
    assert "aws-use1/frontend->whoami.demo" in text
    assert "died" in text


def test_sync_lag_ignores_garbage() -> None:
    assert sync_lag_from_metrics("not { metrics") == {}


FLOW = Flow("frontend", "aws-use1", "us-east-1a", "whoami.demo", "http", "127.0.0.1:1", 4.0)


def _ok(loc: str) -> CallResult:
    cluster, zone = loc.split("/")
    return CallResult(True, 0.01, "w-0", cluster, zone)


def test_recorder_reports_failover_when_the_serving_locality_moves() -> None:
    rec = TrafficRecorder([FLOW], window=10.0)
    events = []
    t = 100.0
    for loc in ["aws/a"] * 8 + ["aws/b"] * 8 + ["aws/a"] * 4:
        events.append(rec.record(FLOW.key, t, _ok(loc)))
        t += 0.25
    # The last second is not over yet: only the first move is known.
    moves = [(e["from"], e["to"]) for e in events if e]
    assert moves == [("aws/a", "aws/b")]
    closing = rec.record(FLOW.key, t, CallResult(False, 0.0, code="connect", detail="refused"))
    assert closing is not None and (closing["from"], closing["to"]) == ("aws/b", "aws/a")
    snap = rec.snapshot(t)["flows"][0]
    assert snap["requests"] == 21 and snap["errors"] == 1
    assert snap["error_codes"] == {"connect": 1}
    assert snap["served_by"] == {"aws/a": 12, "aws/b": 8}
    # Past the window everything but the totals is gone.
    later = rec.snapshot(t + 60)["flows"][0]
    assert later["requests"] == 0 and later["total_requests"] == 21


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0


async def test_demo_apps_answer_who_served_over_every_protocol() -> None:
    me = Identity("whoami-b", "aws-use1", "us-east-1b", 1)
    async with trio.open_nursery() as nursery:
        ports = {}
        for kind in ("http", "http2", "tcp"):
            ports[kind] = await nursery.start(partial(serve_app, kind, me, "127.0.0.1", 0))
        for kind, port in ports.items():
            result = await call_once(kind, f"127.0.0.1:{port}", "whoami.demo", timeout=10)
            assert result.ok, result
            assert (result.served_workload, result.locality) == (
                "whoami-b-1",
                "aws-use1/us-east-1b",
            )
        nursery.cancel_scope.cancel()


async def test_call_to_a_closed_port_is_a_connect_error() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    result = await call_once("http", f"127.0.0.1:{port}", "whoami.demo", timeout=10)
    assert not result.ok and result.code == "connect"


def test_echo_line_prefixes_who_served() -> None:
    assert (
        echo_line(Identity("ledger", "onprem-dc1", "dc1-a"), b"hi\r\n")
        == b"ledger-0 onprem-dc1 dc1-a: hi\n"
    )


def test_scrape_config_lists_every_admin_endpoint_by_kind(tmp_path: Path) -> None:
    comps = [
        Component(
            "agent/a",
            "agent",
            Stage.AGENTS,
            (),
            "http",
            "127.0.0.2:1",
            admin="127.0.0.2:1",
            cluster="a",
        ),
        Component(
            "app/a/w-0", "app", Stage.APPS, ("x",), "tcp", "127.0.0.2:2", cluster="a", zone="z"
        ),
        Component(
            "sidecar/a/w-0",
            "sidecar",
            Stage.SIDECARS,
            ("x",),
            "http",
            "127.0.0.1:3",
            admin="127.0.0.1:3",
            cluster="a",
            zone="z",
        ),
    ]
    doc = yaml.safe_load(scrape_config(comps))
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {"meshfed-agent", "meshfed-sidecar"}
    target = jobs["meshfed-sidecar"]["static_configs"][0]
    assert target == {
        "targets": ["127.0.0.1:3"],
        "labels": {"component": "sidecar/a/w-0", "cluster": "a", "zone": "z"},
    }


def test_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import json
    import re

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "configs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"meshfed_[a-z_]+", e)
    }
    sources = "".join(
        (root / f).read_text()
        for f in (
            "federation/agent/metrics.py",
            "sidecar/metrics.py",
            "gateway/metrics.py",
            "federation/cli/up/traffic.py",
        )
    )
    missing = sorted(n for n in used if f'"{n}"' not in sources)
    assert missing == []
    assert {n.split("_")[1] for n in used} == {"agent", "gateway", "sidecar", "traffic"}


def test_a_gateway_that_renews_through_its_agent_reports_its_own_expiry() -> None:
    payloads = dict(PAYLOADS)
    payloads["gateway/aws-use1"] = Payload(
        data={
            "ready": True,
            "peer_alive": {},
            "svid": GW_ID,
            "svid_not_after": "2026-03-01T13:00:00+00:00",
        }
    )
    view = build_view(MANIFEST, payloads, NOW)
    certs = {c.owner: c.expires_in for c in view.certs}
    assert certs["gateway/aws-use1"] == 3600.0  # live /stats beats the manifest's 300 s
