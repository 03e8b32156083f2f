"""The runner's pure parts: launch decisions, the short form, the config rewrite, target
and link resolution, proxy-status checks, the traffic schedule and record mapping."""

from __future__ import annotations

from pathlib import Path

import yaml

from chaos.drill import TimelineEvent, parse_target
from chaos.drill_loader import load_drill
from chaos.faultproxy import FaultSetting
from chaos.injectors import check_link_status, fault_setting, link_names, process_targets
from chaos.launch import Pin, proxy_hosts, rewrite_document
from chaos.runner import launch_options, shorten
from chaos.traffic import error_kind, schedule, source_listener, to_record
from federation.cli.up.traffic import CallResult
from federation.config.loader import load_config

ROOT = Path(__file__).resolve().parents[2]
DRILLS = ROOT / "chaos" / "drills"


def test_launch_options_pick_store_proxies_and_pins() -> None:
    zone = launch_options(load_drill(DRILLS / "zone-outage.yaml").drill)
    assert (zone.store, zone.gateway_proxies, zone.etcd_proxies, zone.pins) == (
        "embedded",
        frozenset(),
        frozenset(),
        (),
    )
    slow = launch_options(load_drill(DRILLS / "slow-network.yaml").drill)
    assert slow.store == "embedded" and slow.gateway_proxies == {"gcp-euw1"}
    part = launch_options(load_drill(DRILLS / "agent-partition.yaml").drill)
    assert part.store == "etcd" and part.etcd_proxies == {"gcp-euw1"}
    assert launch_options(load_drill(DRILLS / "etcd-outage.yaml").drill).store == "etcd"
    neg = launch_options(load_drill(DRILLS / "failover-disabled.yaml").drill)
    assert neg.pins == (Pin("aws-use1", "frontend", "whoami.demo"),)


def test_shorten_scales_times_and_rates_but_not_budgets() -> None:
    drill = load_drill(DRILLS / "ca-rotation.yaml").drill
    short = shorten(drill, 0.5)
    assert short.traffic_end == drill.traffic_end / 2
    assert [e.at for e in short.timeline] == [e.at / 2 for e in drill.timeline]
    assert short.timeline[2].params.interval == 3.0
    # No restoring fault in this drill: every phase boundary is halved.
    assert len(short.phases) == len(drill.phases) >= 3
    assert [(p.start, p.end) for p in short.phases] == [
        (p.start / 2, p.end / 2) for p in drill.phases
    ]
    assert short.traffic[0].rate == 25.0
    assert short.budgets == drill.budgets


def test_shorten_keeps_the_time_after_the_last_restore() -> None:
    # gateway-loss: revive at 25s, after phase 33s-40s (8s = the recovery budget).
    drill = load_drill(DRILLS / "gateway-loss.yaml").drill
    short = shorten(drill, 0.5)
    assert [e.at for e in short.timeline] == [0.5, 0.5, 5.0, 12.5]
    assert [(p.start, p.end) for p in short.phases] == [(2.0, 5.0), (6.0, 12.5), (20.5, 27.5)]
    assert short.traffic_end == 27.5  # 12.5s halved before the revive + 15s after it
    recovery = drill.budgets.recovery
    assert recovery is not None
    assert short.phases[2].start - short.timeline[3].at == recovery.within
    assert short.budgets == drill.budgets


def test_rewrite_puts_gateway_behind_proxy_and_pins_caller() -> None:
    doc = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    hosts = proxy_hosts(["gcp-euw1"])
    out = rewrite_document(doc, hosts, [Pin("aws-use1", "frontend", "whoami.demo")])
    assert doc != out  # a copy
    gcp = next(c for c in out["clusters"] if c["name"] == "gcp-euw1")
    assert gcp["gateway"]["address"] == hosts["gcp-euw1"] == "127.0.100.1"
    assert gcp["gateway"]["bind"] == "127.0.0.3"
    names = [(w["cluster"], w["name"]) for w in out["workloads"]]
    assert ("aws-use1", "whoami-a") in names and ("aws-use1", "whoami-b") not in names
    assert ("gcp-euw1", "whoami") in names  # runs, but is not exported any more
    whoami = next(s for s in out["services"] if s["name"] == "whoami")
    assert whoami["exported_to"] == []


def test_rewritten_config_is_valid(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    out = rewrite_document(
        doc, proxy_hosts(["gcp-euw1", "onprem-dc1"]), [Pin("aws-use1", "frontend", "whoami.demo")]
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    cfg = load_config(path)
    assert cfg.cluster("onprem-dc1").gateway.address == "127.0.100.2"
    assert cfg.cluster("onprem-dc1").gateway.bind == "127.0.0.4"


def test_process_targets_and_links() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert process_targets(parse_target("endpoint:aws-use1/whoami-b"), cfg) == [
        "aws-use1/whoami-b-0",
        "aws-use1/whoami-b-1",
    ]
    assert process_targets(parse_target("endpoint:aws-use1/whoami-b/1"), cfg) == [
        "aws-use1/whoami-b-1"
    ]
    assert process_targets(parse_target("cloud:gcp"), cfg) == ["cluster:gcp-euw1"]
    assert process_targets(parse_target("agent:gcp-euw1"), cfg) == ["agent/gcp-euw1"]
    have = ["etcd:gcp-euw1", "gateway:gcp-euw1"]
    assert link_names(parse_target("link:aws-use1->gcp-euw1"), have) == ["gateway:gcp-euw1"]
    assert link_names(parse_target("link:gcp-euw1->etcd"), have) == ["etcd:gcp-euw1"]
    assert link_names(parse_target("cluster:gcp-euw1"), have) == have[::-1]
    assert link_names(parse_target("link:aws-use1->onprem-dc1"), have) == []


def test_proxy_status_check_needs_mode_and_new_generation() -> None:
    ev = TimelineEvent(1.0, "partition", parse_target("link:gcp-euw1->etcd"))
    setting = fault_setting(ev)
    assert setting == FaultSetting("blackhole")
    before = {"generation": 3, "fault": {"mode": "pass"}}
    assert check_link_status(before, {"generation": 4, "fault": {"mode": "blackhole"}}, setting)[0]
    stale = check_link_status(before, {"generation": 3, "fault": {"mode": "blackhole"}}, setting)
    assert stale == (False, "proxy generation did not advance")
    wrong = check_link_status(before, {"generation": 4, "fault": {"mode": "pass"}}, setting)
    assert not wrong[0]


def test_schedule_and_records() -> None:
    src = load_drill(DRILLS / "etcd-outage.yaml").drill.traffic[1]  # ledger, tcp, 10/s, 40s
    times = list(schedule(src))
    assert len(times) == 400 and times[:3] == [0.0, 0.1, 0.2]
    ok = to_record(src, 1.0, 1.25, CallResult(True, 0.25, "ledger-0", "onprem-dc1", "dc1-a"))
    assert (ok.outcome, ok.latency, ok.served_by_zone, ok.source) == (
        "ok",
        0.25,
        "dc1-a",
        "aws-use1/frontend",
    )
    bad = to_record(src, 2.0, 5.0, CallResult(False, 3.0, code="503"))
    assert (bad.outcome, bad.error_kind, bad.served_by_cluster) == ("error", "5xx", "")
    assert error_kind(CallResult(False, 0.1, code="connect")) == "refused"
    late = CallResult(False, 3.0, code="200", detail="no answer within 3.0s")
    assert error_kind(late) == "timeout"
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert source_listener(src, cfg) == "127.0.0.2:17302"
