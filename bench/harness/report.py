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

from bench.harness.scenarios import SCENARIOS, Settings, median

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

    def by_name(self, name: str) -> TopologyRecord | None:
        return next((t for t in self.topologies if t.name == name and t.samples), None)


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
    ("rr_max", "rss_load_mib", "RSS load MiB"),
    ("rr_max", "proxy_cpu_s_per_1k", "proxy CPU s / 1k req"),
    ("http_wrk", "req_per_s", "wrk HTTP/1.1 req/s"),
)


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
        "topologies": tops,
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
            "| topology | added p50 µs | added p99 µs |",
            "| --- | --- | --- |",
        ]
        for t in measured:
            if t is direct:
                continue
            p50 = t.med("rr_latency", "p50_us") - direct.med("rr_latency", "p50_us")
            p99 = t.med("rr_latency", "p99_us") - direct.med("rr_latency", "p99_us")
            lines.append(f"| {t.name} | {_fmt(p50)} | {_fmt(p99)} |")
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
        "count means the generator, not the proxy, was the limit.",
        "",
        "## Not measured",
        "",
    ]
    missing = [t for t in c.topologies if not t.samples or t.failures]
    for t in missing:
        why = t.note or "; ".join(t.failures[:3])
        lines.append(f"- {t.name}: {why}")
    for name, why in c.skipped_scenarios.items():
        lines.append(f"- scenario {name}: {why}")
    if not missing and not c.skipped_scenarios:
        lines.append("- nothing: every topology and scenario ran.")
    lines.append("")
    return "\n".join(lines)


def write(c: Comparison, out_dir: Path, stem: str = "comparison") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` to ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(to_markdown(c))
    js.write_text(json.dumps(to_json(c), indent=1, ensure_ascii=False) + "\n")
    return md, js
