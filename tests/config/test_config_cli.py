"""``meshfed config validate`` and ``meshfed config schema`` through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from federation.cli.config_cmd import app
from federation.config import render_schema

from .helpers import DEMO, EXAMPLES, demo_text, mutate

runner = CliRunner()


def test_validate_valid_file_prints_topology_and_exits_0() -> None:
    result = runner.invoke(app, ["validate", str(DEMO)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{DEMO}: valid" in out
    assert "federation demo: 3 clusters, 5 services, 8 workloads (9 instances)" in out
    for text in ("aws-use1.demo.mesh", "us-east-1a,us-east-1b", "gcp-euw1", "onprem-dc1",
                 "* (all clusters)", "(not exported)", "demo/whoami-b x2"):
        assert text in out
    assert len(out.splitlines()) < 40, "the summary fits on one screen"


def test_validate_invalid_file_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = mutate(demo_text(), "lease_ttl: 5s", "lease_ttl: 5")
    bad.write_text(mutate(text, "zone: us-east-1a", "zone: us-east-1z"))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{bad}:15: federation.settings.lease_ttl: ")
    assert lines[1].startswith(f"{bad}:") and "workloads[0].zone" in lines[1]
    assert lines[2] == f"{bad}: invalid, 2 problems"
    assert result.stdout == ""


def test_validate_several_files_reports_each_and_fails_if_any_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nfederation: {name: x}\nclusters: {}\n")
    result = runner.invoke(app, ["validate", *map(str, EXAMPLES), str(bad)])
    assert result.exit_code == 2
    assert result.stdout.count(": valid\n") == 2
    assert f"{bad}:3: clusters: expected a list, got a mapping" in result.stderr


def test_validate_missing_file_exits_2() -> None:
    result = runner.invoke(app, ["validate", "does-not-exist.yaml"])
    assert result.exit_code == 2
    assert "does-not-exist.yaml: cannot read the file" in result.stderr


def test_validate_quiet_prints_nothing_for_valid_files() -> None:
    result = runner.invoke(app, ["validate", "--quiet", str(DEMO)])
    assert (result.exit_code, result.output) == (0, "")


def test_schema_command_prints_the_committed_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert result.stdout == render_schema()
