"""Weighted traffic splits (canaries) and subset endpoint filters.

A split is a list of integer weights; they need not sum to 100. The choice is
exact: ``rng.randrange(total)`` lands in one cumulative bucket, so subset *i* gets
probability ``w_i / total`` whatever the total, with no float rounding. Weight-0
subsets are never chosen. A split whose weights are all 0 has no destination:
:meth:`WeightedSplit.pick` returns None and the adapter answers 503
(``no_route_destination``); failing closed beats silently using all endpoints.

A subset names workloads by labels; an endpoint belongs to it when its labels
contain every (key, value) of the subset. An empty subset (nothing matches, or all
its endpoints are unhealthy) is not a reason to route elsewhere: the request fails
like any request without a healthy upstream, so a canary at 5 % never silently
becomes 0 % or 100 %.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from federation.config.model import Subset, WeightedSubset

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class WeightedSplit:
    """Compiled split: subset names with cumulative weights."""

    subsets: tuple[str, ...]
    """Subset names, config order."""
    cumulative: tuple[int, ...]
    """Running totals of the weights; the last is the total."""

    def __post_init__(self) -> None:
        if len(self.subsets) != len(self.cumulative) or not self.subsets:
            raise ValueError("a split needs one cumulative weight per subset, at least one")
        if any(b < a for a, b in itertools.pairwise((0, *self.cumulative))):
            raise ValueError("weights must be >= 0")

    @classmethod
    def of(cls, items: Sequence[WeightedSubset]) -> WeightedSplit:
        """From the config form."""
        return cls(
            tuple(i.subset for i in items), tuple(itertools.accumulate(i.weight for i in items))
        )

    @property
    def total(self) -> int:
        """Sum of the weights."""
        return self.cumulative[-1]

    def probability(self, subset: str) -> float:
        """Share of requests going to ``subset`` (0 when the total is 0)."""
        if self.total == 0:
            return 0.0
        weight = 0
        for name, lo, hi in zip(self.subsets, (0, *self.cumulative), self.cumulative, strict=False):
            if name == subset:
                weight += hi - lo
        return weight / self.total

    def pick(self, rng: random.Random) -> str | None:
        """One subset name, with probability proportional to its weight; None if total 0."""
        if self.total == 0:
            return None
        return self.subsets[bisect.bisect_right(self.cumulative, rng.randrange(self.total))]


def in_subset(labels: Mapping[str, str], subset: Subset) -> bool:
    """Whether an endpoint with ``labels`` belongs to ``subset``."""
    return all(labels.get(k) == v for k, v in subset.labels.items())


def subset_endpoints(
    endpoints: Iterable[E], labels_of: Callable[[E], Mapping[str, str]], subset: Subset
) -> list[E]:
    """The endpoints of ``subset``, input order kept (feed them to a per-subset balancer)."""
    return [e for e in endpoints if in_subset(labels_of(e), subset)]


__all__ = ["WeightedSplit", "in_subset", "subset_endpoints"]
