"""Aggregate interleaved rounds into medians, ranges and ratios; write Markdown and JSON.

Ratios are median / median: ``vs direct`` against the bare network, ``vs Envoy``
for a meshfed topology against Envoy's topology of the same shape. For latency the
report also gives the *added* latency: this topology's p50/p99 minus direct's.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.harness.control import CONTROL
from bench.harness.scenarios import QUIET_WINDOW, SCENARIOS, Settings, median

Samples = dict[str, dict[str, list[float]]]
"""scenario -> metric -> one value per round."""


@dataclass
class TopologyRecord:
    """Everything measured (or why nothing was) for one topology."""

    name: str
    system: str
    shape: str
    status: str
    """``measured``, ``unavailable`` or ``failed``."""
    note: str = ""
    samples: Samples = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    """One line per scenario run that raised (the run is left out of the figures)."""
    path: dict[str, str] = field(default_factory=dict)
    """Per gateway process, what its relay counters say it carried (after the rounds)."""
    start_rss: dict[str, float] = field(default_factory=dict)
    """RSS MiB by role once started and quiet, before any load (fresh idle)."""

    def add(self, scenario: str, values: dict[str, float]) -> None:
        per = self.samples.setdefault(scenario, {})
        for key, value in values.items():
            per.setdefault(key, []).append(value)

    def med(self, scenario: str, metric: str) -> float:
        return median(self.samples.get(scenario, {}).get(metric, []))


@dataclass
class Comparison:
    """A whole benchmark run."""

    command: str
    rounds: int
    settings: Settings
    scenarios: list[str]
    topologies: list[TopologyRecord]
    machine: dict[str, str]
    started: str
    skipped_scenarios: dict[str, str] = field(default_factory=dict)
    control_scenarios: list[str] = field(default_factory=list)
    control: Samples = field(default_factory=dict)
    """Control-plane scenario -> metric -> one value per round."""
    control_failures: list[str] = field(default_factory=list)
    load: list[str] = field(default_factory=list)
    """``/proc/loadavg`` samples: at the start and after every round."""

    def by_name(self, name: str) -> TopologyRecord | None:
        return next((t for t in self.topologies if t.name == name and t.samples), None)


def load_sample(label: str) -> str:
    """``label: 1/5/15-minute load averages`` from ``/proc/loadavg``."""
    try:
        with open("/proc/loadavg") as f:
            one, five, fifteen = f.read().split()[:3]
    except (OSError, ValueError):
        return f"{label}: unknown"
    return f"{label}: {one} {five} {fifteen}"


def machine_facts(envoy_version: str | None) -> dict[str, str]:
    """nproc, CPU model, kernel, Python, Envoy and wrk versions."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    wrk = "not installed"
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        wrk = (out.stdout + out.stderr).split("Copyright")[0].strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "envoy": envoy_version or "not installed",
        "wrk": wrk,
    }


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(values: list[float]) -> str:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "-"
    mid = _fmt(median(clean))
    if len(clean) == 1:
        return mid
    return f"{mid} [{_fmt(min(clean))}-{_fmt(max(clean))}]"


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _envoy_peer(c: Comparison, t: TopologyRecord) -> TopologyRecord | None:
    return c.by_name(f"envoy-{t.shape}") if t.system == "meshfed" else None


SUMMARY: Final = (
    ("bulk_1", "mb_per_s", "bulk 1 conn MB/s"),
    ("bulk_16", "mb_per_s", "bulk 16 conn MB/s"),
    ("rr_max", "req_per_s", "1 KiB req/s (saturation)"),
    ("rr_pingpong", "p50_us", "ping-pong p50 µs"),
    ("rr_latency", "p50_us", "p50 µs @ fixed rate"),
    ("rr_latency", "p99_us", "p99 µs @ fixed rate"),
    ("connect", "conn_per_s", "new conn/s"),
    ("idle", "rss_mib", "RSS idle MiB"),
    ("idle", "rss_sidecar_mib", "RSS idle per sidecar MiB"),
    ("rr_max", "rss_load_mib", "RSS load MiB"),
    ("rr_max", "proxy_cpu_s_per_1k", "proxy CPU s / 1k req"),
    ("http_wrk", "req_per_s", "wrk HTTP/1.1 req/s"),
)


MB_PER_MIB: Final = 1024 * 1024 / 1e6


@dataclass(frozen=True)
class Goal:
    """One goal of the benchmark issue, evaluated from the medians of this run."""

    goal: str
    measured: str
    met: bool | None
    """None when something needed was not measured."""
    margin: str


def _added(c: Comparison, name: str, metric: str) -> float:
    t, d = c.by_name(name), c.by_name("direct")
    if t is None or d is None:
        return float("nan")
    return t.med("rr_latency", metric) - d.med("rr_latency", metric)


def goals(c: Comparison) -> list[Goal]:
    """The issue's goals, from this run's medians (nothing here is a recorded figure)."""
    out: list[Goal] = []
    mp, ep = c.by_name("meshfed-passthrough"), c.by_name("envoy-passthrough")
    for sc in ("bulk_1", "bulk_16"):
        m = mp.med(sc, "mb_per_s") if mp else float("nan")
        e = ep.med(sc, "mb_per_s") if ep else float("nan")
        ok = None if math.isnan(m) or math.isnan(e) else m >= e
        out.append(
            Goal(
                f"passthrough bulk ({sc}) >= Envoy's",
                f"meshfed {_fmt(m)} MB/s vs Envoy {_fmt(e)} MB/s ({_ratio(m, e)})",
                ok,
                "-" if ok is None else ("met" if ok else f"missed: {(1 - m / e) * 100:.0f}% short"),
            )
        )
    for shape in ("pair", "passthrough", "tunnel"):
        for metric in ("p50_us", "p99_us"):
            m, e = _added(c, f"meshfed-{shape}", metric), _added(c, f"envoy-{shape}", metric)
            ok = None if math.isnan(m) or math.isnan(e) or e <= 0 else m <= 1.5 * e
            ratio = "-" if ok is None else f"{m / e:.1f}x"
            out.append(
                Goal(
                    f"added latency {shape} {metric[:3]} (rr_latency) <= 1.5x Envoy's",
                    f"meshfed +{_fmt(m)} µs vs Envoy +{_fmt(e)} µs ({ratio})",
                    ok,
                    "-"
                    if ok is None
                    else ("met" if ok else f"missed: {m / e:.2f}x of Envoy's, bound 1.5x"),
                )
            )
    for name in ("propagation_etcd", "propagation_embedded"):
        values = c.control.get(name, {}).get("p99_ms", [])
        p99 = median(values)
        ok = None if math.isnan(p99) else p99 < 50
        worst = max((v for v in values if not math.isnan(v)), default=float("nan"))
        out.append(
            Goal(
                f"{name} p99 < 50 ms",
                f"p99 {_fmt(p99)} ms (worst round {_fmt(worst)} ms)",
                ok,
                "-" if ok is None else ("met" if ok else f"missed by {p99 - 50:.1f} ms"),
            )
        )
    for t in c.topologies:
        if t.system != "meshfed" or not t.samples:
            continue
        fresh = [v for role, v in t.start_rss.items() if role.endswith("sidecar")]
        mib = max(fresh) if fresh else float("nan")
        mb = mib * MB_PER_MIB
        after = t.med("idle", "rss_sidecar_mib")
        ok = None if math.isnan(mb) else mb < 40
        out.append(
            Goal(
                f"idle sidecar RSS < 40 MB ({t.name}, largest sidecar)",
                f"fresh {_fmt(mb)} MB ({_fmt(mib)} MiB); idle after load "
                f"{_fmt(after * MB_PER_MIB)} MB (median)",
                ok,
                "-" if ok is None else ("met" if ok else f"missed by {mb - 40:.1f} MB (fresh)"),
            )
        )
    return out


def _samples_json(metrics: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, values in metrics.items():
        clean = [v for v in values if not math.isnan(v)]
        out[key] = {
            "values": [None if math.isnan(v) else v for v in values],
            "median": median(clean) if clean else None,
            "min": min(clean) if clean else None,
            "max": max(clean) if clean else None,
        }
    return out


def to_json(c: Comparison) -> dict[str, Any]:
    """Raw samples plus medians, ranges and ratios, for tools."""
    direct = c.by_name("direct")
    tops: list[dict[str, Any]] = []
    for t in c.topologies:
        peer = _envoy_peer(c, t)
        scen: dict[str, Any] = {}
        for sc, metrics in t.samples.items():
            scen[sc] = {}
            for key, values in metrics.items():
                clean = [v for v in values if not math.isnan(v)]
                entry: dict[str, Any] = {
                    "values": [None if math.isnan(v) else v for v in values],
                    "median": median(clean) if clean else None,
                    "min": min(clean) if clean else None,
                    "max": max(clean) if clean else None,
                }
                for label, other in (("vs_direct", direct), ("vs_envoy", peer)):
                    if other is not None and other is not t and clean:
                        ref = other.med(sc, key)
                        entry[label] = None if math.isnan(ref) or ref == 0 else median(clean) / ref
                if sc == "rr_latency" and key in ("p50_us", "p99_us") and direct and clean:
                    entry["added_vs_direct_us"] = median(clean) - direct.med(sc, key)
                scen[sc][key] = entry
        tops.append(
            {
                "name": t.name,
                "system": t.system,
                "shape": t.shape,
                "status": t.status,
                "note": t.note,
                "failures": t.failures,
                "path_evidence": t.path,
                "start_rss_mib": t.start_rss,
                "scenarios": scen,
            }
        )
    return {
        "command": c.command,
        "started": c.started,
        "rounds": c.rounds,
        "settings": c.settings.__dict__,
        "scenarios": c.scenarios,
        "skipped_scenarios": c.skipped_scenarios,
        "machine": c.machine,
        "load_average": c.load,
        "topologies": tops,
        "control_scenarios": c.control_scenarios,
        "control": {name: _samples_json(m) for name, m in c.control.items()},
        "control_failures": c.control_failures,
        "goals": [g.__dict__ for g in goals(c)],
    }


def to_markdown(c: Comparison) -> str:
    """The comparison table, ratios, per-scenario detail and what was not measured."""
    s = c.settings
    direct = c.by_name("direct")
    measured = [t for t in c.topologies if t.samples]
    summary = [(sc, key, title) for sc, key, title in SUMMARY if sc in c.scenarios]
    lines = [
        "# meshfed vs Envoy vs the bare network (loopback)",
        "",
        f"Command: `{c.command}` (repository root, project venv), started {c.started}.",
        f"{c.rounds} round(s); in each round every scenario runs once on every topology, "
        "in the same order (interleaved: A B C, A B C, ...), so drift in the machine's load "
        f"hits all alike. {s.duration:g} s of measured load per run after a {s.warmup:g} s "
        f"connection warm-up; up to {s.processes} generator process(es). Cells: median "
        "[min-max] over the rounds. MB/s = 10^6 bytes/s.",
        "",
        *(f"- {k}: {v}" for k, v in c.machine.items()),
        "- load average (1/5/15 min; the machine is shared, other work ran meanwhile): "
        + ("; ".join(c.load) or "not sampled"),
        "",
        "## Summary",
        "",
        "| topology | " + " | ".join(title for _, _, title in summary) + " |",
        "| --- |" + " --- |" * len(summary),
    ]
    for t in measured:
        cells = [_cell(t.samples.get(sc, {}).get(key, [])) for sc, key, _ in summary]
        lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
    headline = [
        (sc, key, title)
        for sc, key, title in summary
        if key in ("mb_per_s", "req_per_s", "conn_per_s", "p50_us", "p99_us")
    ]
    lines += [
        "",
        "## Ratios (median / median)",
        "",
        "Against direct (the bare network); meshfed rows also against Envoy of the same "
        "shape. For throughput, higher is better; for latency, lower.",
        "",
        "| topology | vs | " + " | ".join(title for _, _, title in headline) + " |",
        "| --- | --- |" + " --- |" * len(headline),
    ]
    for t in measured:
        for label, other in (("direct", direct), ("Envoy", _envoy_peer(c, t))):
            if other is None or other is t:
                continue
            cells = [_ratio(t.med(sc, key), other.med(sc, key)) for sc, key, _ in headline]
            lines.append(f"| {t.name} | {label} | " + " | ".join(cells) + " |")
    if direct is not None and "rr_latency" in c.scenarios:
        lines += [
            "",
            f"Added latency at {s.latency_rate:g} req/s ({s.latency_connections} persistent "
            "connections, 1 KiB each way, paced; latency from a request's send to its "
            "response's last byte): this topology minus direct.",
            "",
            "| topology | added p50 µs | added p99 µs | p50 vs Envoy's added | "
            "p99 vs Envoy's added |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t in measured:
            if t is direct:
                continue
            p50, p99 = _added(c, t.name, "p50_us"), _added(c, t.name, "p99_us")
            peer = _envoy_peer(c, t)
            vs = ["-", "-"]
            if peer is not None:
                vs = [
                    _ratio(p50, _added(c, peer.name, "p50_us")),
                    _ratio(p99, _added(c, peer.name, "p99_us")),
                ]
            lines.append(f"| {t.name} | {_fmt(p50)} | {_fmt(p99)} | {vs[0]} | {vs[1]} |")
    lines += ["", "## Per scenario", ""]
    for name in c.scenarios:
        sc = SCENARIOS[name]
        if name in c.skipped_scenarios:
            lines += [f"### {name}: {sc.title}", "", f"Skipped: {c.skipped_scenarios[name]}.", ""]
            continue
        lines += [
            f"### {name}: {sc.title}",
            "",
            "| topology | " + " | ".join(m.title for m in sc.metrics) + " |",
            "| --- |" + " --- |" * len(sc.metrics),
        ]
        for t in measured:
            values = t.samples.get(name, {})
            lines.append(
                f"| {t.name} | "
                + " | ".join(_cell(values.get(m.key, [])) for m in sc.metrics)
                + " |"
            )
        lines.append("")
    lines += [
        f"Load: bulk = one 256 KiB buffer sent repeatedly per connection, MB/s counted by "
        f"the backend; rr_max = {s.rr_connections} persistent connections, one 1 KiB "
        f"request in flight on each; connect = {s.connect_concurrency} loops of connect, "
        "1 KiB request, 1 KiB response, server closes; wrk = `wrk -t1 "
        f"-c{s.rr_connections}`. Generator CPU in cores: near the generator's process "
        "count means the generator, not the proxy, was the limit. After every run the "
        "harness waits until the proxies are idle again (at most 5 % of a core over "
        f"{QUIET_WINDOW:g} s) before the next starts; that wait is `drain_s` in the JSON.",
        "",
    ]
    evidence = [t for t in measured if t.path]
    if evidence:
        lines += [
            "Path check, read from the meshfed gateways' admin `/stats` after the rounds "
            "(bytes the gateway relayed, both directions):",
            "",
            *(
                f"- {t.name}: " + "; ".join(f"{role} {text}" for role, text in t.path.items())
                for t in evidence
            ),
            "",
        ]
    fresh = [t for t in measured if t.start_rss]
    if fresh:
        lines += [
            "Fresh idle RSS (MiB, once started and quiet, before any load; the `idle` "
            "scenario above is measured between rounds, after load):",
            "",
            *(
                f"- {t.name}: " + ", ".join(f"{role} {_fmt(v)}" for role, v in t.start_rss.items())
                for t in fresh
            ),
            "",
        ]
    lines += _control_markdown(c)
    lines += _goals_markdown(c)
    lines += ["## Not measured", ""]
    missing = [t for t in c.topologies if not t.samples or t.failures]
    for t in missing:
        why = t.note or "; ".join(t.failures[:3])
        lines.append(f"- {t.name}: {why}")
    for name, why in c.skipped_scenarios.items():
        lines.append(f"- scenario {name}: {why}")
    for failure in c.control_failures:
        lines.append(f"- {failure}")
    if not missing and not c.skipped_scenarios and not c.control_failures:
        lines.append("- nothing: every topology and scenario ran.")
    lines.append("")
    return "\n".join(lines)


def _control_markdown(c: Comparison) -> list[str]:
    names = [n for n in c.control_scenarios if n not in c.skipped_scenarios]
    if not names:
        return []
    s = c.settings
    lines = [
        "## Control plane (meshfed's federation agent path; not per topology)",
        "",
        f"`bench/agent_bench.py --part ... --json`, once per round, after the round's "
        f"data-plane runs. Propagation: {s.changes} sequential changes per run; full sync: "
        f"10 clusters x {s.sync_services} services x 10 endpoints. Median [min-max] over "
        "the rounds (each round's p99 is over its own changes).",
        "",
    ]
    for name in names:
        sc = CONTROL[name]
        values = c.control.get(name, {})
        lines += [
            f"### {name}: {sc.title}",
            "",
            "| " + " | ".join(f"{m.title} ({m.unit})" for m in sc.metrics) + " |",
            "|" + " --- |" * len(sc.metrics),
            "| " + " | ".join(_cell(values.get(m.key, [])) for m in sc.metrics) + " |",
            "",
        ]
    return lines


def _goals_markdown(c: Comparison) -> list[str]:
    gs = goals(c)
    lines = [
        "## Goals of the benchmark issue (from this run's medians)",
        "",
        "| goal | measured | status |",
        "| --- | --- | --- |",
    ]
    for g in gs:
        status = "not measured" if g.met is None else g.margin
        lines.append(f"| {g.goal} | {g.measured} | {status} |")
    return [*lines, ""]


def _floats(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def from_json(doc: dict[str, Any]) -> Comparison:
    """Rebuild a :class:`Comparison` from :func:`to_json`'s document (to re-render it)."""
    c = Comparison(
        command=doc["command"],
        rounds=doc["rounds"],
        settings=Settings(**doc["settings"]),
        scenarios=doc["scenarios"],
        topologies=[],
        machine=doc["machine"],
        started=doc["started"],
        skipped_scenarios=doc.get("skipped_scenarios", {}),
        control_scenarios=doc.get("control_scenarios", []),
        control={
            name: {k: _floats(v["values"]) for k, v in metrics.items()}
            for name, metrics in doc.get("control", {}).items()
        },
        control_failures=doc.get("control_failures", []),
        load=doc.get("load_average", []),
    )
    for t in doc["topologies"]:
        rec = TopologyRecord(t["name"], t["system"], t["shape"], t["status"], t["note"])
        rec.failures = t["failures"]
        rec.path = t.get("path_evidence", {})
        rec.start_rss = t.get("start_rss_mib", {})
        rec.samples = {
            sc: {k: _floats(v["values"]) for k, v in metrics.items()}
            for sc, metrics in t["scenarios"].items()
        }
        c.topologies.append(rec)
    return c


def write(c: Comparison, out_dir: Path, stem: str = "comparison") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` to ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(to_markdown(c))
    js.write_text(json.dumps(to_json(c), indent=1, ensure_ascii=False) + "\n")
    return md, js
