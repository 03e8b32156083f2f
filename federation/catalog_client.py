"""The catalog subscriber used by sidecars and gateways: one mTLS HTTP/2 connection to
the cluster's federation agent.

``await nursery.start(client.run)`` returns at once: the client first loads the
catalog persisted at ``state_path`` (if any), so a proxy that starts while its agent
is down routes on the last catalog it had (static stability, BAD_INPUTS 24), then
connects in the background, retrying with capped exponential backoff and full jitter.
On each connection it:

1. verifies the agent's SVID is exactly ``expected_agent_id`` (the project's
   per-domain validation, :func:`trust.tls.handshake_and_verify`);
2. opens ``GET /v1/catalog`` with the epoch/version it holds, so a reconnect to the
   same agent incarnation costs one Delta, not a Snapshot;
3. re-registers every endpoint this proxy registered before: the agent ties them to
   the connection and withdraws them when it drops.

Messages are applied to a :class:`~federation.catalog.CatalogView` as they arrive; a
delta that does not chain (:class:`~federation.catalog.NeedSnapshot`), a heartbeat
with another version, or an undecodable stream resets the catalog stream and opens a
new one asking for a snapshot. The catalog is written to ``state_path`` atomically
(temp file, fsync, rename, directory fsync) at most every ``persist_interval``.

Flow control does the back-pressure: DATA is acknowledged to h2 only after it was
decoded and applied, so a slow proxy slows its own stream, and the agent's bound on
queued messages turns a long stall into one fresh snapshot.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import h2.events as ev
import h2.exceptions as h2x
import trio
from cryptography import x509
from h2.errors import ErrorCodes

from federation import keys
from federation.catalog import Catalog, CatalogView, NeedSnapshot
from federation.h2guard import recommended_h2_config
from federation.model import EndpointRecord, RecordError
from federation.names import InvalidName
from federation.stream_codec import (
    DEFAULT_MAX_LINE,
    Delta,
    Heartbeat,
    Message,
    Snapshot,
    StreamDecoder,
    StreamError,
    Synced,
)
from trust.atomicfile import write_atomic
from trust.errors import HandshakeRefused
from trust.spiffe import SpiffeId
from trust.tls import TlsContextHolder, bootstrap_client_context, handshake_and_verify
from trust.validate import TrustBundleSet

__all__ = [
    "AgentUnavailable",
    "CatalogClient",
    "CatalogClientError",
    "ClientConfig",
    "ClientStatistics",
    "RequestRefused",
    "backoff_delay",
]

log = logging.getLogger("meshfed.catalog_client")

_ERROR_HEADERS = (b"meshfed-reason", b"meshfed-detail")


class CatalogClientError(Exception):
    """Base of the client's errors."""


class AgentUnavailable(CatalogClientError):
    """The agent could not be reached, or the connection broke mid-request."""


class RequestRefused(CatalogClientError):
    """The agent answered with an error; ``reason`` is its stable ``meshfed-reason``."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status, self.reason, self.detail = status, reason, detail
        super().__init__(f"agent refused ({status} {reason}): {detail}")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Retry, timing and persistence settings."""

    backoff_initial: float = 0.5
    """First reconnect delay (seconds), before jitter."""
    backoff_max: float = 30.0
    """Cap on the reconnect delay."""
    backoff_multiplier: float = 2.0
    """Growth per failed attempt."""
    connect_timeout: float = 10.0
    """TCP connect plus TLS handshake."""
    request_timeout: float = 10.0
    """One register/deregister/CSR request."""
    stream_idle_timeout: float = 20.0
    """No bytes from the agent for this long (several heartbeats): the connection is dead."""
    persist_interval: float = 0.5
    """At most one catalog write per interval under churn."""
    persist_in_thread: bool = True
    """Write the file from a worker thread so fsync never stalls the data path; tests
    with an autojump MockClock turn it off (a thread looks idle to the clock)."""
    max_line: int = DEFAULT_MAX_LINE
    """Largest message accepted from the agent."""


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """Counters for metrics and tests."""

    connects: int
    """Connections that passed the handshake."""
    connect_failures: int
    """Attempts that failed before or during the handshake, or broke."""
    snapshots: int
    """Snapshots applied."""
    deltas: int
    """Deltas applied."""
    resyncs: int
    """Catalog streams reopened for a snapshot (gap, heartbeat mismatch, bad stream)."""
    persisted: int
    """Catalog files written."""
    persist_failures: int
    """Catalog writes that failed (the in-memory catalog keeps serving)."""
    loaded_from_disk: bool
    """The catalog held at start came from ``state_path``."""
    last_error: str | None
    """The last connection error, for ``meshfed status``."""


def backoff_delay(attempt: int, config: ClientConfig, rng: random.Random) -> float:
    """Delay before reconnect ``attempt`` (0-based): capped exponential, full jitter
    (uniform in [0, cap]) so a fleet of proxies restarting together spreads out."""
    cap = min(config.backoff_max, config.backoff_initial * config.backoff_multiplier**attempt)
    return rng.uniform(0.0, cap)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _refusal(status: int, headers: dict[bytes, bytes]) -> RequestRefused:
    reason, detail = (headers.get(h, b"").decode("ascii", "replace") for h in _ERROR_HEADERS)
    return RequestRefused(status, reason or "http_error", detail)


class _Resync(Exception):
    """The catalog stream must be reopened asking for a snapshot."""


@dataclass(slots=True)
class _Pending:
    done: trio.Event
    status: int = 0
    headers: dict[bytes, bytes] | None = None
    body: bytearray | None = None
    broken: bool = False


class _Session:
    """One HTTP/2 connection to the agent (client side)."""

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        self.stream = stream
        self.h2 = recommended_h2_config("client").new_connection()
        self._lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self.catalog_sid: int | None = None
        self.on_catalog: Callable[[bytes], None] | None = None

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def request(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        sid = self.h2.get_next_available_stream_id()
        pending = _Pending(trio.Event(), body=bytearray())
        self._pending[sid] = pending
        self.h2.send_headers(
            sid,
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", b"meshfed-agent"),
                (b":path", path.encode()),
                *headers,
            ],
            end_stream=not body,
        )
        if body:
            # Request bodies are small (a CSR, an endpoint record) and the agent opens a
            # 16 MiB window at once, so no waiting for WINDOW_UPDATE is needed.
            if len(body) > self.h2.local_flow_control_window(sid):
                raise CatalogClientError(f"{len(body)}-byte body exceeds the agent's window")
            step = self.h2.max_outbound_frame_size
            for i in range(0, len(body), step):
                end = i + step >= len(body)
                self.h2.send_data(sid, body[i : i + step], end_stream=end)
        await self.flush()
        await pending.done.wait()
        self._pending.pop(sid, None)
        if pending.broken:
            raise AgentUnavailable(f"connection to the agent broke during {method} {path}")
        return pending.status, pending.headers or {}, bytes(pending.body or b"")

    async def open_catalog(self, resume: tuple[str, int] | None) -> None:
        sid = self.h2.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"meshfed-agent"),
            (b":path", b"/v1/catalog"),
        ]
        if resume is not None:
            headers += [
                (b"meshfed-epoch", resume[0].encode()),
                (b"meshfed-version", str(resume[1]).encode()),
            ]
        self.h2.send_headers(sid, headers, end_stream=True)
        self.catalog_sid = sid
        await self.flush()

    async def reset_catalog(self) -> None:
        if self.catalog_sid is not None:
            with contextlib.suppress(h2x.StreamClosedError):
                self.h2.reset_stream(self.catalog_sid, ErrorCodes.CANCEL)
            self.catalog_sid = None

    async def read_loop(self, idle_timeout: float, read_size: int = 65536) -> None:
        """Read until the connection ends; raises _Resync, RequestRefused, AgentUnavailable."""
        try:
            while True:
                with trio.move_on_after(idle_timeout) as scope:
                    data = await self.stream.receive_some(read_size)
                if scope.cancelled_caught:
                    raise AgentUnavailable(f"no bytes from the agent for {idle_timeout} s")
                if not data:
                    raise AgentUnavailable("the agent closed the connection")
                try:
                    events = self.h2.receive_data(bytes(data))
                except h2x.ProtocolError as exc:
                    raise AgentUnavailable(f"HTTP/2 protocol error from the agent: {exc}") from None
                for event in events:
                    self._on_event(event)
                await self.flush()
        finally:
            for pending in self._pending.values():
                pending.broken = True
                pending.done.set()

    def _on_event(self, event: ev.Event) -> None:
        sid = getattr(event, "stream_id", None)
        if isinstance(event, ev.ResponseReceived):
            assert sid is not None
            headers = {bytes(k): bytes(v) for k, v in event.headers or ()}
            status = int(headers.get(b":status", b"0") or 0)
            if sid == self.catalog_sid:
                if status != 200:
                    raise _refusal(status, headers)
                return
            pending = self._pending.get(sid)
            if pending is not None:
                pending.status, pending.headers = status, headers
        elif isinstance(event, ev.DataReceived):
            assert sid is not None
            if sid == self.catalog_sid and self.on_catalog is not None:
                self.on_catalog(bytes(event.data))
            else:
                pending = self._pending.get(sid)
                if pending is not None and pending.body is not None:
                    pending.body += event.data
            # Acknowledged only after it was applied: back-pressure on a slow proxy.
            self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, ev.StreamEnded | ev.StreamReset):
            if sid == self.catalog_sid:
                raise AgentUnavailable("the agent ended the catalog stream")
            pending = self._pending.get(sid) if sid is not None else None
            if pending is not None:
                pending.broken = isinstance(event, ev.StreamReset) and pending.status == 0
                pending.done.set()
        elif isinstance(event, ev.ConnectionTerminated):
            raise AgentUnavailable(f"the agent sent GOAWAY ({event.error_code!r})")


_RETRYABLE = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    HandshakeRefused,
    CatalogClientError,
)

Connector = Callable[[], Awaitable[trio.abc.Stream]]


class CatalogClient:
    """A proxy's view of its cluster's catalog, kept current from the agent."""

    def __init__(
        self,
        host: str,
        port: int,
        tls_holder: TlsContextHolder,
        bundles_fn: Callable[[], TrustBundleSet],
        expected_agent_id: SpiffeId,
        state_path: Path | None,
        *,
        config: ClientConfig | None = None,
        connect: Connector | None = None,
        now_fn: Callable[[], dt.datetime] = _utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.tls_holder = tls_holder
        self.bundles_fn = bundles_fn
        self.expected_agent_id = expected_agent_id
        self.state_path = state_path
        self.config = config or ClientConfig()
        self._connect = connect or self._tcp_connect
        self.now_fn = now_fn
        self._rng = rng or random.Random()
        self.synced = trio.Event()
        """Set once the agent reported its first full store sync (and stays set)."""
        self._view = CatalogView()
        self._changed = trio.Event()
        self._session: _Session | None = None
        self._decoder = StreamDecoder(self.config.max_line)
        self._agent_degraded = False
        self._desired: dict[str, EndpointRecord] = {}
        self._dirty = trio.Event()
        self._stats = {
            "connects": 0,
            "connect_failures": 0,
            "snapshots": 0,
            "deltas": 0,
            "resyncs": 0,
            "persisted": 0,
            "persist_failures": 0,
        }
        self._loaded = False
        self._progressed = False
        self._last_error: str | None = None

    # -- what proxies read -----------------------------------------------------------

    @property
    def catalog(self) -> Catalog | None:
        """The current catalog (from the agent, or the persisted one until it answers)."""
        return self._view.catalog

    @property
    def connected(self) -> bool:
        """True while a verified connection to the agent is up."""
        return self._session is not None

    @property
    def degraded(self) -> bool:
        """True while the catalog may be stale: no agent connection, or the agent itself
        cannot reach the store."""
        return self._session is None or self._agent_degraded

    async def wait_for(self, predicate: Callable[[Catalog], bool]) -> Catalog:
        """Wait until the catalog satisfies ``predicate``; returns that catalog."""
        while True:
            catalog = self._view.catalog
            if catalog is not None and predicate(catalog):
                return catalog
            await self._changed.wait()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            **self._stats, loaded_from_disk=self._loaded, last_error=self._last_error
        )

    # -- run -------------------------------------------------------------------------

    async def _tcp_connect(self) -> trio.abc.Stream:
        return await trio.open_tcp_stream(self.host, self.port)

    async def _open(self, *, bootstrap: bool = False) -> _Session:
        with trio.fail_after(self.config.connect_timeout):
            transport = await self._connect()
        ctx = bootstrap_client_context(self.bundles_fn()) if bootstrap else self.tls_holder.client
        stream = trio.SSLStream(transport, ctx, server_hostname=self.host)
        await handshake_and_verify(
            stream,
            self.bundles_fn(),
            self.now_fn,
            expected={self.expected_agent_id},
            handshake_timeout=self.config.connect_timeout,
        )
        session = _Session(stream)
        await session.flush()
        return session

    def _load_persisted(self) -> None:
        if self.state_path is None:
            return
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read persisted catalog %s: %s", self.state_path, exc)
            return
        try:
            catalog = Catalog.from_json(data)
        except (RecordError, ValueError) as exc:
            log.warning("persisted catalog %s refused, starting empty: %s", self.state_path, exc)
            return
        self._view.apply_snapshot(catalog)
        self._loaded = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the persisted catalog, then keep a connection to the agent until cancelled."""
        self._load_persisted()
        async with trio.open_nursery() as nursery:
            if self.state_path is not None:
                nursery.start_soon(self._persister)
            task_status.started()
            attempt = 0
            while True:
                self._progressed = False
                try:
                    await self._one_connection()
                except _RETRYABLE as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    log.info("catalog stream to %s:%d: %s", self.host, self.port, exc)
                if self._progressed:
                    attempt = 0
                else:
                    self._stats["connect_failures"] += 1
                await trio.sleep(backoff_delay(attempt, self.config, self._rng))
                attempt += 1

    async def _one_connection(self) -> None:
        """Serve one connection; only ever ends by raising (broken, refused, timed out)."""
        session = await self._open()
        self._stats["connects"] += 1

        def on_catalog(data: bytes) -> None:
            try:
                messages = self._decoder.feed(data)
            except StreamError as exc:
                for message in exc.messages:
                    self._apply(message)
                raise _Resync(f"undecodable catalog stream: {exc}") from None
            for message in messages:
                self._apply(message)
                self._progressed = True

        session.on_catalog = on_catalog
        # Errors are carried out of the nursery by hand: trio would wrap them in an
        # ExceptionGroup, and run() retries on the plain ones.
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._session = session
                self._notify()
                try:
                    await session.open_catalog(self._resume_point())
                    nursery.start_soon(self._reregister, session)
                    while True:
                        try:
                            await session.read_loop(self.config.stream_idle_timeout)
                        except _Resync as exc:
                            log.info("catalog stream resync: %s", exc)
                            self._stats["resyncs"] += 1
                            self._decoder = StreamDecoder(self.config.max_line)
                            await session.reset_catalog()
                            await session.open_catalog(None)
                except _RETRYABLE as exc:
                    error = exc
                nursery.cancel_scope.cancel()
        finally:
            self._session = None
            self._decoder = StreamDecoder(self.config.max_line)
            self._notify()
            await trio.aclose_forcefully(session.stream)
        if error is not None:
            raise error

    def _resume_point(self) -> tuple[str, int] | None:
        epoch, version = self._view.epoch, self._view.version
        return None if epoch is None or version is None else (epoch, version)

    def _apply(self, message: Message) -> None:
        if isinstance(message, Snapshot):
            self._view.apply_snapshot(message.catalog)
            self._stats["snapshots"] += 1
        elif isinstance(message, Delta):
            try:
                self._view.apply_delta(message)
            except NeedSnapshot as exc:
                raise _Resync(str(exc)) from None
            self._stats["deltas"] += 1
        elif isinstance(message, Synced):
            self.synced.set()
            return
        elif isinstance(message, Heartbeat):
            self._agent_degraded = message.agent_degraded
            if message.version != self._view.version:
                raise _Resync(
                    f"heartbeat at version {message.version}, view holds {self._view.version}"
                )
            self._notify()
            return
        self._dirty.set()
        self._notify()

    # -- persistence -----------------------------------------------------------------

    async def _persister(self) -> None:
        path = self.state_path
        assert path is not None
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            catalog = self._view.catalog
            if catalog is not None:
                data = catalog.to_json()
                try:
                    if self.config.persist_in_thread:
                        await trio.to_thread.run_sync(write_atomic, path, data)
                    else:
                        write_atomic(path, data)
                    self._stats["persisted"] += 1
                except OSError as exc:
                    self._stats["persist_failures"] += 1
                    log.warning("cannot persist the catalog to %s: %s", path, exc)
            await trio.sleep(self.config.persist_interval)

    # -- endpoint registration -------------------------------------------------------

    async def _reregister(self, session: _Session) -> None:
        for record in list(self._desired.values()):
            try:
                await self._post_endpoint(session, record)
            except RequestRefused as exc:
                log.warning("agent refused endpoint %s: %s", record.key(), exc)
                self._desired.pop(record.key(), None)
            except (AgentUnavailable, trio.TooSlowError):
                return

    async def _post_endpoint(self, session: _Session, record: EndpointRecord) -> None:
        with trio.fail_after(self.config.request_timeout):
            status, headers, _ = await session.request(
                "POST",
                "/v1/endpoints",
                [(b"content-type", b"application/json")],
                record.to_json(),
            )
        if status != 204:
            raise _refusal(status, headers)

    async def register_endpoint(self, record: EndpointRecord) -> None:
        """Register ``record`` with the agent, now if connected and again after every
        reconnect. Raises RequestRefused (and forgets the record) if the agent refuses
        it; returns without error while the agent is unreachable (it is sent on connect)."""
        self._desired[record.key()] = record
        session = self._session
        if session is None:
            return
        try:
            await self._post_endpoint(session, record)
        except RequestRefused:
            self._desired.pop(record.key(), None)
            raise
        except (AgentUnavailable, trio.TooSlowError):
            return

    async def deregister_endpoint(self, key: str) -> None:
        """Withdraw an endpoint this client registered (by its store key)."""
        try:
            parsed = keys.parse(key)
        except InvalidName as exc:
            raise ValueError(str(exc)) from None
        if parsed.kind != "endpoints":
            raise ValueError(f"{key} is not an endpoint key")
        self._desired.pop(key, None)
        session = self._session
        if session is None:
            return
        _, ns, svc, eid = parsed.parts
        try:
            with trio.fail_after(self.config.request_timeout):
                status, headers, _ = await session.request(
                    "DELETE", f"/v1/endpoints/{ns}/{svc}/{eid}", []
                )
        except (AgentUnavailable, trio.TooSlowError):
            return  # the connection is gone, and with it the registration
        if status != 204 and not (
            status == 404 and headers.get(b"meshfed-reason") == b"not_registered_here"
        ):
            raise _refusal(status, headers)

    # -- SVIDs -----------------------------------------------------------------------

    async def request_svid(
        self, csr_pem: bytes, join_token: str | None = None
    ) -> tuple[x509.Certificate, ...]:
        """Have the agent sign ``csr_pem``: with ``join_token``, over a connection without
        a client certificate (the first SVID); without, authenticated by the current SVID
        (renewal). Returns the chain, leaf first. Raises RequestRefused or AgentUnavailable."""
        try:
            session = await self._open(bootstrap=join_token is not None)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, HandshakeRefused) as exc:
            raise AgentUnavailable(
                f"cannot reach the agent at {self.host}:{self.port}: {exc}"
            ) from exc
        headers = [(b"content-type", b"application/pkcs10")]
        if join_token is not None:
            headers.append((b"authorization", f"JoinToken {join_token}".encode()))
        answer: tuple[int, dict[bytes, bytes], bytes] | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_quietly, session)
                with trio.move_on_after(self.config.request_timeout):
                    with contextlib.suppress(AgentUnavailable):
                        answer = await session.request("POST", "/v1/svid", headers, csr_pem)
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(session.stream)
        if answer is None:
            raise AgentUnavailable("the agent did not answer the CSR (timeout or broken)")
        status, resp_headers, body = answer
        if status != 200:
            raise _refusal(status, resp_headers)
        try:
            return tuple(x509.load_pem_x509_certificates(body))
        except ValueError as exc:
            raise AgentUnavailable(f"the agent sent an unreadable chain: {exc}") from None

    async def _read_quietly(self, session: _Session) -> None:
        with contextlib.suppress(
            CatalogClientError, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await session.read_loop(math.inf)
