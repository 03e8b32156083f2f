"""Config routes compiled into a matcher: the most specific matching route wins.

Specificity (the Kubernetes Gateway API's HTTPRoute precedence, which operators
already know), compared in this order; the first difference decides:

=====  ==========================================  ==============================
rank   criterion                                   more specific
=====  ==========================================  ==============================
1      path kind                                   exact > prefix > none
2      path length (characters, after normalising) longer
3      method condition                            present > absent
4      header conditions                           more
5      position in the config                      earlier
=====  ==========================================  ==============================

So a route with header conditions beats an otherwise equal route without them
(``x-canary: 1`` -> v2 wins over the 95/5 split on the same prefix), but a longer
prefix beats any number of header conditions: give a header route the same path as
the route it should override. Unmatched requests get the service defaults (all
endpoints, the service's timeouts and retries).

Prefixes are segment-aware (Gateway API ``PathPrefix``; Envoy's ``path_separated_prefix``):
``/api`` matches ``/api``, ``/api/`` and ``/api/v1`` but not ``/apiary``; a trailing
``/`` in the config prefix is ignored and ``/`` matches everything. Config paths are
normalised with :func:`~sidecar.http.paths.normalize_path` at compile time, the request
path at request time, so both sides compare canonical forms.

Header conditions compare one field line at a time: a condition holds when any line
of that name satisfies it (exact value, value prefix, or mere presence). Values are
compared as bytes, case-sensitively; names are lower-case on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from federation.config.model import (
    Fault,
    HeaderMatch,
    Retries,
    RetryOn,
    Route,
    Service,
    Subset,
    TrafficPolicy,
)
from sidecar.http.headers import Header
from sidecar.http.paths import BadPath, normalize_path
from sidecar.http.splits import WeightedSplit
from sidecar.retry import Outcome, RetryBudgetConfig, RetryPolicy

_RETRY_ON: Mapping[RetryOn, frozenset[Outcome]] = {
    "connect-failure": frozenset({Outcome.CONNECT_FAILURE}),
    "refused-stream": frozenset({Outcome.REFUSED_STREAM}),
    # Envoy's "reset" covers disconnects, resets and per-try timeouts alike.
    "reset": frozenset({Outcome.RESET, Outcome.TIMEOUT}),
    # Envoy's "5xx" also covers every way of getting no response at all.
    "5xx": frozenset(
        {
            Outcome.SERVER_ERROR,
            Outcome.GATEWAY_ERROR,
            Outcome.RESET,
            Outcome.TIMEOUT,
            Outcome.CONNECT_FAILURE,
        }
    ),
    "gateway-error": frozenset({Outcome.GATEWAY_ERROR}),
}


def retry_policy(retries: Retries) -> RetryPolicy:
    """The :class:`~sidecar.retry.RetryPolicy` a ``traffic_policy.retries`` block means."""
    retry_on: frozenset[Outcome] = frozenset().union(*(_RETRY_ON[r] for r in retries.retry_on))
    return RetryPolicy(
        max_retries=retries.attempts,
        retry_on=retry_on,
        base_backoff=retries.backoff_base,
        max_backoff=retries.backoff_max,
    )


def retry_budget_config(retries: Retries) -> RetryBudgetConfig:
    """The retry budget for one upstream service."""
    return RetryBudgetConfig(
        budget_percent=retries.budget_percent,
        min_retries_per_second=float(retries.min_retries_per_second),
    )


class RouteCompileError(ValueError):
    """A route cannot be compiled (e.g. its path does not normalise)."""


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """One compiled :class:`~federation.config.model.HeaderMatch`."""

    name: bytes
    """Lower-case field name."""
    exact: bytes | None
    """Required value, or None."""
    prefix: bytes | None
    """Required value prefix, or None; neither means "present"."""

    @classmethod
    def compile(cls, match: HeaderMatch) -> HeaderCondition:
        """From the config form (values as UTF-8, as they would arrive on the wire)."""
        return cls(
            match.name.encode("ascii"),
            None if match.exact is None else match.exact.encode(),
            None if match.prefix is None else match.prefix.encode(),
        )

    def holds(self, headers: Sequence[Header]) -> bool:
        """Whether any field line named :attr:`name` satisfies the condition."""
        for name, value in headers:
            if name != self.name:
                continue
            if self.exact is not None and value != self.exact:
                continue
            if self.prefix is not None and not value.startswith(self.prefix):
                continue
            return True
        return False


@dataclass(frozen=True, slots=True)
class RouteAction:
    """What to do with a matched request: everything the adapter needs per request."""

    name: str | None
    """Route name for logs and metrics; None for the service default."""
    split: WeightedSplit | None
    """Weighted subsets; None means all endpoints of the service."""
    subsets: Mapping[str, Subset]
    """The service's subsets by name, to turn a split choice into an endpoint filter."""
    timeout: float
    """Whole-request limit including retries (route override or the service's)."""
    per_try_timeout: float | None
    """Limit on each attempt, or None."""
    retry: RetryPolicy
    """Retry rules."""
    fault: Fault | None
    """Fault injection for drills, or None."""


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route, ready to test against requests."""

    exact: str | None
    """Normalised exact path, or None."""
    prefix: str | None
    """Normalised prefix without trailing ``/`` (``""`` for the root), or None."""
    method: str | None
    """Required method, or None."""
    headers: tuple[HeaderCondition, ...]
    """Header conditions, all required."""
    order: int
    """Position in the config."""
    action: RouteAction
    """What a match means."""

    @property
    def specificity(self) -> tuple[int, int, int, int, int]:
        """Sort key, larger first: see the module docstring's table."""
        if self.exact is not None:
            kind, length = 2, len(self.exact)
        elif self.prefix is not None:
            kind, length = 1, len(self.prefix) + 1
        else:
            kind, length = 0, 0
        return (kind, length, self.method is not None, len(self.headers), -self.order)

    def matches(self, method: str, path: str, headers: Sequence[Header]) -> bool:
        """Whether a request (``path`` already normalised) satisfies every condition."""
        if self.exact is not None and path != self.exact:
            return False
        if self.prefix is not None and not (
            path == self.prefix or path.startswith(self.prefix + "/") or self.prefix == ""
        ):
            return False
        if self.method is not None and method != self.method:
            return False
        return all(h.holds(headers) for h in self.headers)


def _normalized_config_path(route: str, path: str) -> str:
    try:
        normalized = normalize_path(path)
    except BadPath as exc:
        raise RouteCompileError(f"route {route!r}: path {path!r}: {exc}") from None
    if normalized.query is not None:
        raise RouteCompileError(f"route {route!r}: path {path!r} has a query")
    return normalized.path


class RouteTable:
    """A service's routes in specificity order; :meth:`match` returns the first that holds."""

    def __init__(self, service: Service) -> None:
        policy: TrafficPolicy = service.traffic_policy
        self._subsets: Mapping[str, Subset] = {s.name: s for s in service.subsets}
        self._retry = retry_policy(policy.retries)
        self.default = RouteAction(
            name=None,
            split=None,
            subsets=self._subsets,
            timeout=policy.timeouts.request,
            per_try_timeout=policy.retries.per_try_timeout,
            retry=self._retry,
            fault=None,
        )
        compiled = [self._compile(i, r, policy) for i, r in enumerate(service.routes)]
        compiled.sort(key=lambda c: c.specificity, reverse=True)
        self.routes: tuple[CompiledRoute, ...] = tuple(compiled)
        """Compiled routes, most specific first."""

    def _compile(self, order: int, route: Route, policy: TrafficPolicy) -> CompiledRoute:
        m = route.match
        exact = None if m.exact is None else _normalized_config_path(route.name, m.exact)
        prefix = None
        if m.prefix is not None:
            prefix = _normalized_config_path(route.name, m.prefix).rstrip("/")
        for ws in route.split:
            if ws.subset not in self._subsets:
                raise RouteCompileError(f"route {route.name!r}: unknown subset {ws.subset!r}")
        action = RouteAction(
            name=route.name,
            split=WeightedSplit.of(route.split) if route.split else None,
            subsets=self._subsets,
            timeout=route.timeout if route.timeout is not None else policy.timeouts.request,
            per_try_timeout=policy.retries.per_try_timeout,
            retry=self._retry,
            fault=route.fault,
        )
        return CompiledRoute(
            exact=exact,
            prefix=prefix,
            method=m.method,
            headers=tuple(HeaderCondition.compile(h) for h in m.headers),
            order=order,
            action=action,
        )

    def match(self, method: str, path: str, headers: Sequence[Header]) -> RouteAction:
        """The action for a request; ``path`` must come from ``normalize_path``."""
        for route in self.routes:
            if route.matches(method, path, headers):
                return route.action
        return self.default

    def __repr__(self) -> str:
        names = ", ".join(str(r.action.name) for r in self.routes)
        return f"<RouteTable [{names}]>"


__all__ = [
    "CompiledRoute",
    "HeaderCondition",
    "RouteAction",
    "RouteCompileError",
    "RouteTable",
    "retry_budget_config",
    "retry_policy",
]
