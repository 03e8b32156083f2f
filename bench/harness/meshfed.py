"""How the benchmark launches meshfed's own processes (the seam of ``topology.MeshfedDriver``).

Every shape runs two clusters, each with its own trust domain as in ``pki``: ``bench-a``
runs the ``client`` workload whose outbound listener is the load generator's entry,
``bench-b`` runs the ``echo`` workload serving ``echo.bench`` from the backend. Every
process is a real sidecar (``python -m sidecar``: ``meshfed sidecar run``'s options and
code without the typer CLI, as ``meshfed up`` starts it) or ``meshfed gateway run``, with
``--svid-dir`` (the SVIDs of ``pki``, minted by the project's CA code,
``trust.svid.issue_svid``, which is what ``meshfed trust issue`` runs) and ``--catalog``
(a static catalog file per cluster, as the federation agent would stream it, so no
agent or store is needed).
The per-caller inbound connection rate limit is raised out of the way: the
new-connection scenario measures handshakes, not the limiter.

* ``pair``: both clusters on one network; the sidecars talk directly (inner mTLS).
* ``passthrough``: two networks; ``bench-b``'s gateway offers ``passthrough``, so
  sidecar A connects to it (SNI routed, never decrypted, spliced) and it forwards to
  sidecar B's inbound. No gateway runs in ``bench-a``.
* ``tunnel``: two networks; both gateways offer only ``tunnel``, so sidecar A goes to
  its local gateway's SNI listener, which opens a CONNECT stream on its pooled
  HTTP/2 mTLS connection to ``bench-b``'s gateway, which forwards to sidecar B.

The catalogs carry the gateway records (address, ports, modes, healthy counts) the
agents would publish; the config carries the same addresses and ports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from bench.harness.pki import CLIENT_DOMAIN, SERVER_DOMAIN, SERVICE_PORT, SvidFiles

if TYPE_CHECKING:
    from bench.harness.topology import ProcessSpec, Shape, StartContext

_WIRED: Final = frozenset({"pair", "passthrough", "tunnel"})
_HOST: Final = "127.0.0.1"


def not_wired(shape: Shape) -> str | None:
    """None if :func:`process_specs` can launch ``shape``, else why not."""
    if str(shape) in _WIRED:
        return None
    return f"the {shape} shape has no meshfed processes (bench/harness/meshfed.py)"


@dataclass(frozen=True)
class GatewayPorts:
    """One cluster's gateway listeners."""

    passthrough: int
    tunnel: int
    admin: int


@dataclass(frozen=True)
class Layout:
    """Ports and modes of one topology (what the config and the catalogs both say)."""

    backend: int
    inbound: tuple[int, int]
    """Sidecar inbound ports (client, echo)."""
    listen: int
    """The client sidecar's outbound listener for ``echo.bench``."""
    admin: tuple[int, int]
    """Sidecar admin ports (client, echo)."""
    gateways: tuple[GatewayPorts, GatewayPorts]
    """(bench-a, bench-b)."""
    networks: tuple[str, str]
    modes: tuple[tuple[str, ...], tuple[str, ...]]
    """Gateway modes (bench-a, bench-b)."""
    running_gateways: tuple[str, ...]
    """Clusters whose gateway process runs (and is published in the catalogs)."""


def layout(shape: str, backend: int, ports: Callable[[], int]) -> Layout:
    """Fresh ports for ``shape`` (``pair``, ``passthrough`` or ``tunnel``)."""

    def gw() -> GatewayPorts:
        return GatewayPorts(ports(), ports(), ports())

    modes: tuple[tuple[str, ...], tuple[str, ...]]
    running: tuple[str, ...]
    if shape == "pair":
        networks, modes = ("loopback", "loopback"), (("tunnel", "passthrough"),) * 2
        running = ()
    elif shape == "passthrough":
        networks, modes = ("net-a", "net-b"), (("tunnel", "passthrough"), ("passthrough",))
        running = ("bench-b",)
    else:
        networks, modes = ("net-a", "net-b"), (("tunnel",), ("tunnel",))
        running = ("bench-a", "bench-b")
    return Layout(
        backend=backend,
        inbound=(ports(), ports()),
        listen=ports(),
        admin=(ports(), ports()),
        gateways=(gw(), gw()),
        networks=networks,
        modes=modes,
        running_gateways=running,
    )


def _gateway_yaml(g: GatewayPorts, modes: tuple[str, ...]) -> str:
    return (
        f"{{address: {_HOST}, tunnel_port: {g.tunnel}, passthrough_port: {g.passthrough}, "
        f"admin_port: {g.admin}, modes: [{', '.join(modes)}]}}"
    )


def config_text(lay: Layout) -> str:
    """The deployment config of a topology: two clusters, one service, two workloads."""
    ga, gb = lay.gateways
    return f"""version: 1
federation:
  name: bench
clusters:
  - name: bench-a
    cloud: local
    region: r1
    zones: [z1]
    network: {lay.networks[0]}
    trust_domain: {CLIENT_DOMAIN}
    gateway: {_gateway_yaml(ga, lay.modes[0])}
    agent: {{address: 127.0.0.5, catalog_port: 15010, admin_port: 15014}}
  - name: bench-b
    cloud: local
    region: r1
    zones: [z1]
    network: {lay.networks[1]}
    trust_domain: {SERVER_DOMAIN}
    gateway: {_gateway_yaml(gb, lay.modes[1])}
    agent: {{address: 127.0.0.6, catalog_port: 15010, admin_port: 15014}}
services:
  - name: echo
    namespace: bench
    ports: [{{name: tcp, port: {SERVICE_PORT}}}]
    exported_to: ["*"]
workloads:
  - name: client
    cluster: bench-a
    zone: z1
    namespace: bench
    address: {_HOST}
    inbound_port: {lay.inbound[0]}
    admin_port: {lay.admin[0]}
    upstreams:
      - {{service: echo.bench, listen: "{_HOST}:{lay.listen}"}}
  - name: echo
    cluster: bench-b
    zone: z1
    namespace: bench
    address: {_HOST}
    inbound_port: {lay.inbound[1]}
    admin_port: {lay.admin[1]}
    serves: [{{service: echo, port: tcp, app: "{_HOST}:{lay.backend}"}}]
authorization:
  default_action: allow
"""


def _catalog_json(
    cfg_text: str, local_cluster: str, bundles: dict[str, bytes], running_gateways: tuple[str, ...]
) -> bytes:
    """A static catalog (``Catalog.to_json``) for ``local_cluster``: clusters, gateways,
    bundles, exports and endpoints, as the federation agent would stream them."""
    from federation import keys
    from federation.catalog import Catalog
    from federation.config import parse_config
    from federation.model import (
        ClusterRecord,
        EndpointRecord,
        Entry,
        ExportRecord,
        GatewayRecord,
        Locality,
    )
    from federation.model import ServicePort as RecordPort
    from trust.spiffe import TrustDomain, workload_id

    cfg = parse_config(cfg_text, "bench-meshfed.yaml")
    entries: dict[str, Entry] = {}
    healthy: dict[str, dict[str, int]] = {}
    for w in cfg.workloads:
        for sv in w.serves:
            per = healthy.setdefault(w.cluster, {})
            key = f"{w.namespace}/{sv.service}"
            per[key] = per.get(key, 0) + 1
    for c in cfg.clusters:
        rec = ClusterRecord(
            name=c.name,
            cloud=c.cloud,
            region=c.region,
            zones=c.zones,
            network=c.network,
            trust_domain=c.trust_domain,
            agent_address=c.agent.address,
            agent_port=c.agent.catalog_port,
            incarnation="bench-1",
            started_at=1.0,
        )
        entries[rec.key()] = rec
        entries[keys.bundle(c.trust_domain)] = bundles[str(c.trust_domain)]
        if c.name in running_gateways:
            g = c.gateway
            gw = GatewayRecord(
                cluster=c.name,
                gateway_id="gw-0",
                address=g.address,
                tunnel_port=g.tunnel_port if "tunnel" in g.modes else None,
                passthrough_port=g.passthrough_port if "passthrough" in g.modes else None,
                modes=tuple(g.modes),
                healthy_endpoints=healthy.get(c.name, {}),
                peer_alive={},
            )
            entries[gw.key()] = gw
    for s in cfg.services:
        for cname in cfg.clusters_serving(s.ref):
            exp = ExportRecord(
                cluster=cname,
                namespace=s.namespace,
                service=s.name,
                ports=tuple(RecordPort(p.name, p.port, p.protocol) for p in s.ports),
                exported_to=tuple(s.exported_to),
            )
            entries[exp.key()] = exp
    for w in cfg.workloads:
        c = cfg.cluster(w.cluster)
        for sv in w.serves:
            ep = EndpointRecord(
                cluster=w.cluster,
                namespace=w.namespace,
                service=sv.service,
                endpoint_id=w.name,
                address=w.address,
                port=w.inbound_port,
                locality=Locality(c.cloud, c.region, w.zone, c.name),
                weight=w.weight,
                healthy=True,
                spiffe_id=str(
                    workload_id(TrustDomain(c.trust_domain), w.namespace, w.service_account)
                ),
                network=c.network,
            )
            entries[ep.key()] = ep
    catalog = Catalog(
        epoch="bench", version=1, local_cluster=local_cluster, entries=entries, last_seen={}
    )
    return catalog.to_json()


def _svid_dir(base: Path, svid: SvidFiles, bundles: dict[str, bytes] | None = None) -> Path:
    """``svid.crt`` + ``svid.key`` (0600), and for gateways ``bundles/<td>.json``."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    (base / "svid.crt").write_bytes(svid.chain.read_bytes())
    key = base / "svid.key"
    key.touch(mode=0o600)
    key.write_bytes(svid.key.read_bytes())
    if bundles is not None:
        (base / "bundles").mkdir(exist_ok=True)
        for td, doc in bundles.items():
            (base / "bundles" / f"{td}.json").write_bytes(doc)
    return base


def sidecar_command() -> list[str]:
    """How sidecars start, as ``meshfed up`` starts them: ``python -m sidecar`` takes
    ``meshfed sidecar run``'s options without loading the typer CLI (sidecar/entry.py)."""
    return [sys.executable, "-m", "sidecar"]


def process_specs(
    shape: Shape, ctx: StartContext, meshfed_cmd: list[str], ports: Callable[[], int]
) -> list[ProcessSpec]:
    """Sidecar (:func:`sidecar_command`) and ``meshfed gateway run`` command lines,
    upstream first."""
    from bench.harness.topology import ProcessSpec

    if why := not_wired(shape):
        raise RuntimeError(why)
    wd, pki = ctx.workdir, ctx.pki
    lay = layout(str(shape), ctx.backend_port, ports)
    text = config_text(lay)
    cfg = wd / "meshfed.yaml"
    cfg.write_text(text)
    catalogs: dict[str, Path] = {}
    for cluster in ("bench-a", "bench-b"):
        catalogs[cluster] = wd / f"catalog-{cluster}.json"
        catalogs[cluster].write_bytes(
            _catalog_json(text, cluster, pki.bundles, lay.running_gateways)
        )
    quiet = ["--log-level", "WARNING"]

    def sidecar(workload: str, role: str, cluster: str, port: int) -> ProcessSpec:
        argv = [
            *sidecar_command(),
            "--config",
            str(cfg),
            "--workload",
            workload,
            "--state-dir",
            str(wd / f"state-{workload}"),
            "--svid-dir",
            str(_svid_dir(wd / f"svid-{workload}", pki.svids[role])),
            "--catalog",
            str(catalogs[cluster]),
            "--inbound-rate",
            "1000000",
            "--inbound-burst",
            "1000000",
            *quiet,
        ]
        return ProcessSpec(role, argv, port)

    def gateway(role: str, cluster: str, g: GatewayPorts, ready_port: int) -> ProcessSpec:
        argv = [
            *meshfed_cmd,
            "gateway",
            "run",
            "--config",
            str(cfg),
            "--cluster",
            cluster,
            "--state-dir",
            str(wd / f"state-{role}"),
            "--svid-dir",
            str(_svid_dir(wd / f"svid-{role}", pki.svids[role], pki.bundles)),
            "--catalog",
            str(catalogs[cluster]),
            *quiet,
        ]
        return ProcessSpec(role, argv, ready_port, f"http://{_HOST}:{g.admin}/stats")

    ga, gb = lay.gateways
    specs = [sidecar("echo", "server-sidecar", "bench-b", lay.inbound[1])]
    if str(shape) == "passthrough":
        specs.append(gateway("server-gateway", "bench-b", gb, gb.passthrough))
    elif str(shape) == "tunnel":
        specs.append(gateway("server-gateway", "bench-b", gb, gb.tunnel))
        specs.append(gateway("client-gateway", "bench-a", ga, ga.passthrough))
    specs.append(sidecar("client", "client-sidecar", "bench-a", lay.listen))
    return specs
