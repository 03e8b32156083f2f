"""The judge: exact figures from synthetic runs, passing and failing drills."""

from __future__ import annotations

import dataclasses

import pytest

from chaos.judge import Judgement, Verdict, judge, percentile
from chaos.record import FaultRecord, RequestLog, RequestRecord

from .support import drill, zone_faults, zone_run


def verdicts(j: Judgement) -> dict[str, Verdict]:
    return {v.budget: v for v in j.verdicts}


def test_clean_zone_outage_passes_with_exact_figures():
    d = drill("zone-outage")
    j = judge(d.drill, zone_run(), zone_faults(), d.clouds)
    assert j.passed, [v for v in j.verdicts if not v.passed]
    v = verdicts(j)
    assert v["failover time"].measured == 0.0
    # recovered in the window [27s, 28s): back_after = 2s, windows are 1s wide -> 3s
    assert v["recovery time"].measured == 3.0
    during = next(p for p in j.phases if p.name == "during")
    assert during.requests == 13 * 50 and during.failures == 0
    assert dict(during.shares) == {"aws-use1/us-east-1b": 100.0}
    assert during.latency_p99 == pytest.approx(0.004)


def test_errors_during_failover_set_the_failover_time_and_fail_the_count():
    d = drill("zone-outage")
    j = judge(d.drill, zone_run(errors_for=1.5), zone_faults(), d.clouds)
    v = verdicts(j)
    # last failure starts at 11.48s and ends 1s later; the fault was at 10s
    assert v["failover time"].measured == pytest.approx(2.48)
    assert not v["failover time"].passed
    assert v["failed requests"].measured == 75 and not v["failed requests"].passed
    assert "reset: 75" in v["failed requests"].explanation
    assert not j.passed


def test_failover_disabled_fails_every_outage_budget():
    d = drill("failover-disabled")
    j = judge(d.drill, zone_run(failover=False), zone_faults(), d.clouds)
    v = verdicts(j)
    assert not j.passed
    assert v["failover time"].measured is None
    assert "never settled" in v["failover time"].explanation
    assert v["during: failed requests"].measured == 13 * 50
    assert v["during: latency p99"].measured is None
    assert not v["during: served outside zone:aws-use1/us-east-1b"].passed
    assert v["before: failed requests"].passed  # the baseline was fine: the verdict says where


def test_dead_zone_keeping_its_share_fails_the_serving_budget():
    d = drill("zone-outage")
    log = zone_run()
    # a judge must not accept "successful" answers from the dead zone: rebuild the during
    # phase as if whoami-a kept answering (e.g. the kill never happened)
    faked = RequestLog(
        r if not 10 <= r.t_start < 25 else dataclasses.replace(r, served_by_zone="us-east-1a")
        for r in log
    )
    j = judge(d.drill, faked, zone_faults(), d.clouds)
    v = verdicts(j)
    assert v["during: served outside zone:aws-use1/us-east-1b"].measured == 13 * 50
    assert v["failover time"].measured is None
    assert not j.passed


def test_unverified_or_missing_fault_fails_the_drill():
    d = drill("zone-outage")
    j = judge(d.drill, zone_run(), zone_faults(verified=False), d.clouds)
    v = verdicts(j)["faults applied and verified"]
    assert (v.measured, v.passed) == (1, False)
    assert "kill endpoint:aws-use1/whoami-a" in v.explanation and not j.passed
    j = judge(d.drill, zone_run(), zone_faults()[1:], d.clouds)
    v = verdicts(j)["faults applied and verified"]
    assert not v.passed and "no fault record" in v.explanation


def test_fault_times_come_from_the_records():
    d = drill("zone-outage")
    faults = zone_faults(kill=10.25)
    j = judge(d.drill, zone_run(), faults, d.clouds)
    assert j.failover is not None and j.failover.t_fault == 10.25


def test_never_recovering_fails_recovery():
    d = drill("zone-outage")
    j = judge(d.drill, zone_run(back_after=100.0), zone_faults(), d.clouds)
    v = verdicts(j)
    assert v["recovery time"].measured is None and not v["recovery time"].passed
    assert not v["after: share of zone:aws-use1/us-east-1a"].passed


def test_no_traffic_fails():
    d = drill("zone-outage")
    j = judge(d.drill, RequestLog(), zone_faults(), d.clouds)
    assert not verdicts(j)["traffic recorded"].passed and not j.passed


def test_cloud_localities_match_through_the_config():
    d = drill("cloud-outage")
    log = RequestLog()

    for i in range(45 * 20):
        t = i / 20
        cluster, zone = (
            ("gcp-euw1", "europe-west1-b") if t < 12 or t >= 32 else ("onprem-dc1", "dc1-a")
        )
        log.append(
            RequestRecord(
                t,
                t + 0.01,
                "aws-use1/frontend",
                "whoami.demo",
                "ok",
                "",
                0.01,
                cluster,
                zone,
                "whoami",
            )
        )
    faults = [
        FaultRecord(1, "kill", "endpoint:aws-use1/whoami-a", {}, True, ""),
        FaultRecord(1, "kill", "endpoint:aws-use1/whoami-b", {}, True, ""),
        FaultRecord(12, "kill", "cloud:gcp", {}, True, ""),
        FaultRecord(30, "revive", "cloud:gcp", {}, True, ""),
    ]
    j = judge(d.drill, log, faults, d.clouds)
    assert j.passed, [v for v in j.verdicts if not v.passed]
    assert verdicts(j)["recovery time"].measured == 3.0


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([1.0], 0.99, 1.0),
        ([1.0, 2.0], 0.5, 1.0),
        ([float(i) for i in range(1, 101)], 0.99, 99.0),
        ([float(i) for i in range(1, 101)], 0.5, 50.0),
    ],
)
def test_nearest_rank_percentile(values, q, expected):
    assert percentile(values, q) == expected
