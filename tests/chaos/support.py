"""Synthetic drill runs for the judge and report tests: exact times, no clock."""

from __future__ import annotations

from pathlib import Path

from chaos.drill_loader import LoadedDrill, load_drill
from chaos.record import FaultRecord, RequestLog, RequestRecord

DRILLS = Path(__file__).resolve().parents[2] / "chaos" / "drills"


def drill(name: str) -> LoadedDrill:
    return load_drill(DRILLS / f"{name}.yaml")


def zone_run(
    *,
    rate: float = 50.0,
    end: float = 40.0,
    kill: float = 10.0,
    revive: float = 25.0,
    errors_for: float = 0.0,
    failover: bool = True,
    back_after: float = 2.0,
    latency: float = 0.004,
) -> RequestLog:
    """frontend -> whoami at ``rate``/s: 1a before the kill; after it, failures for
    ``errors_for`` seconds then 1b (or, without failover, failures until the revival);
    1a again ``back_after`` seconds after the revival."""
    log = RequestLog()
    n = int(end * rate)
    for i in range(n):
        t = i / rate
        zone, ok, kind = "us-east-1a", True, ""
        if kill <= t < revive:
            if not failover or t < kill + errors_for:
                ok, kind = False, "reset"
            else:
                zone = "us-east-1b"
        elif revive <= t < revive + back_after:
            zone = "us-east-1b"
        lat = latency if ok else 1.0
        log.append(
            RequestRecord(
                t_start=t,
                t_end=t + lat,
                source="aws-use1/frontend",
                service="whoami.demo",
                outcome="ok" if ok else "error",
                error_kind=kind,
                latency=lat,
                served_by_cluster="aws-use1" if ok else "",
                served_by_zone=zone if ok else "",
                served_by_workload=("whoami-a" if zone.endswith("a") else "whoami-b") if ok else "",
            )
        )
    return log


def zone_faults(
    kill: float = 10.0, revive: float = 25.0, verified: bool = True
) -> list[FaultRecord]:
    return [
        FaultRecord(kill, "kill", "endpoint:aws-use1/whoami-a", {}, verified, "process gone"),
        FaultRecord(revive, "revive", "endpoint:aws-use1/whoami-a", {}, True, "ready"),
    ]
