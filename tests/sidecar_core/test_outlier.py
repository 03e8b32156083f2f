"""Passive outlier detection: streaks, exponential ejection, the cap, returns."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.outlier import (
    Ejected,
    EjectionSkipped,
    FailureKind,
    OutlierConfig,
    OutlierDetector,
    OutlierEvent,
    Returned,
)

CONNECT, HTTP = FailureKind.CONNECT, FailureKind.HTTP_5XX


def detector(n: int = 10, **config: float) -> OutlierDetector[str]:
    d: OutlierDetector[str] = OutlierDetector(OutlierConfig(**config))  # type: ignore[arg-type]
    d.update(f"h{i}" for i in range(n))
    return d


def fail(
    d: OutlierDetector[str], host: str, times: int, now: float, kind: FailureKind = CONNECT
) -> list[OutlierEvent[str]]:
    events: list[OutlierEvent[str]] = []
    for _ in range(times):
        events += d.on_failure(host, kind, now)
    return events


def test_five_consecutive_connect_failures_eject_for_base_time() -> None:
    d = detector()
    assert fail(d, "h0", 4, now=1.0) == []
    assert not d.is_ejected("h0")
    events = fail(d, "h0", 1, now=2.0)
    assert events == [Ejected("h0", CONNECT, times_ejected=1, until=32.0)]
    assert d.is_ejected("h0") and d.ejected() == {"h0"}
    assert d.next_deadline() == 32.0


def test_a_success_resets_the_streak_of_its_kind_only() -> None:
    d = detector()
    fail(d, "h0", 4, now=0.0)
    d.on_success("h0", CONNECT, now=0.0)
    assert fail(d, "h0", 4, now=0.0) == []
    # A host that accepts connections but answers 5xx: connect successes do not help it.
    fail(d, "h1", 4, now=0.0, kind=HTTP)
    d.on_success("h1", CONNECT, now=0.0)
    (event,) = fail(d, "h1", 1, now=0.0, kind=HTTP)
    assert isinstance(event, Ejected) and event.kind is HTTP


def test_returns_at_its_time_with_a_returned_event() -> None:
    d = detector()
    fail(d, "h0", 5, now=10.0)
    assert d.poll(39.9) == []
    assert d.poll(40.0) == [Returned("h0", ejected_at=10.0, at=40.0)]
    assert not d.is_ejected("h0") and d.next_deadline() is None


def test_returns_are_reported_by_any_call_that_takes_now() -> None:
    d = detector()
    fail(d, "h0", 5, now=0.0)
    events = d.on_success("h1", CONNECT, now=100.0)
    assert events == [Returned("h0", ejected_at=0.0, at=30.0)]


@pytest.mark.parametrize(
    ("ejection", "duration"),
    [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (5, 300.0), (6, 300.0), (200, 300.0)],
)
def test_ejection_time_doubles_up_to_the_cap(ejection: int, duration: float) -> None:
    assert OutlierConfig().ejection_time(ejection) == duration


def test_repeated_ejections_back_off_exponentially() -> None:
    d = detector()
    now, durations = 0.0, []
    for _ in range(6):
        (event,) = [e for e in fail(d, "h0", 5, now=now) if isinstance(e, Ejected)]
        durations.append(event.until - now)
        now = event.until  # fails again the moment it returns
    assert durations == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]


def test_time_back_in_service_forgives_backoff_steps() -> None:
    d = detector(decay_interval=30.0)
    fail(d, "h0", 5, now=0.0)  # 30 s
    fail(d, "h0", 5, now=30.0)  # 60 s, back at 90
    (again,) = [e for e in fail(d, "h0", 5, now=90.0 + 65.0) if isinstance(e, Ejected)]
    # 65 s in service forgives two steps: 2 -> 0, so this is a first ejection again.
    assert again.times_ejected == 1 and again.until == 155.0 + 30.0


def test_cap_limits_ejections_and_reports_overflow() -> None:
    d = detector(n=20, max_ejection_percent=10.0)
    fail(d, "h0", 5, now=0.0)
    fail(d, "h1", 5, now=0.0)
    events = fail(d, "h2", 5, now=0.0)
    assert events == [EjectionSkipped("h2", CONNECT, ejected=2, total=20)]
    assert d.ejected() == {"h0", "h1"}
    # The streak is spent: one more failure does not retry the ejection.
    assert fail(d, "h2", 1, now=0.0) == []


def test_one_host_may_always_be_ejected_and_zero_percent_disables() -> None:
    small = detector(n=3, max_ejection_percent=10.0)
    assert isinstance(fail(small, "h0", 5, now=0.0)[0], Ejected)
    assert isinstance(fail(small, "h1", 5, now=0.0)[0], EjectionSkipped)
    off = detector(n=3, max_ejection_percent=0.0)
    assert isinstance(fail(off, "h0", 5, now=0.0)[0], EjectionSkipped)


def test_outcomes_while_ejected_are_ignored() -> None:
    d = detector()
    fail(d, "h0", 5, now=0.0)
    assert fail(d, "h0", 50, now=1.0) == []
    assert d.next_deadline() == 30.0
    d.poll(30.0)
    assert fail(d, "h0", 4, now=31.0) == []  # counters were reset on return


def test_update_forgets_removed_hosts_and_ignores_unknown_ones() -> None:
    d = detector(n=2)
    fail(d, "h0", 5, now=0.0)
    d.update(["h1", "h2"])
    assert d.ejected() == frozenset()
    assert fail(d, "ghost", 10, now=0.0) == []
    assert "endpoints=2" in repr(d)


@pytest.mark.parametrize(
    "bad",
    [
        {"consecutive_5xx": 0},
        {"base_ejection_time": 0.0},
        {"base_ejection_time": 400.0},
        {"max_ejection_percent": 101.0},
        {"decay_interval": 0.0},
    ],
)
def test_bad_configs_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        OutlierConfig(**bad)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 30),
    st.floats(0.0, 100.0),
    st.lists(
        st.tuples(st.integers(0, 29), st.booleans(), st.sampled_from(list(FailureKind))),
        max_size=300,
    ),
)
def test_ejection_cap_is_never_exceeded(
    n: int, percent: float, outcomes: list[tuple[int, bool, FailureKind]]
) -> None:
    d = detector(
        n=n, max_ejection_percent=percent, consecutive_connect_failures=2, consecutive_5xx=2
    )
    cap = max(1, math.floor(n * percent / 100.0)) if percent > 0 else 0
    now = 0.0
    for host, ok, kind in outcomes:
        now += 0.5
        name = f"h{host % n}"
        events = d.on_success(name, kind, now) if ok else d.on_failure(name, kind, now)
        assert len(d.ejected()) <= cap
        for event in events:
            if isinstance(event, Ejected):
                assert event.until - now <= d.config.max_ejection_time
