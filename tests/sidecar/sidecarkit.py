"""A small federation for the sidecar tests: config, CAs, SVIDs and a static catalog.

Topology (one network ``n1``, so every hop is direct and no gateway is involved):

* cluster ``c1`` (aws/r1, zones z1 z2, domain ``c1.t.mesh``), cluster ``c2``
  (aws/r2, zone z3, domain ``c2.t.mesh``);
* service ``echo.demo`` (tcp 7000) served by ``echo-z1`` (c1/z1), ``echo-z2``
  (c1/z2) and ``echo-c2`` (c2/z3); service ``redis.demo`` (tcp 6379) served by
  ``redis-srv`` (c1/z1);
* workload ``client`` (c1/z1) calls both through its outbound listeners.

From the client, tiers are: zone = echo-z1, cluster = echo-z2, cloud = echo-c2.
"""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass, field
from pathlib import Path

from federation import keys
from federation.catalog import Catalog
from federation.config import parse_config
from federation.config.model import FederationConfig
from federation.model import ClusterRecord, EndpointRecord, Entry, ExportRecord, Locality
from federation.model import ServicePort as RecordPort
from trust.ca import CertificateAuthority
from trust.revocation import Revocation
from trust.spiffe import SpiffeId, TrustDomain, workload_id
from trust.svid import Svid, issue_svid
from trust.validate import TrustBundleSet

NOW = dt.datetime.now(dt.UTC)
ECHO_WORKLOADS = {"echo-z1": ("c1", "z1"), "echo-z2": ("c1", "z2"), "echo-c2": ("c2", "z3")}


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound together, then released)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Ports:
    inbound: dict[str, int]
    admin: dict[str, int]
    app: dict[str, int]
    echo_listen: int
    redis_listen: int

    @classmethod
    def pick(cls) -> Ports:
        names = ["client", *ECHO_WORKLOADS, "redis-srv"]
        p = free_ports(3 * len(names) + 2)
        return cls(
            inbound={n: p[i] for i, n in enumerate(names)},
            admin={n: p[len(names) + i] for i, n in enumerate(names)},
            app={n: p[2 * len(names) + i] for i, n in enumerate(names)},
            echo_listen=p[-2],
            redis_listen=p[-1],
        )


def config_text(ports: Ports, *, default_action: str = "allow", extra_auth: str = "") -> str:
    workloads = []
    for name, (cluster, zone) in ECHO_WORKLOADS.items():
        workloads.append(
            f"""
  - name: {name}
    cluster: {cluster}
    zone: {zone}
    namespace: demo
    address: 127.0.0.1
    inbound_port: {ports.inbound[name]}
    admin_port: {ports.admin[name]}
    serves: [{{service: echo, port: tcp, app: "127.0.0.1:{ports.app[name]}"}}]"""
        )
    return f"""version: 1
federation:
  name: t
  settings:
    gateway_probe: {{interval: 200ms, timeout: 200ms, failure_threshold: 2}}
clusters:
  - name: c1
    cloud: aws
    region: r1
    zones: [z1, z2]
    network: n1
    gateway: {{address: 127.0.0.5, tunnel_port: 15008, passthrough_port: 15443, admin_port: 15021}}
    agent: {{address: 127.0.0.5, catalog_port: 15010, admin_port: 15014}}
  - name: c2
    cloud: aws
    region: r2
    zones: [z3]
    network: n1
    gateway: {{address: 127.0.0.6, tunnel_port: 15008, passthrough_port: 15443, admin_port: 15021}}
    agent: {{address: 127.0.0.6, catalog_port: 15010, admin_port: 15014}}
services:
  - name: echo
    namespace: demo
    ports: [{{name: tcp, port: 7000}}]
    exported_to: ["*"]
    traffic_policy:
      timeouts: {{connect: 1s}}
      outlier_detection:
        consecutive_failures: 1
        base_ejection_time: 1s
        interval: 1s
        max_ejection_percent: 100
  - name: redis
    namespace: demo
    ports: [{{name: tcp, port: 6379}}]
workloads:
  - name: client
    cluster: c1
    zone: z1
    namespace: demo
    address: 127.0.0.1
    inbound_port: {ports.inbound["client"]}
    admin_port: {ports.admin["client"]}
    upstreams:
      - {{service: echo.demo, listen: "127.0.0.1:{ports.echo_listen}"}}
      - {{service: redis.demo, listen: "127.0.0.1:{ports.redis_listen}"}}
{"".join(workloads)}
  - name: redis-srv
    cluster: c1
    zone: z1
    namespace: demo
    address: 127.0.0.1
    inbound_port: {ports.inbound["redis-srv"]}
    admin_port: {ports.admin["redis-srv"]}
    serves: [{{service: redis, port: tcp, app: "127.0.0.1:{ports.app["redis-srv"]}"}}]
authorization:
  default_action: {default_action}
{extra_auth}
"""


@dataclass
class Mesh:
    """CAs per trust domain and the config; issues SVIDs and builds catalogs."""

    cfg: FederationConfig
    cas: dict[str, CertificateAuthority] = field(default_factory=dict)
    revocations: list[Revocation] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: FederationConfig, extra_domains: tuple[str, ...] = ()) -> Mesh:
        mesh = cls(cfg)
        for name in [c.trust_domain for c in cfg.clusters] + list(extra_domains):
            mesh.cas[name] = CertificateAuthority.create(TrustDomain(name), NOW)[0]
        return mesh

    def bundles(self, *domains: str) -> TrustBundleSet:
        names = domains or tuple(c.trust_domain for c in self.cfg.clusters)
        return TrustBundleSet({TrustDomain(n): (self.cas[n].root,) for n in names})

    def svid_for(self, workload: str) -> Svid:
        w = next(w for w in self.cfg.workloads if w.name == workload)
        td = self.cfg.cluster(w.cluster).trust_domain
        return issue_svid(
            self.cas[td], workload_id(TrustDomain(td), w.namespace, w.service_account), NOW
        )

    def svid(self, domain: str, spiffe_id: str, *, signer: str | None = None) -> Svid:
        """An SVID for any ID; ``signer`` forges it with another domain's CA key."""
        # The project CA refuses to sign another domain's ID: forge by hand.
        return issue_svid_unchecked(self.cas[signer or domain], SpiffeId.parse(spiffe_id))

    def write_svid_dir(self, base: Path, workload: str) -> Path:
        d = base / f"svid-{workload}"
        d.mkdir(parents=True, exist_ok=True)
        svid = self.svid_for(workload)
        (d / "svid.crt").write_bytes(svid.chain_pem())
        key = d / "svid.key"
        key.write_bytes(svid.key_pem())
        key.chmod(0o600)
        return d

    def catalog(self, version: int = 1, *, unhealthy: tuple[str, ...] = ()) -> Catalog:
        entries: dict[str, Entry] = {}
        for c in self.cfg.clusters:
            rec = ClusterRecord(
                name=c.name,
                cloud=c.cloud,
                region=c.region,
                zones=c.zones,
                network=c.network,
                trust_domain=c.trust_domain,
                agent_address=c.agent.address,
                agent_port=c.agent.catalog_port,
                incarnation="inc-1",
                started_at=1.0,
            )
            entries[rec.key()] = rec
            entries[keys.bundle(c.trust_domain)] = (
                self.cas[c.trust_domain].trust_bundle(1).to_json().encode()
            )
        for s in self.cfg.services:
            for cname in self.cfg.clusters_serving(s.ref):
                exp = ExportRecord(
                    cluster=cname,
                    namespace=s.namespace,
                    service=s.name,
                    ports=tuple(RecordPort(p.name, p.port, p.protocol) for p in s.ports),
                    exported_to=tuple(s.exported_to),
                )
                entries[exp.key()] = exp
        for w in self.cfg.workloads:
            c = self.cfg.cluster(w.cluster)
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
                    healthy=w.name not in unhealthy,
                    spiffe_id=str(
                        workload_id(TrustDomain(c.trust_domain), w.namespace, w.service_account)
                    ),
                    network=c.network,
                )
                entries[ep.key()] = ep
        for r in self.revocations:
            entries[keys.revocation(r.trust_domain.name, r.store_segment())] = (
                r.to_json().encode()
            )
        return Catalog(
            epoch="test", version=version, local_cluster="c1", entries=entries, last_seen={}
        )


def issue_svid_unchecked(ca: CertificateAuthority, sid: SpiffeId) -> Svid:
    """Sign without the CA's self-check (which would refuse a forged chain)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from trust.svid import build_svid_certificate

    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_svid_certificate(
        issuer_key=ca.signing_key,
        issuer_cert=ca.certificate,
        public_key=key.public_key(),
        spiffe_id=sid,
        now=NOW,
        ttl=dt.timedelta(hours=1),
    )
    return Svid.from_certificates((cert, *ca.chain[:-1]), key)


def make_config(ports: Ports, **kw: str) -> FederationConfig:
    return parse_config(config_text(ports, **kw), "sidecar-test.yaml")
