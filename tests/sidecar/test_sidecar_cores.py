"""Pure cores of the L4 sidecar: routing, admission/authorization, rate limits."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sidecarkit import Mesh, Ports, make_config

from federation.catalog import Catalog
from federation.config.model import Authorization, Policy, PolicySource, ServiceDefault
from federation.model import ClusterRecord, EndpointRecord, GatewayRecord
from sidecar.authz import Admit, InboundPolicy, Refuse, ServedPort, authorize
from sidecar.balancer import Balancer
from sidecar.ratelimit import RateLimitConfig, RateLimiter
from sidecar.routing import ANY_ZONE, balancer_config_for, build_routes
from sidecar.sni import MeshSni
from trust.spiffe import SpiffeId


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh.build(make_config(Ports.pick()))


def _with(catalog: Catalog, *, network: dict[str, str] | None = None, extra=()) -> Catalog:
    entries = dict(catalog.entries)
    for key, entry in list(entries.items()):
        if network and isinstance(entry, EndpointRecord) and entry.cluster in network:
            entries[key] = dataclasses.replace(entry, network=network[entry.cluster])
        if network and isinstance(entry, ClusterRecord) and entry.name in network:
            entries[key] = dataclasses.replace(entry, network=network[entry.name])
    for e in extra:
        entries[e.key()] = e
    return Catalog("test", catalog.version + 1, "c1", entries, {})


def gw(cluster: str, modes: tuple[str, ...], port: int = 15443) -> GatewayRecord:
    return GatewayRecord(
        cluster=cluster,
        gateway_id="gw-0",
        address=f"gw.{cluster}.example",
        tunnel_port=15008 if "tunnel" in modes else None,
        passthrough_port=port if "passthrough" in modes else None,
        modes=modes,
        healthy_endpoints={},
        peer_alive={},
    )


def test_same_network_endpoints_are_direct_candidates_with_exact_identity(mesh: Mesh) -> None:
    table = build_routes(
        mesh.catalog(), namespace="demo", service="echo", port=7000,
        source_cluster="c1", source_network="n1",
    )
    assert [c.name for c in table.candidates] == ["echo-z1", "echo-z2", "echo-c2"]
    c2 = table.candidates[2]
    assert (c2.kind, c2.via, c2.target_cluster) == ("direct", "direct", "c2")
    assert c2.expected_ids == frozenset({"spiffe://c2.t.mesh/ns/demo/sa/echo-c2"})
    assert MeshSni.parse(c2.sni) == MeshSni("echo", "demo", 7000, "c2", "c1")
    assert all(table.catalog_healthy.values())


def test_remote_network_is_one_candidate_via_its_passthrough_gateway(mesh: Mesh) -> None:
    cat = _with(mesh.catalog(), network={"c2": "n2"}, extra=[gw("c2", ("tunnel", "passthrough"))])
    table = build_routes(
        cat, namespace="demo", service="echo", port=7000, source_cluster="c1", source_network="n1"
    )
    remote = [c for c in table.candidates if c.kind == "gateway"]
    assert len(remote) == 1
    c = remote[0]
    assert (c.host, c.port, c.via) == ("gw.c2.example", 15443, "passthrough")
    assert c.locality.zone == ANY_ZONE and c.locality.region == "r2"
    assert c.weight == 1 and table.catalog_healthy[c]
    assert c.expected_ids == frozenset({"spiffe://c2.t.mesh/ns/demo/sa/echo-c2"})


def test_tunnel_only_target_goes_through_the_local_gateway_and_none_is_unroutable(
    mesh: Mesh,
) -> None:
    base = _with(mesh.catalog(), network={"c2": "n2"}, extra=[gw("c2", ("tunnel",))])
    no_local = build_routes(
        base, namespace="demo", service="echo", port=7000, source_cluster="c1", source_network="n1"
    )
    assert no_local.unroutable == ("c2",)
    assert all(c.kind == "direct" for c in no_local.candidates)
    with_local = _with(base, extra=[gw("c1", ("passthrough",), port=16443)])
    table = build_routes(
        with_local, namespace="demo", service="echo", port=7000,
        source_cluster="c1", source_network="n1",
    )
    c = next(c for c in table.candidates if c.kind == "gateway")
    assert (c.host, c.port, c.via) == ("gw.c1.example", 16443, "local-gateway")
    assert MeshSni.parse(c.sni).target_cluster == "c2"


def test_a_tunnel_only_local_gateway_from_the_config_still_carries_outbound_tunnels(
    mesh: Mesh,
) -> None:
    # The local gateway offers only tunnels to remote callers, so its record has no
    # passthrough port; its SNI listener still serves the cluster's own sidecars.
    cat = _with(
        mesh.catalog(),
        network={"c2": "n2"},
        extra=[gw("c2", ("tunnel",)), gw("c1", ("tunnel",))],
    )
    table = build_routes(
        cat, namespace="demo", service="echo", port=7000, source_cluster="c1",
        source_network="n1", local_gateway=("127.0.0.9", 17002),
    )
    assert table.unroutable == ()
    c = next(c for c in table.candidates if c.kind == "gateway")
    assert (c.host, c.port, c.via) == ("127.0.0.9", 17002, "local-gateway")
    assert MeshSni.parse(c.sni) == MeshSni("echo", "demo", 7000, "c2", "c1")


def test_a_cluster_our_gateway_reports_dead_is_out_of_rotation(mesh: Mesh) -> None:
    import dataclasses

    local = dataclasses.replace(gw("c1", ("passthrough",)), peer_alive={"c2": False})
    cat = _with(mesh.catalog(), network={"c2": "n2"}, extra=[gw("c2", ("passthrough",)), local])
    table = build_routes(
        cat, namespace="demo", service="echo", port=7000, source_cluster="c1", source_network="n1"
    )
    c = next(c for c in table.candidates if c.kind == "gateway")
    assert table.catalog_healthy[c] is False
    alive = dataclasses.replace(local, peer_alive={"c2": True})
    cat = _with(mesh.catalog(), network={"c2": "n2"}, extra=[gw("c2", ("passthrough",)), alive])
    table = build_routes(
        cat, namespace="demo", service="echo", port=7000, source_cluster="c1", source_network="n1"
    )
    c = next(c for c in table.candidates if c.kind == "gateway")
    assert table.catalog_healthy[c] is True


def test_remote_cluster_without_healthy_endpoints_is_unhealthy(mesh: Mesh) -> None:
    cat = _with(
        mesh.catalog(unhealthy=("echo-c2",)),
        network={"c2": "n2"},
        extra=[gw("c2", ("passthrough",))],
    )
    table = build_routes(
        cat, namespace="demo", service="echo", port=7000, source_cluster="c1", source_network="n1"
    )
    c = next(c for c in table.candidates if c.kind == "gateway")
    assert c.weight == 1 and table.catalog_healthy[c] is False


def test_balancer_tiers_follow_the_config_order(mesh: Mesh) -> None:
    cfg = mesh.cfg
    svc = cfg.services[0]
    bc = balancer_config_for(svc, cfg.cluster("c1"), 1.4)
    assert bc.order == ("zone", "cluster", "region", "cloud", "any")
    from federation.model import Locality

    bal = Balancer(Locality("aws", "r1", "z1", "c1"), bc)
    table = build_routes(
        mesh.catalog(), namespace="demo", service="echo", port=7000,
        source_cluster="c1", source_network="n1",
    )
    bal.update(table.candidates)
    assert [(t.name, [e.name for e in t.endpoints]) for t in bal.tiers] == [
        ("zone", ["echo-z1"]),
        ("cluster", ["echo-z2"]),
        ("cloud", ["echo-c2"]),
    ]
    pref = dataclasses.replace(cfg.cluster("c1"), failover=("c2",))
    assert balancer_config_for(svc, pref, 1.4).order == (
        "zone", "cluster", "preferred", "region", "cloud", "any",
    )


# -- authorization and admission -------------------------------------------------------

CALLER = SpiffeId.parse("spiffe://c1.t.mesh/ns/demo/sa/client")
DOMAINS = frozenset({"c1.t.mesh", "c2.t.mesh"})


def pol(name: str, action: str, **src: tuple[str, ...]) -> Policy:
    return Policy(name, "demo", "echo", action, PolicySource(**src))  # type: ignore[arg-type]


def test_deny_wins_over_allow_and_default_applies_otherwise() -> None:
    allow = pol("a-allow", "allow", namespaces=("demo",))
    deny = pol("z-deny", "deny", spiffe_ids=(str(CALLER),))
    assert authorize((allow, deny), "deny", "demo", "echo", CALLER, DOMAINS).rule == "policy:z-deny"
    assert authorize((allow,), "deny", "demo", "echo", CALLER, DOMAINS).allowed
    assert not authorize((), "deny", "demo", "echo", CALLER, DOMAINS).allowed
    assert authorize((), "allow", "demo", "echo", CALLER, DOMAINS).rule == "default:allow"
    other_svc = Policy("x", "demo", "other", "deny", PolicySource(namespaces=("demo",)))
    assert authorize((other_svc,), "allow", "demo", "echo", CALLER, DOMAINS).allowed


def test_namespace_rule_needs_a_federation_domain() -> None:
    allow = pol("a", "allow", namespaces=("demo",))
    stranger = SpiffeId.parse("spiffe://evil.example/ns/demo/sa/client")
    assert not authorize((allow,), "deny", "demo", "echo", stranger, DOMAINS).allowed
    by_domain = pol("b", "allow", trust_domains=("c2.t.mesh",))
    c2 = SpiffeId.parse("spiffe://c2.t.mesh/ns/other/sa/x")
    assert authorize((by_domain,), "deny", "demo", "echo", c2, DOMAINS).allowed


def _policy(auth: Authorization) -> InboundPolicy:
    return InboundPolicy(
        local_cluster="c1",
        served=(ServedPort("demo", "echo", 7000, "127.0.0.1", 1),),
        cluster_trust_domains={"c1": "c1.t.mesh", "c2": "c2.t.mesh"},
        authorization=auth,
    )


@pytest.mark.parametrize(
    ("sni", "caller", "reason"),
    [
        (None, CALLER, "no_sni"),
        ("echo.demo.7000.c1.c1.meshfed.", CALLER, "bad_sni"),
        ("echo.demo.7000.c2.c1.meshfed", CALLER, "wrong_cluster"),
        ("echo.demo.7001.c1.c1.meshfed", CALLER, "unknown_service"),
        ("payments.demo.7000.c1.c1.meshfed", CALLER, "unknown_service"),
        ("echo.demo.7000.c1.c9.meshfed", CALLER, "unknown_source_cluster"),
        ("echo.demo.7000.c1.c2.meshfed", CALLER, "source_cluster_mismatch"),
        ("echo.demo.7000.c1.c1.meshfed", CALLER, "denied"),
    ],
)
def test_admission_refusals_have_stable_reasons(sni, caller, reason) -> None:
    decision = _policy(Authorization()).admit(sni, caller)
    assert isinstance(decision, Refuse) and decision.reason == reason


def test_admission_admits_with_service_default_allow() -> None:
    auth = Authorization(service_defaults=(ServiceDefault("demo", "echo", "allow"),))
    decision = _policy(auth).admit("echo.demo.7000.c1.c1.meshfed", CALLER)
    assert isinstance(decision, Admit) and decision.rule == "default:allow"
    assert decision.served.port == 7000


# -- rate limits ---------------------------------------------------------------------------


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    rl: RateLimiter[str] = RateLimiter(RateLimitConfig(rate=2.0, burst=3.0))
    assert [rl.try_acquire("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.try_acquire("b", 0.0)  # callers are independent
    assert not rl.try_acquire("a", 0.49)
    assert rl.try_acquire("a", 0.5)
    assert rl.tokens("a", 100.0) == 3.0


def test_tracked_callers_are_bounded() -> None:
    rl: RateLimiter[int] = RateLimiter(RateLimitConfig(rate=1.0, burst=1.0, max_callers=10))
    for i in range(1000):
        rl.try_acquire(i, 0.0)
    assert len(rl) <= 10


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.01)), min_size=1, max_size=200)
)
def test_admitted_never_exceeds_burst_plus_rate_times_time(steps) -> None:
    cfg = RateLimitConfig(rate=10.0, burst=5.0)
    rl: RateLimiter[str] = RateLimiter(cfg)
    now = 0.0
    admitted = {"a": 0, "b": 0, "c": 0}
    for caller, dt in steps:
        now += dt
        admitted[caller] += rl.try_acquire(caller, now)
    for n in admitted.values():
        assert n <= cfg.burst + cfg.rate * now + 1e-9
