"""Reports: JSON carries every figure, Markdown the verdicts and notes, SVG the series."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from chaos.drill_loader import LoadedDrill
from chaos.judge import Judgement, judge
from chaos.plot import render_svg, series
from chaos.record import RequestLog
from chaos.report import report_json, report_markdown, write_report

from .support import drill, zone_faults, zone_run

NS = {"svg": "http://www.w3.org/2000/svg"}


def attr(element: ET.Element | None, name: str) -> str:
    assert element is not None
    value = element.get(name)
    assert value is not None, name
    return value


def run(**kw: Any) -> tuple[LoadedDrill, RequestLog, Judgement]:
    d = drill("zone-outage")
    log = zone_run(**kw)
    j = judge(d.drill, log, zone_faults(), d.clouds)
    return d, log, j


def test_svg_has_series_errors_p99_phases_and_faults_in_time_order():
    d, log, j = run(errors_for=1.0)
    data = series(log, d.drill.traffic_end)
    root = ET.fromstring(render_svg(d.drill, data, j.faults))
    localities = [attr(g, "data-locality") for g in root.findall(".//svg:g[@class='series']", NS)]
    assert localities == ["aws-use1/us-east-1a", "aws-use1/us-east-1b"]
    a_bars = root.find(".//svg:g[@data-locality='aws-use1/us-east-1a']", NS)
    assert a_bars is not None
    assert [float(attr(r, "data-value")) for r in a_bars][:3] == [50.0, 50.0, 50.0]
    errors = root.findall(".//svg:rect[@class='error']", NS)
    assert [float(attr(r, "data-t")) for r in errors] == [10.0]
    assert float(attr(errors[0], "data-value")) == 50.0
    p99 = root.find(".//svg:polyline[@class='p99']", NS)
    assert len(attr(p99, "data-t").split()) == 39  # one second had no successful request
    faults = root.findall(".//svg:g[@class='fault']", NS)
    assert [(attr(f, "data-fault"), float(attr(f, "data-t"))) for f in faults] == [
        ("kill", 10.0),
        ("revive", 25.0),
    ]
    xs = [float(attr(f.find("svg:line", NS), "x1")) for f in faults]
    assert xs == sorted(xs)
    phases = [attr(p, "data-phase") for p in root.findall(".//svg:rect[@class='phase']", NS)]
    assert phases == ["before", "during", "after"]


def test_reports_are_deterministic_and_complete(tmp_path):
    d, log, j = run(errors_for=1.0)
    data = series(log, d.drill.traffic_end)
    assert report_json(j, d.drill, data) == report_json(j, d.drill, data)
    doc = json.loads(report_json(j, d.drill, data))
    assert doc["passed"] is False
    assert {v["budget"] for v in doc["verdicts"]} >= {"failover time", "recovery time"}
    assert doc["failover"]["failed"] == 50
    assert len(doc["series"]["errors"]) == 40
    md = report_markdown(j, d.drill)
    assert (
        "# Drill zone-outage: FAILED" in md
        and "| **FAIL** | failed requests |" in md
        and "| pass | failover time |" in md
    )
    assert d.drill.notes[0] in md
    files = write_report(tmp_path, j, d.drill, data)
    assert sorted(p.suffix for p in files.values()) == [".html", ".json", ".md", ".svg"]
    assert "<svg" in files["html"].read_text()
    first = {k: p.read_bytes() for k, p in files.items()}
    files = write_report(tmp_path, j, d.drill, data)
    assert first == {k: p.read_bytes() for k, p in files.items()}
