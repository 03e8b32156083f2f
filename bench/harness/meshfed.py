"""How the benchmark launches meshfed's own processes (the seam of ``topology.MeshfedDriver``).

Pair shape: two clusters on one network (so the sidecars talk directly, inner mTLS,
no gateway), each with its own trust domain as in ``pki``: ``bench-a`` runs the
``client`` workload whose outbound listener is the load generator's entry,
``bench-b`` runs the ``echo`` workload serving ``echo.bench`` from the backend.
Each sidecar is a real ``meshfed sidecar run`` with ``--svid-dir`` (the SVIDs of
``pki``) and ``--catalog`` (a static catalog file, so no agent or store is needed).
The per-caller inbound connection rate limit is raised out of the way: the
new-connection scenario measures handshakes, not the limiter.

Passthrough and tunnel shapes (``meshfed gateway run``) are not wired yet:
:func:`not_wired` says so and the driver reports "not available yet".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from bench.harness.pki import CLIENT_DOMAIN, SERVER_DOMAIN, SERVICE_PORT, SvidFiles

if TYPE_CHECKING:
    from bench.harness.topology import ProcessSpec, Shape, StartContext

_WIRED: Final = frozenset({"pair"})


def not_wired(shape: Shape) -> str | None:
    """None if :func:`process_specs` can launch ``shape``, else why not."""
    if str(shape) in _WIRED:
        return None
    return (
        f"the {shape} shape needs `meshfed gateway run` configured by "
        "bench/harness/meshfed.py, which only launches the sidecar pair so far"
    )


def config_text(backend: int, inbound: tuple[int, int], listen: int, admin: tuple[int, int]) -> str:
    """The pair shape's deployment config; ``inbound``/``admin`` are (client, echo) ports."""
    return f"""version: 1
federation:
  name: bench
clusters:
  - name: bench-a
    cloud: local
    region: r1
    zones: [z1]
    network: loopback
    trust_domain: {CLIENT_DOMAIN}
    gateway: {{address: 127.0.0.5, tunnel_port: 15008, passthrough_port: 15443, admin_port: 15021}}
    agent: {{address: 127.0.0.5, catalog_port: 15010, admin_port: 15014}}
  - name: bench-b
    cloud: local
    region: r1
    zones: [z1]
    network: loopback
    trust_domain: {SERVER_DOMAIN}
    gateway: {{address: 127.0.0.6, tunnel_port: 15008, passthrough_port: 15443, admin_port: 15021}}
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
    address: 127.0.0.1
    inbound_port: {inbound[0]}
    admin_port: {admin[0]}
    upstreams:
      - {{service: echo.bench, listen: "127.0.0.1:{listen}"}}
  - name: echo
    cluster: bench-b
    zone: z1
    namespace: bench
    address: 127.0.0.1
    inbound_port: {inbound[1]}
    admin_port: {admin[1]}
    serves: [{{service: echo, port: tcp, app: "127.0.0.1:{backend}"}}]
authorization:
  default_action: allow
"""


def _catalog_json(cfg_text: str, local_cluster: str, bundles: dict[str, bytes]) -> bytes:
    """A static catalog (``Catalog.to_json``) for ``local_cluster``: clusters, bundles,
    exports and endpoints, as the federation agent would stream them."""
    from federation import keys
    from federation.catalog import Catalog
    from federation.config import parse_config
    from federation.model import (
        ClusterRecord,
        EndpointRecord,
        Entry,
        ExportRecord,
        Locality,
    )
    from federation.model import ServicePort as RecordPort
    from trust.spiffe import TrustDomain, workload_id

    cfg = parse_config(cfg_text, "bench-meshfed.yaml")
    entries: dict[str, Entry] = {}
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


def _svid_dir(base: Path, svid: SvidFiles) -> Path:
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    (base / "svid.crt").write_bytes(svid.chain.read_bytes())
    key = base / "svid.key"
    key.touch(mode=0o600)
    key.write_bytes(svid.key.read_bytes())
    return base


def process_specs(
    shape: Shape, ctx: StartContext, meshfed_cmd: list[str], ports: Callable[[], int]
) -> list[ProcessSpec]:
    """``meshfed sidecar run`` command lines for ``shape``, upstream first."""
    from bench.harness.topology import ProcessSpec

    if why := not_wired(shape):
        raise RuntimeError(why)
    wd, pki = ctx.workdir, ctx.pki
    inbound, listen, admin = (ports(), ports()), ports(), (ports(), ports())
    text = config_text(ctx.backend_port, inbound, listen, admin)
    cfg = wd / "meshfed.yaml"
    cfg.write_text(text)
    specs: list[ProcessSpec] = []
    for workload, role, cluster, port in (
        ("echo", "server-sidecar", "bench-b", inbound[1]),
        ("client", "client-sidecar", "bench-a", listen),
    ):
        catalog = wd / f"catalog-{cluster}.json"
        catalog.write_bytes(_catalog_json(text, cluster, pki.bundles))
        argv = [
            *meshfed_cmd,
            "sidecar",
            "run",
            "--config",
            str(cfg),
            "--workload",
            workload,
            "--state-dir",
            str(wd / f"state-{workload}"),
            "--svid-dir",
            str(_svid_dir(wd / f"svid-{workload}", pki.svids[role])),
            "--catalog",
            str(catalog),
            "--inbound-rate",
            "1000000",
            "--inbound-burst",
            "1000000",
            "--log-level",
            "WARNING",
        ]
        specs.append(ProcessSpec(role, argv, port))
    return specs
