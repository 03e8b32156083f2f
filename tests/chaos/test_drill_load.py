"""Drill files: the whole library loads; every kind of mistake is reported with file:line:path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chaos.drill import Target, parse_locality, parse_target
from chaos.drill_loader import load_drill, parse_drill
from federation.config import ConfigError, load_config
from federation.config.scalars import BadValue

from .support import DRILLS

CONFIG = load_config(DRILLS.parents[1] / "configs" / "demo.yaml")

GOOD = """\
name: t
description: test drill
config: ../../configs/demo.yaml
traffic:
  - {workload: frontend, cluster: aws-use1, service: whoami.demo, rate: 10, duration: 20s}
timeline:
  - {at: 5s, fault: kill, target: "endpoint:aws-use1/whoami-a"}
  - {at: 10s, fault: revive, target: "endpoint:aws-use1/whoami-a"}
phases:
  - {name: before, start: 0s, end: 5s}
  - {name: after, start: 12s, end: 20s}
budgets:
  max_failed_requests: 0
  failover: {within: 2s, to: ["zone:aws-use1/us-east-1b"]}
  recovery: {within: 5s, to: ["zone:aws-use1/us-east-1a"]}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_drill(text, "d.yaml", config=CONFIG)
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize("path", sorted(DRILLS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_library_drill_is_valid(path):
    loaded = load_drill(path)
    assert loaded.drill.name == path.stem
    assert loaded.config.federation.name == "demo"
    assert loaded.drill.notes, "every drill explains where retries cannot hide the fault"


def test_library_covers_the_required_drills():
    names = {p.stem for p in DRILLS.glob("*.yaml")}
    assert names >= {
        "zone-outage",
        "region-outage",
        "cloud-outage",
        "gateway-loss",
        "etcd-outage",
        "etcd-compaction-partition",
        "agent-partition",
        "slow-network",
        "ca-rotation",
        "bundle-rollback",
        "rolling-restart",
        "failover-disabled",
    }


def test_good_drill_parses_with_typed_values():
    loaded = parse_drill(GOOD, "d.yaml", config=CONFIG)
    event = loaded.drill.timeline[0]
    assert (event.at, event.fault, event.target) == (
        5.0,
        "kill",
        Target("endpoint", cluster="aws-use1", workload="whoami-a"),
    )
    assert loaded.drill.budgets.failover is not None
    assert loaded.drill.budgets.failover.within == 2.0
    assert loaded.clouds["gcp-euw1"] == "gcp"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("rate: 10", "rate: 10, colour: red", "d.yaml:5: traffic[0].colour: unknown key 'colour'"),
        ("duration: 20s", "duration: 20", "d.yaml:5: traffic[0].duration: expected a duration"),
        ("at: 5s", "at: 5 s", "d.yaml:7: timeline[0].at: duration '5 s' contains spaces"),
        ("fault: kill", "fault: explode", "d.yaml:7: timeline[0].fault: unknown fault 'explode'"),
        (
            '"endpoint:aws-use1/whoami-a"}\n  - {at: 10s',
            '"moon:base"}\n  - {at: 10s',
            "d.yaml:7: timeline[0].target: unknown target 'moon:base'",
        ),
        (
            '"zone:aws-use1/us-east-1b"',
            '"zone:aws-use1/us-east-1z"',
            "d.yaml:14: budgets.failover.to[0]: cluster 'aws-use1' has no zone 'us-east-1z'",
        ),
        (
            "cluster: aws-use1, service",
            "cluster: gcp-euw1, service",
            "d.yaml:5: traffic[0].workload: no workload 'frontend' in cluster 'gcp-euw1'",
        ),
        (
            "name: after, start: 12s",
            "name: after, start: 3s",
            "d.yaml:11: phases[1].start: phase overlaps the previous one",
        ),
        ("fault: revive", "fault: heal", "d.yaml:8: timeline[1].fault: 'heal' on"),
        ("at: 10s", "at: 2s", "d.yaml:8: timeline[1].at: 2s is before the previous event (5s)"),
    ],
)
def test_mistakes_name_file_line_and_path(old, new, expected):
    assert old in GOOD
    found = problems(GOOD.replace(old, new, 1))
    assert any(p.startswith(expected) for p in found), found


def test_fault_target_and_params_rules():
    text = GOOD.replace(
        '{at: 10s, fault: revive, target: "endpoint:aws-use1/whoami-a"}',
        '{at: 10s, fault: revive, target: "endpoint:aws-use1/whoami-a"}\n'
        '  - {at: 11s, fault: latency, target: "zone:aws-use1/us-east-1a", params: {jitter: 5ms}}\n'
        '  - {at: 12s, fault: bandwidth, target: "link:aws-use1->gcp-euw1", params: {delay: 1s}}',
    )
    found = problems(text)
    assert any("timeline[2].target: fault 'latency' cannot target a zone" in p for p in found)
    assert any("timeline[2].params: fault 'latency' needs 'delay'" in p for p in found)
    assert any("timeline[3].params.delay: fault 'bandwidth' takes no parameter" in p for p in found)
    assert any("timeline[3].params: fault 'bandwidth' needs 'bytes_per_second'" in p for p in found)


def test_every_problem_is_reported_in_one_pass():
    text = GOOD.replace("rate: 10", "rate: -1").replace("at: 5s", "at: soon")
    found = problems(text)
    assert any("traffic[0].rate" in p for p in found)
    assert any("timeline[0].at" in p for p in found)


def test_invalid_config_reference_points_at_the_config_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("version: 2\n")
    (tmp_path / "d.yaml").write_text(GOOD.replace("../../configs/demo.yaml", "bad.yaml"))
    with pytest.raises(ConfigError) as info:
        load_drill(tmp_path / "d.yaml")
    texts = [str(i) for i in info.value.issues]
    assert any(
        t.startswith(f"{tmp_path / 'd.yaml'}:3: config: the federation config") for t in texts
    )
    assert any(t.startswith(f"{tmp_path / 'bad.yaml'}:1") for t in texts)


def test_empty_and_multi_document_drills_are_refused():
    assert problems("") == ["d.yaml:1: empty drill (see docs/drills.md for the format)"]
    assert "one drill" in problems(GOOD + "---\nname: x\n")[0]


names = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


@given(
    st.one_of(
        st.builds(lambda c, z: f"zone:{c}/{z}", names, names),
        st.builds(
            lambda k, c: f"{k}:{c}",
            st.sampled_from(["cluster", "cloud", "gateway", "agent"]),
            names,
        ),
        st.builds(
            lambda c, w, r: f"endpoint:{c}/{w}" + ("" if r is None else f"/{r}"),
            names,
            names,
            st.none() | st.integers(0, 99),
        ),
        st.builds(lambda a, b: f"link:{a}->{b}", names, names).filter(
            lambda s: s.split(":")[1].split("->")[0] != s.split("->")[1]
        ),
        st.just("etcd"),
    )
)
def test_target_text_round_trips(text):
    assert str(parse_target(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "zone:a",
        "zone:a/b/c",
        "link:a-b",
        "link:a->a",
        "cluster:A",
        "endpoint:a/b/01",
        "etcd:x",
        "cluster:a/b",
    ],
)
def test_malformed_targets_are_refused(text):
    with pytest.raises(BadValue):
        parse_target(text)


def test_localities_are_only_zone_cluster_or_cloud():
    assert parse_locality("cloud:gcp") == Target("cloud", cloud="gcp")
    with pytest.raises(BadValue, match="unknown locality"):
        parse_locality("gateway:aws-use1")
