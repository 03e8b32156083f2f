"""Route compilation and specificity; retry policy mapping reuses sidecar/retry.py."""

from __future__ import annotations

import pytest

from federation.config.model import (
    Fault,
    FaultAbort,
    HeaderMatch,
    Retries,
    Route,
    RouteMatch,
    Service,
    ServicePort,
    Subset,
    Timeouts,
    TrafficPolicy,
    WeightedSubset,
)
from sidecar.http.paths import normalize_path
from sidecar.http.routes import RouteCompileError, RouteTable, retry_policy
from sidecar.retry import Outcome, RetryReason


def svc(*routes: Route, subsets: tuple[Subset, ...] = ()) -> Service:
    return Service(
        name="shop",
        namespace="prod",
        ports=(ServicePort("http", 8080, "http"),),
        subsets=subsets or (Subset("v1", {"version": "v1"}), Subset("v2", {"version": "v2"})),
        routes=routes,
        traffic_policy=TrafficPolicy(timeouts=Timeouts(request=15.0)),
    )


def r(name: str, **match: object) -> Route:
    return Route(name=name, match=RouteMatch(**match))  # type: ignore[arg-type]


CANARY = HeaderMatch("x-canary", exact="1")

TABLE = svc(
    r("root", prefix="/"),
    r("api", prefix="/api"),
    r("api-v1", prefix="/api/v1/"),
    r("api-post", prefix="/api", method="POST"),
    r("api-canary", prefix="/api", headers=(CANARY,)),
    r("api-canary-beta", prefix="/api", headers=(CANARY, HeaderMatch("x-beta"))),
    r("health", exact="/api/health"),
    r("api-dup", prefix="/api"),  # same specificity as "api": config order decides
)

# (method, path, headers, expected route): one row per specificity rule.
CASES = [
    ("GET", "/api/health", [(b"x-canary", b"1")], "health"),  # exact beats all prefixes
    ("GET", "/api/health/x", [], "api"),  # exact is exact
    ("GET", "/api/v1/users", [(b"x-canary", b"1")], "api-v1"),  # longer prefix beats headers
    ("GET", "/api/v1", [], "api-v1"),  # trailing / of a prefix ignored
    ("POST", "/api/x", [(b"x-canary", b"1")], "api-post"),  # method beats headers
    ("GET", "/api/x", [(b"x-canary", b"1")], "api-canary"),  # header route beats plain one
    ("GET", "/api/x", [(b"x-canary", b"1"), (b"x-beta", b"")], "api-canary-beta"),  # more headers
    ("GET", "/api/x", [(b"x-canary", b"2")], "api"),  # header value must match
    ("GET", "/api", [], "api"),  # equal specificity: earlier in config
    ("GET", "/apiary", [], "root"),  # prefixes are segment-aware
    ("GET", "/", [], "root"),
]


@pytest.mark.parametrize(("method", "path", "headers", "expected"), CASES)
def test_most_specific_route_wins(
    method: str, path: str, headers: list[tuple[bytes, bytes]], expected: str
) -> None:
    assert RouteTable(TABLE).match(method, path, headers).name == expected


def test_order_in_config_does_not_matter_except_for_ties() -> None:
    reversed_table = RouteTable(svc(*reversed(TABLE.routes)))
    for method, path, headers, expected in CASES:
        got = reversed_table.match(method, path, headers).name
        assert got == ("api-dup" if expected == "api" else expected)


def test_unmatched_request_gets_the_service_default() -> None:
    table = RouteTable(svc(r("only", exact="/x")))
    action = table.match("GET", "/y", [])
    assert action.name is None and action.split is None and action.timeout == 15.0


def test_bypass_spellings_hit_the_admin_route_after_normalisation() -> None:
    table = RouteTable(svc(r("admin", prefix="/admin"), r("rest", prefix="/")))
    for raw in ("/%61dmin/x", "//admin", "/x/../admin", "/./admin/", "/%2e%2e/admin"):
        assert table.match("GET", normalize_path(raw).path, []).name == "admin"


def test_header_conditions_present_and_prefix() -> None:
    table = RouteTable(
        svc(
            r("pre", prefix="/", headers=(HeaderMatch("x-user", prefix="team-a"),)),
            r("present", prefix="/", headers=(HeaderMatch("x-debug"),)),
            r("all", prefix="/"),
        )
    )
    assert table.match("GET", "/", [(b"x-user", b"team-abc")]).name == "pre"
    assert table.match("GET", "/", [(b"x-user", b"team-b"), (b"x-debug", b"")]).name == "present"
    # any field line of the name may satisfy the condition
    assert table.match("GET", "/", [(b"x-user", b"b"), (b"x-user", b"team-a")]).name == "pre"
    assert table.match("GET", "/", [(b"x-user", b"team-b")]).name == "all"


def test_route_action_carries_timeout_split_and_fault() -> None:
    fault = Fault(abort=FaultAbort(status=503, percent=100.0))
    route = Route(
        name="canary",
        match=RouteMatch(prefix="/"),
        split=(WeightedSubset("v1", 95), WeightedSubset("v2", 5)),
        timeout=2.0,
        fault=fault,
    )
    action = RouteTable(svc(route)).match("GET", "/x", [])
    assert action.timeout == 2.0 and action.fault == fault
    assert action.split is not None and action.split.subsets == ("v1", "v2")
    assert action.subsets["v2"].labels == {"version": "v2"}


def test_config_paths_are_normalised_and_bad_ones_refused() -> None:
    table = RouteTable(svc(r("x", exact="/a/./b//c")))
    assert table.routes[0].exact == "/a/b/c"
    with pytest.raises(RouteCompileError):
        RouteTable(svc(r("bad", prefix="/a%2Fb")))
    with pytest.raises(RouteCompileError):
        RouteTable(svc(Route("s", split=(WeightedSubset("nope", 1),))))


def test_retry_policy_from_config_reuses_sidecar_retry() -> None:
    policy = retry_policy(Retries(attempts=3, retry_on=("reset", "gateway-error")))
    assert policy.max_retries == 3
    assert policy.retry_on == {Outcome.RESET, Outcome.TIMEOUT, Outcome.GATEWAY_ERROR}
    assert policy.should_retry(1, Outcome.from_status(503), idempotent=True).retry
    assert (
        policy.should_retry(1, Outcome.from_status(500), True).reason is RetryReason.NOT_RETRIABLE
    )
    assert policy.should_retry(4, Outcome.RESET, True).reason is RetryReason.ATTEMPTS_EXHAUSTED
    default = retry_policy(Retries())
    assert default.retry_on == {
        Outcome.CONNECT_FAILURE,
        Outcome.REFUSED_STREAM,
        Outcome.RESET,
        Outcome.TIMEOUT,
    }
    assert Outcome.SERVER_ERROR in retry_policy(Retries(retry_on=("5xx",))).retry_on
