"""The process plan of ``meshfed up``: which processes, in which order, with which
command lines, and how each one is known to be ready. Pure: built from the run's
(port-shifted) config and the run directory layout; nothing is started here.

Start order is the stage order (store, agents, gateways, apps, sidecars,
traffic); shutdown runs the stages backwards. Every component is one OS process
except the agents on the embedded store, which live inside the ``up`` process
because the embedded store is in-process by nature (docs/up.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from federation.cli.up.ports import SIDECAR_ADMIN_HOST, ExtraPorts, is_loopback
from federation.config.model import FederationConfig, Workload
from trust.spiffe import TrustDomain, gateway_id, workload_id

__all__ = [
    "Component",
    "Layout",
    "Plan",
    "Stage",
    "TargetError",
    "build_plan",
    "resolve_target",
    "traffic_flows",
]

Kind = Literal["etcd", "agent", "gateway", "app", "sidecar", "traffic"]
Readiness = Literal["http", "tcp"]


class Stage(IntEnum):
    STORE = 0
    AGENTS = 1
    GATEWAYS = 2
    APPS = 3
    SIDECARS = 4
    TRAFFIC = 5


class TargetError(ValueError):
    """A kill/revive target that names nothing, or more than one thing ambiguously."""


@dataclass(frozen=True, slots=True)
class Component:
    """One thing ``up`` runs."""

    name: str
    """Unique, path-like: ``sidecar/aws-use1/whoami-b-1``, ``gateway/gcp-euw1``, ``etcd``."""
    kind: Kind
    stage: Stage
    argv: tuple[str, ...]
    """Command line (empty for in-process agents)."""
    ready: Readiness
    ready_addr: str
    """``host:port`` polled: ``GET /ready`` for http, a TCP connect for tcp."""
    admin: str | None = None
    """``host:port`` of the admin endpoint (``/status`` or ``/stats``, ``/metrics``)."""
    cluster: str | None = None
    zone: str | None = None
    workload: str | None = None
    replica: int | None = None
    caller: bool = False
    """A sidecar whose workload calls upstreams: it carries the demo's traffic."""
    in_process: bool = False
    join_spiffe_id: str | None = None
    """Start with ``--join-token <fresh token for this ID>`` (a token is one-time)."""
    agent_state_dir: str | None = None
    """Where that token is issued (the agent's ``--state-dir``)."""

    @property
    def endpoint(self) -> str | None:
        """The agent's endpoint id of an app or sidecar: ``<workload>-<replica>``."""
        if self.workload is None or self.replica is None:
            return None
        return f"{self.workload}-{self.replica}"

    @property
    def log_name(self) -> str:
        return self.name.replace("/", ".") + ".log"

    def to_obj(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["stage"] = self.stage.name.lower()
        obj["argv"] = list(self.argv)
        return obj

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Component:
        fields = dict(obj)
        fields["stage"] = Stage[str(fields["stage"]).upper()]
        fields["argv"] = tuple(fields["argv"])
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things live in the run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def cluster_config(self, cluster: str) -> Path:
        return self.root / f"config-{cluster}.yaml"

    def ca_dir(self, trust_domain: str) -> Path:
        """One CA per trust domain (clusters may share one)."""
        return self.root / "ca" / trust_domain

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    def agent_state(self, cluster: str) -> Path:
        return self.root / "agents" / cluster

    def gateway_svid(self, cluster: str) -> Path:
        return self.root / "gateways" / cluster / "svid"

    def gateway_state(self, cluster: str) -> Path:
        return self.root / "gateways" / cluster / "state"

    def sidecar_state(self, cluster: str, endpoint: str) -> Path:
        return self.root / "sidecars" / cluster / endpoint

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def control(self) -> Path:
        return self.root / "control.sock"

    @property
    def traffic_plan(self) -> Path:
        return self.root / "traffic-plan.json"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"


@dataclass(frozen=True, slots=True)
class Plan:
    components: tuple[Component, ...]
    store_url: str
    flows: tuple[dict[str, Any], ...] = field(default=())

    def by_name(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def stages(self) -> list[list[Component]]:
        """Components grouped by stage, in start order."""
        out: dict[Stage, list[Component]] = {}
        for c in self.components:
            out.setdefault(c.stage, []).append(c)
        return [out[s] for s in sorted(out)]


def _rp(host: str, port: int, replica: int) -> int:
    return port + replica if is_loopback(host) else port


def _app_kind(cfg: FederationConfig, w: Workload, service: str) -> str:
    from federation.config.scalars import ServiceRef

    svc = cfg.service(ServiceRef(service, w.namespace))
    return {"http": "http", "http2": "http2"}.get(svc.ports[0].protocol, "tcp")


def traffic_flows(cfg: FederationConfig, rate: float) -> list[dict[str, Any]]:
    """One flow per (source workload instance 0, upstream): where to send and how."""
    flows = []
    for w in cfg.workloads:
        for u in w.upstreams:
            svc = cfg.service(u.service)
            sp = svc.port(u.port) if u.port is not None else svc.ports[0]
            assert sp is not None  # the strict loader checked it
            flows.append(
                {
                    "source_workload": w.name,
                    "source_cluster": w.cluster,
                    "source_zone": w.zone,
                    "service": str(u.service),
                    "protocol": sp.protocol,
                    "target": f"{u.listen.host}:{u.listen.port}",
                    "rate": rate,
                }
            )
    return flows


def build_plan(
    cfg: FederationConfig,
    layout: Layout,
    meshfed: Sequence[str],
    extra: ExtraPorts,
    *,
    store: Literal["embedded", "etcd", "external"],
    store_url: str,
    etcd_binary: str = "etcd",
    sidecar_has_cluster_flag: bool = False,
    rate: float = 4.0,
    sidecar: Sequence[str] | None = None,
) -> Plan:
    """The components of a run of ``cfg`` (already port-shifted; ``extra`` likewise).

    ``meshfed`` is the command prefix that runs the CLI (``[python, -m, ...]``);
    ``sidecar`` the one that runs a sidecar (``[python, -m, sidecar]``, the same
    options as ``meshfed sidecar run``, its default).
    ``store``: ``embedded`` runs the agents in-process; ``etcd`` starts etcd on
    ``extra``'s ports and one agent process per cluster; ``external`` uses an
    etcd at ``store_url`` with agent processes.
    """
    mf = tuple(meshfed)
    sc = tuple(sidecar) if sidecar is not None else (*mf, "sidecar", "run")
    comps: list[Component] = []
    if store == "etcd":
        client = f"127.0.0.1:{extra.etcd_client}"
        peer = f"http://127.0.0.1:{extra.etcd_peer}"
        comps.append(
            Component(
                name="etcd",
                kind="etcd",
                stage=Stage.STORE,
                argv=(
                    etcd_binary,
                    "--name=meshfed-up",
                    f"--data-dir={layout.etcd_data}",
                    f"--listen-client-urls=http://{client}",
                    f"--advertise-client-urls=http://{client}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=meshfed-up={peer}",
                    "--initial-cluster-state=new",
                ),
                ready="tcp",
                ready_addr=client,
            )
        )
    config = str(layout.config)
    for c in cfg.clusters:
        agent_admin = f"{c.agent.address}:{c.agent.admin_port}"
        comps.append(
            Component(
                name=f"agent/{c.name}",
                kind="agent",
                stage=Stage.AGENTS,
                argv=()
                if store == "embedded"
                else (
                    *mf, "agent", "run", "--config", config, "--cluster", c.name,
                    "--store", store_url, "--ca-dir", str(layout.ca_dir(c.trust_domain)),
                    "--state-dir", str(layout.agent_state(c.name)),
                ),
                ready="http",
                ready_addr=agent_admin,
                admin=agent_admin,
                cluster=c.name,
                in_process=store == "embedded",
                agent_state_dir=str(layout.agent_state(c.name)),
            )
        )  # fmt: skip
    for c in cfg.clusters:
        gw = c.gateway
        admin = f"{gw.bind or gw.address}:{gw.admin_port}"
        comps.append(
            Component(
                name=f"gateway/{c.name}",
                kind="gateway",
                stage=Stage.GATEWAYS,
                argv=(
                    *mf, "gateway", "run", "--config", config, "--cluster", c.name,
                    "--state-dir", str(layout.gateway_state(c.name)),
                    "--bundles", str(layout.bundles),
                    "--agent", f"{c.agent.address}:{c.agent.catalog_port}",
                ),
                ready="http",
                ready_addr=admin,
                admin=admin,
                cluster=c.name,
                zone=None,
                join_spiffe_id=gateway_spiffe_id(cfg, c.name),
                agent_state_dir=str(layout.agent_state(c.name)),
            )
        )  # fmt: skip
    for w in cfg.workloads:
        td = TrustDomain(cfg.cluster(w.cluster).trust_domain)
        sid = str(workload_id(td, w.namespace, w.service_account))
        wconfig = config if sidecar_has_cluster_flag else str(layout.cluster_config(w.cluster))
        for i in range(w.replicas):
            ep = f"{w.name}-{i}"
            for s in w.serves:
                app = f"{s.app.host}:{_rp(s.app.host, s.app.port, i)}"
                comps.append(
                    Component(
                        name=f"app/{w.cluster}/{ep}"
                        + ("" if len(w.serves) == 1 else f"/{s.service}"),
                        kind="app",
                        stage=Stage.APPS,
                        argv=(
                            *mf, "demo", "app", "--kind", _app_kind(cfg, w, s.service),
                            "--listen", app, "--workload", w.name, "--cluster", w.cluster,
                            "--zone", w.zone, "--replica", str(i),
                        ),
                        ready="tcp",
                        ready_addr=app,
                        cluster=w.cluster,
                        zone=w.zone,
                        workload=w.name,
                        replica=i,
                    )
                )  # fmt: skip
            assert w.admin_port is not None  # configcopy gives every workload one
            admin = f"{SIDECAR_ADMIN_HOST}:{_rp(w.address, w.admin_port, i)}"
            argv = [
                *sc, "--config", wconfig, "--workload", w.name,
                "--replica", str(i), "--state-dir", str(layout.sidecar_state(w.cluster, ep)),
                "--bundles", str(layout.bundles), "--drain", "2",
            ]  # fmt: skip
            if sidecar_has_cluster_flag:
                argv += ["--cluster", w.cluster]
            comps.append(
                Component(
                    name=f"sidecar/{w.cluster}/{ep}",
                    kind="sidecar",
                    stage=Stage.SIDECARS,
                    argv=tuple(argv),
                    ready="http",
                    ready_addr=admin,
                    admin=admin,
                    cluster=w.cluster,
                    zone=w.zone,
                    workload=w.name,
                    replica=i,
                    caller=bool(w.upstreams),
                    join_spiffe_id=sid,
                    agent_state_dir=str(layout.agent_state(w.cluster)),
                )
            )
    flows = traffic_flows(cfg, rate)
    if flows:
        addr = f"127.0.0.1:{extra.traffic}"
        comps.append(
            Component(
                name="traffic",
                kind="traffic",
                stage=Stage.TRAFFIC,
                argv=(*mf, "demo", "traffic", "--plan", str(layout.traffic_plan), "--listen", addr),
                ready="http",
                ready_addr=addr,
                admin=addr,
            )
        )
    names = [c.name for c in comps]
    assert len(set(names)) == len(names), "component names are unique by construction"
    return Plan(tuple(comps), store_url, tuple(flows))


def gateway_spiffe_id(cfg: FederationConfig, cluster: str) -> str:
    return str(gateway_id(TrustDomain(cfg.cluster(cluster).trust_domain)))


def resolve_target(components: Iterable[Component], target: str) -> list[Component]:
    """What ``meshfed kill``/``revive`` TARGET means, in start order.

    * ``zone:C/Z``: the zone's apps and the sidecars of its serving workloads. The
      sidecars of callers (workloads with upstreams) are spared: they carry the
      demo's traffic, and killing them would stop the very calls whose failover
      you want to watch. Kill a caller by name to take it down too.
    * ``cluster:C``: likewise for the whole cluster, plus its gateway and agent.
    * ``gateway:C``: the cluster's gateway.
    * ``ENDPOINT`` or ``C/ENDPOINT`` (``whoami-b-1``): that instance's app and sidecar.
    * an exact component name (``sidecar/aws-use1/frontend-0``, ``traffic``).
    """
    comps = list(components)
    exact = [c for c in comps if c.name == target]
    if exact:
        return exact
    kind, colon, rest = target.partition(":")
    if colon:
        if kind == "zone":
            cluster, slash, zone = rest.partition("/")
            if not slash:
                raise TargetError(f"{target}: write zone:CLUSTER/ZONE")
            hit = [
                c for c in comps
                if c.cluster == cluster and c.zone == zone and c.kind in ("app", "sidecar")
                and not c.caller
            ]  # fmt: skip
        elif kind == "cluster":
            hit = [
                c for c in comps
                if c.cluster == rest and c.kind != "etcd" and not c.caller
            ]  # fmt: skip
        elif kind == "gateway":
            hit = [c for c in comps if c.kind == "gateway" and c.cluster == rest]
        else:
            raise TargetError(f"{target}: unknown target kind {kind!r} (zone, cluster, gateway)")
        if not hit:
            raise TargetError(f"{target}: nothing of this run matches")
        return sorted(hit, key=lambda c: (c.stage, c.name))
    cluster, slash, ep = target.rpartition("/")
    hit = [
        c for c in comps
        if c.endpoint == ep and c.kind in ("app", "sidecar") and (not slash or c.cluster == cluster)
    ]  # fmt: skip
    clusters = sorted({c.cluster or "" for c in hit})
    if len(clusters) > 1:
        raise TargetError(
            f"{target}: endpoint in several clusters; write one of "
            + ", ".join(f"{c}/{ep}" for c in clusters)
        )
    if not hit:
        names = sorted({c.endpoint for c in comps if c.endpoint})
        raise TargetError(
            f"{target}: no such component or endpoint (endpoints: {', '.join(names)})"
        )
    return sorted(hit, key=lambda c: (c.stage, c.name))
