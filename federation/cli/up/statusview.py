"""The view model of a running federation: pure aggregation of admin payloads.

Input: the run manifest (``run.json``: components, their process states) and,
per component, what its admin endpoint answered (agent ``/status`` and
``/metrics``, gateway ``/stats``, sidecar ``/stats``, traffic ``/stats``; None
when it did not answer). Output: :class:`View`, the one model that the live
dashboard renders, ``--json`` prints and ``meshfed status`` shows. No I/O here,
``now`` is an argument, so the tests feed recorded payloads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "CertView",
    "ClusterView",
    "Payload",
    "ProcessView",
    "ServiceView",
    "View",
    "build_view",
    "sync_lag_from_metrics",
]

CERT_WARNING_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Payload:
    """What one component's admin endpoint answered."""

    ready: bool | None = None
    """``/ready`` was 200 (None: not asked or no answer)."""
    data: Any = None
    """Parsed ``/status`` or ``/stats`` JSON (None: no answer)."""
    metrics: str | None = None
    """``/metrics`` text, where the view needs it (agents: sync lag)."""


@dataclass(frozen=True, slots=True)
class ProcessView:
    name: str
    kind: str
    cluster: str | None
    zone: str | None
    state: str
    """pending/starting/ready/died/killed/stopping/stopped, or ``unresponsive``."""
    pid: int | None
    exit_code: int | None
    starts: int
    note: str


@dataclass(frozen=True, slots=True)
class ClusterView:
    name: str
    cloud: str
    region: str
    agent_state: str
    agent_phase: str | None
    store_up: bool | None
    synced: bool | None
    catalog_version: int | None
    catalog_entries: int | None
    peer_last_seen: dict[str, float]
    """Seconds since each peer cluster's data was last confirmed."""
    sync_lag: dict[str, float]
    """Mean seconds from a peer's write to this agent's import, per peer."""
    gateway_state: str
    gateway_ready: bool | None
    gateway_peers: dict[str, bool]
    """Peer cluster -> its gateway answers this gateway's probes."""
    sidecars_ready: int
    sidecars_total: int


@dataclass(frozen=True, slots=True)
class ServiceView:
    flow: str
    service: str
    source_cluster: str
    source_workload: str
    requests: int
    errors: int
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    by_cluster: dict[str, int]
    by_locality: dict[str, int]
    serving: str | None
    last_error: str | None
    failovers: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class CertView:
    owner: str
    spiffe_id: str
    not_after: str
    expires_in: float
    """Seconds left (negative: expired)."""


@dataclass(frozen=True, slots=True)
class View:
    run: dict[str, Any]
    clusters: list[ClusterView]
    services: list[ServiceView]
    processes: list[ProcessView]
    certs: list[CertView]
    alerts: list[str] = field(default_factory=list)
    window_seconds: float | None = None

    def to_obj(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def traffic_by_cluster(self) -> dict[str, int]:
        """Successful calls in the window per serving cluster, over every flow."""
        out: dict[str, int] = {}
        for s in self.services:
            for c, n in s.by_cluster.items():
                out[c] = out.get(c, 0) + n
        return dict(sorted(out.items()))


def sync_lag_from_metrics(text: str) -> dict[str, float]:
    """Mean ``meshfed_agent_sync_lag_seconds`` per ``source_cluster`` (sum / count)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return {}
    for fam in families:
        if fam.name != "meshfed_agent_sync_lag_seconds":
            continue
        for s in fam.samples:
            src = s.labels.get("source_cluster", "")
            if s.name.endswith("_sum"):
                sums[src] = s.value
            elif s.name.endswith("_count"):
                counts[src] = s.value
    return {c: round(sums.get(c, 0.0) / n, 4) for c, n in sorted(counts.items()) if n > 0}


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _state(runtime: Mapping[str, Any], payload: Payload | None, has_admin: bool) -> str:
    state = str(runtime.get("state", "pending"))
    # A process the supervisor believes ready whose admin port does not answer is
    # worth seeing: it is hung, or another run took its port.
    if (
        state == "ready"
        and has_admin
        and payload is not None
        and payload.data is None
        and payload.ready is None
    ):
        return "unresponsive"
    return state


def build_view(
    manifest: Mapping[str, Any],
    payloads: Mapping[str, Payload],
    now: dt.datetime,
) -> View:
    """Aggregate the manifest and the admin payloads into the view model."""
    comps = list(manifest.get("components", []))
    processes: list[ProcessView] = []
    alerts: list[str] = []
    by_name: dict[str, dict[str, Any]] = {c["name"]: c for c in comps}
    for c in comps:
        rt = c.get("runtime", {})
        state = _state(rt, payloads.get(c["name"]), c.get("admin") is not None)
        processes.append(
            ProcessView(
                name=c["name"],
                kind=c["kind"],
                cluster=c.get("cluster"),
                zone=c.get("zone"),
                state=state,
                pid=rt.get("pid"),
                exit_code=rt.get("exit_code"),
                starts=int(rt.get("starts", 0)),
                note=str(rt.get("note", "")),
            )
        )
        if state == "died":
            alerts.append(
                f"{c['name']} died unexpectedly (exit {rt.get('exit_code')}); "
                f"`meshfed revive {c['name']}` starts it again"
            )
        elif state == "unresponsive":
            alerts.append(f"{c['name']} is running but its admin endpoint does not answer")

    clusters: list[ClusterView] = []
    for cl in manifest.get("clusters", []):
        name = cl["name"]
        agent = by_name.get(f"agent/{name}", {})
        gw = by_name.get(f"gateway/{name}", {})
        ap = payloads.get(f"agent/{name}") or Payload()
        gp = payloads.get(f"gateway/{name}") or Payload()
        a = ap.data if isinstance(ap.data, dict) else {}
        g = gp.data if isinstance(gp.data, dict) else {}
        sidecars = [p for p in processes if p.kind == "sidecar" and p.cluster == name]
        peers_alive = {str(k): bool(v) for k, v in (g.get("peer_alive") or {}).items()}
        cv = ClusterView(
            name=name,
            cloud=cl.get("cloud", ""),
            region=cl.get("region", ""),
            agent_state=_state(agent.get("runtime", {}), ap if agent else None, True),
            agent_phase=a.get("phase"),
            store_up=(a.get("store") or {}).get("up") if a else None,
            synced=a.get("synced") if a else None,
            catalog_version=(a.get("catalog") or {}).get("version") if a else None,
            catalog_entries=(a.get("catalog") or {}).get("entries") if a else None,
            peer_last_seen={
                str(k): float(v.get("last_seen_age", 0.0))
                for k, v in sorted((a.get("peers") or {}).items())
            },
            sync_lag=sync_lag_from_metrics(ap.metrics) if ap.metrics else {},
            gateway_state=_state(gw.get("runtime", {}), gp if gw else None, True) if gw else "none",
            gateway_ready=g.get("ready") if g else None,
            gateway_peers=dict(sorted(peers_alive.items())),
            sidecars_ready=sum(1 for p in sidecars if p.state == "ready"),
            sidecars_total=len(sidecars),
        )
        clusters.append(cv)
        if a and a.get("store", {}).get("up") is False:
            alerts.append(f"agent/{name}: store unreachable ({a['store'].get('last_error')})")
        if a and a.get("synced") is False:
            alerts.append(f"agent/{name}: not synced with the store")
        for peer, alive in cv.gateway_peers.items():
            if not alive:
                alerts.append(f"gateway/{name}: peer gateway of {peer} is not answering probes")

    services: list[ServiceView] = []
    window = None
    tp = payloads.get("traffic")
    if tp is not None and isinstance(tp.data, dict):
        window = tp.data.get("window_seconds")
        for f in tp.data.get("flows", []):
            by_loc = {str(k): int(v) for k, v in (f.get("served_by") or {}).items()}
            by_cluster: dict[str, int] = {}
            for loc, n in by_loc.items():
                cluster = loc.split("/", 1)[0]
                by_cluster[cluster] = by_cluster.get(cluster, 0) + n
            sv = ServiceView(
                flow=f["flow"],
                service=f["service"],
                source_cluster=f["source_cluster"],
                source_workload=f["source_workload"],
                requests=int(f.get("requests", 0)),
                errors=int(f.get("errors", 0)),
                error_rate=float(f.get("error_rate", 0.0)),
                p50_ms=f.get("p50_ms"),
                p99_ms=f.get("p99_ms"),
                by_cluster=dict(sorted(by_cluster.items())),
                by_locality=dict(sorted(by_loc.items())),
                serving=f.get("serving"),
                last_error=f.get("last_error"),
                failovers=list(f.get("failovers", []))[-5:],
            )
            services.append(sv)
            if sv.requests and sv.error_rate > 0.05:
                alerts.append(
                    f"{sv.flow}: {sv.error_rate:.0%} errors in the last {window}s ({sv.last_error})"
                )

    certs: list[CertView] = []
    for c in comps:
        p = payloads.get(c["name"])
        sid, not_after = None, None
        if c["kind"] == "sidecar" and p is not None and isinstance(p.data, dict):
            sid, not_after = p.data.get("spiffe_id"), p.data.get("svid_not_after")
        elif c["kind"] == "gateway":
            # Gateways renew through their agent: their /stats is the live answer; the
            # manifest (certificates issued from files by older runs) is the fallback.
            svid = (manifest.get("gateway_svids") or {}).get(c.get("cluster"), {})
            sid, not_after = svid.get("spiffe_id"), svid.get("not_after")
            if p is not None and isinstance(p.data, dict) and p.data.get("svid_not_after"):
                sid, not_after = p.data.get("svid") or sid, p.data["svid_not_after"]
        t = _parse_time(not_after)
        if sid and t is not None:
            left = (t - now).total_seconds()
            certs.append(CertView(c["name"], str(sid), t.isoformat(), round(left, 1)))
            if left < CERT_WARNING_SECONDS:
                alerts.append(f"{c['name']}: SVID {'expired' if left < 0 else 'expires soon'}")

    run = {
        k: manifest.get(k)
        for k in ("run_dir", "config", "offset", "store", "store_url", "up_pid", "started_at")
    }
    return View(run, clusters, services, processes, certs, alerts, window)
