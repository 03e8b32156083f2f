"""The agent's HTTP/2 API as a sans-IO state machine: bytes in, typed requests out.

One :class:`ServerProtocol` per TLS connection. It owns the ``H2Connection`` and an
:class:`~federation.h2guard.H2Guard`, parses and authorises requests, answers every
refusal itself, and hands the adapter (``stream_server.py``) only requests that need
I/O: :class:`Subscribe`, :class:`RegisterEndpoint`, :class:`DeregisterEndpoint`,
:class:`SignCsr`. The adapter answers them with :meth:`ServerProtocol.respond` or, for
a subscription, :meth:`ServerProtocol.enqueue`; :meth:`ServerProtocol.pump` moves
queued bytes into h2 within the peer's flow-control window; ``data_to_send`` is what
to write.

Authorisation (the peer identity comes from the TLS handshake; None = no client
certificate, which the TLS layer allows only so the bootstrap path can exist):

=========================  ============================================================
request                    who may
=========================  ============================================================
GET  /v1/catalog           an SVID of the agent's trust domain
POST /v1/endpoints         same, for a record whose ``spiffe_id`` is the caller's own
                           and whose ``cluster`` is the agent's
DELETE /v1/endpoints/...   same, for an endpoint this connection registered
POST /v1/svid              an SVID of the agent's domain, for a CSR naming that same
                           ID (renewal); or no certificate plus ``authorization:
                           JoinToken <token>`` (bootstrap; the token decides the ID)
=========================  ============================================================

Anything else from an anonymous peer is 401; a foreign trust domain or another
identity is 403. Refusals are header-only responses carrying ``meshfed-reason`` (a
stable label) and ``meshfed-detail`` (free text), so they need no flow-control window.

Back-pressure (BAD_INPUTS 23): a subscription's queue of encoded messages is bounded
(``StreamLimits.max_queued_bytes``). A message that would overflow it drops the
whole queue (never a half-sent line) and marks the subscription *stale*: later
messages are dropped until the queue has drained and the peer's window is open
again, then the adapter sends one fresh Snapshot (:meth:`ServerProtocol.resync_ready`,
:meth:`ServerProtocol.resync`). So a subscriber that stops reading costs at most the
bound plus one message, and never delays anyone else.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Final

import h2.events as ev
import h2.exceptions as h2x
from cryptography import x509
from h2.errors import ErrorCodes

from federation import keys
from federation.h2guard import ALLOW, Close, H2Guard, H2Tuning, RejectStream, recommended_h2_config
from federation.model import EndpointRecord, RecordError
from federation.names import InvalidName
from trust.errors import InvalidSpiffeId
from trust.spiffe import SpiffeId

__all__ = [
    "CATALOG_PATH",
    "ENDPOINTS_PATH",
    "SVID_PATH",
    "DeregisterEndpoint",
    "ProtocolStatistics",
    "RegisterEndpoint",
    "Request",
    "ServerProtocol",
    "SignCsr",
    "StreamGone",
    "StreamLimits",
    "Subscribe",
    "SubscriptionStatistics",
]

CATALOG_PATH: Final = "/v1/catalog"
ENDPOINTS_PATH: Final = "/v1/endpoints"
SVID_PATH: Final = "/v1/svid"
EPOCH_HEADER: Final = b"meshfed-epoch"
VERSION_HEADER: Final = b"meshfed-version"
REASON_HEADER: Final = b"meshfed-reason"
DETAIL_HEADER: Final = b"meshfed-detail"
NDJSON: Final = b"application/x-ndjson"
PEM_CHAIN: Final = b"application/pem-certificate-chain"
_MAX_DETAIL: Final = 240


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-connection limits of the agent API."""

    max_body: int = 64 * 1024
    """Largest request body (a CSR or an endpoint record); more gets 413."""
    max_queued_bytes: int = 1 << 20
    """Bound on one subscription's queued messages; past it the queue is dropped and the
    subscriber gets a fresh snapshot once it reads again."""
    max_subscriptions: int = 4
    """Catalog streams per connection (a proxy needs one); more gets 429."""
    max_concurrent_streams: int = 32
    """SETTINGS_MAX_CONCURRENT_STREAMS; h2 closes a connection that opens more."""
    max_header_list_size: int = 16 * 1024
    """SETTINGS_MAX_HEADER_LIST_SIZE; the guard rejects single streams above half of it."""
    write_chunk: int = 64 * 1024
    """Bytes one subscription may hand h2 per pump, so one busy stream cannot starve others."""

    def __post_init__(self) -> None:
        for name in (
            "max_body",
            "max_queued_bytes",
            "max_subscriptions",
            "max_concurrent_streams",
            "max_header_list_size",
            "write_chunk",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"StreamLimits.{name} must be >= 1")


# -- requests handed to the adapter ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    """GET /v1/catalog: 200 and the stream headers are already queued."""

    stream_id: int
    """The response stream; feed it with :meth:`ServerProtocol.enqueue`."""
    epoch: str | None
    """The epoch the subscriber holds (``meshfed-epoch``), None for a fresh subscriber."""
    version: int | None
    """The version it holds (``meshfed-version``); set exactly when ``epoch`` is."""


@dataclass(frozen=True, slots=True)
class RegisterEndpoint:
    """POST /v1/endpoints, authorised: answer 204 once the registrar took it."""

    stream_id: int
    """Stream to answer on."""
    record: EndpointRecord
    """The record; its spiffe_id is the caller's and its cluster the agent's."""


@dataclass(frozen=True, slots=True)
class DeregisterEndpoint:
    """DELETE /v1/endpoints/<namespace>/<service>/<endpoint_id> of this connection's own."""

    stream_id: int
    """Stream to answer on."""
    key: str
    """The endpoint's store key."""


@dataclass(frozen=True, slots=True)
class SignCsr:
    """POST /v1/svid: a parseable CSR naming one SPIFFE ID, authorised as far as the
    protocol can tell. With ``join_token`` None the caller's SVID has this very ID
    (renewal); otherwise the adapter must redeem the token and check its identity."""

    stream_id: int
    """Stream to answer on."""
    csr_pem: bytes
    """The CSR as sent."""
    spiffe_id: SpiffeId
    """The one URI SAN of the CSR."""
    join_token: str | None
    """The bootstrap token, for an anonymous caller."""


@dataclass(frozen=True, slots=True)
class StreamGone:
    """The peer reset or abandoned a stream the adapter may be serving; stop feeding it."""

    stream_id: int
    """The stream."""


Request = Subscribe | RegisterEndpoint | DeregisterEndpoint | SignCsr | StreamGone


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """One subscription's back-pressure state."""

    stream_id: int
    """The stream."""
    version: int | None
    """The version the subscriber will hold once it read everything queued."""
    queued_bytes: int
    """Encoded bytes queued and not yet given to h2."""
    max_queued_bytes: int
    """The high-water mark of ``queued_bytes``."""
    stale: bool
    """Messages are being dropped; a snapshot follows when the peer reads again."""
    dropped_messages: int
    """Messages dropped because the subscriber fell behind."""
    resyncs: int
    """Snapshots sent to catch up after falling behind."""


@dataclass(frozen=True, slots=True)
class ProtocolStatistics:
    """Counters for one connection."""

    requests: int
    """Requests received (complete or refused)."""
    refusals: dict[str, int]
    """Refused requests by ``meshfed-reason``."""
    subscriptions: tuple[SubscriptionStatistics, ...]
    """Open subscriptions."""
    closed: str | None
    """Why the connection is closing, if it is."""


# -- internal state ----------------------------------------------------------------


@dataclass(slots=True)
class _Incoming:
    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class _Outbound:
    """Bytes queued for one response stream; ``bound`` is set for subscriptions."""

    bound: int | None
    queue: collections.deque[bytes] = field(default_factory=collections.deque)
    partial: memoryview | None = None
    queued: int = 0
    end_after: bool = False
    version: int | None = None
    stale: bool = False
    dropped: int = 0
    resyncs: int = 0
    high_water: int = 0

    def has_data(self) -> bool:
        return self.partial is not None or bool(self.queue)

    def push(self, data: bytes) -> None:
        self.queue.append(data)
        self.queued += len(data)
        self.high_water = max(self.high_water, self.queued)

    def take(self, n: int) -> bytes:
        if self.partial is None:
            self.partial = memoryview(self.queue.popleft())
        chunk = bytes(self.partial[:n])
        rest = self.partial[n:]
        self.partial = rest if len(rest) else None
        self.queued -= len(chunk)
        return chunk


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status, self.reason, self.detail = status, reason, detail
        super().__init__(f"{status} {reason}: {detail}")


def _clean_detail(text: str) -> bytes:
    # Header values must be visible ASCII; detail is for humans, so lossy is fine.
    out = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)
    return out[:_MAX_DETAIL].encode("ascii")


def csr_identity(csr_pem: bytes) -> SpiffeId:
    """The one SPIFFE ID a CSR asks for; raise ValueError saying what is wrong."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate signing request ({exc})") from None
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the CSR has no subjectAltName with a SPIFFE ID") from None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise ValueError(f"unreadable CSR extensions ({exc})") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"the CSR must name exactly one URI SAN, it names {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise ValueError(str(exc)) from None


def _parse_version(value: bytes) -> int:
    if not value.isdigit() or len(value) > 18:
        raise _Refusal(400, "bad_version", "meshfed-version must be a decimal integer")
    return int(value)


class ServerProtocol:
    """One connection of the agent API (see the module docstring)."""

    def __init__(
        self,
        *,
        peer: SpiffeId | None,
        trust_domain: str,
        cluster: str,
        limits: StreamLimits | None = None,
        tuning: H2Tuning | None = None,
    ) -> None:
        self.peer = peer
        self.trust_domain = trust_domain
        self.cluster = cluster
        self.limits = limits or StreamLimits()
        lim = self.limits
        self._tuning = tuning or recommended_h2_config(
            "server",
            max_concurrent_streams=lim.max_concurrent_streams,
            max_header_list_size=lim.max_header_list_size,
        )
        self._h2 = self._tuning.new_connection()
        self._guard = H2Guard(self._tuning.guard_limits)
        self._incoming: dict[int, _Incoming] = {}
        self._out: dict[int, _Outbound] = {}
        self._subscriptions: set[int] = set()
        self._owned: set[str] = set()
        self._requests = 0
        self._refusals: collections.Counter[str] = collections.Counter()
        self.closed: str | None = None
        """Why the connection is closing (a guard or h2 reason, ``peer_goaway``); once
        set, write ``data_to_send()`` (the GOAWAY) and close the transport."""

    # -- bytes ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now."""
        return self._h2.data_to_send()

    def receive_data(self, data: bytes, now: float) -> list[Request]:
        """Feed bytes read from the peer; returns the requests the adapter must serve."""
        if self.closed is not None:
            return []
        verdict = self._guard.observe_bytes(data, now)
        if isinstance(verdict, Close):
            self._close(verdict)
            return []
        try:
            events = self._h2.receive_data(data)
        except h2x.ProtocolError as exc:
            # h2 has queued its own GOAWAY; the guard gives the stable reason.
            self.closed = self._guard.close_for_h2_error(exc).reason
            return []
        out: list[Request] = []
        for event in events:
            judged = self._guard.observe_event(event, now)
            if isinstance(judged, Close):
                self._close(judged)
                break
            if isinstance(judged, RejectStream):
                self._incoming.pop(judged.stream_id, None)
                self._refuse(judged.stream_id, _Refusal(431, judged.reason, "header limits"))
                continue
            assert judged is ALLOW
            request = self._on_event(event)
            if request is not None:
                out.append(request)
        return out

    def _close(self, verdict: Close) -> None:
        self.closed = verdict.reason
        self._h2.close_connection(error_code=verdict.error_code)

    def _on_event(self, event: ev.Event) -> Request | None:
        if isinstance(event, ev.RequestReceived):
            self._on_headers(event)
            return None
        if isinstance(event, ev.DataReceived):
            sid = event.stream_id
            assert sid is not None
            # Credit the window at once: the body cap, not flow control, bounds memory.
            self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
            incoming = self._incoming.get(sid)
            if incoming is None:
                return None
            if len(incoming.body) + len(event.data) > self.limits.max_body:
                del self._incoming[sid]
                self._refuse(
                    sid,
                    _Refusal(
                        413,
                        "body_too_large",
                        f"request bodies are capped at {self.limits.max_body} bytes",
                    ),
                    stop_upload=True,
                )
                return None
            incoming.body += event.data
            return None
        if isinstance(event, ev.StreamEnded):
            sid = event.stream_id
            assert sid is not None
            incoming = self._incoming.pop(sid, None)
            if incoming is None:
                return None
            self._requests += 1
            try:
                return self._route(sid, incoming)
            except _Refusal as refusal:
                self._refuse(sid, refusal)
                return None
        if isinstance(event, ev.StreamReset):
            sid = event.stream_id
            assert sid is not None
            return self._forget(sid)
        if isinstance(event, ev.ConnectionTerminated):
            self.closed = self.closed or "peer_goaway"
        return None

    def _forget(self, sid: int) -> StreamGone | None:
        self._incoming.pop(sid, None)
        self._out.pop(sid, None)
        if sid in self._subscriptions:
            self._subscriptions.discard(sid)
            return StreamGone(sid)
        return None

    def _on_headers(self, event: ev.RequestReceived) -> None:
        sid = event.stream_id
        assert sid is not None
        headers: dict[bytes, bytes] = {}
        for name, value in event.headers or ():
            # header_encoding=None: names and values are bytes.
            assert isinstance(name, bytes) and isinstance(value, bytes)
            if name in headers:
                self._refuse(
                    sid, _Refusal(400, "duplicate_header", name.decode("ascii", "replace"))
                )
                return None
            headers[name] = value
        method = headers.get(b":method", b"").decode("ascii", "replace")
        path = headers.get(b":path", b"").decode("ascii", "replace")
        self._incoming[sid] = _Incoming(method, path, headers)
        return None

    # -- routing and authorisation ---------------------------------------------------

    def _own_domain(self) -> SpiffeId:
        if self.peer is None:
            raise _Refusal(
                401,
                "client_certificate_required",
                "present an SVID of this cluster (only the bootstrap CSR may not)",
            )
        if self.peer.trust_domain.name != self.trust_domain:
            raise _Refusal(
                403,
                "foreign_trust_domain",
                f"{self.peer} is not of trust domain {self.trust_domain}",
            )
        return self.peer

    def _route(self, sid: int, req: _Incoming) -> Request | None:
        path, _, query = req.path.partition("?")
        if query:
            raise _Refusal(400, "query_not_allowed", "the agent API takes no query strings")
        if path == CATALOG_PATH:
            if req.method != "GET":
                raise _Refusal(405, "method_not_allowed", f"{path} takes GET")
            return self._subscribe(sid, req)
        if path == ENDPOINTS_PATH:
            if req.method != "POST":
                raise _Refusal(405, "method_not_allowed", f"{path} takes POST")
            return self._register(sid, req)
        if path.startswith(ENDPOINTS_PATH + "/"):
            if req.method != "DELETE":
                raise _Refusal(405, "method_not_allowed", f"{path} takes DELETE")
            return self._deregister(sid, path[len(ENDPOINTS_PATH) + 1 :])
        if path == SVID_PATH:
            if req.method != "POST":
                raise _Refusal(405, "method_not_allowed", f"{path} takes POST")
            return self._sign(sid, req)
        raise _Refusal(404, "not_found", f"no such path {path[:64]!r}")

    def _subscribe(self, sid: int, req: _Incoming) -> Subscribe:
        self._own_domain()
        epoch_b, version_b = req.headers.get(EPOCH_HEADER), req.headers.get(VERSION_HEADER)
        if (epoch_b is None) != (version_b is None):
            raise _Refusal(
                400, "bad_resume", "send both meshfed-epoch and meshfed-version, or neither"
            )
        epoch = version = None
        if epoch_b is not None and version_b is not None:
            if not 0 < len(epoch_b) <= 128 or not epoch_b.isascii():
                raise _Refusal(400, "bad_epoch", "meshfed-epoch must be 1..128 ASCII bytes")
            epoch, version = epoch_b.decode("ascii"), _parse_version(version_b)
        if len(self._subscriptions) >= self.limits.max_subscriptions:
            raise _Refusal(
                429,
                "too_many_subscriptions",
                f"at most {self.limits.max_subscriptions} catalog streams per connection",
            )
        self._h2.send_headers(
            sid,
            [(b":status", b"200"), (b"content-type", NDJSON), (b"cache-control", b"no-store")],
        )
        self._subscriptions.add(sid)
        self._out[sid] = _Outbound(bound=self.limits.max_queued_bytes)
        return Subscribe(sid, epoch, version)

    def _register(self, sid: int, req: _Incoming) -> RegisterEndpoint:
        peer = self._own_domain()
        try:
            record = EndpointRecord.from_json(bytes(req.body))
        except RecordError as exc:
            raise _Refusal(400, "bad_record", str(exc)) from None
        if record.spiffe_id != str(peer):
            raise _Refusal(
                403,
                "spiffe_id_mismatch",
                f"the caller is {peer}; it may register only endpoints with that "
                f"spiffe_id, not {record.spiffe_id}",
            )
        if record.cluster != self.cluster:
            raise _Refusal(
                403,
                "foreign_cluster",
                f"this agent registers endpoints of cluster {self.cluster} only",
            )
        self._owned.add(record.key())
        return RegisterEndpoint(sid, record)

    def _deregister(self, sid: int, tail: str) -> DeregisterEndpoint:
        self._own_domain()
        parts = tail.split("/")
        if len(parts) != 3:
            raise _Refusal(
                400,
                "bad_endpoint_path",
                "use DELETE /v1/endpoints/<namespace>/<service>/<endpoint_id>",
            )
        try:
            key = keys.endpoint(self.cluster, *parts)
        except InvalidName as exc:
            raise _Refusal(400, "bad_endpoint_path", str(exc)) from None
        if key not in self._owned:
            raise _Refusal(
                404, "not_registered_here", "this connection did not register that endpoint"
            )
        self._owned.discard(key)
        return DeregisterEndpoint(sid, key)

    def _sign(self, sid: int, req: _Incoming) -> SignCsr:
        token: str | None = None
        if self.peer is None:
            auth = req.headers.get(b"authorization", b"")
            scheme, _, value = auth.partition(b" ")
            if scheme != b"JoinToken" or not value:
                raise _Refusal(
                    401,
                    "client_certificate_required",
                    "present an SVID, or a join token (authorization: JoinToken "
                    "<token>) for the first CSR",
                )
            token = value.decode("ascii", "replace").strip()
        else:
            self._own_domain()
        try:
            requested = csr_identity(bytes(req.body))
        except ValueError as exc:
            raise _Refusal(400, "bad_csr", str(exc)) from None
        if self.peer is not None and requested != self.peer:
            raise _Refusal(
                403,
                "identity_mismatch",
                f"an SVID renews only itself: the caller is {self.peer}, the CSR "
                f"asks for {requested}",
            )
        return SignCsr(sid, bytes(req.body), requested, token)

    # -- answers ---------------------------------------------------------------------

    def _refuse(self, sid: int, refusal: _Refusal, *, stop_upload: bool = False) -> None:
        self._refusals[refusal.reason] += 1
        self._out.pop(sid, None)
        try:
            self._h2.send_headers(
                sid,
                [
                    (b":status", str(refusal.status).encode("ascii")),
                    (b"content-length", b"0"),
                    (REASON_HEADER, refusal.reason.encode("ascii")),
                    (DETAIL_HEADER, _clean_detail(refusal.detail)),
                ],
                end_stream=True,
            )
            if stop_upload:
                # RFC 9113 8.1: a complete early response, then RST_STREAM(NO_ERROR)
                # tells the client to stop sending the rest of the body.
                self._h2.reset_stream(sid, ErrorCodes.NO_ERROR)
        except h2x.StreamClosedError:
            pass

    def refuse(self, stream_id: int, status: int, reason: str, detail: str) -> None:
        """Answer a request the adapter refused (token, registrar or signer said no)."""
        self._refuse(stream_id, _Refusal(status, reason, detail))

    def respond(
        self, stream_id: int, status: int, body: bytes = b"", content_type: bytes = b""
    ) -> None:
        """Answer a request successfully; the body goes out within the flow window."""
        headers = [(b":status", str(status).encode("ascii"))]
        if content_type:
            headers.append((b"content-type", content_type))
        headers.append((b"content-length", str(len(body)).encode("ascii")))
        try:
            self._h2.send_headers(stream_id, headers, end_stream=not body)
        except h2x.StreamClosedError:
            return
        if body:
            out = _Outbound(bound=None, end_after=True)
            out.push(body)
            self._out[stream_id] = out

    # -- subscriptions ---------------------------------------------------------------

    def enqueue(self, stream_id: int, line: bytes, version: int | None = None) -> bool:
        """Queue one encoded message on a subscription; False if it was dropped (the
        subscriber is behind, or gone). ``version`` is the version the subscriber holds
        after this message (None for messages that do not change it)."""
        out = self._out.get(stream_id)
        if out is None or out.bound is None:
            return False
        if out.stale:
            out.dropped += 1
            return False
        if out.queued and out.queued + len(line) > out.bound:
            # Drop whole unsent messages only; a half-sent line must be finished or
            # the subscriber's decoder would see garbage.
            out.dropped += len(out.queue) + 1
            out.queued -= sum(len(m) for m in out.queue)
            out.queue.clear()
            out.stale = True
            return False
        out.push(line)
        if version is not None:
            out.version = version
        return True

    def subscription_version(self, stream_id: int) -> int | None:
        """The version the subscriber holds once it read everything queued."""
        out = self._out.get(stream_id)
        return None if out is None else out.version

    def is_stale(self, stream_id: int) -> bool:
        """True while the subscription drops messages, waiting to be resynced."""
        out = self._out.get(stream_id)
        return out is not None and out.stale

    def _window(self, stream_id: int) -> int:
        try:
            # Already the smaller of the stream's and the connection's window.
            return int(self._h2.local_flow_control_window(stream_id))
        except (h2x.StreamClosedError, h2x.NoSuchStreamError, KeyError):
            return 0

    def resync_ready(self) -> list[int]:
        """Stale subscriptions that drained and whose window is open: send each a snapshot."""
        return [
            sid
            for sid, out in self._out.items()
            if out.stale and not out.has_data() and self._window(sid) > 0
        ]

    def resync(self, stream_id: int, lines: list[bytes], version: int) -> None:
        """Queue a fresh snapshot (and whatever must follow it) on a stale subscription.
        The bound does not apply to these: a snapshot is sent whole whatever its size."""
        out = self._out.get(stream_id)
        if out is None:
            return
        out.stale = False
        out.resyncs += 1
        for line in lines:
            out.push(line)
        out.version = version

    # -- writing ---------------------------------------------------------------------

    def pump(self) -> bool:
        """Hand queued bytes to h2 within flow-control windows; True if more could go
        right away (call again after writing ``data_to_send``)."""
        if self.closed is not None:
            return False
        frames = 0
        more = False
        frame_max = self._h2.max_outbound_frame_size
        for sid, out in list(self._out.items()):
            budget = self.limits.write_chunk
            while out.has_data():
                n = min(self._window(sid), frame_max, budget)
                if n <= 0:
                    break
                chunk = out.take(n)
                end = out.end_after and not out.has_data()
                self._h2.send_data(sid, chunk, end_stream=end)
                frames += 1
                budget -= len(chunk)
                if end:
                    del self._out[sid]
            if out.has_data() and budget <= 0 and self._window(sid) > 0:
                more = True
        if frames:
            self._guard.note_data_sent(frames)
        return more

    def close(self, error_code: ErrorCodes = ErrorCodes.NO_ERROR, reason: str = "shutdown") -> None:
        """Queue a GOAWAY (server shutting down or the connection timed out)."""
        if self.closed is None:
            self.closed = reason
            self._h2.close_connection(error_code=error_code)

    @property
    def has_subscriptions(self) -> bool:
        """True while a catalog stream is open (the connection is not idle)."""
        return bool(self._subscriptions)

    def statistics(self) -> ProtocolStatistics:
        subs = tuple(
            SubscriptionStatistics(
                stream_id=sid,
                version=out.version,
                queued_bytes=out.queued,
                max_queued_bytes=out.high_water,
                stale=out.stale,
                dropped_messages=out.dropped,
                resyncs=out.resyncs,
            )
            for sid, out in sorted(self._out.items())
            if sid in self._subscriptions
        )
        return ProtocolStatistics(self._requests, dict(self._refusals), subs, self.closed)
