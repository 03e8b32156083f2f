"""Locality tiers: which endpoints are "near" a caller, in failover order.

A tier is a group of endpoints that the balancer treats as one priority level
(Envoy's "priority"): traffic stays in tier 0 while it is healthy enough and
spills to tier 1, 2, ... as it is not (see ``sidecar.balancer``).

Tiers come from the caller's :class:`~federation.model.Locality` and a failover
order, a sequence of rule names. Each endpoint lands in the *first* rule it
matches; endpoints that match no rule are not routable at all (an order without
``"any"`` therefore means "never leave these localities"). Rules:

========== ==================================================================
rule       an endpoint matches when
========== ==================================================================
zone       same cluster, and same cloud, region and zone
region     same cloud and region (this cluster or another)
cluster    same cluster (a cluster that spans regions)
preferred  expands to one tier per entry of ``cluster_preference``, in that
           order: the endpoint is in that cluster
cloud      same cloud
any        always
========== ==================================================================

Empty tiers are dropped, so every returned tier has at least one endpoint and
tier indices are dense; each tier carries its name (``"zone"``,
``"preferred:eu-1"``...) for metrics and logs. Within a tier, endpoints keep
the order they were given in, so the result is a deterministic function of the
input sequence.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar, get_args

from federation.model import Locality

TierRule = Literal["zone", "region", "cluster", "preferred", "cloud", "any"]
"""One step of a failover order; see the module docstring for what each matches."""

TIER_RULES: Final[frozenset[str]] = frozenset(get_args(TierRule))

DEFAULT_ORDER: Final[tuple[TierRule, ...]] = (
    "zone",
    "region",
    "cluster",
    "preferred",
    "cloud",
    "any",
)
"""Same zone, same region, same cluster, preferred clusters, same cloud, anything."""


class Routable(Hashable, Protocol):
    """What the locality and balancing cores need from an endpoint.

    Any hashable record with these two read-only attributes works (a frozen
    dataclass is the natural fit); the cores use the endpoint itself as a key.
    """

    @property
    def locality(self) -> Locality:
        """Where the endpoint runs."""
        ...

    @property
    def weight(self) -> int:
        """Relative share of its tier's traffic; at least 1."""
        ...


E = TypeVar("E", bound=Routable)


@dataclass(frozen=True, slots=True)
class Tier(Generic[E]):
    """One priority level: endpoints equally near the caller."""

    name: str
    """The rule that formed the tier, e.g. ``"zone"`` or ``"preferred:eu-1"``."""
    endpoints: tuple[E, ...]
    """The tier's endpoints, never empty, in input order."""


def validate_order(order: Sequence[str], cluster_preference: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``order`` and ``cluster_preference`` make sense.

    Fail loudly rather than guess: an unknown rule, a repeated rule, a repeated
    preferred cluster, or a preference list that the order never consults
    (no ``"preferred"`` rule) are configuration mistakes.
    """
    unknown = [rule for rule in order if rule not in TIER_RULES]
    if unknown:
        raise ValueError(
            f"unknown failover rule(s) {unknown}; expected one of {sorted(TIER_RULES)}"
        )
    if len(set(order)) != len(order):
        raise ValueError(f"failover order repeats a rule: {list(order)}")
    if len(set(cluster_preference)) != len(cluster_preference):
        raise ValueError(f"cluster preference repeats a cluster: {list(cluster_preference)}")
    if cluster_preference and "preferred" not in order:
        raise ValueError("cluster_preference is set but the failover order has no 'preferred' rule")


def _in_cluster(cluster: str) -> Callable[[Locality], bool]:
    return lambda loc: loc.cluster == cluster


def _matchers(
    caller: Locality, order: Sequence[str], cluster_preference: Sequence[str]
) -> list[tuple[str, Callable[[Locality], bool]]]:
    """The named predicates, in order, with ``preferred`` expanded per cluster."""
    out: list[tuple[str, Callable[[Locality], bool]]] = []
    for rule in order:
        if rule == "zone":
            out.append(
                (
                    "zone",
                    lambda loc: (
                        loc.cluster == caller.cluster
                        and (loc.cloud, loc.region, loc.zone)
                        == (caller.cloud, caller.region, caller.zone)
                    ),
                )
            )
        elif rule == "region":
            # Region names are per cloud ("us-east-1" on two clouds are different places).
            out.append(
                ("region", lambda loc: (loc.cloud, loc.region) == (caller.cloud, caller.region))
            )
        elif rule == "cluster":
            out.append(("cluster", lambda loc: loc.cluster == caller.cluster))
        elif rule == "preferred":
            out.extend((f"preferred:{c}", _in_cluster(c)) for c in cluster_preference)
        elif rule == "cloud":
            out.append(("cloud", lambda loc: loc.cloud == caller.cloud))
        else:
            out.append(("any", lambda loc: True))
    return out


def assign_tiers(
    caller: Locality,
    endpoints: Iterable[E],
    order: Sequence[TierRule] = DEFAULT_ORDER,
    cluster_preference: Sequence[str] = (),
) -> list[Tier[E]]:
    """Group ``endpoints`` into failover tiers for ``caller``, nearest first.

    Invariants: every endpoint appears in at most one tier (the first rule it
    matches); no tier is empty; tier order follows ``order``; endpoint order
    within a tier follows the input. Endpoints that match no rule are left out.
    """
    validate_order(order, cluster_preference)
    matchers = _matchers(caller, order, cluster_preference)
    buckets: list[list[E]] = [[] for _ in matchers]
    for endpoint in endpoints:
        loc = endpoint.locality
        for index, (_, matches) in enumerate(matchers):
            if matches(loc):
                buckets[index].append(endpoint)
                break
    return [
        Tier(name=name, endpoints=tuple(bucket))
        for (name, _), bucket in zip(matchers, buckets, strict=True)
        if bucket
    ]
