"""Pure planning: listeners, extra ports, offsets and locks, the config copy, the process plan."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from federation.cli.up.configcopy import _DEFAULT_PORTS, cluster_first, shift_document
from federation.cli.up.plan import Layout, Stage, TargetError, build_plan, resolve_target
from federation.cli.up.ports import (
    Listener,
    OffsetLock,
    PortConflict,
    choose_offset,
    duplicates,
    extra_ports,
    listeners,
)
from federation.config.loader import load_config
from federation.config.model import AgentSpec, GatewaySpec

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def demo() -> Any:
    return load_config(DEMO)


def test_extra_ports_sit_above_every_configured_port_and_do_not_clash(demo: Any) -> None:
    extra = extra_ports(demo)
    top = max(lst.port for lst in listeners(demo))
    assert min(extra.sidecar_admin.values()) > top
    assert extra.traffic > max(extra.sidecar_admin.values())
    # whoami-b has two replicas: its block is two ports wide.
    b = extra.sidecar_admin[("aws-use1", "demo", "whoami-b")]
    assert b + 1 not in extra.sidecar_admin.values()
    # frontend has its own admin port already.
    assert ("aws-use1", "demo", "frontend") not in extra.sidecar_admin
    assert duplicates(listeners(demo, extra)) == []


def test_listeners_count_replicas_and_gateway_modes(demo: Any) -> None:
    owners = [lst.owner for lst in listeners(demo)]
    assert "sidecar aws-use1/whoami-b-1 inbound" in owners
    # The gateway binds its passthrough port whatever its modes (gateway/runner.py).
    assert "gateway/onprem-dc1 tunnel" in owners
    assert "gateway/onprem-dc1 passthrough" in owners


def test_duplicates_see_same_host_and_wildcards_only() -> None:
    a = Listener("127.0.0.2", 80, "a")
    b = Listener("127.0.0.3", 80, "b")
    c = Listener("127.0.0.2", 80, "c")
    w = Listener("0.0.0.0", 80, "w")
    assert duplicates([a, b]) == []
    assert duplicates([a, c]) == [(a, c)]
    assert len(duplicates([a, b, w])) == 2


def test_choose_offset_skips_busy_and_locked_offsets() -> None:
    planned = [Listener("127.0.0.1", 17000, "x"), Listener("127.0.0.1", 17001, "y")]
    busy = {("127.0.0.1", 17001)}
    locked = {2000}

    def free(lst: Listener) -> bool:
        return (lst.host, lst.port) not in busy

    assert choose_offset(planned, free, try_lock=lambda o: o not in locked) == 1000
    assert choose_offset(planned, lambda _l: True, try_lock=lambda o: o not in {0}) == 1000
    with pytest.raises(PortConflict, match="in use at offset 0"):
        choose_offset(planned, free, requested=0)
    with pytest.raises(PortConflict, match="out of 1-65535"):
        choose_offset(planned, free, requested=50000)


def test_offset_locks_exclude_a_second_run_until_released(tmp_path: Path) -> None:
    first, second = OffsetLock(tmp_path), OffsetLock(tmp_path)
    assert first.try_lock(1000)
    assert not second.try_lock(1000)
    assert second.try_lock(2000)
    first.release_all()
    assert second.try_lock(1000)
    second.release_all()


def test_config_copy_shifts_every_listener_and_validates(demo: Any, tmp_path: Path) -> None:
    doc = yaml.safe_load(DEMO.read_text())
    extra = extra_ports(demo)
    shifted = shift_document(doc, 3000, extra.sidecar_admin, store_endpoints=("127.0.0.1:2379",))
    assert doc["clusters"][0]["gateway"]["tunnel_port"] == 17001  # the source is untouched
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(shifted))
    cfg = load_config(path)
    assert sorted(
        lst.port + 3000
        for lst in listeners(demo, extra)
        if "etcd" not in lst.owner and lst.owner != "traffic"
    ) == sorted(lst.port for lst in listeners(cfg))
    assert cfg.federation.settings.store.backend == "etcd"
    whoami = next(s for s in cfg.services if s.name == "whoami")
    assert whoami.ports[0].port == 8080  # service ports are not listeners


def test_config_copy_defaults_match_the_model() -> None:
    for part, cls in (("gateway", GatewaySpec), ("agent", AgentSpec)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name.endswith("_port")}
        assert _DEFAULT_PORTS[part] == defaults


def test_cluster_first_moves_one_clusters_workloads_to_the_front() -> None:
    doc = {"workloads": [{"name": "a", "cluster": "x"}, {"name": "b", "cluster": "y"}]}
    assert [w["name"] for w in cluster_first(doc, "y")["workloads"]] == ["b", "a"]


def _plan(demo: Any, store: Any = "embedded") -> Any:
    return build_plan(
        demo, Layout(Path("/run")), ["meshfed"], extra_ports(demo),
        store=store, store_url="memory://" if store == "embedded" else "etcd://127.0.0.1:17402",
    )  # fmt: skip


def test_plan_orders_stages_and_runs_embedded_agents_in_process(demo: Any) -> None:
    # configcopy gives every workload an admin port; emulate it on the loaded model.
    plan = _plan(_with_admin(demo))
    kinds = [[c.kind for c in group] for group in plan.stages()]
    assert [group[0] for group in kinds] == ["agent", "gateway", "app", "sidecar", "traffic"]
    assert all(c.in_process and not c.argv for c in plan.components if c.kind == "agent")
    assert len(plan.components) == 3 + 3 + 9 + 9 + 1
    sidecar = plan.by_name("sidecar/onprem-dc1/whoami-0")
    assert sidecar.join_spiffe_id == "spiffe://onprem-dc1.demo.mesh/ns/demo/sa/whoami"
    assert "/run/config-onprem-dc1.yaml" in sidecar.argv  # its cluster's workloads first
    assert len(plan.flows) == 4


def test_plan_with_etcd_starts_etcd_and_agent_processes(demo: Any) -> None:
    plan = _plan(_with_admin(demo), store="etcd")
    assert plan.stages()[0][0].name == "etcd"
    agent = plan.by_name("agent/aws-use1")
    assert not agent.in_process
    assert agent.stage is Stage.AGENTS
    assert "etcd://127.0.0.1:17402" in agent.argv


def test_targets_zone_spares_callers_endpoint_needs_cluster_when_ambiguous(demo: Any) -> None:
    comps = _plan(_with_admin(demo)).components
    zone = [c.name for c in resolve_target(comps, "zone:aws-use1/us-east-1a")]
    assert zone == [
        "app/aws-use1/frontend-0",
        "app/aws-use1/whoami-a-0",
        "sidecar/aws-use1/whoami-a-0",
    ]
    with pytest.raises(TargetError, match="gcp-euw1/whoami-0, onprem-dc1/whoami-0"):
        resolve_target(comps, "whoami-0")
    assert len(resolve_target(comps, "gcp-euw1/whoami-0")) == 2
    assert [c.name for c in resolve_target(comps, "gateway:gcp-euw1")] == ["gateway/gcp-euw1"]
    cluster = {c.kind for c in resolve_target(comps, "cluster:onprem-dc1")}
    assert cluster == {"agent", "gateway", "app", "sidecar"}
    with pytest.raises(TargetError):
        resolve_target(comps, "zone:nowhere/x")


def _with_admin(cfg: Any) -> Any:
    extra = extra_ports(cfg)
    workloads = tuple(
        dataclasses.replace(
            w, admin_port=extra.sidecar_admin.get((w.cluster, w.namespace, w.name), w.admin_port)
        )
        for w in cfg.workloads
    )
    return dataclasses.replace(cfg, workloads=workloads)
