"""Retry policy, backoff with full jitter, and the retry budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.retry import (
    BudgetDecision,
    Outcome,
    RetryBudget,
    RetryBudgetConfig,
    RetryPolicy,
    RetryReason,
    backoff,
    backoff_ceiling,
)

# --- policy ------------------------------------------------------------------------------

POLICY = RetryPolicy(max_retries=2)

DECISIONS = [
    # attempt, outcome, idempotent -> reason
    (1, Outcome.SUCCESS, True, RetryReason.NOT_RETRIABLE),
    (1, Outcome.SERVER_ERROR, True, RetryReason.NOT_RETRIABLE),
    (1, Outcome.CONNECT_FAILURE, False, RetryReason.RETRY),  # never sent: always safe
    (1, Outcome.REFUSED_STREAM, False, RetryReason.RETRY),
    (1, Outcome.GATEWAY_ERROR, False, RetryReason.NOT_IDEMPOTENT),
    (1, Outcome.RESET, False, RetryReason.NOT_IDEMPOTENT),
    (1, Outcome.TIMEOUT, False, RetryReason.NOT_IDEMPOTENT),
    (1, Outcome.GATEWAY_ERROR, True, RetryReason.RETRY),
    (2, Outcome.TIMEOUT, True, RetryReason.RETRY),
    (3, Outcome.TIMEOUT, True, RetryReason.ATTEMPTS_EXHAUSTED),
    (3, Outcome.CONNECT_FAILURE, False, RetryReason.ATTEMPTS_EXHAUSTED),
]


@pytest.mark.parametrize(("attempt", "outcome", "idempotent", "reason"), DECISIONS)
def test_should_retry(
    attempt: int, outcome: Outcome, idempotent: bool, reason: RetryReason
) -> None:
    decision = POLICY.should_retry(attempt, outcome, idempotent)
    assert decision.reason is reason
    assert decision.retry is (reason is RetryReason.RETRY)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (404, Outcome.SUCCESS),
        (500, Outcome.SERVER_ERROR),
        (502, Outcome.GATEWAY_ERROR),
        (503, Outcome.GATEWAY_ERROR),
        (504, Outcome.GATEWAY_ERROR),
        (599, Outcome.SERVER_ERROR),
    ],
)
def test_status_classification(status: int, outcome: Outcome) -> None:
    assert Outcome.from_status(status) is outcome


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(retry_on=frozenset({Outcome.SUCCESS}))
    with pytest.raises(ValueError):
        RetryPolicy(base_backoff=1.0, max_backoff=0.5)
    with pytest.raises(ValueError):
        POLICY.should_retry(0, Outcome.TIMEOUT, True)


# --- backoff -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (10, 0.25), (10_000, 0.25)],
)
def test_backoff_ceiling_doubles_then_caps(attempt: int, ceiling: float) -> None:
    assert backoff_ceiling(attempt, 0.025, 0.25) == pytest.approx(ceiling)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.001, 1.0), st.floats(1.0, 60.0), st.integers(0, 2**32 - 1))
def test_backoff_grows_is_capped_and_jitters_within_bounds(
    base: float, cap: float, seed: int
) -> None:
    rng = random.Random(seed)
    ceilings = [backoff_ceiling(a, base, cap) for a in range(40)]
    assert ceilings == sorted(ceilings)
    assert ceilings[-1] == cap
    for attempt, ceiling in enumerate(ceilings):
        assert 0.0 <= backoff(attempt, base, cap, rng) <= ceiling


def test_policy_backoff_is_seeded_full_jitter() -> None:
    waits = [POLICY.backoff(3, random.Random(s)) for s in range(200)]
    assert all(0.0 <= w <= 0.1 for w in waits)
    assert min(waits) < 0.02 and max(waits) > 0.08  # the whole interval, not a narrow band
    assert waits == [POLICY.backoff(3, random.Random(s)) for s in range(200)]


# --- budget ------------------------------------------------------------------------------


def test_budget_allows_percent_of_requests_then_floor_then_nothing() -> None:
    budget = RetryBudget(RetryBudgetConfig(budget_percent=20.0, min_retries_per_second=3.0))
    for _ in range(10):
        budget.on_request_start()
    decisions = [budget.try_acquire(now=0.0) for _ in range(6)]
    assert decisions == [BudgetDecision.RATIO] * 2 + [BudgetDecision.FLOOR] * 3 + [
        BudgetDecision.EXHAUSTED
    ]
    assert budget.retries_in_flight == 5
    # The floor refills at its rate: half a second buys 1.5 tokens.
    assert budget.try_acquire(now=0.5) is BudgetDecision.FLOOR
    assert budget.try_acquire(now=0.5) is BudgetDecision.EXHAUSTED
    stats = budget.statistics(now=0.5)
    assert (stats.requests_in_flight, stats.retries_in_flight, stats.exhausted) == (10, 6, 2)


def test_released_retries_free_the_ratio_share() -> None:
    budget = RetryBudget(RetryBudgetConfig(budget_percent=50.0, min_retries_per_second=0.0))
    for _ in range(2):
        budget.on_request_start()
    assert budget.try_acquire(0.0) is BudgetDecision.RATIO
    assert budget.try_acquire(0.0) is BudgetDecision.EXHAUSTED
    budget.release()
    assert budget.try_acquire(0.0) is BudgetDecision.RATIO
    assert "retries=1" in repr(budget)


def test_unpaired_calls_are_caller_bugs() -> None:
    budget = RetryBudget()
    with pytest.raises(ValueError):
        budget.release()
    with pytest.raises(ValueError):
        budget.on_request_end()


OPS = st.sampled_from(["start", "end", "retry", "release", "tick"])


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 100.0), st.floats(0.0, 20.0), st.lists(OPS, max_size=200))
def test_retries_never_exceed_the_share_plus_the_floor(
    percent: float, floor_rate: float, ops: list[str]
) -> None:
    budget = RetryBudget(
        RetryBudgetConfig(budget_percent=percent, min_retries_per_second=floor_rate)
    )
    now, floor_grants = 0.0, 0
    for op in ops:
        if op == "start":
            budget.on_request_start()
        elif op == "end" and budget.requests_in_flight:
            budget.on_request_end()
        elif op == "release" and budget.retries_in_flight:
            budget.release()
        elif op == "tick":
            now += 0.1
        elif op == "retry":
            decision = budget.try_acquire(now)
            if decision is BudgetDecision.RATIO:
                assert budget.retries_in_flight <= percent / 100.0 * budget.requests_in_flight
            elif decision is BudgetDecision.FLOOR:
                floor_grants += 1
        # The floor admits at most its burst plus its rate over elapsed time.
        assert floor_grants <= floor_rate + floor_rate * now + 1e-9
