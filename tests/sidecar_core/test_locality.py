"""Tier assignment from the caller's locality and a failover order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.model import Locality
from sidecar.locality import DEFAULT_ORDER, Tier, TierRule, assign_tiers

from .support import CALLER, Ep, ep, loc

# One endpoint per interesting place relative to CALLER (aws/us-east-1/us-east-1a@c1).
SAME_ZONE = ep("same-zone")
OTHER_ZONE = ep("other-zone", zone="us-east-1b")
OTHER_CLUSTER_SAME_ZONE = ep("c2-same-zone", cluster="c2")
OTHER_CLUSTER_SAME_REGION = ep("c2-same-region", zone="us-east-1c", cluster="c2")
SAME_CLUSTER_OTHER_REGION = ep("c1-west", region="us-west-2", zone="us-west-2a")
PREFERRED_EU = ep("eu", cloud="aws", region="eu-west-1", zone="eu-west-1a", cluster="eu")
PREFERRED_GCP = ep("gcp", cloud="gcp", region="us-east1", zone="us-east1-b", cluster="g1")
SAME_CLOUD = ep("ap", region="ap-south-1", zone="ap-south-1a", cluster="ap")
OTHER_CLOUD = ep("azure", cloud="azure", region="eastus", zone="eastus-1", cluster="az")
# Same region *name* on another cloud is not the same region.
OTHER_CLOUD_SAME_REGION_NAME = ep("fake-region", cloud="onprem", cluster="dc")

ALL = [
    OTHER_CLOUD,
    SAME_CLOUD,
    PREFERRED_GCP,
    PREFERRED_EU,
    SAME_CLUSTER_OTHER_REGION,
    OTHER_CLUSTER_SAME_REGION,
    OTHER_CLUSTER_SAME_ZONE,
    OTHER_ZONE,
    SAME_ZONE,
    OTHER_CLOUD_SAME_REGION_NAME,
]


def named(tiers: list[Tier[Ep]]) -> list[tuple[str, tuple[str, ...]]]:
    return [(t.name, tuple(e.name for e in t.endpoints)) for t in tiers]


def test_default_order_ranks_zone_region_cluster_preference_cloud_rest() -> None:
    tiers = assign_tiers(CALLER, ALL, DEFAULT_ORDER, cluster_preference=("g1", "eu"))
    assert named(tiers) == [
        ("zone", ("same-zone",)),
        # Another cluster in our zone is only "same region": zone means same cluster too.
        ("region", ("c2-same-region", "c2-same-zone", "other-zone")),
        ("cluster", ("c1-west",)),
        ("preferred:g1", ("gcp",)),
        ("preferred:eu", ("eu",)),
        ("cloud", ("ap",)),
        ("any", ("azure", "fake-region")),
    ]


def test_without_preference_list_other_clusters_rank_by_cloud() -> None:
    tiers = assign_tiers(CALLER, ALL)
    assert named(tiers)[3:] == [
        ("cloud", ("ap", "eu")),
        ("any", ("azure", "gcp", "fake-region")),
    ]


def test_order_without_any_leaves_far_endpoints_unroutable() -> None:
    tiers = assign_tiers(CALLER, ALL, ("zone", "region"))
    routed = {e.name for t in tiers for e in t.endpoints}
    assert routed == {"same-zone", "other-zone", "c2-same-zone", "c2-same-region"}


def test_custom_order_can_prefer_cluster_over_region() -> None:
    tiers = assign_tiers(CALLER, ALL, ("cluster", "region", "any"))
    assert named(tiers)[0] == ("cluster", ("c1-west", "other-zone", "same-zone"))
    assert named(tiers)[1] == ("region", ("c2-same-region", "c2-same-zone"))


def test_empty_tiers_are_dropped() -> None:
    tiers = assign_tiers(CALLER, [OTHER_CLOUD, SAME_ZONE])
    assert named(tiers) == [("zone", ("same-zone",)), ("any", ("azure",))]
    assert assign_tiers(CALLER, []) == []


@pytest.mark.parametrize(
    ("order", "preference", "message"),
    [
        (("zone", "galaxy"), (), "unknown failover rule"),
        (("zone", "zone"), (), "repeats a rule"),
        (("zone", "preferred"), ("a", "a"), "repeats a cluster"),
        (("zone", "any"), ("a",), "no 'preferred' rule"),
    ],
)
def test_bad_orders_are_rejected(
    order: tuple[TierRule, ...], preference: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        assign_tiers(CALLER, ALL, order, preference)


names = st.sampled_from(["aws", "gcp"])
localities = st.builds(
    loc,
    cloud=names,
    region=st.sampled_from(["us-east-1", "eu-west-1"]),
    zone=st.sampled_from(["a", "b"]),
    cluster=st.sampled_from(["c1", "c2", "c3"]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(localities, max_size=30), localities)
def test_every_endpoint_lands_in_exactly_one_tier_in_input_order(
    places: list[Locality], caller: Locality
) -> None:
    endpoints = [Ep(f"e{i}", where) for i, where in enumerate(places)]
    tiers = assign_tiers(caller, endpoints, cluster_preference=("c3", "c2"))
    flat = [e for t in tiers for e in t.endpoints]
    assert sorted(flat, key=lambda e: e.name) == sorted(endpoints, key=lambda e: e.name)
    assert all(t.endpoints for t in tiers)
    for tier in tiers:
        positions = [endpoints.index(e) for e in tier.endpoints]
        assert positions == sorted(positions)
    assert tiers == assign_tiers(caller, endpoints, cluster_preference=("c3", "c2"))
