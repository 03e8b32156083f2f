"""gateway.router.decide: every allowed and refused case, with its reason."""

from __future__ import annotations

import random

import pytest

from federation.catalog import Catalog
from gateway.router import Inbound, LocalBalancers, Outbound, Refused, decide
from sidecar.sni import MeshSni

from .helpers import Record, catalog, cluster_record, endpoint, export, gateway_record

BOTH = ("tunnel", "passthrough")
TUNNEL = ("tunnel",)


def world(local: str = "b", *, remote_tunnel: bool = True) -> Catalog:
    """Clusters a, b, c. In b: web (exported to a), hidden (exported to nobody),
    down (exported to *, no healthy endpoint). In c: api (exported to b, tunnel gateway),
    priv (exported to a only). a has a passthrough-only gateway."""
    recs: list[Record] = [
        cluster_record("a"),
        cluster_record("b"),
        cluster_record("c"),
        gateway_record("a", ("passthrough",)),
        gateway_record("b"),
        gateway_record("c", TUNNEL if remote_tunnel else ("passthrough",)),
        export("b", "web", ("a",)),
        export("b", "hidden", ()),
        export("b", "down", ("*",)),
        endpoint("b", "web", "w1"),
        endpoint("b", "web", "w2", healthy=False),
        endpoint("b", "hidden", "h1"),
        endpoint("b", "down", "d1", healthy=False),
        export("c", "api", ("b",)),
        export("c", "priv", ("a",)),
        endpoint("c", "api", "a1"),
    ]
    return catalog(local, recs)


def sni(service: str, target: str, source: str, port: int = 8080) -> MeshSni:
    return MeshSni(service, "demo", port, target, source)


# (case, sni, via, modes, authenticated source, expected reason or route type)
CASES = [
    # inbound via passthrough
    ("remote caller, exported", sni("web", "b", "a"), "passthrough", BOTH, None, Inbound),
    ("local caller, not exported", sni("hidden", "b", "b"), "passthrough", BOTH, None, Inbound),
    ("local caller, tunnel-only gw", sni("hidden", "b", "b"), "passthrough", TUNNEL, None, Inbound),
    (
        "remote caller, passthrough off",
        sni("web", "b", "a"),
        "passthrough",
        TUNNEL,
        None,
        "passthrough_disabled",
    ),
    ("not exported to caller", sni("web", "b", "c"), "passthrough", BOTH, None, "not_exported"),
    ("exported to nobody", sni("hidden", "b", "a"), "passthrough", BOTH, None, "not_exported"),
    ("unknown service", sni("nope", "b", "a"), "passthrough", BOTH, None, "unknown_service"),
    ("unknown port", sni("web", "b", "a", port=9999), "passthrough", BOTH, None, "unknown_port"),
    ("no healthy endpoint", sni("down", "b", "a"), "passthrough", BOTH, None, "no_endpoint"),
    # outbound via passthrough (local sidecar -> our gateway -> tunnel)
    ("outbound, exported to us", sni("api", "c", "b"), "passthrough", BOTH, None, Outbound),
    ("outbound from tunnel-only gw", sni("api", "c", "b"), "passthrough", TUNNEL, None, Outbound),
    (
        "outbound, not exported to us",
        sni("priv", "c", "b"),
        "passthrough",
        BOTH,
        None,
        "not_exported",
    ),
    (
        "outbound, unknown service",
        sni("nope", "c", "b"),
        "passthrough",
        BOTH,
        None,
        "unknown_service",
    ),
    (
        "outbound, unknown port",
        sni("api", "c", "b", port=1),
        "passthrough",
        BOTH,
        None,
        "unknown_port",
    ),
    (
        "outbound, unknown cluster",
        sni("api", "zz", "b"),
        "passthrough",
        BOTH,
        None,
        "unknown_cluster",
    ),
    # transit: neither end is us
    ("transit via passthrough", sni("api", "c", "a"), "passthrough", BOTH, None, "transit"),
    # tunnel listener: source must be the authenticated peer, target must be us
    ("tunnel, exported", sni("web", "b", "a"), "tunnel", BOTH, "a", Inbound),
    ("tunnel, passthrough mode irrelevant", sni("web", "b", "a"), "tunnel", TUNNEL, "a", Inbound),
    ("tunnel, lying SNI source", sni("web", "b", "a"), "tunnel", BOTH, "c", "source_mismatch"),
    (
        "tunnel, peer claims to be us",
        sni("hidden", "b", "b"),
        "tunnel",
        BOTH,
        "a",
        "source_mismatch",
    ),
    ("tunnel, transit", sni("api", "c", "a"), "tunnel", BOTH, "a", "transit"),
    ("tunnel, not exported", sni("web", "b", "c"), "tunnel", BOTH, "c", "not_exported"),
    ("tunnel, unknown service", sni("nope", "b", "a"), "tunnel", BOTH, "a", "unknown_service"),
    ("tunnel, no endpoint", sni("down", "b", "a"), "tunnel", BOTH, "a", "no_endpoint"),
]


@pytest.mark.parametrize(
    ("sni_", "via", "modes", "peer", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decision_table(
    sni_: MeshSni, via: str, modes: tuple[str, ...], peer: str | None, expected: object
) -> None:
    route = decide(world(), sni_, via=via, modes=modes, authenticated_source=peer)  # type: ignore[arg-type]
    if isinstance(expected, str):
        assert isinstance(route, Refused)
        assert route.reason == expected
        assert route.detail
    else:
        assert isinstance(route, expected)  # type: ignore[arg-type]


def test_inbound_lists_only_healthy_local_endpoints() -> None:
    route = decide(world(), sni("web", "b", "a"), via="passthrough", modes=BOTH)
    assert isinstance(route, Inbound)
    assert [e.endpoint_id for e in route.endpoints] == ["w1"]


def test_outbound_names_the_target_trust_domain_and_tunnel_gateways() -> None:
    route = decide(world(), sni("api", "c", "b"), via="passthrough", modes=BOTH)
    assert isinstance(route, Outbound)
    assert route.trust_domain == "c.test.mesh"
    assert [g.cluster for g in route.gateways] == ["c"]


def test_outbound_without_a_tunnel_gateway_is_refused() -> None:
    route = decide(world(remote_tunnel=False), sni("api", "c", "b"), via="passthrough", modes=BOTH)
    assert isinstance(route, Refused) and route.reason == "no_gateway"


def test_tunnel_decision_requires_the_authenticated_peer() -> None:
    with pytest.raises(ValueError):
        decide(world(), sni("web", "b", "a"), via="tunnel", modes=BOTH)


def test_local_balancer_prefers_the_gateways_zone_and_skips_failed() -> None:
    from federation.model import Locality

    recs: list[Record] = [
        cluster_record("b"),
        export("b", "web", ("*",)),
        endpoint("b", "web", "near", port=1, zone="zb1"),
        endpoint("b", "web", "far", port=2, zone="zb2"),
    ]
    cat = catalog("b", recs)
    lb = LocalBalancers(Locality("cloud-b", "region-b", "zb1", "b"))
    lb.update(cat)
    route = decide(cat, sni("web", "b", "a"), via="passthrough", modes=BOTH)
    assert isinstance(route, Inbound)
    rng = random.Random(1)
    picks = [next(iter(lb.attempts(route, rng))).endpoint.endpoint_id for _ in range(20)]
    assert set(picks) == {"near"}
    attempts = [p.endpoint.endpoint_id for p in lb.attempts(route, rng, budget=3)]
    assert attempts == ["near", "far"]  # a failed connect moves on, each endpoint once
