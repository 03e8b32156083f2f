"""The HTTP pipeline's trio adapter over memory streams: real h2 connections (H2Channel,
H2Pool) to fake upstream sidecars, the real cores, and virtual time (MockClock with
autojump) wherever time matters, so every time below is exact."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from federation.config.model import (
    CircuitBreaking,
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
from federation.model import Locality
from sidecar.balancer import Balancer, BalancerConfig, Pick
from sidecar.http.accesslog import HttpMetrics
from sidecar.http.circuit import CircuitBreaker
from sidecar.http.h2io import H2Channel, H2Stream
from sidecar.http.headers import Header, get_all
from sidecar.http.paths import normalize_path
from sidecar.http.proxy import HttpProxy, ProxyRequest, RequestBody
from sidecar.http.routes import RouteTable, retry_budget_config
from sidecar.http.tracing import TraceContext, parse_traceparent
from sidecar.http.upstream import Dialed, H2Pool
from sidecar.retry import RetryBudget
from sidecar.routing import Candidate

CALLER = Locality("aws", "r1", "z1", "c1")
App = Callable[[H2Stream], Awaitable[None]]


class MaxJitter(random.Random):
    """Full jitter pinned to its ceiling, so backoffs are exact: base x 2**n, capped."""

    def uniform(self, a: float, b: float) -> float:
        return b


def cand(name: str, zone: str = "z1") -> Candidate:
    return Candidate(
        kind="direct",
        target_cluster="c1",
        name=name,
        locality=Locality("aws", "r1", zone, "c1"),
        weight=1,
        host="127.0.0.1",
        port=1000 + len(name),
        sni=f"sni-{name}",
        expected_ids=frozenset({f"spiffe://c1/ns/demo/sa/{name}"}),
    )


async def respond(
    s: H2Stream, status: int, body: bytes = b"", extra: list[Header] | None = None
) -> None:
    while await s.receive_data() is not None:
        pass
    head = [(b":status", str(status).encode()), *(extra or [])]
    if body:
        await s.send_headers(head)
        await s.send_data(body, end_stream=True)
    else:
        await s.send_headers(head, end_stream=True)


@dataclass
class FakeUpstreams:
    """Endpoints served by in-memory h2 servers; records who got what, and when."""

    nursery: trio.Nursery
    apps: dict[str, App]
    subsets_of: dict[str, str] = field(default_factory=dict)
    seen: list[tuple[str, float, list[Header]]] = field(default_factory=list)
    pools: dict[Candidate, H2Pool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cands = {n: cand(n) for n in self.apps}
        self.balancer: Balancer[Candidate] = Balancer(CALLER, BalancerConfig())
        self.balancer.update(self.cands.values())
        self.subset_balancers: dict[str, Balancer[Candidate]] = {}
        for sub in set(self.subsets_of.values()):
            b: Balancer[Candidate] = Balancer(CALLER, BalancerConfig())
            b.update(c for n, c in self.cands.items() if self.subsets_of[n] == sub)
            self.subset_balancers[sub] = b
        self.reports: list[tuple[str, int]] = []

    def pick(
        self, subset: str | None, rng: random.Random, exclude: frozenset[Candidate]
    ) -> Pick[Candidate] | None:
        b = self.balancer if subset is None else self.subset_balancers[subset]
        return b.pick(rng, exclude)

    def on_start(self, c: Candidate, subset: str | None) -> None:
        self.balancer.on_start(c)

    def on_finish(self, c: Candidate, subset: str | None) -> None:
        self.balancer.on_finish(c)

    def report_response(self, c: Candidate, status: int, grpc_status: int | None) -> None:
        self.reports.append((c.name, status))

    async def open_stream(
        self, c: Candidate, headers: list[Header], *, end_stream: bool
    ) -> H2Stream:
        pool = self.pools.get(c)
        if pool is None:
            name = c.name

            async def dial() -> Dialed:
                client, server = trio.testing.memory_stream_pair()

                async def on_stream(s: H2Stream) -> None:
                    self.seen.append((name, trio.current_time(), s.head or []))
                    await self.apps[name](s)

                self.nursery.start_soon(H2Channel(server, "server", on_stream=on_stream).run)
                return Dialed(client)

            pool = self.pools[c] = H2Pool(name, dial, self.nursery)
        return await pool.open_stream(headers, end_stream=end_stream)


@dataclass
class Sink:
    head: list[Header] | None = None
    data: bytearray = field(default_factory=bytearray)
    trailers: list[Header] | None = None
    ended: bool = False
    aborted: bool = False

    async def send_head(self, head: list[Header], *, end_stream: bool) -> None:
        self.head = head
        self.ended = end_stream

    async def send_data(self, data: bytes) -> None:
        self.data += data

    async def send_end(self, trailers: Sequence[Header] | None) -> None:
        self.trailers = list(trailers) if trailers else None
        self.ended = True

    def abort(self) -> None:
        self.aborted = True

    @property
    def status(self) -> int:
        assert self.head is not None
        return int(get_all(self.head, b":status")[0])


def service(
    *,
    retries: Retries | None = None,
    timeouts: Timeouts | None = None,
    breaking: CircuitBreaking | None = None,
    routes: tuple[Route, ...] = (),
) -> Service:
    return Service(
        name="web",
        namespace="demo",
        ports=(ServicePort("http", 8080, "http"),),
        traffic_policy=TrafficPolicy(
            timeouts=timeouts or Timeouts(),
            retries=retries or Retries(),
            circuit_breaking=breaking or CircuitBreaking(),
        ),
        subsets=(Subset("v1", {"version": "v1"}), Subset("v2", {"version": "v2"})),
        routes=routes,
    )


REGISTRIES: dict[int, CollectorRegistry] = {}


def make_proxy(svc: Service, ups: FakeUpstreams, rng: random.Random | None = None) -> HttpProxy:
    registry = CollectorRegistry()
    proxy = HttpProxy(
        service="web.demo",
        source_cluster="c1",
        source_workload="client",
        routes=RouteTable(svc),
        destination=ups,
        breaker=CircuitBreaker(svc.traffic_policy.circuit_breaking),
        budget=RetryBudget(retry_budget_config(svc.traffic_policy.retries)),
        metrics=HttpMetrics(registry, source_cluster="c1", destination_services=["web.demo"]),
        rng=rng or MaxJitter(7),
    )
    REGISTRIES[id(proxy)] = registry
    return proxy


def request(
    path: str = "/x", method: str = "GET", headers: list[Header] | None = None, body: bytes = b""
) -> ProxyRequest:
    rp = normalize_path(path)
    fields = headers or []

    def upstream(trace: TraceContext) -> list[Header]:
        return [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", b"web"),
            (b":path", rp.target.encode()),
            *[(n, v) for n, v in fields if n not in (b"traceparent", b"tracestate")],
            *trace.headers(),
        ]

    chunks = [body] if body else []

    async def receive() -> bytes | None:
        return chunks.pop(0) if chunks else None

    return ProxyRequest(
        method=method,
        path=rp,
        headers=fields,
        upstream_headers=upstream,
        body=RequestBody(receive if body else None),
        protocol="HTTP/2",
    )


def metric(proxy: HttpProxy, name: str, **labels: str) -> float:
    value = REGISTRIES[id(proxy)].get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def test_retries_back_off_exactly_and_reach_another_endpoint(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def fail(s: H2Stream) -> None:
        await respond(s, 503)

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": fail, "b": fail})
        svc = service(
            retries=Retries(
                attempts=2, backoff_base=1.0, backoff_max=4.0, retry_on=("gateway-error",)
            )
        )
        proxy = make_proxy(svc, ups)
        sink = Sink()
        await proxy.handle(request(), sink)
        nursery.cancel_scope.cancel()
    assert sink.status == 503
    # Backoffs at their ceilings: 1 s before the first retry, 2 s before the second.
    assert [t for _, t, _ in ups.seen] == [0.0, 1.0, 3.0]
    # The first retry goes to the endpoint not tried yet.
    assert ups.seen[0][0] != ups.seen[1][0]
    assert (
        metric(
            proxy,
            "meshfed_sidecar_http_retries_total",
            source_cluster="c1",
            destination_service="web.demo",
        )
        == 2
    )
    assert [s for _, s in ups.reports] == [503, 503, 503]


async def test_retry_budget_stops_retries(autojump_clock: trio.abc.Clock) -> None:
    async def fail(s: H2Stream) -> None:
        await respond(s, 503)

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": fail, "b": fail})
        retries = Retries(
            attempts=3,
            backoff_base=0.1,
            backoff_max=0.1,
            retry_on=("5xx",),
            budget_percent=0.0,
            min_retries_per_second=1,
        )
        proxy = make_proxy(service(retries=retries), ups)
        sink = Sink()
        await proxy.handle(request(), sink)
        nursery.cancel_scope.cancel()
    assert sink.status == 503
    # One floor token: one retry at 0.1 s; the next finds 0.1 token and is refused.
    assert [t for _, t, _ in ups.seen] == [0.0, pytest.approx(0.1)]
    assert (
        metric(
            proxy,
            "meshfed_sidecar_http_retry_budget_exhausted_total",
            source_cluster="c1",
            destination_service="web.demo",
        )
        == 1
    )


async def test_post_is_not_retried_on_5xx(autojump_clock: trio.abc.Clock) -> None:
    async def fail(s: H2Stream) -> None:
        await respond(s, 503)

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": fail, "b": fail})
        proxy = make_proxy(service(retries=Retries(attempts=2, retry_on=("5xx",))), ups)
        sink = Sink()
        await proxy.handle(request(method="POST", body=b"x" * 10), sink)
        nursery.cancel_scope.cancel()
    assert sink.status == 503
    assert len(ups.seen) == 1


async def test_per_try_timeout_then_request_timeout(autojump_clock: trio.abc.Clock) -> None:
    async def hang(s: H2Stream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": hang, "b": hang})
        retries = Retries(
            attempts=2, per_try_timeout=1.0, backoff_base=0.5, backoff_max=0.5, retry_on=("reset",)
        )
        proxy = make_proxy(service(retries=retries), ups)
        sink = Sink()
        start = trio.current_time()
        await proxy.handle(request(), sink)
        # 1 s try, 0.5 s backoff, 1 s try, 0.5 s backoff, 1 s try: 504 at 4 s.
        assert trio.current_time() - start == pytest.approx(4.0)
        assert sink.status == 504
        assert [t for _, t, _ in ups.seen] == [0.0, 1.5, 3.0]

        # A request timeout of 2.5 s cuts the second try short: 504 at 2.5 s.
        ups.seen.clear()
        short = make_proxy(service(retries=retries, timeouts=Timeouts(request=2.5)), ups)
        sink2 = Sink()
        start = trio.current_time()
        await short.handle(request(), sink2)
        assert trio.current_time() - start == pytest.approx(2.5)
        assert sink2.status == 504
        assert len(ups.seen) == 2
        nursery.cancel_scope.cancel()


async def test_circuit_open_answers_503_with_header() -> None:
    release = trio.Event()

    async def slow(s: H2Stream) -> None:
        await release.wait()
        await respond(s, 200, b"ok")

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": slow})
        proxy = make_proxy(service(breaking=CircuitBreaking(max_requests=1)), ups)
        first = Sink()
        nursery.start_soon(proxy.handle, request(), first)
        await trio.testing.wait_all_tasks_blocked()
        second = Sink()
        await proxy.handle(request(), second)
        assert second.status == 503
        assert (b"x-meshfed-overloaded", b"max_requests") in (second.head or [])
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert first.status == 200 and bytes(first.data) == b"ok"
    assert len(ups.seen) == 1
    assert (
        metric(
            proxy,
            "meshfed_sidecar_http_circuit_open_total",
            source_cluster="c1",
            destination_service="web.demo",
            reason="max_requests",
        )
        == 1
    )


def split_routes() -> tuple[Route, ...]:
    return (
        Route(
            "canary",
            RouteMatch(prefix="/", headers=(HeaderMatch("x-canary", exact="1"),)),
            split=(WeightedSubset("v2", 100),),
        ),
        Route(
            "split",
            RouteMatch(prefix="/"),
            split=(WeightedSubset("v1", 10), WeightedSubset("v2", 90)),
        ),
    )


async def test_split_10_90_within_binomial_bound_and_header_route_wins() -> None:
    async def ok(s: H2Stream) -> None:
        await respond(s, 200)

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a1": ok, "b2": ok}, subsets_of={"a1": "v1", "b2": "v2"})
        proxy = make_proxy(service(routes=split_routes()), ups, rng=random.Random(1234))
        n = 2000
        for _ in range(n):
            await proxy.handle(request(), Sink())
        v1 = sum(1 for name, _, _ in ups.seen if name == "a1")
        mean, sigma = n * 0.1, math.sqrt(n * 0.1 * 0.9)
        assert abs(v1 - mean) <= 4.5 * sigma, v1
        assert sum(p.statistics().dials for p in ups.pools.values()) == 2

        ups.seen.clear()
        for _ in range(50):
            sink = Sink()
            await proxy.handle(request(headers=[(b"x-canary", b"1")]), sink)
            assert sink.status == 200
        assert {name for name, _, _ in ups.seen} == {"b2"}
        nursery.cancel_scope.cancel()


async def test_burst_of_requests_shares_one_connection() -> None:
    gate = trio.Event()

    async def ok(s: H2Stream) -> None:
        await gate.wait()
        await respond(s, 200, b"hi")

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": ok})
        proxy = make_proxy(service(), ups)
        sinks = [Sink() for _ in range(100)]
        async with trio.open_nursery() as burst:
            for s in sinks:
                burst.start_soon(proxy.handle, request(), s)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        nursery.cancel_scope.cancel()
    assert all(s.status == 200 and bytes(s.data) == b"hi" for s in sinks)
    (pool,) = ups.pools.values()
    assert pool.statistics().dials == 1


async def test_trace_propagates_with_new_span_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ok(s: H2Stream) -> None:
        await respond(s, 200)

    incoming = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    caplog.set_level(logging.INFO, logger="meshfed.sidecar")
    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": ok})
        proxy = make_proxy(service(), ups)
        await proxy.handle(request(headers=[(b"traceparent", incoming)]), Sink())
        await proxy.handle(request(), Sink())
        nursery.cancel_scope.cancel()
    sent = [parse_traceparent(get_all(h, b"traceparent")[0]) for _, _, h in ups.seen]
    assert sent[0] is not None and sent[0].trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert sent[0].parent_id != "b7ad6b7169203331"
    assert sent[1] is not None and sent[1].trace_id != sent[0].trace_id  # started here
    lines = [r.getMessage() for r in caplog.records if '"http_request"' in r.getMessage()]
    assert '"trace_id":"0af7651916cd43dd8448eb211c80319c"' in lines[0]
    assert f'"span_id":"{sent[0].parent_id}"' in lines[0]
    assert '"parent_span_id":"b7ad6b7169203331"' in lines[0]


async def test_grpc_unavailable_trailers_only_is_retried(autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    async def flaky(s: H2Stream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await respond(
                s, 200, extra=[(b"content-type", b"application/grpc"), (b"grpc-status", b"14")]
            )
        else:
            while await s.receive_data() is not None:
                pass
            await s.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
            await s.send_data(b"\x00\x00\x00\x00\x01z")
            await s.end([(b"grpc-status", b"0")])

    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": flaky, "b": flaky})
        proxy = make_proxy(service(retries=Retries(retry_on=("gateway-error",))), ups)
        req = request(
            method="POST",
            headers=[(b"content-type", b"application/grpc")],
            body=b"\x00\x00\x00\x00\x00",
        )
        req.grpc = True
        sink = Sink()
        await proxy.handle(req, sink)
        nursery.cancel_scope.cancel()
    assert calls == 2
    assert sink.status == 200 and sink.trailers == [(b"grpc-status", b"0")]
    assert bytes(sink.data) == b"\x00\x00\x00\x00\x01z"


def test_h1_client_chunks_a_request_body_of_unknown_length() -> None:
    # Regression: h11 frames a request without Content-Length/Transfer-Encoding as
    # bodiless, so the inbound leg to an HTTP/1.1 app must say chunked itself.
    from sidecar.http.h1 import H1ClientConnection

    c = H1ClientConnection()
    head = c.send_request("POST", "/x", [(b"host", b"a")])
    assert b"transfer-encoding: chunked" in head.lower()
    assert c.send_data(b"abc") + c.send_end() == b"3\r\nabc\r\n0\r\n\r\n"


def test_h1_client_response_head_arriving_alone_is_not_eof() -> None:
    # Regression: the bytes after a response head were handed to h11 even when empty,
    # and h11 reads b"" as EOF, so an app writing head and body separately got a 502.
    from sidecar.http.h1 import NEED_DATA, BodyData, H1ClientConnection, MessageEnd, ResponseHead

    c = H1ClientConnection()
    c.send_request("GET", "/", [(b"host", b"a")])
    c.send_end()
    c.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert isinstance(c.next_event(), ResponseHead)
    assert c.next_event() is NEED_DATA
    c.receive_data(b"ok")
    assert c.next_event() == BodyData(b"ok")
    assert isinstance(c.next_event(), MessageEnd)


async def test_app_gone_while_answering_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression: SinkBroken raised inside the attempt nursery arrived as an
    # ExceptionGroup and escaped handle(), which would take the listener down.
    from sidecar.http.proxy import SinkBroken

    class GoneSink(Sink):
        async def send_head(self, head: list[Header], *, end_stream: bool) -> None:
            raise SinkBroken("app went away")

    async def ok(s: H2Stream) -> None:
        await respond(s, 200, b"x")

    caplog.set_level(logging.INFO, logger="meshfed.sidecar")
    async with trio.open_nursery() as nursery:
        ups = FakeUpstreams(nursery, {"a": ok})
        await make_proxy(service(), ups).handle(request(), GoneSink())
        nursery.cancel_scope.cancel()
    (line,) = [r.getMessage() for r in caplog.records if '"http_request"' in r.getMessage()]
    assert '"response_flags":["downstream_disconnect"]' in line
