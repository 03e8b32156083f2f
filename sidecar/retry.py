"""Retries: which outcomes may be retried, how long to wait, and the budget that bounds them.

Three independent pieces the L7 adapter combines per failed attempt::

    decision = policy.should_retry(attempt, outcome, idempotent)
    if decision.retry and budget.try_acquire(now) is not BudgetDecision.EXHAUSTED:
        await trio.sleep(policy.backoff(attempt, rng))
        ... send the retry (to a new pick), then budget.release()

The budget (Envoy's ``retry_budget`` with linkerd's floor): a retry may start
while retries in flight, counting it, stay within ``budget_percent`` of the
original requests in flight; beyond that, a token bucket refilled at
``min_retries_per_second`` (burst of one second's worth) still admits retries,
so a service with little traffic can retry at all. Retries never count as
original requests, so retries cannot inflate their own allowance.

No I/O, no clock; ``now`` and ``random.Random`` come from the caller.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """Upper bound of the wait before retry number ``attempt + 1``: ``min(cap, base x 2**attempt)``.

    ``attempt`` counts from 0 (the wait before the first retry is at most ``base``).
    """
    if attempt < 0:
        raise ValueError(f"attempt counts from 0, got {attempt}")
    if not (0 <= base <= cap and math.isfinite(cap)):
        raise ValueError(f"need 0 <= base <= cap < inf, got base={base} cap={cap}")
    # Cap the exponent so a large attempt cannot overflow before min() applies.
    return min(cap, base * 2.0 ** min(attempt, 64))


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: ``U(0, backoff_ceiling(attempt, base, cap))``.

    Full jitter (the whole interval is random) spreads synchronised clients
    best, at the cost of sometimes retrying almost at once.
    """
    return rng.uniform(0.0, backoff_ceiling(attempt, base, cap))


class Outcome(enum.Enum):
    """How one attempt ended, as far as retrying is concerned."""

    SUCCESS = "success"
    """A response that is not an error worth retrying (2xx-4xx)."""
    CONNECT_FAILURE = "connect_failure"
    """No connection: the request never left; always safe to retry."""
    REFUSED_STREAM = "refused_stream"
    """HTTP/2 REFUSED_STREAM or a stream above GOAWAY's last id: not processed; safe."""
    RESET = "reset"
    """The connection or stream broke after the request was sent."""
    TIMEOUT = "timeout"
    """The per-try timeout expired."""
    GATEWAY_ERROR = "gateway_error"
    """502, 503 or 504."""
    SERVER_ERROR = "server_error"
    """Any other 5xx."""

    @classmethod
    def from_status(cls, status: int) -> Outcome:
        """Classify an HTTP status code."""
        if status in (502, 503, 504):
            return cls.GATEWAY_ERROR
        if 500 <= status <= 599:
            return cls.SERVER_ERROR
        return cls.SUCCESS


SAFE_OUTCOMES = frozenset({Outcome.CONNECT_FAILURE, Outcome.REFUSED_STREAM})
"""Outcomes where the upstream never processed the request: retriable even if not idempotent."""

DEFAULT_RETRY_ON = frozenset(
    {
        Outcome.CONNECT_FAILURE,
        Outcome.REFUSED_STREAM,
        Outcome.RESET,
        Outcome.TIMEOUT,
        Outcome.GATEWAY_ERROR,
    }
)
"""Retriable by default; plain 500s usually mean a bug that a retry will repeat."""


class RetryReason(enum.Enum):
    """Why :meth:`RetryPolicy.should_retry` answered as it did."""

    RETRY = "retry"
    """Retry."""
    NOT_RETRIABLE = "not_retriable"
    """The outcome is not in ``retry_on`` (successes never are)."""
    NOT_IDEMPOTENT = "not_idempotent"
    """The request may have been processed and repeating it is not safe."""
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    """``max_retries`` retries were already made."""


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The answer to "retry this attempt?"."""

    retry: bool
    """Whether to retry (subject to the budget)."""
    reason: RetryReason
    """Why, for logs and the ``reason`` metric label."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Per-route retry rules."""

    max_retries: int = 2
    """Retries after the first attempt (so at most ``max_retries + 1`` attempts)."""
    retry_on: frozenset[Outcome] = DEFAULT_RETRY_ON
    """Outcomes that may be retried."""
    base_backoff: float = 0.025
    """Seconds: ceiling of the first backoff (Envoy's default)."""
    max_backoff: float = 0.25
    """Seconds: ceiling of any backoff (Envoy's default, 10 x base)."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if Outcome.SUCCESS in self.retry_on:
            raise ValueError("SUCCESS cannot be retried")
        backoff_ceiling(0, self.base_backoff, self.max_backoff)  # validates base and cap

    def should_retry(self, attempt: int, outcome: Outcome, idempotent: bool) -> RetryDecision:
        """Whether the ``attempt``-th attempt (1-based: 1 is the original) may be retried.

        Order of checks: retriable outcome, then idempotency (only
        :data:`SAFE_OUTCOMES` skip it), then the attempt count.
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        if outcome not in self.retry_on:
            return RetryDecision(False, RetryReason.NOT_RETRIABLE)
        if not idempotent and outcome not in SAFE_OUTCOMES:
            return RetryDecision(False, RetryReason.NOT_IDEMPOTENT)
        if attempt > self.max_retries:
            return RetryDecision(False, RetryReason.ATTEMPTS_EXHAUSTED)
        return RetryDecision(True, RetryReason.RETRY)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The wait before retrying the ``attempt``-th attempt (1-based), full jitter."""
        return backoff(attempt - 1, self.base_backoff, self.max_backoff, rng)


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """Bounds on retry volume for one upstream service."""

    budget_percent: float = 20.0
    """Retries in flight may be up to this percent of original requests in flight."""
    min_retries_per_second: float = 10.0
    """Floor: retries admitted at this rate even when the percentage allows none
    (burst: one second's worth)."""

    def __post_init__(self) -> None:
        if not (self.budget_percent >= 0.0 and math.isfinite(self.budget_percent)):
            raise ValueError("budget_percent must be >= 0")
        if not (self.min_retries_per_second >= 0.0 and math.isfinite(self.min_retries_per_second)):
            raise ValueError("min_retries_per_second must be >= 0")


class BudgetDecision(enum.Enum):
    """Answer of :meth:`RetryBudget.try_acquire`."""

    RATIO = "ratio"
    """Admitted within the percentage of requests in flight."""
    FLOOR = "floor"
    """Admitted by the per-second floor (one token spent)."""
    EXHAUSTED = "exhausted"
    """Denied: fail with the last attempt's outcome."""


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot for metrics."""

    requests_in_flight: int
    """Original requests in flight."""
    retries_in_flight: int
    """Admitted retries not yet released."""
    floor_tokens: float
    """Tokens left in the floor bucket."""
    exhausted: int
    """Retries denied so far."""


class RetryBudget:
    """Admission control for retries: see the module docstring for the rule.

    Calls pair up: ``on_request_start``/``on_request_end`` around every
    original request, ``try_acquire`` (when it admits) /``release`` around
    every retry attempt. ``now`` must not go backwards; if it does, no tokens
    are added. The floor bucket starts full.
    """

    def __init__(self, config: RetryBudgetConfig | None = None) -> None:
        self.config = config if config is not None else RetryBudgetConfig()
        self.requests_in_flight = 0
        self.retries_in_flight = 0
        self.exhausted = 0
        self._tokens: float | None = None
        self._refilled_at: float | None = None

    def on_request_start(self) -> None:
        """An original request started."""
        self.requests_in_flight += 1

    def on_request_end(self) -> None:
        """An original request ended (after its last retry, if any)."""
        if self.requests_in_flight <= 0:
            raise ValueError("on_request_end without on_request_start")
        self.requests_in_flight -= 1

    def ratio_allowance(self) -> float:
        """Retries the percentage alone allows in flight now."""
        return self.config.budget_percent / 100.0 * self.requests_in_flight

    def _refill(self, now: float) -> float:
        capacity = self.config.min_retries_per_second
        if self._tokens is None or self._refilled_at is None:
            self._tokens, self._refilled_at = capacity, now
        elif now > self._refilled_at:
            added = (now - self._refilled_at) * self.config.min_retries_per_second
            self._tokens = min(capacity, self._tokens + added)
            self._refilled_at = now
        return self._tokens

    def try_acquire(self, now: float) -> BudgetDecision:
        """Admit one retry, or not. An admitted retry must be :meth:`release`\\ d."""
        tokens = self._refill(now)
        if self.retries_in_flight + 1 <= self.ratio_allowance():
            self.retries_in_flight += 1
            return BudgetDecision.RATIO
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self.retries_in_flight += 1
            return BudgetDecision.FLOOR
        self.exhausted += 1
        return BudgetDecision.EXHAUSTED

    def release(self) -> None:
        """An admitted retry attempt ended."""
        if self.retries_in_flight <= 0:
            raise ValueError("release without an admitted retry")
        self.retries_in_flight -= 1

    def __repr__(self) -> str:
        return (
            f"<RetryBudget requests={self.requests_in_flight} retries={self.retries_in_flight} "
            f"allowance={self.ratio_allowance():.2f} exhausted={self.exhausted}>"
        )

    def statistics(self, now: float) -> RetryBudgetStatistics:
        """Counts and tokens as of ``now``."""
        return RetryBudgetStatistics(
            requests_in_flight=self.requests_in_flight,
            retries_in_flight=self.retries_in_flight,
            floor_tokens=self._refill(now),
            exhausted=self.exhausted,
        )
