"""Locality-aware load balancing: Envoy-style tier spillover, panic, weighted P2C.

Three pure layers, each usable alone:

1. :func:`plan_load` / :func:`tier_shares` turn per-tier health into the share
   of traffic each tier receives (Envoy's "priority load"), plus which tiers
   are in panic.
2. :func:`pick_tier` draws a tier from those shares; :func:`p2c_least_request`
   draws an endpoint inside a tier (power of two choices over weights, fewer
   active requests per unit of weight wins).
3. :class:`Balancer` keeps the endpoint set, tiers, health flags and active
   request counts, and ties the two together in :meth:`Balancer.pick`.
   :func:`connect_attempts` is the "connect failed, try another endpoint"
   plan for new connections.

Health is *pushed* into the balancer as one boolean per endpoint (the effective
health from ``sidecar.health.effective_healthy``: catalog AND active checks AND
not ejected); the balancer never reads a clock. Shares are percentages in
``[0, 100]`` as floats: Envoy rounds to whole percents, we do not, so Envoy's
tables hold here to within one percentage point (see docs/load-balancing.md).

No I/O, no clock; every random choice takes a ``random.Random``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Final, Generic

from federation.model import Locality
from sidecar.locality import DEFAULT_ORDER, E, Tier, TierRule, assign_tiers, validate_order

DEFAULT_OVERPROVISIONING_FACTOR: Final = 1.4
"""Envoy's default: a tier counts as fully healthy down to ~71.4 % healthy."""
DEFAULT_PANIC_THRESHOLD: Final = 50.0
"""Envoy's default ``healthy_panic_threshold``, in percent."""


@dataclass(frozen=True, slots=True)
class TierHealth:
    """How much of one tier can serve. Host counts or weights: the caller's choice."""

    healthy: float
    """Healthy capacity: host count (Envoy's default) or summed weight."""
    total: float
    """All capacity, healthy or not, in the same unit. Zero means the tier is absent."""

    def __post_init__(self) -> None:
        if not (0 <= self.healthy <= self.total) or not math.isfinite(self.total):
            raise ValueError(f"need 0 <= healthy <= total, got {self.healthy}/{self.total}")

    @property
    def percent(self) -> float:
        """Healthy share of the tier in percent; 0 for an absent tier."""
        return 100.0 * self.healthy / self.total if self.total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Where traffic goes across tiers, for one health snapshot."""

    shares: tuple[float, ...]
    """Percent of traffic per tier; sums to 100 (float tolerance), or to 0 when nothing is
    routable."""
    panic: tuple[bool, ...]
    """Per tier: pick among all its endpoints, ignoring health."""
    normalized_total_health: float
    """``min(100, sum of tier health scores)``; panic is only possible below 100."""


def health_score(health: TierHealth, overprovisioning_factor: float) -> float:
    """A tier's health score: ``min(100, healthy% x overprovisioning_factor)``."""
    return min(100.0, health.percent * overprovisioning_factor)


def _validate_factor_and_threshold(overprovisioning_factor: float, panic_threshold: float) -> None:
    if not (overprovisioning_factor > 0 and math.isfinite(overprovisioning_factor)):
        raise ValueError(f"overprovisioning factor must be > 0, got {overprovisioning_factor}")
    if not (0.0 <= panic_threshold <= 100.0):
        raise ValueError(f"panic threshold must be in [0, 100], got {panic_threshold}")


_SHARE_EPSILON: Final = 1e-9
"""Percent: shares closer than this to the remainder are the remainder."""


def tier_shares(
    tiers_health: Sequence[TierHealth],
    overprovisioning_factor: float = DEFAULT_OVERPROVISIONING_FACTOR,
) -> list[float]:
    """Envoy's priority load, in percent per tier, nearest tier first.

    ``score_i = min(100, healthy%_i x factor)``; ``N = min(100, sum(score))``;
    tier ``i`` gets ``min(remaining, score_i x 100 / N)`` and the rest spills on.
    When nothing is healthy anywhere (``N == 0``), all traffic goes to the first
    tier that has endpoints (which :func:`plan_load` then puts in panic).
    Invariant: the shares sum to 100 whenever any tier has ``total > 0``, else 0.
    """
    _validate_factor_and_threshold(overprovisioning_factor, 0.0)
    scores = [health_score(h, overprovisioning_factor) for h in tiers_health]
    normalized = min(100.0, sum(scores))
    if normalized <= 0.0:
        shares = [0.0] * len(tiers_health)
        for index, health in enumerate(tiers_health):
            if health.total > 0:
                shares[index] = 100.0
                break
        return shares
    shares = []
    remaining = 100.0
    for score in scores:
        share = score * 100.0 / normalized
        # A share within rounding of what is left takes all of it: otherwise a float
        # residue (1e-15 %) spills to a farther tier that should get nothing.
        if share >= remaining - _SHARE_EPSILON:
            share = remaining
        shares.append(share)
        remaining -= share
    return shares


def plan_load(
    tiers_health: Sequence[TierHealth],
    overprovisioning_factor: float = DEFAULT_OVERPROVISIONING_FACTOR,
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
) -> LoadPlan:
    """:func:`tier_shares` plus Envoy's panic rule.

    A tier is in panic iff the normalized total health is below 100 (the tiers
    together cannot absorb the load) AND its own healthy percentage, *without*
    overprovisioning, is below ``panic_threshold``. A tier in panic spreads its
    share over all of its endpoints regardless of health. A threshold of 0
    disables panic; then, with nothing healthy anywhere, every share is 0 and
    the caller must fail the request ("no healthy upstream") instead of sending
    it to the first tier.
    """
    _validate_factor_and_threshold(overprovisioning_factor, panic_threshold)
    shares = tier_shares(tiers_health, overprovisioning_factor)
    normalized = min(100.0, sum(health_score(h, overprovisioning_factor) for h in tiers_health))
    if normalized <= 0.0 and panic_threshold <= 0.0:
        shares = [0.0] * len(tiers_health)
    panic = tuple(
        normalized < 100.0 and h.total > 0 and h.percent < panic_threshold for h in tiers_health
    )
    return LoadPlan(shares=tuple(shares), panic=panic, normalized_total_health=normalized)


def pick_tier(shares: Sequence[float], rng: random.Random) -> int:
    """Draw a tier index with probability proportional to its share.

    A tier with share 0 is never drawn. Raises ``ValueError`` when no share is
    positive (nothing routable: the caller should have checked).
    """
    total = math.fsum(s for s in shares if s > 0)
    if total <= 0.0:
        raise ValueError("no tier has a positive share")
    point = rng.random() * total
    acc = 0.0
    last_positive = -1
    for index, share in enumerate(shares):
        if share <= 0.0:
            continue
        last_positive = index
        acc += share
        if point < acc:
            return index
    # Float rounding can leave ``point`` a hair above the running sum.
    return last_positive


def p2c_least_request(weights: Sequence[int], active: Sequence[int], rng: random.Random) -> int:
    """Power of two choices over weights; returns an index into ``weights``.

    Draw two *distinct* candidates, each with probability proportional to
    weight, and keep the one with fewer active requests per unit of weight
    (``active / weight``, compared exactly by cross-multiplying). A tie keeps
    the first draw, so an idle tier (all counts equal) is picked exactly in
    proportion to weight, and a loaded tier converges to load proportional to
    weight. One candidate is returned as is.
    """
    count = len(weights)
    if count == 0 or count != len(active):
        raise ValueError("need one active count per candidate and at least one candidate")
    if count == 1:
        return 0
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    first = bisect.bisect_right(cumulative, rng.random() * total)
    first = min(first, count - 1)
    # Second draw from the others: sample in [0, total - w_first) and step over the first.
    below_first = cumulative[first] - weights[first]
    point = rng.random() * (total - weights[first])
    if point >= below_first:
        point += weights[first]
    second = min(bisect.bisect_right(cumulative, point), count - 1)
    if second == first:  # only reachable through float rounding at a boundary
        second = (first + 1) % count
    if active[second] * weights[first] < active[first] * weights[second]:
        return second
    return first


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """How a :class:`Balancer` forms tiers and spreads load."""

    order: tuple[TierRule, ...] = DEFAULT_ORDER
    """Failover order; see ``sidecar.locality``."""
    cluster_preference: tuple[str, ...] = ()
    """Clusters for the ``preferred`` rule, most preferred first."""
    overprovisioning_factor: float = DEFAULT_OVERPROVISIONING_FACTOR
    """Multiplier on a tier's healthy percentage before it starts spilling."""
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD
    """Percent healthy below which a tier ignores health (only when all tiers together are
    short); 0 disables panic."""
    weighted_health: bool = False
    """Measure tier health by summed weight instead of host count (Envoy's default is counts;
    weights suit gateway endpoints whose weight is the remote healthy endpoint count)."""

    def __post_init__(self) -> None:
        validate_order(self.order, self.cluster_preference)
        _validate_factor_and_threshold(self.overprovisioning_factor, self.panic_threshold)


@dataclass(frozen=True, slots=True)
class Pick(Generic[E]):
    """The balancer's answer: where to send one connection or request."""

    endpoint: E
    """The chosen endpoint."""
    tier_index: int
    """Index into :attr:`Balancer.tiers` (0 is nearest)."""
    tier_name: str
    """The tier's name, for the ``locality_tier`` label."""
    panic: bool
    """The tier was in panic: the endpoint may be unhealthy or ejected."""


@dataclass(frozen=True, slots=True)
class TierStatistics:
    """One tier as the balancer sees it now."""

    name: str
    """Tier name."""
    endpoints: int
    """Endpoints in the tier."""
    healthy: int
    """Healthy endpoints in the tier."""
    share: float
    """Percent of new traffic the tier receives."""
    panic: bool
    """Whether the tier is in panic."""


@dataclass(frozen=True, slots=True)
class BalancerStatistics:
    """A snapshot for metrics and ``__repr__``."""

    endpoints: int
    """Routable endpoints (in some tier)."""
    healthy: int
    """Routable endpoints currently healthy."""
    active_requests: int
    """Requests or connections in flight, routable endpoints or not."""
    tiers: tuple[TierStatistics, ...]
    """Per tier, nearest first."""


class Balancer(Generic[E]):
    """Endpoints, their health and load, and the pick decision for one upstream service.

    Driving it from an adapter:

    * on every catalog snapshot: :meth:`update` (a full reset; survivors keep
      health and counts);
    * whenever an endpoint's effective health changes: :meth:`set_healthy`;
    * around every connection/request: :meth:`on_start` and :meth:`on_finish`;
    * to route: :meth:`pick`, or :func:`connect_attempts` for new connections.

    Endpoint identity is equality of ``E``. Not thread-safe; trio needs no locks
    because no method awaits.
    """

    def __init__(self, caller: Locality, config: BalancerConfig | None = None) -> None:
        self._caller = caller
        self._config = config if config is not None else BalancerConfig()
        self._tiers: tuple[Tier[E], ...] = ()
        self._tier_of: dict[E, int] = {}
        self._healthy: dict[E, bool] = {}
        self._active: dict[E, int] = {}
        self._plan: LoadPlan | None = None  # cached for the no-exclusion case

    @property
    def caller(self) -> Locality:
        """The locality tiers are computed from."""
        return self._caller

    @property
    def config(self) -> BalancerConfig:
        """The balancing configuration."""
        return self._config

    @property
    def tiers(self) -> tuple[Tier[E], ...]:
        """Current tiers, nearest first; never contains an empty tier."""
        return self._tiers

    def update(self, endpoints: Iterable[E], healthy: Mapping[E, bool] | None = None) -> None:
        """Replace the endpoint set (a full reset, so missed removals are repaired).

        Health comes from ``healthy`` when given for an endpoint, else is kept
        for a surviving endpoint, else starts healthy (it is in the catalog).
        Active counts of endpoints in flight are kept even if they leave, so a
        late :meth:`on_finish` stays balanced.
        """
        endpoints = list(dict.fromkeys(endpoints))
        for endpoint in endpoints:
            if endpoint.weight < 1:
                raise ValueError(f"endpoint weight must be >= 1, got {endpoint.weight}")
        given = healthy if healthy is not None else {}
        self._tiers = tuple(
            assign_tiers(
                self._caller, endpoints, self._config.order, self._config.cluster_preference
            )
        )
        self._tier_of = {ep: i for i, tier in enumerate(self._tiers) for ep in tier.endpoints}
        self._healthy = {ep: given.get(ep, self._healthy.get(ep, True)) for ep in self._tier_of}
        self._plan = None

    def set_healthy(self, endpoint: E, healthy: bool) -> bool:
        """Record an endpoint's effective health; returns whether anything changed.

        Unknown endpoints are ignored (a health event can race a catalog removal).
        """
        if endpoint not in self._healthy or self._healthy[endpoint] == healthy:
            return False
        self._healthy[endpoint] = healthy
        self._plan = None
        return True

    def is_healthy(self, endpoint: E) -> bool:
        """The effective health last recorded for a routable endpoint."""
        return self._healthy[endpoint]

    def on_start(self, endpoint: E) -> None:
        """A connection or request to ``endpoint`` started."""
        self._active[endpoint] = self._active.get(endpoint, 0) + 1

    def on_finish(self, endpoint: E) -> None:
        """A connection or request to ``endpoint`` ended (success or not).

        Raises ``ValueError`` when nothing was started: a bug in the caller.
        """
        count = self._active.get(endpoint, 0)
        if count <= 0:
            raise ValueError(f"on_finish without on_start for {endpoint!r}")
        if count == 1:
            del self._active[endpoint]
        else:
            self._active[endpoint] = count - 1

    def active(self, endpoint: E) -> int:
        """Connections or requests in flight to ``endpoint``."""
        return self._active.get(endpoint, 0)

    def _measure(self, endpoint: E) -> int:
        return endpoint.weight if self._config.weighted_health else 1

    def plan(self, exclude: Set[E] = frozenset()) -> LoadPlan:
        """The load plan, treating ``exclude``\\ d endpoints as absent.

        An excluded endpoint counts neither as healthy nor in the total, so a
        tier whose endpoints are all excluded disappears and its share spills
        to the next tier, while a partly excluded tier is judged on the rest.
        """
        if not exclude and self._plan is not None:
            return self._plan
        health = []
        for tier in self._tiers:
            healthy = total = 0
            for endpoint in tier.endpoints:
                if endpoint in exclude:
                    continue
                total += self._measure(endpoint)
                if self._healthy[endpoint]:
                    healthy += self._measure(endpoint)
            health.append(TierHealth(healthy=healthy, total=total))
        plan = plan_load(health, self._config.overprovisioning_factor, self._config.panic_threshold)
        if not exclude:
            self._plan = plan
        return plan

    def pick(self, rng: random.Random, exclude: Set[E] = frozenset()) -> Pick[E] | None:
        """Choose an endpoint, never one in ``exclude``; ``None`` if nothing is routable.

        Outside panic only healthy endpoints are candidates; in a panicking
        tier every non-excluded endpoint is. ``None`` means the caller should
        fail the request as "no healthy upstream".
        """
        plan = self.plan(exclude)
        if not any(share > 0 for share in plan.shares):
            return None
        index = pick_tier(plan.shares, rng)
        panic = plan.panic[index]
        tier = self._tiers[index]
        candidates = [
            ep for ep in tier.endpoints if ep not in exclude and (panic or self._healthy[ep])
        ]
        if not candidates:  # unreachable: a positive share implies a candidate
            return None
        chosen = p2c_least_request(
            [ep.weight for ep in candidates], [self.active(ep) for ep in candidates], rng
        )
        return Pick(endpoint=candidates[chosen], tier_index=index, tier_name=tier.name, panic=panic)

    def statistics(self) -> BalancerStatistics:
        """Counts per tier and overall, for metrics."""
        plan = self.plan()
        tiers = tuple(
            TierStatistics(
                name=tier.name,
                endpoints=len(tier.endpoints),
                healthy=sum(1 for ep in tier.endpoints if self._healthy[ep]),
                share=plan.shares[i],
                panic=plan.panic[i],
            )
            for i, tier in enumerate(self._tiers)
        )
        return BalancerStatistics(
            endpoints=len(self._tier_of),
            healthy=sum(t.healthy for t in tiers),
            active_requests=sum(self._active.values()),
            tiers=tiers,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        tiers = ", ".join(
            f"{t.name}:{t.healthy}/{t.endpoints}={t.share:.1f}%{'!panic' if t.panic else ''}"
            for t in stats.tiers
        )
        return f"<Balancer caller={self._caller} active={stats.active_requests} tiers=[{tiers}]>"


def connect_attempts(balancer: Balancer[E], rng: random.Random, budget: int) -> Iterator[Pick[E]]:
    """Endpoints to try, in order, for one new connection: at most ``budget`` picks.

    Each pick excludes every endpoint already tried, so a retry lands on
    another endpoint of the same tier while the tier still has one and spills
    to the next tier once it does not. The generator is lazy: health changes
    made between attempts (an ejection after a failed connect) affect the next
    pick. It stops early when nothing routable is left.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    tried: set[E] = set()
    for _ in range(budget):
        pick = balancer.pick(rng, exclude=frozenset(tried))
        if pick is None:
            return
        tried.add(pick.endpoint)
        yield pick
