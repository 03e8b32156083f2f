"""Drill reports: JSON (every figure), Markdown (verdicts, phase by phase, notes), SVG + HTML.

All renderers are pure and deterministic: same judgement and records, same bytes. Only
:func:`write_report` touches the file system.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

from chaos.drill import Drill
from chaos.judge import Judgement, PhaseStats
from chaos.plot import Series, render_svg

REPORT_FORMAT = 1


def _plain(value: Any) -> Any:
    """JSON-ready form: dataclasses and mappings to dicts, tuples to lists, inf to null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_json(judgement: Judgement, drill: Drill, data: Series) -> str:
    """Every figure of the run as one JSON document (sorted keys, stable)."""
    document = {
        "format": REPORT_FORMAT,
        "drill": {
            "name": drill.name,
            "description": drill.description,
            "notes": list(drill.notes),
            "traffic_end": drill.traffic_end,
        },
        "passed": judgement.passed,
        "verdicts": _plain(judgement.verdicts),
        "overall": _plain(judgement.overall),
        "phases": _plain(judgement.phases),
        "faults": _plain(judgement.faults),
        "failover": _plain(judgement.failover),
        "recovery": _plain(judgement.recovery),
        "series": _plain(data),
    }
    return json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.2f} s"
    if unit == "%":
        return f"{value:.2f} %"
    return f"{value:g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _phase_row(stats: PhaseStats) -> str:
    shares = ", ".join(f"{k} {v:.1f}%" for k, v in stats.shares.items()) or "-"
    end = "end" if math.isinf(stats.end) else f"{stats.end:g}s"
    return (
        f"| {stats.name} | {stats.start:g}s-{end} | {stats.requests} | {stats.failures} | "
        f"{stats.error_rate:.2f} % | {_figure(stats.latency_p50, 's')} | "
        f"{_figure(stats.latency_p99, 's')} | {_cell(shares)} |"
    )


def report_markdown(judgement: Judgement, drill: Drill, svg_name: str = "") -> str:
    """A human report: verdict table, then phases, faults and the drill's notes."""
    status = "PASSED" if judgement.passed else "FAILED"
    failed = sum(not v.passed for v in judgement.verdicts)
    lines = [
        f"# Drill {drill.name}: {status}",
        "",
        drill.description,
        "",
        f"{len(judgement.verdicts) - failed} of {len(judgement.verdicts)} budgets held.",
        "",
        "## Verdicts",
        "",
        "| | budget | limit | measured | explanation |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v in judgement.verdicts:
        mark = "pass" if v.passed else "**FAIL**"
        lines.append(
            f"| {mark} | {_cell(v.budget)} | {_figure(v.limit, v.unit)} | "
            f"{_figure(v.measured, v.unit)} | {_cell(v.explanation)} |"
        )
    lines += [
        "",
        "## Phases",
        "",
        "| phase | window | requests | failed | error rate | p50 | p99 | served by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [_phase_row(p) for p in judgement.phases]
    lines.append(_phase_row(judgement.overall))
    if judgement.failover is not None:
        f = judgement.failover
        lines += [
            "",
            "## Failover",
            "",
            f"Fault at {f.t_fault:.3f}s, window until {f.window_end:.3f}s: failover time "
            f"{_figure(f.failover_time, 's')}, first fallback answer after "
            f"{_figure(f.first_fallback, 's')}, {f.failed} failed and {f.misrouted} misrouted "
            "requests in the window.",
        ]
    if judgement.recovery is not None:
        r = judgement.recovery
        shares = ", ".join("-" if s is None else f"{s:.0f}%" for s in r.shares)
        lines += [
            "",
            "## Recovery",
            "",
            f"Restore at {r.t_heal:.3f}s: recovery time {_figure(r.recovery_time, 's')}. "
            f"Preferred share per {r.window:g}s window: {shares}.",
        ]
    lines += ["", "## Faults", "", "| planned | applied | fault | target | verified | detail |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for a in judgement.faults:
        planned = "-" if a.planned_at is None else f"{a.planned_at:g}s"
        applied = "-" if a.t is None else f"{a.t:.3f}s"
        lines.append(
            f"| {planned} | {applied} | {a.fault} | {_cell(a.target)} | "
            f"{'yes' if a.verified else '**no**'} | {_cell(a.detail)} |"
        )
    if drill.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in drill.notes]
    if svg_name:
        lines += ["", "## Timeline", "", f"![timeline]({svg_name})"]
    return "\n".join(lines) + "\n"


def report_html(judgement: Judgement, drill: Drill, svg: str) -> str:
    """A single self-contained page: the chart inline and the verdict table."""
    rows = "\n".join(
        f'<tr class="{"pass" if v.passed else "fail"}"><td>{"pass" if v.passed else "FAIL"}'
        f"</td><td>{escape(v.budget)}</td><td>{escape(_figure(v.limit, v.unit))}</td>"
        f"<td>{escape(_figure(v.measured, v.unit))}</td><td>{escape(v.explanation)}</td></tr>"
        for v in judgement.verdicts
    )
    notes = "".join(f"<li>{escape(n)}</li>" for n in drill.notes)
    status = "PASSED" if judgement.passed else "FAILED"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Drill {escape(drill.name)}: {status}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}.fail td{background:#fdd}</style>"
        f"</head><body><h1>Drill {escape(drill.name)}: {status}</h1>"
        f"<p>{escape(drill.description)}</p>\n{svg}"
        "<table><tr><th></th><th>budget</th><th>limit</th><th>measured</th>"
        f"<th>explanation</th></tr>\n{rows}\n</table>"
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )


def write_report(
    directory: str | os.PathLike[str], judgement: Judgement, drill: Drill, data: Series
) -> dict[str, Path]:
    """Write ``<drill>.json``, ``.md``, ``.svg`` and ``.html`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    svg = render_svg(drill, data, judgement.faults)
    files = {
        "json": out / f"{drill.name}.json",
        "md": out / f"{drill.name}.md",
        "svg": out / f"{drill.name}.svg",
        "html": out / f"{drill.name}.html",
    }
    files["json"].write_text(report_json(judgement, drill, data), encoding="utf-8")
    files["md"].write_text(report_markdown(judgement, drill, files["svg"].name), encoding="utf-8")
    files["svg"].write_text(svg, encoding="utf-8")
    files["html"].write_text(report_html(judgement, drill, svg), encoding="utf-8")
    return files
