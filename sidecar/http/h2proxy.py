"""Sans-IO helpers to proxy one HTTP/2 stream (app side) onto another (upstream side).

The adapter owns two ``h2.connection.H2Connection`` objects (set up with
:func:`federation.h2guard.recommended_h2_config`, ``header_encoding=None`` so fields
are bytes) and does all I/O. This module decides *what* to send:

* :func:`upstream_request_headers`: pseudo-headers first, ``:path`` replaced by the
  normalised target (what routing matched is what the upstream gets), hop-by-hop
  fields dropped except ``te: trailers`` (gRPC needs it end to end), trace headers
  replaced by this hop's.
* :func:`downstream_response_headers` and :func:`forward_trailers`: the same hygiene
  on the way back; trailers are passed through (gRPC status lives there).
* :func:`h2_request_from_h1` / :func:`h1_response_from_h2`: the translation when the
  app speaks HTTP/1.1 and the sidecar-to-sidecar hop HTTP/2.
* :class:`StreamForwarder`: flow control across the proxy. App DATA is acknowledged
  (``acknowledge_received_data``) only once the upstream connection has accepted it
  (``send_data`` within the upstream window), so a slow upstream shrinks the app's
  window instead of growing our buffer: memory per stream is bounded by the window
  we advertise to the app (4 MiB with the recommended config).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.http.h1 import RequestHead
from sidecar.http.headers import Header, strip_hop_by_hop
from sidecar.http.paths import RequestPath
from sidecar.http.tracing import TraceContext, replace_headers

_PSEUDO_REQUEST_ORDER = (b":method", b":scheme", b":authority", b":path")


class HeaderError(ValueError):
    """A header block the proxy cannot map (missing pseudo-header); answer 400."""


def _split_pseudo(headers: Sequence[Header]) -> tuple[dict[bytes, bytes], list[Header]]:
    pseudo: dict[bytes, bytes] = {}
    regular: list[Header] = []
    for name, value in headers:
        if name.startswith(b":"):
            if name in pseudo:
                raise HeaderError(f"repeated pseudo-header {name!r}")
            pseudo[name] = value
        else:
            regular.append((name, value))
    return pseudo, regular


@dataclass(frozen=True, slots=True)
class RequestPseudo:
    """The pseudo-headers of an incoming HTTP/2 request."""

    method: str
    """``:method``."""
    scheme: bytes
    """``:scheme``."""
    authority: bytes
    """``:authority`` (or ``host`` when a client sent only that)."""
    path: bytes
    """``:path`` as received (normalise before matching)."""


def request_pseudo(headers: Sequence[Header]) -> RequestPseudo:
    """Read ``:method``, ``:scheme``, ``:authority``, ``:path``; raises :class:`HeaderError`."""
    pseudo, regular = _split_pseudo(headers)
    authority = pseudo.get(b":authority") or next((v for n, v in regular if n == b"host"), b"")
    try:
        return RequestPseudo(
            pseudo[b":method"].decode("ascii"), pseudo[b":scheme"], authority, pseudo[b":path"]
        )
    except KeyError as exc:
        raise HeaderError(f"missing pseudo-header {exc.args[0]!r}") from None


def upstream_request_headers(
    headers: Sequence[Header], path: RequestPath, trace: TraceContext
) -> list[Header]:
    """The header block for the upstream stream of an incoming HTTP/2 request."""
    pseudo, regular = _split_pseudo(headers)
    if b":authority" not in pseudo:
        pseudo[b":authority"] = next((v for n, v in regular if n == b"host"), b"")
    pseudo[b":path"] = path.target.encode("ascii")
    missing = [p for p in _PSEUDO_REQUEST_ORDER if p not in pseudo]
    if missing:
        raise HeaderError(f"missing pseudo-headers {missing}")
    fields = replace_headers(strip_hop_by_hop(regular, keep_te_trailers=True), trace)
    fields = [(n, v) for n, v in fields if n != b"host"]  # :authority carries it (RFC 9113 8.3.1)
    return [(p, pseudo[p]) for p in _PSEUDO_REQUEST_ORDER] + fields


def h2_request_from_h1(
    head: RequestHead, trace: TraceContext, scheme: bytes = b"http"
) -> list[Header]:
    """HTTP/2 request headers for an HTTP/1.1 request head (already framing-stripped)."""
    pseudo: list[Header] = [
        (b":method", head.method.encode("ascii")),
        (b":scheme", scheme),
        (b":authority", head.authority),
        (b":path", head.path.target.encode("ascii")),
    ]
    regular = [(n, v) for n, v in head.headers if n != b"host"]
    return pseudo + replace_headers(regular, trace)


def downstream_response_headers(headers: Sequence[Header]) -> list[Header]:
    """Upstream response headers for the app-side stream: ``:status`` first, no hop-by-hop."""
    pseudo, regular = _split_pseudo(headers)
    if b":status" not in pseudo:
        raise HeaderError("missing :status")
    return [(b":status", pseudo[b":status"]), *strip_hop_by_hop(regular)]


def h1_response_from_h2(headers: Sequence[Header]) -> tuple[int, list[Header]]:
    """Status and fields for an HTTP/1.1 response from HTTP/2 response headers."""
    pseudo, regular = _split_pseudo(headers)
    status = pseudo.get(b":status", b"")
    if not status.isdigit() or len(status) != 3:
        raise HeaderError(f"bad :status {status!r}")
    return int(status), strip_hop_by_hop(regular)


def forward_trailers(trailers: Sequence[Header]) -> list[Header]:
    """Trailers to pass on: pseudo-headers (forbidden in trailers) and hop-by-hop removed."""
    return [(n, v) for n, v in strip_hop_by_hop(trailers) if not n.startswith(b":")]


@dataclass(frozen=True, slots=True)
class SendData:
    """Send ``data`` on the destination stream, then acknowledge ``ack`` bytes on the source."""

    data: memoryview
    """Bytes to send (fits the window and frame size given to :meth:`StreamForwarder.next`)."""
    ack: int
    """Flow-controlled bytes to acknowledge on the source stream once sent."""
    end_stream: bool
    """Set END_STREAM on this DATA frame."""


@dataclass(frozen=True, slots=True)
class SendTrailers:
    """Send these trailers (END_STREAM) on the destination stream."""

    trailers: list[Header]
    """Already filtered with :func:`forward_trailers`."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    data: memoryview
    padding: int  # flow-controlled bytes beyond the data (padding), acked with the last byte


@dataclass
class StreamForwarder:
    """DATA from one stream to another, acknowledging only what the destination accepted.

    Feed it ``DataReceived`` events (:meth:`push`) and the end of the source stream
    (:meth:`push_end`); ask :meth:`next` with the destination's current send window
    (``local_flow_control_window(stream)``) and max frame size. Slicing uses
    memoryviews, so a large body is never re-copied per frame.
    """

    _queue: collections.deque[_Chunk] = field(default_factory=collections.deque)
    _queued: int = 0
    _end: bool = False
    _trailers: list[Header] | None = None
    _done: bool = False

    @property
    def buffered(self) -> int:
        """Data bytes received and not yet sent on (bounded by our advertised window)."""
        return self._queued

    @property
    def done(self) -> bool:
        """Everything, including the end of stream, was handed out."""
        return self._done

    def push(self, data: bytes, flow_controlled_length: int) -> int:
        """A DATA frame from the source. Returns bytes to acknowledge at once: padding of
        an empty frame, which holds no data to wait for."""
        if self._end:
            raise ValueError("DATA after end of stream")
        padding = flow_controlled_length - len(data)
        if padding < 0:
            raise ValueError("flow_controlled_length below data length")
        if not data:
            return padding
        self._queue.append(_Chunk(memoryview(data), padding))
        self._queued += len(data)
        return 0

    def push_end(self, trailers: Sequence[Header] | None = None) -> None:
        """The source stream ended (``StreamEnded``, or ``TrailersReceived`` first)."""
        self._end = True
        if trailers is not None:
            self._trailers = forward_trailers(trailers)

    def next(self, window: int, max_frame_size: int) -> SendData | SendTrailers | None:
        """The next thing to send, or None (wait for data or for a WINDOW_UPDATE)."""
        if self._done:
            return None
        if self._queue:
            room = min(window, max_frame_size)
            if room <= 0:
                return None
            chunk = self._queue[0]
            n = min(room, len(chunk.data))
            piece = chunk.data[:n]
            ack = n
            if n == len(chunk.data):
                self._queue.popleft()
                ack += chunk.padding
            else:
                self._queue[0] = _Chunk(chunk.data[n:], chunk.padding)
            self._queued -= n
            last = not self._queue and self._end and self._trailers is None
            self._done = last
            return SendData(piece, ack, end_stream=last)
        if not self._end:
            return None
        self._done = True
        if self._trailers is not None:
            return SendTrailers(self._trailers)
        return SendData(memoryview(b""), 0, end_stream=True)


__all__ = [
    "HeaderError",
    "RequestPseudo",
    "SendData",
    "SendTrailers",
    "StreamForwarder",
    "downstream_response_headers",
    "forward_trailers",
    "h1_response_from_h2",
    "h2_request_from_h1",
    "request_pseudo",
    "upstream_request_headers",
]
