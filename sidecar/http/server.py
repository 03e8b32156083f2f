"""HTTP front ends of the sidecar: the app-facing server (outbound) and the peer-facing
server (inbound), both thin trio loops around the sans-IO cores.

**Outbound** (:func:`serve_app_connection`): an app connection to an ``http``/``http2``
upstream's listener speaks HTTP/1.1 or HTTP/2 with prior knowledge (h2c, what gRPC
clients send); the first bytes decide (the HTTP/2 preface can never start an HTTP/1.1
request). HTTP/1.1 runs over :class:`~sidecar.http.h1.H1ServerConnection` (smuggling
defences, keep-alive, streaming bodies, ``100-continue`` sent when the body is first
wanted); HTTP/2 over :class:`~sidecar.http.h2io.H2Channel` with the guard (431/RST for
header limits, GOAWAY for floods). Each request becomes a
:class:`~sidecar.http.proxy.ProxyRequest` for the upstream's
:class:`~sidecar.http.proxy.HttpProxy`.

**Inbound** (:class:`InboundHttp`): after the inbound listener's admission (SVID, SNI,
authorization, rate limit), the caller sidecar's inner-mTLS connection carries HTTP/2;
each stream is forwarded to the local app over HTTP/1.1 (keep-alive pool) or HTTP/2
(h2c, pooled), as the service port's protocol says, with the app's response and
trailers streamed back. This hop takes a child span of the caller's trace and writes
its own access-log line with the same trace id, and counts the request in the
``meshfed_sidecar_http_inbound_*`` metrics (:class:`~sidecar.metrics.SidecarMetrics`).

**Drain** (SIGTERM, :class:`~sidecar.http.drain.ServerDrain`): every server-side HTTP/2
connection, inbound or app-facing, gets the graceful GOAWAY of
:meth:`~sidecar.http.h2io.H2Channel.drain` (streams in flight finish, new ones are
refused and retried elsewhere by the caller); an HTTP/1.1 app connection answers its
current request with ``Connection: close`` and closes, and one idle between requests is
closed at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import trio
from h2.errors import ErrorCodes

from federation.h2guard import PREFACE
from sidecar.http import tracing
from sidecar.http.accesslog import NO_RESPONSE, AccessRecord, format_line
from sidecar.http.drain import ServerDrain
from sidecar.http.grpc import grpc_status, is_grpc
from sidecar.http.h1 import (
    NEED_DATA,
    BodyData,
    Event,
    H1ClientConnection,
    H1Limits,
    H1ServerConnection,
    MessageEnd,
    Refusal,
    RequestHead,
    ResponseHead,
    refusal_response,
)
from sidecar.http.h2io import H2Channel, H2Stream, StreamReset, lone_errors
from sidecar.http.h2proxy import (
    HeaderError,
    RequestPseudo,
    downstream_response_headers,
    h1_response_from_h2,
    h2_request_from_h1,
    request_pseudo,
    upstream_request_headers,
)
from sidecar.http.headers import Header, get_all, strip_hop_by_hop
from sidecar.http.paths import BadPath, RequestPath, normalize_path
from sidecar.http.proxy import HttpProxy, ProxyRequest, RequestBody, SinkBroken, local_response
from sidecar.http.upstream import ConnectFailed, Dialed, H1AppPool, H2Pool

if TYPE_CHECKING:
    from sidecar.metrics import SidecarMetrics

__all__ = [
    "InboundHttp",
    "InboundStatistics",
    "InboundTarget",
    "PrefixedStream",
    "serve_app_connection",
    "serve_http_listener",
]

log = logging.getLogger("meshfed.sidecar")

READ_SIZE: Final = 256 * 1024
_WRITE_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PrefixedStream(trio.abc.Stream):
    """A stream whose first reads return bytes already taken off it (protocol sniffing)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _sniff(stream: trio.abc.Stream) -> tuple[Literal["h1", "h2"], bytes]:
    """Read until the bytes are or cannot be the HTTP/2 preface."""
    buf = b""
    while len(buf) < len(PREFACE) and PREFACE.startswith(buf):
        data = await stream.receive_some(READ_SIZE)
        if not data:
            break
        buf += data
    return ("h2" if buf.startswith(PREFACE) else "h1"), buf


async def serve_app_connection(
    stream: trio.abc.Stream,
    proxy: HttpProxy,
    *,
    limits: H1Limits | None = None,
    drain: ServerDrain | None = None,
) -> None:
    """Serve one app connection on an HTTP upstream's listener until it closes
    (``drain``: the group that a graceful shutdown drains; default ``proxy.drain_group``)."""
    drain = drain if drain is not None else proxy.drain_group
    try:
        with trio.fail_after(30):
            kind, first = await _sniff(stream)
    except (trio.TooSlowError, *_WRITE_ERRORS):
        await trio.aclose_forcefully(stream)
        return
    if not first:
        await trio.aclose_forcefully(stream)
        return
    if kind == "h2":
        await _serve_h2_app(PrefixedStream(stream, first), proxy, drain)
    else:
        await _serve_h1_app(stream, first, proxy, limits, drain)


# -- HTTP/1.1 app ----------------------------------------------------------------------


class _H1Sink:
    """Response sink onto the app's HTTP/1.1 connection."""

    def __init__(
        self, stream: trio.abc.Stream, conn: H1ServerConnection, drain: ServerDrain
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.drain = drain
        self.aborted = False
        self.finished = False

    async def write(self, data: bytes) -> None:
        if data:
            try:
                await self.stream.send_all(data)
            except _WRITE_ERRORS as exc:
                raise SinkBroken(str(exc)) from None

    async def send_head(self, head: list[Header], *, end_stream: bool) -> None:
        try:
            status, fields = h1_response_from_h2(head)
        except HeaderError:
            status, fields = 502, []
        lengths = get_all(fields, b"content-length")
        length = int(lengths[0]) if len(lengths) == 1 and lengths[0].isdigit() else None
        if end_stream and length is None and status not in (204, 304) and status >= 200:
            length = 0
        data = self.conn.send_response(
            status, fields, content_length=length, close=self.drain.draining
        )
        if end_stream:
            data += self.conn.send_end()
            self.finished = True
        await self.write(data)

    async def send_data(self, data: bytes) -> None:
        await self.write(self.conn.send_data(data))

    async def send_end(self, trailers: Sequence[Header] | None) -> None:
        self.finished = True
        await self.write(self.conn.send_end(trailers or ()))

    def abort(self) -> None:
        self.aborted = True


class _H1Reader:
    """Reads the app's HTTP/1.1 connection: events, and one request's body at a time."""

    def __init__(self, stream: trio.abc.Stream, conn: H1ServerConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.eof = False

    async def read_more(self) -> None:
        try:
            data = bytes(await self.stream.receive_some(READ_SIZE))
        except _WRITE_ERRORS:
            data = b""
        self.eof = not data
        self.conn.receive_data(data)

    async def next_event(self) -> Event:
        event = self.conn.next_event()
        while event is NEED_DATA:
            await self.read_more()
            event = self.conn.next_event()
        return event


class _H1Body:
    """One request's body off an :class:`_H1Reader`; ``100 Continue`` when first wanted."""

    def __init__(self, reader: _H1Reader, head: RequestHead, sink: _H1Sink) -> None:
        self.reader = reader
        self.head = head
        self.sink = sink
        self.done = head.framing.content_length in (None, 0) and not head.framing.chunked
        self.trailers: list[Header] = []
        self._continue_sent = False

    async def receive(self) -> bytes | None:
        if self.done:
            return None
        if self.head.expect_continue and not self._continue_sent:
            self._continue_sent = True
            await self.sink.write(self.reader.conn.send_continue())
        try:
            ev = await self.reader.next_event()
        except Refusal as exc:
            raise SinkBroken(str(exc)) from None
        if isinstance(ev, BodyData):
            return ev.data
        if isinstance(ev, MessageEnd):
            self.done = True
            self.trailers = ev.trailers
            return None
        raise SinkBroken(f"app connection ended mid-body ({ev!r})")

    def get_trailers(self) -> list[Header] | None:
        return self.trailers or None


async def _serve_h1_app(
    stream: trio.abc.Stream,
    first: bytes,
    proxy: HttpProxy,
    limits: H1Limits | None,
    drain: ServerDrain,
) -> None:
    conn = H1ServerConnection(limits)
    conn.receive_data(first)
    reader = _H1Reader(stream, conn)
    waiting: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    try:
        while True:
            event: Event | None = None
            try:
                # Between requests (not the first: its bytes are here) a drain closes
                # the idle connection; a request already started is answered in full.
                with waiting:
                    event = await reader.next_event()
            except Refusal as refusal:
                _log_refusal(proxy, refusal, "HTTP/1.1")
                with contextlib.suppress(*_WRITE_ERRORS):
                    await stream.send_all(refusal_response(refusal))
                return
            if not isinstance(event, RequestHead):
                return  # ConnectionClosed, or drained while idle
            head = event
            sink = _H1Sink(stream, conn, drain)
            source = _H1Body(reader, head, sink)
            body = RequestBody(
                None if source.done else source.receive, trailers=source.get_trailers
            )
            req = ProxyRequest(
                method=head.method,
                path=head.path,
                headers=head.headers,
                upstream_headers=functools.partial(h2_request_from_h1, head),
                body=body,
                protocol="HTTP/1.1",
                grpc=is_grpc(head.headers),
            )
            await proxy.handle(req, sink)
            # A body not read to its end (a local answer) leaves the connection
            # mid-message: close rather than guess where the next request starts.
            if sink.aborted or not sink.finished or not head.keep_alive or not source.done:
                return
            if drain.draining:
                return  # answered with Connection: close (or drained since): done
            while not conn.reusable:  # h11 still holds the empty body's end
                ev = conn.next_event()
                if ev is NEED_DATA and not reader.eof:
                    await reader.read_more()
                elif not isinstance(ev, MessageEnd):
                    break
            if not conn.reusable:
                return
            conn.start_next_cycle()
            waiting = drain.idle()
    finally:
        await trio.aclose_forcefully(stream)


def _log_refusal(proxy: HttpProxy, refusal: Refusal, protocol: str) -> None:
    """A request refused before routing (bad framing, bad path): access log + metrics."""
    trace = tracing.start(proxy.rng)
    record = AccessRecord(
        start_time=time.time(),
        duration=0.0,
        trace_id=trace.trace_id,
        span_id=trace.span_id,
        parent_span_id=None,
        source_cluster=proxy.source_cluster,
        source_workload=proxy.source_workload,
        destination_service=proxy.service,
        destination_cluster="",
        destination_zone="",
        upstream_endpoint="",
        locality_tier="local",
        route=None,
        method="",
        path="",
        protocol=protocol,
        status=refusal.status,
        grpc_status=None,
        retries=0,
        request_bytes=0,
        response_bytes=0,
        response_flags=("bad_request",),
    )
    proxy.metrics.observe(record)
    log.info(format_line(record))


# -- HTTP/2 app ------------------------------------------------------------------------


class _H2Sink:
    """Response sink onto one of the app's HTTP/2 streams."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream

    async def send_head(self, head: list[Header], *, end_stream: bool) -> None:
        try:
            await self.stream.send_headers(downstream_response_headers(head), end_stream=end_stream)
        except StreamReset as exc:
            raise SinkBroken(str(exc)) from None

    async def send_data(self, data: bytes) -> None:
        try:
            await self.stream.send_data(data)
        except StreamReset as exc:
            raise SinkBroken(str(exc)) from None

    async def send_end(self, trailers: Sequence[Header] | None) -> None:
        try:
            await self.stream.end(trailers)
        except StreamReset as exc:
            raise SinkBroken(str(exc)) from None

    def abort(self) -> None:
        self.stream.reset(ErrorCodes.INTERNAL_ERROR)


def _h2_body(stream: H2Stream) -> RequestBody:
    if stream.remote_ended and not stream._chunks:
        return RequestBody(None)

    async def receive() -> bytes | None:
        try:
            return await stream.receive_data()
        except StreamReset as exc:
            raise SinkBroken(str(exc)) from None

    return RequestBody(receive, trailers=lambda: stream.trailers)


async def _serve_h2_app(stream: trio.abc.Stream, proxy: HttpProxy, drain: ServerDrain) -> None:
    async def on_stream(s: H2Stream) -> None:
        head = s.head or []
        try:
            pseudo = request_pseudo(head)
            path = normalize_path(pseudo.path)
        except (HeaderError, BadPath) as exc:
            status = exc.status if isinstance(exc, BadPath) else 400
            _log_refusal(proxy, Refusal(status, "bad_request", str(exc)), "HTTP/2")
            await s.send_headers(local_response(status), end_stream=True)
            return
        regular = [(n, v) for n, v in head if not n.startswith(b":")]
        req = ProxyRequest(
            method=pseudo.method,
            path=path,
            headers=regular,
            upstream_headers=lambda trace: upstream_request_headers(head, path, trace),
            body=_h2_body(s),
            protocol="HTTP/2",
            grpc=is_grpc(regular),
        )
        await proxy.handle(req, _H2Sink(s))

    channel = H2Channel(stream, "server", on_stream=on_stream)
    with drain.track(channel):
        await channel.run()


# -- inbound ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboundTarget:
    """One served HTTP port: where its app listens and what it speaks."""

    service: str
    """``<service>.<namespace>``."""
    protocol: Literal["http", "http2"]
    """``http``: HTTP/1.1 to the app; ``http2``: h2c with prior knowledge."""
    app_host: str
    """App address."""
    app_port: int
    """App port."""


@dataclass(slots=True)
class InboundStatistics:
    """Counts for ``/stats`` and tests."""

    connections: int = 0
    """Caller connections served over HTTP/2 (each one a TLS handshake)."""
    streams: int = 0
    """Requests received."""
    active_connections: int = 0
    """Caller connections open now."""


class InboundHttp:
    """The destination side of HTTP ports: HTTP/2 from peer sidecars to the local app."""

    def __init__(
        self,
        *,
        local_cluster: str,
        local_workload: str,
        connect_timeout: float = 1.0,
        rng: random.Random | None = None,
        metrics: SidecarMetrics | None = None,
        services: Iterable[str] = (),
    ) -> None:
        self.local_cluster = local_cluster
        self.local_workload = local_workload
        self.connect_timeout = connect_timeout
        self.rng = rng if rng is not None else random.Random()
        self.metrics = metrics
        """Where requests are counted (``meshfed_sidecar_http_inbound_*``); None: not."""
        if metrics is not None:
            for service in services:
                metrics.http_inbound_active.labels(service)  # a 0 series from the start
        self.stats = InboundStatistics()
        self.drain_group = ServerDrain()
        """Every caller connection, drained on SIGTERM (:meth:`drain`)."""
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._h1: dict[InboundTarget, H1AppPool] = {}
        self._h2: dict[InboundTarget, H2Pool] = {}
        self.nursery: trio.Nursery | None = None
        """Where pooled h2c app connections run (set by the runner)."""

    async def serve(
        self, transport: trio.abc.Stream, target: InboundTarget, source_cluster: str
    ) -> None:
        """Serve one admitted caller connection until it closes."""
        self.stats.connections += 1
        self.stats.active_connections += 1

        async def on_stream(s: H2Stream) -> None:
            self.stats.streams += 1
            self.in_flight += 1
            if self.in_flight == 1:
                self._idle = trio.Event()
            active = (
                self.metrics.http_inbound_active.labels(target.service)
                if self.metrics is not None
                else None
            )
            if active is not None:
                active.inc()
            try:
                await self._forward(s, target, source_cluster)
            finally:
                if active is not None:
                    active.dec()
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

        channel = H2Channel(transport, "server", on_stream=on_stream)
        try:
            with self.drain_group.track(channel):
                await channel.run()
        finally:
            self.stats.active_connections -= 1

    def drain(self) -> None:
        """Graceful GOAWAY on every caller connection (SIGTERM): requests in flight
        finish, new ones are refused so that callers retry them on another endpoint."""
        self.drain_group.start()

    async def _forward(self, s: H2Stream, target: InboundTarget, source_cluster: str) -> None:
        head = s.head or []
        start, wall = trio.current_time(), time.time()
        regular = [(n, v) for n, v in head if not n.startswith(b":")]
        trace = tracing.from_headers(regular, self.rng)
        grpc = is_grpc(regular)
        flags: list[str] = []
        status = NO_RESPONSE
        sent = [0]
        method, path_text = "", ""
        resp_head: list[Header] | None = None
        trailers: Sequence[Header] | None = None
        try:
            pseudo = request_pseudo(head)
            method = pseudo.method
            path = normalize_path(pseudo.path)
            path_text = path.path
        except (HeaderError, BadPath) as exc:
            status = exc.status if isinstance(exc, BadPath) else 400
            flags.append("bad_request")
            await _answer_local(s, status, grpc)
        else:
            try:
                if target.protocol == "http":
                    resp_head, trailers = await self._to_h1_app(
                        s, target, pseudo, path, trace, sent
                    )
                else:
                    resp_head, trailers = await self._to_h2_app(s, target, path, trace, sent)
                status = int(resp_head[0][1]) if resp_head else NO_RESPONSE
            except ConnectFailed:
                status = 503
                flags.append("upstream_connect_failure")
                await _answer_local(s, status, grpc)
            except _AppBroken as exc:
                flags.append("upstream_reset")
                if exc.answered:
                    s.reset(ErrorCodes.INTERNAL_ERROR)
                else:
                    status = 502
                    await _answer_local(s, status, grpc)
            except StreamReset:
                flags.append("downstream_disconnect")
        record = AccessRecord(
            start_time=wall,
            duration=trio.current_time() - start,
            trace_id=trace.trace_id,
            span_id=trace.span_id,
            parent_span_id=trace.parent_span_id,
            source_cluster=source_cluster,
            source_workload="",
            destination_service=target.service,
            destination_cluster=self.local_cluster,
            destination_zone="",
            upstream_endpoint=f"{target.app_host}:{target.app_port}",
            locality_tier="inbound",
            route=None,
            method=method,
            path=path_text,
            protocol="HTTP/2",
            status=status,
            grpc_status=grpc_status(resp_head, trailers) if grpc and resp_head else None,
            retries=0,
            request_bytes=s.received_bytes,
            response_bytes=sent[0],
            response_flags=tuple(flags),
        )
        if self.metrics is not None:
            self.metrics.http_inbound_observe(
                source_cluster=source_cluster,
                destination_cluster=self.local_cluster,
                destination_service=target.service,
                code=record.code,
                duration=record.duration,
            )
        log.info(format_line(record))

    # -- to an HTTP/1.1 app ------------------------------------------------------------

    def _h1_pool(self, target: InboundTarget) -> H1AppPool:
        pool = self._h1.get(target)
        if pool is None:
            pool = self._h1[target] = H1AppPool(
                target.app_host, target.app_port, connect_timeout=self.connect_timeout
            )
        return pool

    async def _to_h1_app(
        self,
        s: H2Stream,
        target: InboundTarget,
        pseudo: RequestPseudo,
        path: RequestPath,
        trace: tracing.TraceContext,
        sent: list[int],
    ) -> tuple[list[Header], Sequence[Header] | None]:
        head = s.head or []
        regular = strip_hop_by_hop([(n, v) for n, v in head if not n.startswith(b":")])
        fields = [
            (b"host", pseudo.authority),
            *tracing.replace_headers([(n, v) for n, v in regular if n != b"host"], trace),
        ]
        no_body = s.remote_ended and not s._chunks
        lengths = get_all(regular, b"content-length")
        length = int(lengths[0]) if lengths and lengths[0].isdigit() else (0 if no_body else None)
        pool = self._h1_pool(target)
        app = await pool.acquire()
        ok = False
        try:
            try:
                await app.stream.send_all(
                    app.h1.send_request(pseudo.method, path.target, fields, content_length=length)
                )
            except _WRITE_ERRORS as exc:
                raise _AppBroken(False) from exc
            with lone_errors():
                resp, trailers = await self._h1_exchange(s, app.stream, app.h1, no_body, sent)
            ok = True
            return resp, trailers
        finally:
            if ok:
                await pool.release(app)
            else:
                await trio.aclose_forcefully(app.stream)

    @staticmethod
    async def _h1_exchange(
        s: H2Stream, app: trio.abc.Stream, h1: H1ClientConnection, no_body: bool, sent: list[int]
    ) -> tuple[list[Header], Sequence[Header] | None]:
        async with trio.open_nursery() as nursery:
            if no_body:
                await _send_h1(app, h1.send_end())
            else:
                nursery.start_soon(_pump_h2_to_h1, s, app, h1)
            resp = await _h1_response_to_h2(s, app, h1, sent)
            # An app that answered before reading the whole body wants no more of it;
            # the connection is then not reusable (h1 says so) and gets closed.
            nursery.cancel_scope.cancel()
        return resp

    # -- to an HTTP/2 (h2c) app --------------------------------------------------------

    def _h2_pool(self, target: InboundTarget) -> H2Pool:
        pool = self._h2.get(target)
        if pool is None:
            assert self.nursery is not None, "InboundHttp.nursery must be set for h2c apps"

            async def dial() -> Dialed:
                try:
                    with trio.fail_after(self.connect_timeout):
                        return Dialed(await trio.open_tcp_stream(target.app_host, target.app_port))
                except (OSError, trio.TooSlowError) as exc:
                    raise ConnectFailed("app_unavailable") from exc

            pool = self._h2[target] = H2Pool(f"app:{target.service}", dial, self.nursery)
        return pool

    async def _to_h2_app(
        self,
        s: H2Stream,
        target: InboundTarget,
        path: RequestPath,
        trace: tracing.TraceContext,
        sent: list[int],
    ) -> tuple[list[Header], Sequence[Header] | None]:
        head = s.head or []
        no_body = s.remote_ended and not s._chunks
        try:
            up = await self._h2_pool(target).open_stream(
                upstream_request_headers(head, path, trace), end_stream=no_body
            )
        except StreamReset as exc:
            raise _AppBroken(False) from exc
        try:
            with lone_errors():
                return await self._h2_exchange(s, up, no_body, sent)
        except StreamReset as exc:
            up.reset()
            if exc is up.error:
                raise _AppBroken(up.head is not None) from exc
            raise

    @staticmethod
    async def _h2_exchange(
        s: H2Stream, up: H2Stream, no_body: bool, sent: list[int]
    ) -> tuple[list[Header], Sequence[Header] | None]:
        async with trio.open_nursery() as nursery:
            if not no_body:
                nursery.start_soon(_pump_h2_to_h2, s, up)
            resp = await up.receive_head()
            await s.send_headers(
                downstream_response_headers(resp),
                end_stream=up.remote_ended and not up._chunks,
            )
            if not (up.remote_ended and not up._chunks):
                while (chunk := await up.receive_data()) is not None:
                    await s.send_data(chunk)
                    sent[0] += len(chunk)
                await s.end(up.trailers)
            nursery.cancel_scope.cancel()
        return resp, up.trailers

    async def wait_idle(self) -> None:
        """Return when no request is in flight and, once :meth:`drain` was called, every
        caller connection has closed (graceful drain)."""
        await self._idle.wait()
        if self.drain_group.draining:
            await self.drain_group.wait_closed()

    async def aclose(self) -> None:
        """Close pooled app connections."""
        for h1 in self._h1.values():
            await h1.aclose()
        for h2 in self._h2.values():
            await h2.aclose()


class _AppBroken(Exception):
    """The local app's connection broke; ``answered``: the response had started."""

    def __init__(self, answered: bool) -> None:
        super().__init__("app connection broke")
        self.answered = answered


async def _answer_local(s: H2Stream, status: int, grpc: bool) -> None:
    with contextlib.suppress(StreamReset):
        await s.send_headers(local_response(status, grpc=grpc), end_stream=True)


async def _send_h1(stream: trio.abc.Stream, data: bytes) -> None:
    if data:
        try:
            await stream.send_all(data)
        except _WRITE_ERRORS as exc:
            raise _AppBroken(False) from exc


async def _pump_h2_to_h1(s: H2Stream, app: trio.abc.Stream, h1: H1ClientConnection) -> None:
    try:
        while (chunk := await s.receive_data()) is not None:
            await _send_h1(app, h1.send_data(chunk))
        await _send_h1(app, h1.send_end(s.trailers or ()))
    except StreamReset:
        # The caller gave up mid-body: the app must not see a complete request.
        await trio.aclose_forcefully(app)
    except _AppBroken:
        pass  # the response side notices


async def _pump_h2_to_h2(s: H2Stream, up: H2Stream) -> None:
    try:
        while (chunk := await s.receive_data()) is not None:
            await up.send_data(chunk)
        await up.end(s.trailers)
    except StreamReset:
        up.reset()


async def _h1_response_to_h2(
    s: H2Stream, app: trio.abc.Stream, h1: H1ClientConnection, sent: list[int]
) -> tuple[list[Header], Sequence[Header] | None]:
    async def next_event() -> Event:
        while True:
            try:
                ev = h1.next_event()
            except Refusal as exc:
                raise _AppBroken(answered) from exc
            if ev is not NEED_DATA:
                return ev
            try:
                data = bytes(await app.receive_some(READ_SIZE))
            except _WRITE_ERRORS:
                data = b""
            h1.receive_data(data)

    answered = False
    while True:
        ev = await next_event()
        if isinstance(ev, ResponseHead) and ev.status >= 200:
            break
    assert isinstance(ev, ResponseHead)
    head: list[Header] = [(b":status", str(ev.status).encode("ascii")), *ev.headers]
    if ev.framing.content_length is not None:
        head.append((b"content-length", str(ev.framing.content_length).encode("ascii")))
    first = await next_event()
    answered = True
    await s.send_headers(head, end_stream=isinstance(first, MessageEnd) and not first.trailers)
    ev2 = first
    while True:
        if isinstance(ev2, BodyData):
            await s.send_data(ev2.data)
            sent[0] += len(ev2.data)
        elif isinstance(ev2, MessageEnd):
            if ev2.trailers or not s._local_ended:
                await s.end(ev2.trailers or None)
            return head, ev2.trailers or None
        ev2 = await next_event()


async def serve_http_listener(
    proxy: HttpProxy,
    host: str,
    port: int,
    handler_nursery: trio.Nursery,
    *,
    drain: ServerDrain | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The listener of an HTTP upstream (as ``serve_outbound``; connections run in
    ``handler_nursery`` so closing the listener leaves live requests alone; ``drain``
    drains them on SIGTERM)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await serve_app_connection(stream, proxy, drain=drain)
        except Exception as exc:
            # Handlers run in the sidecar's connection nursery: an escaped bug would
            # stop every connection. Log it and drop this one.
            log.info(json.dumps({"event": "http_connection_failed", "error": repr(exc)[:300]}))
            await trio.aclose_forcefully(stream)

    task_status.started(bound)
    await trio.serve_listeners(handler, listeners, handler_nursery=handler_nursery)
