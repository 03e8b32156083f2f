"""``meshfed drill``: list, validate and judge with their exit codes."""

from __future__ import annotations

from typer.testing import CliRunner

from chaos.record import Recorder
from federation.cli.main import app

from .support import DRILLS, zone_faults, zone_run

runner = CliRunner()


def test_list_prints_one_line_per_drill():
    result = runner.invoke(app, ["drill", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(list(DRILLS.glob("*.yaml")))
    assert any(line.startswith("zone-outage ") and "[kill,revive]" in line for line in lines)


def test_validate_accepts_a_drill_and_refuses_a_broken_one(tmp_path):
    result = runner.invoke(app, ["drill", "validate", str(DRILLS / "slow-network.yaml")])
    assert result.exit_code == 0 and "latency link:aws-use1->gcp-euw1" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text((DRILLS / "zone-outage.yaml").read_text().replace("rate: 50", "rate: fast"))
    result = runner.invoke(app, ["drill", "validate", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:11: traffic[0].rate: expected a number" in result.output


def test_judge_writes_reports_and_exits_1_on_failure(tmp_path):
    records = tmp_path / "run.jsonl"
    with Recorder(records) as rec:
        for r in zone_run(failover=False):
            rec.request(r)
        for f in zone_faults():
            rec.fault(f)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["drill", "judge", str(DRILLS / "failover-disabled.yaml"), str(records), "--out", str(out)],
    )
    assert result.exit_code == 1, result.output
    assert "failover-disabled: FAILED" in result.output
    assert (out / "failover-disabled.svg").exists()
