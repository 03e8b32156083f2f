"""The tunnel server maps a peer gateway's trust domain to its cluster even when that
cluster's leased ClusterRecord is gone (its agent cut from the store past the lease,
BAD_INPUTS 27): the deployment config's cluster -> trust domain mapping fills in."""

from __future__ import annotations

from gateway.tunnel import cluster_of_trust_domain

from .helpers import catalog, cluster_record, td

CONFIG = {"a": td("a"), "b": td("b"), "c": td("c")}


def test_catalog_record_maps_the_peer() -> None:
    cat = catalog("b", [cluster_record("a"), cluster_record("b")])
    assert cluster_of_trust_domain(cat, td("a")) == "a"
    assert cluster_of_trust_domain(cat, td("a"), CONFIG) == "a"


def test_expired_record_falls_back_to_the_config() -> None:
    # a's agent lost its lease: only b's own record is left in b's catalog.
    cat = catalog("b", [cluster_record("b")])
    assert cluster_of_trust_domain(cat, td("a")) is None  # the old behaviour: refused
    assert cluster_of_trust_domain(cat, td("a"), CONFIG) == "a"
    assert cluster_of_trust_domain(None, td("a"), CONFIG) == "a"


def test_unknown_or_shared_trust_domain_is_still_refused() -> None:
    cat = catalog("b", [cluster_record("b")])
    assert cluster_of_trust_domain(cat, "evil.mesh", CONFIG) is None
    shared = {"a": "shared.mesh", "c": "shared.mesh"}
    assert cluster_of_trust_domain(cat, "shared.mesh", shared) is None


def test_catalog_record_overrides_the_config() -> None:
    # The record is the live truth: a cluster whose trust domain moved is mapped by it.
    moved = cluster_record("a")
    cat = catalog("b", [moved])
    stale = {"a": "old-a.mesh", "b": td("b")}
    assert cluster_of_trust_domain(cat, "old-a.mesh", stale) is None
    assert cluster_of_trust_domain(cat, moved.trust_domain, stale) == "a"
