"""The demo traffic generator and the one-shot client used by ``meshfed call``.

For every flow of the plan (a source workload's upstream listener) it sends
steady requests through the source sidecar, records outcome, latency and who
served, and serves ``/stats`` (JSON) and ``/metrics`` (Prometheus).

:class:`TrafficRecorder` is the pure core (times are arguments); the clients
and the server are trio adapters.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from federation.cli.up.demoapps import grpc_frame

__all__ = ["CallResult", "Flow", "TrafficRecorder", "call_once", "run_traffic"]

log = logging.getLogger("meshfed.demo.traffic")
REQUEST_TIMEOUT = 3.0
MAX_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class Flow:
    source_workload: str
    source_cluster: str
    source_zone: str
    service: str
    protocol: str
    target: str
    rate: float

    @property
    def key(self) -> str:
        return f"{self.source_cluster}/{self.source_workload}->{self.service}"

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Flow:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class CallResult:
    ok: bool
    latency: float
    served_workload: str | None = None
    served_cluster: str | None = None
    served_zone: str | None = None
    code: str = "ok"
    """``ok``, an HTTP status, ``grpc-<n>``, or a failure class (``connect``, ``timeout``...)."""
    detail: str = ""

    @property
    def locality(self) -> str | None:
        if self.served_cluster is None:
            return None
        return f"{self.served_cluster}/{self.served_zone}"


# -- pure core ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Sample:
    t: float
    ok: bool
    latency: float
    locality: str | None
    code: str


@dataclass(slots=True)
class _FlowState:
    samples: deque[_Sample] = field(default_factory=deque)
    bucket: int | None = None
    bucket_counts: dict[str, int] = field(default_factory=dict)
    serving: str | None = None
    """The locality that served most calls of the last complete second."""
    failovers: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    total: int = 0
    total_errors: int = 0
    last_error: str = ""


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class TrafficRecorder:
    """Outcomes per flow over a sliding window, and failovers.

    A *failover* is a change of the serving locality: the (cluster/zone) that served
    the majority of a flow's successful calls in one second differs from that of the
    previous second that had any. A per-call definition would flag every request of a
    weighted split; a one-second majority shows where the traffic *is*.
    """

    def __init__(self, flows: Sequence[Flow], window: float = 10.0) -> None:
        self.window = window
        self.flows = {f.key: f for f in flows}
        self.state = {f.key: _FlowState() for f in flows}

    def record(self, key: str, now: float, result: CallResult) -> dict[str, Any] | None:
        """Add one outcome; returns a failover event if this call closed a second that
        moved the traffic."""
        st = self.state[key]
        st.samples.append(_Sample(now, result.ok, result.latency, result.locality, result.code))
        st.total += 1
        if not result.ok:
            st.total_errors += 1
            st.last_error = f"{result.code}: {result.detail}"[:200]
        self._trim(st, now)
        event = self._advance(st, key, now)
        if result.ok and result.locality is not None:
            st.bucket_counts[result.locality] = st.bucket_counts.get(result.locality, 0) + 1
        return event

    def _trim(self, st: _FlowState, now: float) -> None:
        while st.samples and st.samples[0].t < now - self.window:
            st.samples.popleft()

    def _advance(self, st: _FlowState, key: str, now: float) -> dict[str, Any] | None:
        second = math.floor(now)
        if st.bucket == second:
            return None
        event = None
        if st.bucket_counts:
            top = max(sorted(st.bucket_counts), key=lambda loc: st.bucket_counts[loc])
            if st.serving is not None and top != st.serving:
                event = {
                    "at": float(st.bucket or 0) + 1.0,
                    "flow": key,
                    "from": st.serving,
                    "to": top,
                }
                st.failovers.append(event)
            st.serving = top
        st.bucket = second
        st.bucket_counts = {}
        return event

    def snapshot(self, now: float, *, wall_offset: float = 0.0) -> dict[str, Any]:
        """JSON-ready stats; ``wall_offset`` turns recorder times into wall-clock times."""
        flows = []
        for key, flow in sorted(self.flows.items()):
            st = self.state[key]
            self._trim(st, now)
            window = list(st.samples)
            ok = [s for s in window if s.ok]
            errors = len(window) - len(ok)
            served: dict[str, int] = {}
            for s in ok:
                if s.locality is not None:
                    served[s.locality] = served.get(s.locality, 0) + 1
            codes: dict[str, int] = {}
            for s in window:
                if not s.ok:
                    codes[s.code] = codes.get(s.code, 0) + 1
            p50 = percentile([s.latency for s in ok], 50)
            p99 = percentile([s.latency for s in ok], 99)
            flows.append(
                {
                    "flow": key,
                    "source_workload": flow.source_workload,
                    "source_cluster": flow.source_cluster,
                    "source_zone": flow.source_zone,
                    "service": flow.service,
                    "protocol": flow.protocol,
                    "target": flow.target,
                    "requests": len(window),
                    "errors": errors,
                    "error_rate": round(errors / len(window), 4) if window else 0.0,
                    "error_codes": codes,
                    "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                    "p99_ms": None if p99 is None else round(p99 * 1000, 2),
                    "served_by": dict(sorted(served.items())),
                    "serving": st.serving,
                    "last_served_by": next((s.locality for s in reversed(window) if s.ok), None),
                    "total_requests": st.total,
                    "total_errors": st.total_errors,
                    "last_error": st.last_error or None,
                    "failovers": [
                        {**e, "at": round(e["at"] + wall_offset, 3)} for e in st.failovers
                    ],
                }
            )
        return {"window_seconds": self.window, "flows": flows}


def parse_served(protocol: str, body: bytes) -> tuple[str, str, str]:
    """(workload-replica, cluster, zone) from a demo app's answer."""
    if protocol == "tcp":
        head = body.split(b":", 1)[0].decode("utf-8", "replace").split()
        if len(head) != 3:
            raise ValueError(f"unexpected echo {body[:80]!r}")
        return head[0], head[1], head[2]
    obj = json.loads(body)
    return f"{obj['workload']}-{obj.get('replica', 0)}", str(obj["cluster"]), str(obj["zone"])


# -- clients ------------------------------------------------------------------------------------


async def _http1(stream: trio.SocketStream, host: str, path: str) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT)
    # No "connection: close": the sidecar's L7 layer pools connections to the app, and
    # a forwarded close would only make the app hang up on the pool. We close after one.
    req = h11.Request(method="GET", target=path, headers=[("host", host)])
    await stream.send_all((conn.send(req) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, body


async def _http2(stream: trio.SocketStream, host: str, path: str, grpc: bool) -> tuple[str, bytes]:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    headers = [
        (":method", "POST" if grpc else "GET"), (":scheme", "http"),
        (":authority", host), (":path", path),
    ]  # fmt: skip
    if grpc:
        headers += [("content-type", "application/grpc"), ("te", "trailers")]
        conn.send_headers(sid, headers)
        conn.send_data(sid, grpc_frame(b"{}"), end_stream=True)
    else:
        conn.send_headers(sid, headers, end_stream=True)
    await stream.send_all(conn.data_to_send())
    status, body, grpc_status = "", b"", None
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("connection closed before the response ended")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers or []).get(b":status", b"").decode()
            elif isinstance(ev, h2.events.TrailersReceived):
                gs = dict(ev.headers or []).get(b"grpc-status")
                grpc_status = gs.decode() if gs is not None else None
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                raise ConnectionError(f"stream reset ({ev.error_code!r})")
            elif isinstance(ev, h2.events.StreamEnded):
                if grpc:
                    if grpc_status not in (None, "0"):
                        return f"grpc-{grpc_status}", b""
                    body = body[5:]
                return status, body
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)


async def call_once(
    protocol: str,
    target: str,
    service: str,
    *,
    timeout: float = REQUEST_TIMEOUT,  # noqa: ASYNC109
) -> CallResult:
    """One request to ``target`` (a sidecar's upstream listener, or an app)."""
    host, _, port = target.rpartition(":")
    start = trio.current_time()
    code = "timeout"
    detail = f"no answer within {timeout}s"
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, int(port))
        except OSError as exc:
            return CallResult(False, trio.current_time() - start, code="connect", detail=str(exc))
        try:
            async with stream:
                if protocol == "http":
                    status, body = await _http1(stream, service, "/demo")
                    code = str(status)
                elif protocol == "http2":
                    svc = service.split(".")[0]
                    grpc_path = f"/demo.{svc.capitalize()}/Call"
                    code, body = await _http2(stream, service, grpc_path, grpc=True)
                else:
                    await stream.send_all(b"hello\n")
                    body = b""
                    while not body.endswith(b"\n"):
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        body += chunk
                    code = "200" if body.endswith(b"\n") else "reset"
            latency = trio.current_time() - start
            if code != "200":
                return CallResult(
                    False,
                    latency,
                    code=code or "reset",
                    detail=body[:120].decode("utf-8", "replace"),
                )
            who, cluster, zone = parse_served(protocol, body)
            return CallResult(True, latency, who, cluster, zone)
        except (
            OSError, trio.BrokenResourceError, ConnectionError, h11.ProtocolError,
            h2.exceptions.H2Error,
        ) as exc:  # fmt: skip
            return CallResult(False, trio.current_time() - start, code="reset", detail=str(exc))
        except (ValueError, KeyError) as exc:
            return CallResult(
                False, trio.current_time() - start, code="bad-answer", detail=str(exc)
            )
    return CallResult(False, trio.current_time() - start, code=code, detail=detail)


# -- the generator process ----------------------------------------------------------------------


class TrafficMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("source_cluster", "destination_service", "destination_cluster", "code")
        self.requests = Counter(
            "meshfed_traffic_requests_total",
            "Demo requests by outcome and serving cluster (empty when none served).",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            "meshfed_traffic_request_duration_seconds",
            "Latency of successful demo requests, through the source sidecar.",
            ("source_cluster", "destination_service"),
            registry=self.registry,
        )
        self.failovers = Counter(
            "meshfed_traffic_failovers_total",
            "Changes of the locality serving most of a flow's calls.",
            ("source_cluster", "destination_service"),
            registry=self.registry,
        )

    def observe(self, flow: Flow, result: CallResult, failover: bool) -> None:
        self.requests.labels(
            flow.source_cluster, flow.service, result.served_cluster or "", result.code
        ).inc()
        if result.ok:
            self.duration.labels(flow.source_cluster, flow.service).observe(result.latency)
        if failover:
            self.failovers.labels(flow.source_cluster, flow.service).inc()


async def _send_loop(flow: Flow, recorder: TrafficRecorder, metrics: TrafficMetrics) -> None:
    interval = 1.0 / flow.rate
    limit = trio.CapacityLimiter(MAX_IN_FLIGHT)

    async def one() -> None:
        async with limit:
            try:
                result = await call_once(flow.protocol, flow.target, flow.service)
            except Exception as exc:  # a client bug is an error sample, not a dead generator
                log.exception("call %s failed", flow.key)
                result = CallResult(False, 0.0, code="client-error", detail=repr(exc))
        event = recorder.record(flow.key, trio.current_time(), result)
        metrics.observe(flow, result, event is not None)
        if event is not None:
            log.info("failover %s: %s -> %s", flow.key, event["from"], event["to"])

    async with trio.open_nursery() as nursery:
        next_at = trio.current_time()
        while True:
            if limit.borrowed_tokens < MAX_IN_FLIGHT:
                nursery.start_soon(one)
            next_at += interval
            await trio.sleep_until(next_at)


def _http_response(status: str, ctype: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def run_traffic(
    flows: Sequence[Flow],
    host: str,
    port: int,
    *,
    window: float = 10.0,
    wall: float = 0.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send every flow's requests and serve ``/ready``, ``/stats`` and ``/metrics``.

    ``wall`` is the wall-clock time at trio time 0 (failover times in ``/stats`` are
    wall-clock, so they can be compared with logs)."""
    recorder = TrafficRecorder(flows, window)
    metrics = TrafficMetrics()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            head = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    head += chunk
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            path = parts[1].decode("ascii", "replace").split("?")[0] if len(parts) == 3 else ""
            if path == "/stats":
                snap = recorder.snapshot(trio.current_time(), wall_offset=wall)
                body = json.dumps(snap, indent=1).encode()
                resp = _http_response("200 OK", "application/json", body)
            elif path == "/metrics":
                resp = _http_response(
                    "200 OK", "text/plain; version=0.0.4", generate_latest(metrics.registry)
                )
            elif path == "/ready":
                resp = _http_response("200 OK", "text/plain", b"ready\n")
            else:
                resp = _http_response("404 Not Found", "text/plain", b"unknown path\n")
            await stream.send_all(resp)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(port, host=host)
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        for flow in flows:
            nursery.start_soon(_send_loop, flow, recorder, metrics)
        task_status.started(listeners[0].socket.getsockname()[1])
