"""Active health checking per endpoint, and how health sources combine.

The checker is a sans-IO state machine. The adapter asks when to probe
(:meth:`ActiveHealthCheck.first_check_at`, :meth:`~ActiveHealthCheck.next_check_at`),
runs the probe itself under ``config.timeout``, and feeds the result back with
:meth:`~ActiveHealthCheck.record`, which returns a :class:`HealthTransition`
when the verdict changes. The same machine serves gateway liveness probes.

Transitions (``F`` = failure or timeout, ``S`` = success; counters are
consecutive and reset by the opposite result)::

    UNKNOWN   --S-->                                   HEALTHY
    UNKNOWN   --F x unhealthy_threshold-->             UNHEALTHY
    HEALTHY   --F x unhealthy_threshold-->             UNHEALTHY
    UNHEALTHY --S x healthy_threshold-->               HEALTHY

A new endpoint starts ``UNKNOWN``, which counts as healthy: the catalog already
vouches for it (lease, probes), and holding traffic back until a first probe
would blackhole every service at sidecar start. The first success confirms it
at once, as Envoy does for a host's first check.

Effective health = catalog healthy AND active check not ``UNHEALTHY`` AND not
ejected by outlier detection (:func:`effective_healthy`).
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, replace


class CheckResult(enum.Enum):
    """Outcome of one active probe."""

    SUCCESS = "success"
    """The probe passed."""
    FAILURE = "failure"
    """The probe failed (refused, reset, bad response)."""
    TIMEOUT = "timeout"
    """No answer within ``HealthCheckConfig.timeout``; counts as a failure."""


class ActiveState(enum.Enum):
    """The active checker's verdict."""

    UNKNOWN = "unknown"
    """No verdict yet; treated as healthy."""
    HEALTHY = "healthy"
    """Passing."""
    UNHEALTHY = "unhealthy"
    """Failing: excluded from load balancing (outside panic)."""


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Probe schedule and thresholds."""

    interval: float = 5.0
    """Seconds between probes while not UNHEALTHY."""
    timeout: float = 1.0
    """Seconds a probe may take before it counts as TIMEOUT (enforced by the adapter)."""
    jitter: float = 0.1
    """Fraction of the interval added at random to each delay, so sidecars do not probe
    in lockstep."""
    unhealthy_interval: float | None = None
    """Seconds between probes while UNHEALTHY; ``None`` means ``interval``."""
    unhealthy_threshold: int = 3
    """Consecutive failures that mark an endpoint UNHEALTHY."""
    healthy_threshold: int = 2
    """Consecutive successes that bring an UNHEALTHY endpoint back."""

    def __post_init__(self) -> None:
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.unhealthy_interval is not None and not (
            self.unhealthy_interval > 0 and math.isfinite(self.unhealthy_interval)
        ):
            raise ValueError("unhealthy_interval must be positive")
        if not (0.0 <= self.jitter <= 1.0):
            raise ValueError(f"jitter must be a fraction in [0, 1], got {self.jitter}")
        if self.unhealthy_threshold < 1 or self.healthy_threshold < 1:
            raise ValueError("thresholds must be >= 1")


@dataclass(frozen=True, slots=True)
class ActiveHealth:
    """One endpoint's checker state: verdict plus the current streaks."""

    state: ActiveState = ActiveState.UNKNOWN
    """The verdict."""
    failures: int = 0
    """Consecutive failures (and timeouts) since the last success."""
    successes: int = 0
    """Consecutive successes since the last failure."""


@dataclass(frozen=True, slots=True)
class HealthTransition:
    """The verdict changed."""

    before: ActiveState
    """Verdict before the probe."""
    after: ActiveState
    """Verdict after the probe."""
    result: CheckResult
    """The probe result that tipped it."""


def step(
    health: ActiveHealth, result: CheckResult, config: HealthCheckConfig
) -> tuple[ActiveHealth, HealthTransition | None]:
    """Apply one probe result; the whole transition table lives here."""
    if result is CheckResult.SUCCESS:
        successes = health.successes + 1
        if health.state is ActiveState.UNHEALTHY and successes < config.healthy_threshold:
            return ActiveHealth(ActiveState.UNHEALTHY, failures=0, successes=successes), None
        after = ActiveState.HEALTHY
        new = ActiveHealth(after, failures=0, successes=successes)
    else:
        failures = health.failures + 1
        if health.state is ActiveState.UNHEALTHY or failures < config.unhealthy_threshold:
            return replace(health, failures=failures, successes=0), None
        after = ActiveState.UNHEALTHY
        new = ActiveHealth(after, failures=failures, successes=0)
    if after is health.state:
        return new, None
    return new, HealthTransition(before=health.state, after=after, result=result)


class ActiveHealthCheck:
    """The active checker for one endpoint: state plus schedule."""

    def __init__(self, config: HealthCheckConfig | None = None) -> None:
        self._config = config if config is not None else HealthCheckConfig()
        self._health = ActiveHealth()

    @property
    def config(self) -> HealthCheckConfig:
        """The checker's configuration."""
        return self._config

    @property
    def health(self) -> ActiveHealth:
        """The current state and streaks."""
        return self._health

    @property
    def state(self) -> ActiveState:
        """The current verdict."""
        return self._health.state

    def record(self, result: CheckResult) -> HealthTransition | None:
        """Feed one probe result; returns the transition if the verdict changed."""
        self._health, transition = step(self._health, result, self._config)
        return transition

    def first_check_at(self, now: float, rng: random.Random) -> float:
        """When to run the first probe: uniformly within one interval from ``now``.

        Spreading the first probes avoids a burst when a sidecar starts with
        many endpoints (Envoy's ``initial_jitter``).
        """
        return now + rng.uniform(0.0, self._config.interval)

    def next_check_at(self, now: float, rng: random.Random) -> float:
        """When to run the next probe, given that the last one finished at ``now``.

        ``now + interval + U(0, jitter x interval)``, with ``unhealthy_interval``
        while UNHEALTHY when configured.
        """
        interval = self._config.interval
        if self._health.state is ActiveState.UNHEALTHY and self._config.unhealthy_interval:
            interval = self._config.unhealthy_interval
        return now + interval + rng.uniform(0.0, self._config.jitter * interval)

    def __repr__(self) -> str:
        h = self._health
        return f"<ActiveHealthCheck {h.state.value} failures={h.failures} successes={h.successes}>"


def effective_healthy(catalog_healthy: bool, active: ActiveState, ejected: bool) -> bool:
    """Whether the balancer may send an endpoint traffic outside panic.

    All three sources must agree: the federation catalog lists it healthy,
    active checks have not marked it down (``UNKNOWN`` passes), and outlier
    detection has not ejected it.
    """
    return catalog_healthy and active is not ActiveState.UNHEALTHY and not ejected


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """The three health sources of one endpoint, kept together by the adapter."""

    catalog_healthy: bool = True
    """Health as published by the federation catalog (leases, remote gateway counts)."""
    active: ActiveState = ActiveState.UNKNOWN
    """Verdict of active health checks (UNKNOWN when none are configured)."""
    ejected: bool = False
    """Whether passive outlier detection has ejected it."""

    @property
    def effective(self) -> bool:
        """:func:`effective_healthy` of the three sources."""
        return effective_healthy(self.catalog_healthy, self.active, self.ejected)
