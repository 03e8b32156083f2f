"""Circuit breaker limits, the overloaded header, outlier feed, and fault decisions."""

from __future__ import annotations

import math
import random

import pytest

from federation.config.model import CircuitBreaking, Fault, FaultAbort, FaultDelay
from sidecar.http.circuit import (
    ADMITTED,
    CircuitBreaker,
    Open,
    OverloadReason,
    effective_status,
    report_response,
)
from sidecar.http.faults import NO_FAULT, FaultDecision, decide
from sidecar.outlier import Ejected, OutlierConfig, OutlierDetector


def test_max_requests_opens_and_release_closes() -> None:
    cb = CircuitBreaker(CircuitBreaking(max_requests=2))
    assert cb.admit_request() is ADMITTED and cb.admit_request() is ADMITTED
    verdict = cb.admit_request()
    assert verdict == Open(OverloadReason.MAX_REQUESTS, 2)
    assert isinstance(verdict, Open)
    assert verdict.status == 503
    assert verdict.header() == (b"x-meshfed-overloaded", b"max_requests")
    cb.release_request()
    assert cb.admit_request() is ADMITTED
    assert cb.statistics().opened["max_requests"] == 1


def test_pending_limit_zero_never_queues() -> None:
    cb = CircuitBreaker(CircuitBreaking(max_pending_requests=0))
    verdict = cb.admit_pending()
    assert isinstance(verdict, Open) and verdict.reason is OverloadReason.MAX_PENDING_REQUESTS


def test_connection_limit_then_pending_limit_decides() -> None:
    cb = CircuitBreaker(CircuitBreaking(max_connections=1, max_pending_requests=1))
    assert cb.admit_connection() is ADMITTED
    # the pool is full: the request waits as pending instead of failing
    assert isinstance(cb.admit_connection(), Open)
    assert cb.admit_pending() is ADMITTED
    second = cb.admit_pending()
    assert isinstance(second, Open) and second.header()[1] == b"max_pending_requests"
    cb.release_pending()
    cb.release_connection()
    assert (cb.pending, cb.connections) == (0, 0)


def test_unbalanced_release_is_an_error() -> None:
    cb = CircuitBreaker()
    for release in (cb.release_request, cb.release_pending, cb.release_connection):
        with pytest.raises(ValueError):
            release()


def test_5xx_responses_eject_through_outlier_detection() -> None:
    od: OutlierDetector[str] = OutlierDetector(OutlierConfig(consecutive_5xx=3))
    od.update(["a", "b"])
    assert report_response(od, "a", 503, 0.0) == []
    assert report_response(od, "a", 200, 1.0) == []  # a success resets the streak
    events = [e for t in range(3) for e in report_response(od, "a", 500, 2.0 + t)]
    assert [type(e) for e in events] == [Ejected]
    assert od.is_ejected("a")


def test_grpc_unavailable_counts_as_5xx() -> None:
    assert effective_status(200, 14) == 503
    assert effective_status(200, 0) == 200
    assert effective_status(200, 5) == 404
    assert effective_status(502, 14) == 502  # a real HTTP status wins
    od: OutlierDetector[str] = OutlierDetector(OutlierConfig(consecutive_5xx=1))
    od.update(["a", "b"])
    assert [type(e) for e in report_response(od, "a", 200, 0.0, grpc_status=14)] == [Ejected]


# -- faults --------------------------------------------------------------------------------


def test_no_fault_config_injects_nothing() -> None:
    assert decide(None, random.Random(1)) is NO_FAULT
    assert decide(Fault(), random.Random(1)) is NO_FAULT
    assert not NO_FAULT.injects


def test_zero_and_hundred_percent_are_never_and_always() -> None:
    always = Fault(delay=FaultDelay(0.5, 100.0), abort=FaultAbort(503, 100.0))
    never = Fault(delay=FaultDelay(0.5, 0.0), abort=FaultAbort(503, 0.0))
    rng = random.Random(2)
    for _ in range(200):
        assert decide(always, rng) == FaultDecision(0.5, 503)
        assert decide(never, rng) is NO_FAULT


def test_abort_rate_is_within_binomial_bound() -> None:
    fault = Fault(abort=FaultAbort(status=500, percent=25.0))
    n, p = 2000, 0.25
    rng = random.Random(11)
    aborted = sum(decide(fault, rng).abort_status == 500 for _ in range(n))
    assert abs(aborted - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


def test_delay_and_abort_are_drawn_independently() -> None:
    fault = Fault(delay=FaultDelay(1.0, 50.0), abort=FaultAbort(503, 50.0))
    rng = random.Random(5)
    seen = {
        (d.delay is not None, d.abort_status is not None)
        for d in (decide(fault, rng) for _ in range(200))
    }
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
