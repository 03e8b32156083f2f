"""Record builders and hypothesis strategies shared by the catalog tests."""

from __future__ import annotations

from typing import Literal

from hypothesis import strategies as st

from federation.model import (
    ClusterRecord,
    EndpointRecord,
    ExportRecord,
    GatewayRecord,
    Locality,
    PolicyRecord,
    ServicePort,
)
from federation.store.api import KeyValue

LOCAL = "c1"
CLUSTERS = ("c1", "c2", "c3")
SERVICES = ("a", "b")
ENDPOINT_IDS = ("e1", "e2")
NS = "shop"
PROTOCOLS: tuple[Literal["tcp", "http", "http2"], ...] = ("tcp", "http", "http2")


def cluster(name: str = "c2", **kw: object) -> ClusterRecord:
    fields: dict[str, object] = {
        "name": name,
        "cloud": "aws",
        "region": "us-east-1",
        "zones": ("us-east-1a", "us-east-1b"),
        "network": f"net-{name}",
        "trust_domain": f"{name}.acme.mesh",
        "agent_address": "10.0.0.2",
        "agent_port": 15012,
        "incarnation": "inc-1",
        "started_at": 1000.0,
        "written_at": 1001.0,
    }
    fields.update(kw)
    return ClusterRecord(**fields)  # type: ignore[arg-type]


def export(
    cluster: str = "c2", service: str = "a", to: tuple[str, ...] = ("*",), **kw: object
) -> ExportRecord:
    fields: dict[str, object] = {
        "cluster": cluster,
        "namespace": NS,
        "service": service,
        "ports": (ServicePort("http", 8080, "http"), ServicePort("grpc", 9090, "http2")),
        "exported_to": to,
    }
    fields.update(kw)
    return ExportRecord(**fields)  # type: ignore[arg-type]


def endpoint(
    cluster: str = "c2", service: str = "a", eid: str = "e1", **kw: object
) -> EndpointRecord:
    fields: dict[str, object] = {
        "cluster": cluster,
        "namespace": NS,
        "service": service,
        "endpoint_id": eid,
        "address": "10.1.2.3",
        "port": 15006,
        "locality": Locality("aws", "us-east-1", "us-east-1a", cluster),
        "weight": 1,
        "healthy": True,
        "spiffe_id": f"spiffe://{cluster}.acme.mesh/ns/{NS}/sa/{service}",
        "network": f"net-{cluster}",
        "written_at": 1002.0,
    }
    fields.update(kw)
    return EndpointRecord(**fields)  # type: ignore[arg-type]


def gateway(cluster: str = "c2", gid: str = "gw-0", **kw: object) -> GatewayRecord:
    fields: dict[str, object] = {
        "cluster": cluster,
        "gateway_id": gid,
        "address": "gw.c2.example",
        "tunnel_port": 15443,
        "passthrough_port": 15444,
        "modes": ("tunnel", "passthrough"),
        "healthy_endpoints": {f"{NS}/a": 2, f"{NS}/b": 1},
        "peer_alive": {"c1": True, "c3": False},
    }
    fields.update(kw)
    return GatewayRecord(**fields)  # type: ignore[arg-type]


def policy(name: str = "deny-all", body: dict[str, object] | None = None) -> PolicyRecord:
    return PolicyRecord.create(name, body or {"action": "deny"}, now=5.0)


def kv(key: str, value: bytes, rev: int) -> KeyValue:
    return KeyValue(key=key, value=value, create_revision=rev, mod_revision=rev, version=1)


labels = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
ids = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9._-]{0,10}[A-Za-z0-9])?\Z")
ports = st.integers(1, 65535)
times = st.floats(0, 2e9, allow_nan=False, allow_infinity=False)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_bodies = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        json_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    ),
    max_size=4,
)


@st.composite
def localities(draw: st.DrawFn, cluster: str) -> Locality:
    return Locality(draw(labels), draw(labels), draw(labels), cluster)


@st.composite
def endpoint_records(draw: st.DrawFn) -> EndpointRecord:
    c = draw(labels)
    return EndpointRecord(
        cluster=c,
        namespace=draw(labels),
        service=draw(labels),
        endpoint_id=draw(ids),
        address=draw(st.sampled_from(["10.0.0.1", "fd00::1", "pod-1.ns.svc.cluster.local"])),
        port=draw(ports),
        locality=draw(localities(c)),
        weight=draw(st.integers(1, 65535)),
        healthy=draw(st.booleans()),
        spiffe_id=f"spiffe://{draw(labels)}.mesh/ns/{draw(labels)}/sa/{draw(ids)}",
        network=draw(labels),
        written_at=draw(st.none() | times),
    )


@st.composite
def export_records(draw: st.DrawFn) -> ExportRecord:
    names = draw(st.lists(labels, min_size=1, max_size=3, unique=True))
    numbers = draw(st.lists(ports, min_size=len(names), max_size=len(names), unique=True))
    protos = draw(st.lists(st.sampled_from(PROTOCOLS), min_size=len(names)))
    to = draw(st.just(("*",)) | st.lists(labels, max_size=3, unique=True).map(tuple))
    return ExportRecord(
        cluster=draw(labels),
        namespace=draw(labels),
        service=draw(labels),
        ports=tuple(
            ServicePort(n, p, pr) for n, p, pr in zip(names, numbers, protos, strict=False)
        ),
        exported_to=to,
        written_at=draw(st.none() | times),
    )


@st.composite
def gateway_records(draw: st.DrawFn) -> GatewayRecord:
    modes = draw(st.sampled_from([("tunnel",), ("passthrough",), ("tunnel", "passthrough")]))
    return GatewayRecord(
        cluster=draw(labels),
        gateway_id=draw(ids),
        address=draw(st.sampled_from(["10.0.0.9", "gw.example"])),
        tunnel_port=draw(ports) if "tunnel" in modes else None,
        passthrough_port=draw(ports) if "passthrough" in modes else None,
        modes=modes,  # type: ignore[arg-type]
        healthy_endpoints=draw(
            st.dictionaries(st.tuples(labels, labels).map("/".join), st.integers(0, 1000))
        ),
        peer_alive=draw(st.dictionaries(labels, st.booleans())),
        written_at=draw(st.none() | times),
    )


@st.composite
def cluster_records(draw: st.DrawFn) -> ClusterRecord:
    return ClusterRecord(
        name=draw(labels),
        cloud=draw(labels),
        region=draw(labels),
        zones=tuple(draw(st.lists(labels, min_size=1, max_size=3, unique=True))),
        network=draw(labels),
        trust_domain=draw(labels) + ".mesh",
        agent_address="10.0.0.1",
        agent_port=draw(ports),
        incarnation=draw(ids),
        started_at=draw(times),
        written_at=draw(st.none() | times),
    )


@st.composite
def policy_records(draw: st.DrawFn) -> PolicyRecord:
    record = PolicyRecord.create(draw(labels), draw(json_bodies), now=draw(times))
    for body in draw(st.lists(json_bodies, max_size=4)):
        record = record.revise(body, now=draw(times), keep=draw(st.integers(0, 3)))
    return record


any_record = st.one_of(
    endpoint_records(), export_records(), gateway_records(), cluster_records(), policy_records()
)
