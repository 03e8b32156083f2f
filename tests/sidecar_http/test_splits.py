"""Weighted splits: exact proportions, a binomial bound, zero weights, subset filters."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from federation.config.model import Subset, WeightedSubset
from sidecar.http.splits import WeightedSplit, in_subset, subset_endpoints

SIGMAS = 4.5  # false-failure odds ~7e-6 per check


def binomial_bound(n: int, p: float) -> float:
    """Allowed |count - n p| at SIGMAS standard deviations."""
    return SIGMAS * math.sqrt(n * p * (1 - p))


def test_ten_ninety_over_2000_requests_is_within_the_binomial_bound() -> None:
    split = WeightedSplit.of([WeightedSubset("canary", 10), WeightedSubset("stable", 90)])
    n, p = 2000, 0.1
    for seed in range(5):
        rng = random.Random(seed)
        canary = sum(split.pick(rng) == "canary" for _ in range(n))
        assert abs(canary - n * p) <= binomial_bound(n, p), (seed, canary)


def test_weights_need_not_sum_to_100() -> None:
    a = WeightedSplit.of([WeightedSubset("v1", 95), WeightedSubset("v2", 5)])
    b = WeightedSplit.of([WeightedSubset("v1", 1900), WeightedSubset("v2", 100)])
    assert a.probability("v2") == b.probability("v2") == 0.05
    n, p = 4000, 0.05
    rng = random.Random(3)
    count = sum(b.pick(rng) == "v2" for _ in range(n))
    assert abs(count - n * p) <= binomial_bound(n, p)


def test_exact_buckets_cover_every_draw() -> None:
    split = WeightedSplit.of(
        [WeightedSubset("a", 1), WeightedSubset("b", 0), WeightedSubset("c", 2)]
    )

    class Fixed(random.Random):
        def __init__(self, value: int) -> None:
            super().__init__(0)
            self.value = value

        def randrange(self, *args: object, **kwargs: object) -> int:
            return self.value

    assert [split.pick(Fixed(v)) for v in range(3)] == ["a", "c", "c"]


def test_all_zero_weights_have_no_destination() -> None:
    split = WeightedSplit.of([WeightedSubset("a", 0), WeightedSubset("b", 0)])
    assert split.pick(random.Random(1)) is None
    assert split.probability("a") == 0.0


@given(st.lists(st.integers(0, 10000), min_size=1, max_size=6), st.integers(0, 2**32))
def test_zero_weight_subsets_are_never_picked(weights: list[int], seed: int) -> None:
    split = WeightedSplit.of([WeightedSubset(f"s{i}", w) for i, w in enumerate(weights)])
    rng = random.Random(seed)
    for _ in range(20):
        choice = split.pick(rng)
        if sum(weights) == 0:
            assert choice is None
        else:
            assert choice is not None and weights[int(choice[1:])] > 0


def test_subset_filter_matches_all_labels() -> None:
    v2 = Subset("v2", {"version": "v2", "track": "canary"})
    assert in_subset({"version": "v2", "track": "canary", "zone": "a"}, v2)
    assert not in_subset({"version": "v2"}, v2)
    eps = [("e1", {"version": "v1"}), ("e2", {"version": "v2", "track": "canary"})]
    assert subset_endpoints(eps, lambda e: e[1], v2) == [eps[1]]
    assert subset_endpoints(eps, lambda e: e[1], Subset("none", {"version": "v9"})) == []
