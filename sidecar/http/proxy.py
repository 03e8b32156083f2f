"""The per-request pipeline of an HTTP upstream: the trio adapter that wires the HTTP cores.

For each request the app sends to an ``http``/``http2`` upstream's listener
(docs/http.md, "What the adapter must do"), :meth:`HttpProxy.handle`:

1. matches the route (``RouteTable.match`` on the path the front end normalised);
2. starts this hop's span (``tracing.from_headers``);
3. draws faults (``faults.decide``): sleeps the delay on the trio clock, answers an
   abort locally with ``x-meshfed-fault: abort``;
4. picks the split's subset (``WeightedSplit.pick``; all weights 0: 503
   ``no_route_destination``);
5. per attempt: ``CircuitBreaker.admit_request`` (Open: 503 + ``x-meshfed-overloaded``),
   a P2C least-request pick across locality tiers (:class:`Destination`), a stream on
   the pooled HTTP/2 connection to that endpoint, the request body pumped alongside
   (both directions stream: gRPC bidi works), the response head awaited within the
   per-try timeout (never past the request timeout);
6. classifies the attempt (``Outcome.from_status``, ``grpc.retry_outcome`` for a
   trailers-only gRPC answer, connect failure, reset, refused stream, timeout), feeds
   real upstream responses to outlier detection (``report_response``), and retries with
   ``RetryPolicy.should_retry`` + ``RetryBudget.try_acquire`` + ``backoff`` (trio sleep),
   on another endpoint when there is one;
7. streams the chosen response to the app (or answers locally), then writes one
   access-log line (``format_line``) and ``HttpMetrics.observe``.

Retrying a request needs its body again. Up to ``retry_buffer`` bytes are kept as they
stream by (:class:`RequestBody`); a request whose body outgrew that can only be retried
if the failed attempt never consumed any of it (Envoy's rule, with its buffer limit
idea). A response is committed once its head goes to the app: no retry after that.

The request timeout bounds the whole exchange (Envoy's route timeout): before the
response head it answers 504 ``request_timeout``; after, the app's stream is aborted.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio
from h2.errors import ErrorCodes

from sidecar.balancer import Pick
from sidecar.http import faults, tracing
from sidecar.http.accesslog import LOCAL_TIER, NO_RESPONSE, AccessRecord, HttpMetrics, format_line
from sidecar.http.circuit import CircuitBreaker, Open
from sidecar.http.drain import ServerDrain
from sidecar.http.grpc import grpc_status, parse_status, retry_idempotent, retry_outcome
from sidecar.http.h2io import H2Stream, StreamReset, lone_errors
from sidecar.http.headers import Header, get_all
from sidecar.http.paths import RequestPath
from sidecar.http.routes import RouteAction, RouteTable
from sidecar.http.tracing import TraceContext
from sidecar.http.upstream import ConnectFailed, Overloaded
from sidecar.retry import BudgetDecision, Outcome, RetryBudget
from sidecar.routing import Candidate

__all__ = [
    "DEFAULT_RETRY_BUFFER",
    "Destination",
    "HttpProxy",
    "NotReplayable",
    "ProxyRequest",
    "RequestBody",
    "ResponseSink",
    "SinkBroken",
    "local_response",
]

log = logging.getLogger("meshfed.sidecar")

DEFAULT_RETRY_BUFFER: Final = 64 * 1024
"""Request body bytes kept for a retry (Envoy's default per-connection buffer is 1 MiB;
requests in a mesh are mostly small, and a big upload is not retried anyway)."""


class NotReplayable(Exception):
    """The request body was partly consumed and is no longer buffered: cannot retry."""


class SinkBroken(Exception):
    """The app went away while we answered it."""


class RequestBody:
    """The app's request body as a replayable source (see the module docstring).

    ``receive`` yields chunks then None; ``trailers`` is read after the end. Attempts
    read through :meth:`cursor`; only one cursor reads at a time (attempts are
    sequential), and a cursor that would need bytes no longer kept raises
    :class:`NotReplayable`.
    """

    def __init__(
        self,
        receive: Callable[[], Awaitable[bytes | None]] | None,
        *,
        trailers: Callable[[], Sequence[Header] | None] = lambda: None,
        limit: int = DEFAULT_RETRY_BUFFER,
    ) -> None:
        self._receive = receive
        self._trailers = trailers
        self._limit = limit
        self._kept: list[bytes] | None = []
        self._kept_bytes = 0
        self.consumed = 0
        """Bytes read from the app so far."""
        self.ended = receive is None
        """The app's body is complete."""
        self.bytes_read = 0
        """Body bytes received from the app (for the access log)."""

    @property
    def empty(self) -> bool:
        """The request has no body at all (the head ended the stream)."""
        return self._receive is None

    @property
    def replayable(self) -> bool:
        """A new attempt can send the whole body again."""
        return self.consumed == 0 or self._kept is not None

    @property
    def trailers(self) -> Sequence[Header] | None:
        """The request's trailers, once :attr:`ended`."""
        return self._trailers() if self.ended else None

    def cursor(self) -> Callable[[], Awaitable[bytes | None]]:
        """A reader from the start of the body."""
        position = 0

        async def next_chunk() -> bytes | None:
            nonlocal position
            if position < self.consumed:
                if self._kept is None:
                    raise NotReplayable(f"{self.consumed} bytes already sent and not kept")
                chunk = self._kept[position]
                position += 1
                return chunk
            if self.ended or self._receive is None:
                return None
            chunk_or_end = await self._receive()
            # No await between the read and the bookkeeping: a cancelled read loses nothing.
            if chunk_or_end is None:
                self.ended = True
                return None
            self.consumed += 1
            position += 1
            if self._kept is not None:
                self._kept_bytes += len(chunk_or_end)
                if self._kept_bytes > self._limit:
                    self._kept = None
                else:
                    self._kept.append(chunk_or_end)
            self.bytes_read += len(chunk_or_end)
            return chunk_or_end

        return next_chunk


@dataclass(slots=True)
class ProxyRequest:
    """One request from the app, already framed and normalised by the front end."""

    method: str
    """Upper-case method."""
    path: RequestPath
    """Normalised path (routes match ``path.path``; upstreams get ``path.target``)."""
    headers: list[Header]
    """Regular fields as received (route header conditions and tracing read them)."""
    upstream_headers: Callable[[TraceContext], list[Header]]
    """The HTTP/2 header block for the upstream stream, with this hop's trace headers."""
    body: RequestBody
    """The body source."""
    protocol: str
    """``HTTP/1.1`` or ``HTTP/2`` (access log)."""
    grpc: bool = False
    """A gRPC call (``content-type: application/grpc``)."""


class ResponseSink(Protocol):
    """Where the answer goes: the app's HTTP/1.1 connection or HTTP/2 stream.

    Heads are HTTP/2-style (``:status`` first); sinks translate. Errors writing to the
    app raise :class:`SinkBroken`.
    """

    async def send_head(self, head: list[Header], *, end_stream: bool) -> None: ...

    async def send_data(self, data: bytes) -> None: ...

    async def send_end(self, trailers: Sequence[Header] | None) -> None: ...

    def abort(self) -> None:
        """The response cannot complete: reset the app's stream / close its connection."""


class Destination(Protocol):
    """Endpoints of one upstream service: picks, health feedback and streams to them."""

    def pick(
        self, subset: str | None, rng: random.Random, exclude: frozenset[Candidate]
    ) -> Pick[Candidate] | None:
        """P2C least-request across locality tiers, within ``subset`` (None: all)."""

    def on_start(self, cand: Candidate, subset: str | None) -> None:
        """A request to ``cand`` started (least-request counts)."""

    def on_finish(self, cand: Candidate, subset: str | None) -> None:
        """That request ended."""

    def report_response(self, cand: Candidate, status: int, grpc_status: int | None) -> None:
        """An upstream response, for outlier detection."""

    async def open_stream(
        self, cand: Candidate, headers: list[Header], *, end_stream: bool
    ) -> H2Stream:
        """A request stream to ``cand``; raises ConnectFailed, Overloaded or StreamReset."""


def local_response(
    status: int, extra: Sequence[Header] = (), *, grpc: bool = False, message: str = ""
) -> list[Header]:
    """The head of a response the sidecar makes itself (no body).

    For gRPC calls it is a trailers-only response carrying the status gRPC's table maps
    ``status`` to (so the client library sees e.g. UNAVAILABLE, not a bare HTTP 503),
    as Envoy does for local replies to gRPC requests.
    """
    head: list[Header] = [(b":status", str(status).encode("ascii"))]
    if grpc:
        code = grpc_status(head, None)
        head = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(code).encode("ascii")),
            (b"grpc-message", (message or f"meshfed: HTTP {status}").encode("ascii", "replace")),
        ]
    else:
        head.append((b"content-length", b"0"))
    return head + list(extra)


@dataclass(slots=True)
class _Exchange:
    """Mutable state of one request, for the access log."""

    start: float
    wall: float
    trace: TraceContext
    action: RouteAction
    flags: list[str] = field(default_factory=list)
    status: int = NO_RESPONSE
    grpc_status: int | None = None
    attempts: int = 0
    pick: Pick[Candidate] | None = None
    response_bytes: int = 0
    committed: bool = False


@dataclass(slots=True)
class _Attempt:
    """One try: its stream, its body pump, and how it ended."""

    pick: Pick[Candidate]
    stream: H2Stream | None = None
    pump: trio.CancelScope = field(default_factory=trio.CancelScope)
    head: list[Header] | None = None
    outcome: Outcome = Outcome.SUCCESS
    flag: str | None = None
    pump_error: BaseException | None = None
    overloaded: Open | None = None


def _status_of(head: Sequence[Header]) -> int:
    values = get_all(head, b":status")
    return int(values[0]) if values and values[0].isdigit() else 502


def _head_grpc_status(head: Sequence[Header]) -> int | None:
    values = get_all(head, b"grpc-status")
    return parse_status(values[0]) if values else None


class HttpProxy:
    """The request pipeline of one HTTP upstream service (see the module docstring)."""

    def __init__(
        self,
        *,
        service: str,
        source_cluster: str,
        source_workload: str,
        routes: RouteTable,
        destination: Destination,
        breaker: CircuitBreaker,
        budget: RetryBudget,
        metrics: HttpMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.source_cluster = source_cluster
        self.source_workload = source_workload
        self.routes = routes
        self.destination = destination
        self.breaker = breaker
        self.budget = budget
        self.metrics = metrics
        self.rng = rng if rng is not None else random.Random()
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.drain_group = ServerDrain()
        """The app connections served for this upstream (its listener's front end)."""

    # -- entry point -------------------------------------------------------------------

    async def handle(self, req: ProxyRequest, sink: ResponseSink) -> None:
        """Serve one request to completion (never raises for request-level failures)."""
        self.in_flight += 1
        self._idle = trio.Event() if self.in_flight == 1 else self._idle
        action = self.routes.match(req.method, req.path.path, req.headers)
        ex = _Exchange(
            start=trio.current_time(),
            wall=time.time(),
            trace=tracing.from_headers(req.headers, self.rng),
            action=action,
        )
        try:
            with trio.move_on_at(ex.start + action.timeout) as overall:
                await self._serve(req, sink, ex)
            if overall.cancelled_caught:
                ex.flags.append("request_timeout")
                if ex.committed:
                    sink.abort()
                else:
                    await self._local(req, sink, ex, 504)
        except SinkBroken:
            ex.flags.append("downstream_disconnect")
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            self._record(req, ex)

    def drain(self) -> None:
        """Graceful shutdown of the app connections (:class:`ServerDrain`)."""
        self.drain_group.start()

    async def wait_idle(self) -> None:
        """Return when no request is in flight and, once :meth:`drain` was called, every
        app HTTP/2 connection has closed (graceful drain)."""
        await self._idle.wait()
        if self.drain_group.draining:
            await self.drain_group.wait_closed()

    async def _serve(self, req: ProxyRequest, sink: ResponseSink, ex: _Exchange) -> None:
        action = ex.action
        fault = faults.decide(action.fault, self.rng)
        if fault.delay is not None:
            ex.flags.append("fault_delay")
            await trio.sleep(fault.delay)
        if fault.abort_status is not None:
            ex.flags.append("fault_abort")
            await self._local(req, sink, ex, fault.abort_status, [(faults.FAULT_HEADER, b"abort")])
            return
        subset: str | None = None
        if action.split is not None:
            subset = action.split.pick(self.rng)
            if subset is None:
                ex.flags.append("no_route_destination")
                await self._local(req, sink, ex, 503)
                return
        self.budget.on_request_start()
        try:
            await self._attempts(req, sink, ex, subset)
        finally:
            self.budget.on_request_end()

    # -- attempts ----------------------------------------------------------------------

    async def _attempts(
        self, req: ProxyRequest, sink: ResponseSink, ex: _Exchange, subset: str | None
    ) -> None:
        idempotent = retry_idempotent(req.method, req.grpc)
        tried: set[Candidate] = set()
        with lone_errors():
            await self._attempt_loop(req, sink, ex, subset, idempotent, tried)

    async def _attempt_loop(
        self,
        req: ProxyRequest,
        sink: ResponseSink,
        ex: _Exchange,
        subset: str | None,
        idempotent: bool,
        tried: set[Candidate],
    ) -> None:
        action = ex.action
        retry_held = False
        async with trio.open_nursery() as nursery:
            while True:
                admitted = self.breaker.admit_request()
                if isinstance(admitted, Open):
                    if retry_held:
                        self.budget.release()
                    await self._overloaded(req, sink, ex, admitted)
                    return
                pick = self.destination.pick(subset, self.rng, frozenset(tried))
                if pick is None and tried:
                    # Every endpoint failed once already: any of them beats no answer.
                    pick = self.destination.pick(subset, self.rng, frozenset())
                if pick is None:
                    self.breaker.release_request()
                    if retry_held:
                        self.budget.release()
                    ex.flags.append("no_healthy_upstream")
                    await self._local(req, sink, ex, 503)
                    return
                ex.attempts += 1
                ex.pick = pick
                tried.add(pick.endpoint)
                attempt = _Attempt(pick)
                self.destination.on_start(pick.endpoint, subset)
                try:
                    await self._try(req, ex, attempt, nursery)
                    if attempt.overloaded is not None:
                        ex.pick = None
                        await self._overloaded(req, sink, ex, attempt.overloaded)
                        return
                    retry = self._should_retry(req, ex, attempt, idempotent)
                    if not retry:
                        await self._finish(req, sink, ex, attempt)
                        return
                finally:
                    self.destination.on_finish(pick.endpoint, subset)
                    self.breaker.release_request()
                    if retry_held:
                        self.budget.release()
                        retry_held = False
                retry_held = True
                self.metrics.retry_started(self.service)
                await trio.sleep(action.retry.backoff(ex.attempts, self.rng))

    async def _try(
        self, req: ProxyRequest, ex: _Exchange, attempt: _Attempt, nursery: trio.Nursery
    ) -> None:
        """Open the stream, start the body pump, wait for the response head."""
        action = ex.action
        cand = attempt.pick.endpoint
        deadline = ex.start + action.timeout
        if action.per_try_timeout is not None:
            deadline = min(deadline, trio.current_time() + action.per_try_timeout)
        with trio.move_on_at(deadline) as per_try:
            try:
                attempt.stream = await self.destination.open_stream(
                    cand, req.upstream_headers(ex.trace), end_stream=req.body.empty
                )
            except ConnectFailed:
                attempt.outcome, attempt.flag = Outcome.CONNECT_FAILURE, "upstream_connect_failure"
                return
            except Overloaded as exc:
                attempt.overloaded = exc.verdict
                return
            except StreamReset as exc:
                attempt.outcome = Outcome.REFUSED_STREAM if exc.refused else Outcome.RESET
                attempt.flag = "upstream_reset"
                return
            if not req.body.empty:
                nursery.start_soon(self._pump, req.body, attempt)
            try:
                attempt.head = await attempt.stream.receive_head()
            except StreamReset as exc:
                attempt.outcome = Outcome.REFUSED_STREAM if exc.refused else Outcome.RESET
                attempt.flag = "upstream_reset"
                if isinstance(attempt.pump_error, SinkBroken | NotReplayable):
                    raise attempt.pump_error from None
                return
        if per_try.cancelled_caught:
            attempt.outcome, attempt.flag = Outcome.TIMEOUT, "per_try_timeout"
            return
        head = attempt.head
        assert head is not None
        status = _status_of(head)
        code = _head_grpc_status(head) if req.grpc else None
        if code is not None:
            attempt.outcome = retry_outcome(code)
        else:
            attempt.outcome = Outcome.from_status(status)

    async def _pump(self, body: RequestBody, attempt: _Attempt) -> None:
        """Send the request body (and trailers) on the attempt's stream."""
        stream = attempt.stream
        assert stream is not None
        with attempt.pump:
            try:
                read = body.cursor()
                while (chunk := await read()) is not None:
                    await stream.send_data(chunk)
                await stream.end(body.trailers)
            except StreamReset:
                return  # the response side sees the reset too
            except (SinkBroken, NotReplayable, trio.BrokenResourceError) as exc:
                # The app stopped sending mid-body: the upstream must not take a
                # truncated body for a complete one.
                attempt.pump_error = exc if isinstance(exc, NotReplayable) else SinkBroken()
                stream.reset(ErrorCodes.CANCEL)

    def _should_retry(
        self, req: ProxyRequest, ex: _Exchange, attempt: _Attempt, idempotent: bool
    ) -> bool:
        """Report the attempt and decide; a False leaves the attempt to be finished."""
        cand = attempt.pick.endpoint
        if attempt.head is not None:
            self.destination.report_response(
                cand, _status_of(attempt.head), _head_grpc_status(attempt.head)
            )
        if attempt.outcome is Outcome.SUCCESS:
            return False
        decision = ex.action.retry.should_retry(ex.attempts, attempt.outcome, idempotent)
        if not decision.retry or not req.body.replayable:
            return False
        if self.budget.try_acquire(trio.current_time()) is BudgetDecision.EXHAUSTED:
            self.metrics.retry_budget_exhausted(self.service)
            ex.flags.append("retry_budget_exhausted")
            return False
        if attempt.flag is not None:
            ex.flags.append(attempt.flag)
        self._abandon(attempt)
        return True

    @staticmethod
    def _abandon(attempt: _Attempt) -> None:
        attempt.pump.cancel()
        if attempt.stream is not None:
            attempt.stream.reset(ErrorCodes.CANCEL)

    # -- answering ---------------------------------------------------------------------

    async def _finish(
        self, req: ProxyRequest, sink: ResponseSink, ex: _Exchange, attempt: _Attempt
    ) -> None:
        """Forward the attempt's response, or answer its failure locally."""
        if attempt.head is None:
            self._abandon(attempt)
            if attempt.flag is not None:
                ex.flags.append(attempt.flag)
            if attempt.outcome is Outcome.TIMEOUT:
                await self._local(req, sink, ex, 504)
            else:
                await self._local(req, sink, ex, 503)
            return
        stream = attempt.stream
        assert stream is not None
        head = attempt.head
        ex.status = _status_of(head)
        ex.committed = True
        try:
            await sink.send_head(head, end_stream=stream.remote_ended and not stream._chunks)
            if not (stream.remote_ended and not stream._chunks):
                while (chunk := await stream.receive_data()) is not None:
                    await sink.send_data(chunk)
                    ex.response_bytes += len(chunk)
                await sink.send_end(stream.trailers)
        except StreamReset:
            ex.flags.append("upstream_reset")
            sink.abort()
            self._abandon(attempt)
            return
        except SinkBroken:
            self._abandon(attempt)
            raise
        if req.grpc:
            ex.grpc_status = grpc_status(head, stream.trailers)
            if stream.trailers is not None:
                # A status in the trailers is the call's real result; tell outlier
                # detection (the head said 200).
                self.destination.report_response(attempt.pick.endpoint, ex.status, ex.grpc_status)
        if isinstance(attempt.pump_error, SinkBroken):
            ex.flags.append("downstream_disconnect")
        # The upstream answered in full; a body still being sent is no longer wanted.
        attempt.pump.cancel()

    async def _local(
        self,
        req: ProxyRequest,
        sink: ResponseSink,
        ex: _Exchange,
        status: int,
        extra: Sequence[Header] = (),
    ) -> None:
        head = local_response(status, extra, grpc=req.grpc)
        ex.status = status
        if req.grpc:
            ex.grpc_status = grpc_status(head, None)
        ex.committed = True
        await sink.send_head(head, end_stream=True)

    async def _overloaded(
        self, req: ProxyRequest, sink: ResponseSink, ex: _Exchange, verdict: Open
    ) -> None:
        self.metrics.circuit_opened(self.service, verdict.reason)
        ex.flags.append("circuit_open")
        await self._local(req, sink, ex, verdict.status, [verdict.header()])

    # -- logging -----------------------------------------------------------------------

    def _record(self, req: ProxyRequest, ex: _Exchange) -> None:
        pick = ex.pick
        local = pick is None or "circuit_open" in ex.flags
        cand = pick.endpoint if pick is not None else None
        record = AccessRecord(
            start_time=ex.wall,
            duration=trio.current_time() - ex.start,
            trace_id=ex.trace.trace_id,
            span_id=ex.trace.span_id,
            parent_span_id=ex.trace.parent_span_id,
            source_cluster=self.source_cluster,
            source_workload=self.source_workload,
            destination_service=self.service,
            destination_cluster=cand.target_cluster if cand is not None and not local else "",
            destination_zone=cand.locality.zone if cand is not None and not local else "",
            upstream_endpoint=f"{cand.host}:{cand.port}" if cand is not None and not local else "",
            locality_tier=pick.tier_name if pick is not None and not local else LOCAL_TIER,
            route=ex.action.name,
            method=req.method,
            path=req.path.path,
            protocol=req.protocol,
            status=ex.status,
            grpc_status=ex.grpc_status,
            retries=max(0, ex.attempts - 1),
            request_bytes=req.body.bytes_read,
            response_bytes=ex.response_bytes,
            response_flags=tuple(dict.fromkeys(ex.flags)),
        )
        self.metrics.observe(record)
        if log.isEnabledFor(logging.INFO):
            log.info(format_line(record))
