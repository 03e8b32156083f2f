"""``meshfed call`` and ``meshfed logs``: the parts of the pokes that are not the
supervisor's (kill/revive go to the running ``up`` over its control socket).

``path_of`` is pure: from the source sidecar's ``/stats`` and the answer's
serving locality it names the hop (direct / passthrough / tunnel) and the
locality tier.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.cli.up.plan import Layout
from federation.config.model import FederationConfig, Workload

__all__ = [
    "CallPlan",
    "LogLine",
    "find_run_dirs",
    "format_log_line",
    "locality_tier",
    "path_of",
    "plan_call",
]


class PokeError(ValueError):
    """A poke that names nothing in this run; the message says what exists."""


@dataclass(frozen=True, slots=True)
class CallPlan:
    workload: Workload
    service: str
    protocol: str
    target: str


def _find_workload(cfg: FederationConfig, name: str) -> Workload:
    cluster, slash, wname = name.rpartition("/")
    hits = [w for w in cfg.workloads if w.name == wname and (not slash or w.cluster == cluster)]
    if len(hits) > 1:
        raise PokeError(
            f"--from {name}: workload in several clusters; write one of "
            + ", ".join(f"{w.cluster}/{w.name}" for w in hits)
        )
    if not hits:
        names = ", ".join(sorted({f"{w.cluster}/{w.name}" for w in cfg.workloads if w.upstreams}))
        raise PokeError(f"--from {name}: no such workload (callers: {names})")
    return hits[0]


def plan_call(cfg: FederationConfig, service: str, source: str) -> CallPlan:
    """Where ``meshfed call SERVICE --from SOURCE`` sends its request (instance 0)."""
    w = _find_workload(cfg, source)
    for u in w.upstreams:
        ref = str(u.service)
        if service in (ref, ref.split(".")[0]):
            svc = cfg.service(u.service)
            sp = svc.port(u.port) if u.port is not None else svc.ports[0]
            assert sp is not None
            return CallPlan(w, ref, sp.protocol, f"{u.listen.host}:{u.listen.port}")
    ups = ", ".join(str(u.service) for u in w.upstreams) or "none"
    raise PokeError(f"{w.cluster}/{w.name} does not call {service} (its upstreams: {ups})")


def locality_tier(cfg: FederationConfig, source: Workload, cluster: str, zone: str) -> str:
    """The locality tier of a serving (cluster, zone) as seen from ``source``."""
    mine = cfg.cluster(source.cluster)
    if cluster == source.cluster:
        return "zone" if zone == source.zone else "cluster"
    other = cfg.cluster(cluster)
    if (other.cloud, other.region) == (mine.cloud, mine.region):
        return "region"
    return "remote-cluster"


def path_of(stats: Any, service: str, cluster: str, endpoint: str | None) -> str | None:
    """``via`` of the candidate that served (matched by endpoint id, else by cluster)."""
    if not isinstance(stats, dict):
        return None
    up = (stats.get("upstreams") or {}).get(service) or {}
    cands = [c for c in up.get("candidates", []) if isinstance(c, dict)]
    exact = [c for c in cands if endpoint is not None and c.get("name") == endpoint]
    same = exact or [c for c in cands if c.get("cluster") == cluster]
    vias = sorted({str(c.get("via")) for c in same if c.get("via")})
    return "/".join(vias) if vias else None


# -- logs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogLine:
    component: str
    text: str


def log_files(layout: Layout, component: str | None) -> list[tuple[str, Path]]:
    """(component, file) for every log matching ``component`` (a name or a prefix)."""
    out = []
    for path in sorted(layout.logs.glob("*.log")):
        # Names are RFC 1123 labels joined by "/", so "." in a log name was a "/".
        name = path.name[: -len(".log")].replace(".", "/")
        if component is None or name == component or name.startswith(component.rstrip("/") + "/"):
            out.append((name, path))
    return out


def format_log_line(component: str, raw: str) -> str:
    """``component | time level msg key=value...`` for JSON lines; others verbatim."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return f"{component} | {raw}"
    if not isinstance(obj, dict):
        return f"{component} | {raw}"
    t = str(obj.pop("t", obj.pop("time", "")))
    level = str(obj.pop("level", "")).lower()
    msg = str(obj.pop("msg", obj.pop("message", "")))
    for k in ("logger", "component", "cluster", "workload"):
        obj.pop(k, None)
    rest = " ".join(f"{k}={v}" for k, v in obj.items())
    return f"{component} | {t} {level} {msg} {rest}".rstrip()


def read_lines(path: Path, start: int = 0) -> tuple[list[str], int]:
    """Complete lines after byte ``start``; returns them and the new position."""
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = data[:end].decode("utf-8", "replace").splitlines()
    return lines, start + end


def find_run_dirs(base: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Run dirs under ``base`` whose ``up`` process is alive, newest first."""
    found = []
    for d in base.glob("meshfed-up-*"):
        try:
            manifest = json.loads((d / "run.json").read_text())
        except (OSError, ValueError):
            continue
        pid = manifest.get("up_pid")
        if isinstance(pid, int) and _alive(pid):
            found.append((manifest.get("started_at") or 0.0, d, manifest))
    for _, d, m in sorted(found, key=lambda x: -float(x[0])):
        yield d, m


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
