"""Active health check state machine, schedule, and the combination of health sources."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.health import (
    ActiveHealthCheck,
    ActiveState,
    CheckResult,
    EndpointHealth,
    HealthCheckConfig,
    HealthTransition,
    effective_healthy,
)

S, F, T = CheckResult.SUCCESS, CheckResult.FAILURE, CheckResult.TIMEOUT
UNKNOWN, UP, DOWN = ActiveState.UNKNOWN, ActiveState.HEALTHY, ActiveState.UNHEALTHY

# unhealthy_threshold=3, healthy_threshold=2
SEQUENCES = [
    ((), UNKNOWN),
    ((S,), UP),
    ((F,), UNKNOWN),
    ((F, F, F), DOWN),
    ((F, T, F), DOWN),  # timeouts are failures
    ((S, F, F), UP),
    ((S, F, F, S, F, F), UP),  # a success resets the failure streak
    ((S, F, F, F), DOWN),
    ((F, F, F, S), DOWN),
    ((F, F, F, S, S), UP),
    ((F, F, F, S, F, S), DOWN),  # a failure resets the success streak
]


@pytest.mark.parametrize(("results", "state"), SEQUENCES)
def test_state_after_results(results: tuple[CheckResult, ...], state: ActiveState) -> None:
    check = ActiveHealthCheck(HealthCheckConfig(unhealthy_threshold=3, healthy_threshold=2))
    for result in results:
        check.record(result)
    assert check.state is state


def test_transitions_are_reported_exactly_when_the_verdict_changes() -> None:
    check = ActiveHealthCheck(HealthCheckConfig(unhealthy_threshold=2, healthy_threshold=2))
    answers = [check.record(r) for r in (S, S, F, T, F, S, S, S)]
    assert answers == [
        HealthTransition(UNKNOWN, UP, S),
        None,
        None,
        HealthTransition(UP, DOWN, T),
        None,
        None,
        HealthTransition(DOWN, UP, S),
        None,
    ]


def test_schedule_has_bounded_jitter_and_optional_unhealthy_interval() -> None:
    config = HealthCheckConfig(
        interval=10.0, jitter=0.2, unhealthy_interval=2.0, unhealthy_threshold=1
    )
    check = ActiveHealthCheck(config)
    rng = random.Random(4)
    firsts = [check.first_check_at(100.0, rng) for _ in range(200)]
    assert all(100.0 <= t <= 110.0 for t in firsts)
    nexts = [check.next_check_at(100.0, rng) for _ in range(200)]
    assert all(110.0 <= t <= 112.0 for t in nexts)
    assert len(set(nexts)) > 1  # jittered, not lockstep
    check.record(F)
    assert all(102.0 <= check.next_check_at(100.0, rng) <= 102.4 for _ in range(200))


def test_schedule_is_deterministic_for_a_seed() -> None:
    check = ActiveHealthCheck()
    a = [check.next_check_at(0.0, rng) for rng in [random.Random(1)] for _ in range(5)]
    b = [check.next_check_at(0.0, rng) for rng in [random.Random(1)] for _ in range(5)]
    assert a == b


@pytest.mark.parametrize(
    ("catalog", "active", "ejected"),
    list(itertools.product([True, False], [UNKNOWN, UP, DOWN], [True, False])),
)
def test_effective_health_requires_all_sources(
    catalog: bool, active: ActiveState, ejected: bool
) -> None:
    expected = catalog and active is not DOWN and not ejected
    assert effective_healthy(catalog, active, ejected) is expected
    assert EndpointHealth(catalog, active, ejected).effective is expected


@pytest.mark.parametrize(
    "bad",
    [
        {"interval": 0.0},
        {"timeout": -1.0},
        {"jitter": 1.5},
        {"healthy_threshold": 0},
        {"unhealthy_interval": 0.0},
    ],
)
def test_bad_configs_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HealthCheckConfig(**bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.sampled_from([S, F, T]), max_size=40))
def test_verdict_matches_the_trailing_streak(
    up_after: int, down_after: int, results: list[CheckResult]
) -> None:
    check = ActiveHealthCheck(
        HealthCheckConfig(unhealthy_threshold=down_after, healthy_threshold=up_after)
    )
    for r in results:
        check.record(r)
    trailing_ok = len(list(itertools.takewhile(lambda r: r is S, reversed(results))))
    trailing_bad = len(list(itertools.takewhile(lambda r: r is not S, reversed(results))))
    if trailing_bad >= down_after:
        assert check.state is DOWN
    if trailing_ok >= up_after:
        assert check.state is UP
    assert check.health.successes == trailing_ok or check.health.failures == trailing_bad
