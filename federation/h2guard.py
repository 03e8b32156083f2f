"""Sans-IO flood and abuse guard for one HTTP/2 connection (BAD_INPUTS 17-20).

The guard watches a connection from two sides and answers with a verdict:

* ``observe_bytes(data, now)``: the raw bytes *before* they are given to
  ``H2Connection.receive_data``. A tiny frame-header scanner (9 bytes per frame,
  bodies skipped, O(1) memory) counts every frame the peer sends, including the
  ones h2 swallows without an event (CONTINUATION fragments, WINDOW_UPDATE or
  RST_STREAM on streams h2 already forgot) and the ones that make h2 write a reply
  (PING, SETTINGS, frames on reset streams). All frame *rate* rules live here, so
  each frame is counted exactly once whatever h2 does with it.
* ``observe_event(event, now)``: each event ``receive_data`` returned. Rules that
  need meaning live here: header list size and field count, streams opened per
  connection, and the rapid-reset ratio (resets of streams that were just opened).
* ``close_for_h2_error(exc)``: h2 raised; map its exception to a Close with a
  stable reason, so metrics label h2's own refusals like the guard's.

Verdicts: :data:`ALLOW`, :class:`RejectStream` (refuse one stream: answer 431 if
the adapter speaks HTTP, else RST_STREAM with ``error_code``), :class:`Close`
(send GOAWAY with ``error_code``, stop reading, close). A Close is sticky: every
later call returns the same Close. ``Close.error_code == NO_ERROR`` means a
graceful drain (stream budget used up), not an attack.

Which layer enforces what is in docs/sni.md ("The HTTP/2 guard"); in short:
h2 itself enforces frame size (FRAME_SIZE_ERROR), the decoded header list size it
advertised (DenialOfServiceError, ENHANCE_YOUR_CALM), at most 64 CONTINUATION
frames per block (PROTOCOL_ERROR), MAX_CONCURRENT_STREAMS (TooManyStreamsError,
a connection-level PROTOCOL_ERROR in h2 4.x) and flow control; the guard adds
rates, tighter CONTINUATION and encoded-size bounds that trip before h2 buffers
the block, per-stream header limits, rapid reset and a lifetime stream budget.

Time comes only from ``now`` (the adapter passes ``trio.current_time()``).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import h2.events as ev
import h2.exceptions as h2x
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

# Frame types and flags (RFC 9113 section 6).
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PUSH_PROMISE: Final = 0x5
_PING: Final = 0x6
_WINDOW_UPDATE: Final = 0x8
_CONTINUATION: Final = 0x9
_FLAG_END_STREAM: Final = 0x1
_FLAG_ACK: Final = 0x1
_FLAG_END_HEADERS: Final = 0x4
_FLAG_PADDED: Final = 0x8
_FRAME_HEADER: Final = 9
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MiB: Final = 1024 * 1024

CloseReason = Literal[
    "bad_preface",
    "ping_flood",
    "settings_flood",
    "rst_flood",
    "rapid_reset",
    "window_update_flood",
    "empty_data_flood",
    "priority_flood",
    "continuation_flood",
    "header_block_too_large",
    "stream_error_flood",
    "stream_budget_exhausted",
    # h2's own refusals, via close_for_h2_error:
    "h2_header_list_too_large",
    "h2_too_many_streams",
    "h2_frame_size",
    "h2_flow_control",
    "h2_protocol_error",
]
RejectReason = Literal["header_list_too_large", "too_many_header_fields"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` events in any sliding window of ``per_seconds``."""

    count: int
    """Events allowed in one window; the next one trips the rule."""

    per_seconds: float
    """Window length in seconds."""

    def __post_init__(self) -> None:
        if self.count < 1 or not self.per_seconds > 0:
            raise ValueError(f"bad rate limit {self}")


@dataclass(frozen=True, slots=True)
class H2GuardLimits:
    """Every threshold the guard applies. Defaults suit a gateway or sidecar server."""

    pings: RateLimit = RateLimit(100, 10.0)
    """PING frames without ACK. Each one makes us send an ACK (CVE-2019-9512)."""

    settings: RateLimit = RateLimit(20, 10.0)
    """SETTINGS frames without ACK. Each one makes us send an ACK (CVE-2019-9515)."""

    resets: RateLimit = RateLimit(200, 1.0)
    """RST_STREAM frames from the peer, any stream (CVE-2023-44487, CVE-2019-9514)."""

    idle_window_updates: RateLimit = RateLimit(200, 1.0)
    """WINDOW_UPDATE frames not explained by DATA we sent (see ``note_data_sent``)."""

    window_update_credit_per_data_frame: int = 2
    """Free WINDOW_UPDATEs per DATA frame we sent: one for the stream, one for the connection."""

    max_window_update_credit: int = 4096
    """Cap on banked credit, so a long download cannot pre-pay a later flood."""

    empty_data: RateLimit = RateLimit(50, 1.0)
    """DATA frames with no payload (padding aside) and no END_STREAM (CVE-2019-9518)."""

    priority: RateLimit = RateLimit(200, 1.0)
    """PRIORITY frames, which cost work and no flow control (CVE-2019-9513)."""

    max_continuation_frames: int = 8
    """CONTINUATION frames per header block; nghttp2's default (CVE-2024-27316 class).
    h2's own backstop is 64."""

    max_header_block_bytes: int = 64 * 1024
    """Encoded bytes of one header block (HEADERS + CONTINUATIONs), checked as each
    frame header arrives, before h2 buffers the body."""

    max_header_list_size: int = 32 * 1024
    """Decoded size (RFC 9113 6.5.2: name + value + 32 per field) above which one
    stream is rejected. Keep it below the advertised SETTINGS_MAX_HEADER_LIST_SIZE,
    which h2 enforces by closing the whole connection."""

    max_header_fields: int = 100
    """Header fields in one block above which the stream is rejected."""

    stream_errors: RateLimit = RateLimit(20, 10.0)
    """Streams rejected by the guard or reset by h2 for peer errors; past this the
    peer is flooding malformed HEADERS and the connection is closed."""

    premature_reset_age: float = 1.0
    """A peer reset of a stream younger than this (seconds) is premature (Envoy's rule)."""

    rapid_reset_min_streams: int = 100
    """Streams the peer must have opened before the premature-reset ratio is judged."""

    rapid_reset_max_ratio: float = 0.5
    """Largest tolerated share of peer-opened streams that the peer reset prematurely."""

    max_streams_per_connection: int | None = 1_000_000
    """Streams the peer may open over the connection's life, then a graceful close
    (NO_ERROR); None for no limit. Bounds h2's per-connection bookkeeping."""

    max_tracked_streams: int = 65536
    """Bound on young streams remembered for the rapid-reset rule (memory cap)."""

    def __post_init__(self) -> None:
        for name in (
            "window_update_credit_per_data_frame",
            "max_window_update_credit",
            "max_continuation_frames",
            "max_header_block_bytes",
            "max_header_list_size",
            "max_header_fields",
            "rapid_reset_min_streams",
            "max_tracked_streams",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0.0 <= self.rapid_reset_max_ratio <= 1.0:
            raise ValueError("rapid_reset_max_ratio must be within 0..1")
        if self.premature_reset_age < 0:
            raise ValueError("premature_reset_age must be >= 0")


@dataclass(frozen=True, slots=True)
class Allow:
    """Carry on."""


ALLOW: Final = Allow()


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection: send GOAWAY with ``error_code``, then stop."""

    reason: CloseReason
    """Stable metric label naming the rule that tripped."""

    error_code: ErrorCodes
    """GOAWAY code: ENHANCE_YOUR_CALM for floods, NO_ERROR for a graceful drain,
    h2's own code for h2's refusals."""

    detail: str = ""
    """Human-readable numbers for the log line."""


@dataclass(frozen=True, slots=True)
class RejectStream:
    """Refuse one stream; the connection stays up."""

    stream_id: int
    """The stream whose headers broke a limit."""

    reason: RejectReason
    """Stable metric label."""

    http_status: int = 431
    """Answer with this status where the stream carries HTTP (BAD_INPUTS 17)."""

    error_code: ErrorCodes = ErrorCodes.ENHANCE_YOUR_CALM
    """RST_STREAM code where no HTTP response can be sent (e.g. a CONNECT tunnel)."""


Verdict = Allow | Close | RejectStream


@dataclass(frozen=True, slots=True)
class H2GuardStatistics:
    """Counters for metrics and tests."""

    frames: int
    """Frames seen by the scanner."""

    streams_opened: int
    """Streams the peer opened (RequestReceived)."""

    premature_resets: int
    """Peer resets of streams younger than ``premature_reset_age``."""

    streams_rejected: int
    """RejectStream verdicts given."""

    closed: Close | None
    """The sticky Close, if any."""


class _Window:
    """Sliding-window counter; holds at most ``count + 1`` timestamps."""

    __slots__ = ("_limit", "_times")

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._times: collections.deque[float] = collections.deque()

    def hit(self, now: float) -> bool:
        """Record one event; True if the window now holds more than allowed."""
        times = self._times
        horizon = now - self._limit.per_seconds
        while times and times[0] <= horizon:
            times.popleft()
        times.append(now)
        return len(times) > self._limit.count


class H2Guard:
    """Per-connection guard. ``client_side`` is our role (as in H2Configuration)."""

    def __init__(self, limits: H2GuardLimits | None = None, *, client_side: bool = False) -> None:
        self.limits = limits or H2GuardLimits()
        lim = self.limits
        self._closed: Close | None = None
        # Scanner state. A server reads the client preface first.
        self._preface_left = b"" if client_side else PREFACE
        self._hdr = bytearray()
        self._skip = 0
        self._pad_check: int | None = None  # DATA length awaiting its pad-length byte
        self._pad_end_stream = False
        self._block_frames = 0  # CONTINUATIONs in the open header block
        self._block_bytes = 0
        self._in_block = False
        self._frames = 0
        # Rate rules.
        self._pings = _Window(lim.pings)
        self._settings = _Window(lim.settings)
        self._resets = _Window(lim.resets)
        self._idle_wu = _Window(lim.idle_window_updates)
        self._empty_data = _Window(lim.empty_data)
        self._priority = _Window(lim.priority)
        self._stream_errors = _Window(lim.stream_errors)
        self._wu_credit = 0
        # Event rules.
        self._streams_opened = 0
        self._premature = 0
        self._rejected = 0
        self._young: dict[int, float] = {}
        self._young_order: collections.deque[tuple[float, int]] = collections.deque()

    # -- verdict helpers -------------------------------------------------------

    def _close(self, reason: CloseReason, code: ErrorCodes, detail: str = "") -> Close:
        if self._closed is None:
            self._closed = Close(reason, code, detail)
        return self._closed

    def _flood(self, reason: CloseReason, limit: RateLimit) -> Close:
        detail = f"more than {limit.count} in {limit.per_seconds:g}s"
        return self._close(reason, ErrorCodes.ENHANCE_YOUR_CALM, detail)

    @property
    def closed(self) -> Close | None:
        """The sticky Close, once a rule has tripped."""
        return self._closed

    def statistics(self) -> H2GuardStatistics:
        return H2GuardStatistics(
            frames=self._frames,
            streams_opened=self._streams_opened,
            premature_resets=self._premature,
            streams_rejected=self._rejected,
            closed=self._closed,
        )

    # -- raw side --------------------------------------------------------------

    def note_data_sent(self, frames: int = 1) -> None:
        """We sent ``frames`` DATA frames: the peer may now send that many WINDOW_UPDATEs
        (times ``window_update_credit_per_data_frame``) without counting as a flood."""
        lim = self.limits
        self._wu_credit = min(
            lim.max_window_update_credit,
            self._wu_credit + frames * lim.window_update_credit_per_data_frame,
        )

    def observe_bytes(self, data: bytes | bytearray | memoryview, now: float) -> Allow | Close:
        """Scan bytes read from the peer, before ``receive_data``. Bodies are skipped,
        so the cost is one 9-byte header per frame and memory stays constant."""
        if self._closed is not None:
            return self._closed
        mv = memoryview(data)
        n = len(mv)
        i = 0
        if self._preface_left:
            take = min(n, len(self._preface_left))
            if bytes(mv[:take]) != self._preface_left[:take]:
                return self._close("bad_preface", ErrorCodes.PROTOCOL_ERROR)
            self._preface_left = self._preface_left[take:]
            i = take
        while i < n:
            if self._skip:
                if self._pad_check is not None:
                    self._check_padded_data(mv[i], now)
                    if self._closed is not None:
                        return self._closed
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            take = min(_FRAME_HEADER - len(self._hdr), n - i)
            self._hdr += mv[i : i + take]
            i += take
            if len(self._hdr) < _FRAME_HEADER:
                break
            h = self._hdr
            length = (h[0] << 16) | (h[1] << 8) | h[2]
            ftype, flags = h[3], h[4]
            h.clear()
            verdict = self._on_frame(ftype, flags, length, now)
            if verdict is not ALLOW:
                return verdict
            self._skip = length
        return ALLOW

    def _check_padded_data(self, pad_length: int, now: float) -> None:
        length = self._pad_check
        assert length is not None
        self._pad_check = None
        if length - 1 - pad_length <= 0 and not self._pad_end_stream:
            self._hit_empty_data(now)

    def _hit_empty_data(self, now: float) -> None:
        if self._empty_data.hit(now):
            self._flood("empty_data_flood", self.limits.empty_data)

    def _on_frame(self, ftype: int, flags: int, length: int, now: float) -> Allow | Close:
        self._frames += 1
        lim = self.limits
        if self._in_block:
            # Anything but CONTINUATION here is a protocol error h2 will raise; the
            # guard just stops tracking the block.
            if ftype != _CONTINUATION:
                self._in_block = False
            else:
                self._block_frames += 1
                self._block_bytes += length
                if self._block_frames > lim.max_continuation_frames:
                    return self._close(
                        "continuation_flood",
                        ErrorCodes.ENHANCE_YOUR_CALM,
                        f"more than {lim.max_continuation_frames} CONTINUATION frames",
                    )
                if self._block_bytes > lim.max_header_block_bytes:
                    return self._header_block_too_large()
                if flags & _FLAG_END_HEADERS:
                    self._in_block = False
                return ALLOW
        if ftype in (_HEADERS, _PUSH_PROMISE):
            # Padding and priority fields count too: an upper bound on the block.
            self._block_bytes = length
            self._block_frames = 0
            if length > lim.max_header_block_bytes:
                return self._header_block_too_large()
            self._in_block = not flags & _FLAG_END_HEADERS
        elif ftype == _DATA:
            if flags & _FLAG_PADDED and length > 0:
                # Whether any payload is left after padding needs the pad-length byte.
                self._pad_check = length
                self._pad_end_stream = bool(flags & _FLAG_END_STREAM)
            elif length == 0 and not flags & _FLAG_END_STREAM:
                self._hit_empty_data(now)
        elif ftype == _RST_STREAM:
            if self._resets.hit(now):
                return self._flood("rst_flood", lim.resets)
        elif ftype == _SETTINGS:
            if not flags & _FLAG_ACK and self._settings.hit(now):
                return self._flood("settings_flood", lim.settings)
        elif ftype == _PING:
            if not flags & _FLAG_ACK and self._pings.hit(now):
                return self._flood("ping_flood", lim.pings)
        elif ftype == _WINDOW_UPDATE:
            if self._wu_credit > 0:
                self._wu_credit -= 1
            elif self._idle_wu.hit(now):
                return self._flood("window_update_flood", lim.idle_window_updates)
        elif ftype == _PRIORITY and self._priority.hit(now):
            return self._flood("priority_flood", lim.priority)
        return self._closed or ALLOW

    def _header_block_too_large(self) -> Close:
        return self._close(
            "header_block_too_large",
            ErrorCodes.ENHANCE_YOUR_CALM,
            f"encoded header block over {self.limits.max_header_block_bytes} bytes",
        )

    # -- event side ------------------------------------------------------------

    def observe_events(self, events: Iterable[ev.Event], now: float) -> list[Verdict]:
        """``observe_event`` for each event; returns the non-Allow verdicts in order,
        stopping at the first Close."""
        out: list[Verdict] = []
        for event in events:
            v = self.observe_event(event, now)
            if v is ALLOW:
                continue
            out.append(v)
            if isinstance(v, Close):
                break
        return out

    def observe_event(self, event: ev.Event, now: float) -> Verdict:
        """Judge one event returned by ``H2Connection.receive_data``."""
        if self._closed is not None:
            return self._closed
        if isinstance(event, ev.RequestReceived):
            return self._on_request(event, now)
        if isinstance(
            event, ev.ResponseReceived | ev.TrailersReceived | ev.InformationalResponseReceived
        ):
            assert event.stream_id is not None
            return self._check_headers(event.stream_id, event.headers, now)
        if isinstance(event, ev.StreamReset):
            return self._on_reset(event, now)
        return ALLOW

    def _on_request(self, event: ev.RequestReceived, now: float) -> Verdict:
        lim = self.limits
        sid = event.stream_id
        assert sid is not None
        self._streams_opened += 1
        if (
            lim.max_streams_per_connection is not None
            and self._streams_opened > lim.max_streams_per_connection
        ):
            return self._close(
                "stream_budget_exhausted",
                ErrorCodes.NO_ERROR,
                f"{lim.max_streams_per_connection} streams on this connection",
            )
        # Forget streams too old to be reset prematurely; the deque is in open order.
        horizon = now - lim.premature_reset_age
        order = self._young_order
        while order and (order[0][0] < horizon or len(self._young) >= lim.max_tracked_streams):
            _, old = order.popleft()
            self._young.pop(old, None)
        self._young[sid] = now
        order.append((now, sid))
        return self._check_headers(sid, event.headers, now)

    def _check_headers(self, stream_id: int, headers: object, now: float) -> Verdict:
        lim = self.limits
        fields = headers if isinstance(headers, list | tuple) else []
        reason: RejectReason | None = None
        if len(fields) > lim.max_header_fields:
            reason = "too_many_header_fields"
        else:
            size = 0
            for name, value in fields:
                size += len(name) + len(value) + 32
            if size > lim.max_header_list_size:
                reason = "header_list_too_large"
        if reason is None:
            return ALLOW
        self._rejected += 1
        if self._stream_errors.hit(now):
            return self._flood("stream_error_flood", lim.stream_errors)
        return RejectStream(stream_id, reason)

    def _on_reset(self, event: ev.StreamReset, now: float) -> Verdict:
        lim = self.limits
        sid = event.stream_id
        if not event.remote_reset:
            # h2 reset the stream because the peer broke the protocol on it.
            if self._stream_errors.hit(now):
                return self._flood("stream_error_flood", lim.stream_errors)
            return ALLOW
        opened = self._young.pop(sid, None) if sid is not None else None
        if opened is not None and now - opened < lim.premature_reset_age:
            self._premature += 1
            if (
                self._streams_opened >= lim.rapid_reset_min_streams
                and self._premature > lim.rapid_reset_max_ratio * self._streams_opened
            ):
                return self._close(
                    "rapid_reset",
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"{self._premature} of {self._streams_opened} streams reset prematurely",
                )
        return ALLOW

    # -- h2's own refusals -----------------------------------------------------

    def close_for_h2_error(self, exc: h2x.ProtocolError) -> Close:
        """The Close matching an exception from ``receive_data`` (h2 has already
        queued its GOAWAY; send ``data_to_send()`` then close)."""
        code = exc.error_code if isinstance(exc.error_code, ErrorCodes) else None
        if isinstance(exc, h2x.DenialOfServiceError):
            return self._close("h2_header_list_too_large", ErrorCodes.ENHANCE_YOUR_CALM, str(exc))
        if isinstance(exc, h2x.TooManyStreamsError):
            return self._close("h2_too_many_streams", ErrorCodes.PROTOCOL_ERROR, str(exc))
        if isinstance(exc, h2x.FrameTooLargeError | h2x.FrameDataMissingError):
            return self._close("h2_frame_size", ErrorCodes.FRAME_SIZE_ERROR, str(exc))
        if isinstance(exc, h2x.FlowControlError):
            return self._close("h2_flow_control", ErrorCodes.FLOW_CONTROL_ERROR, str(exc))
        return self._close("h2_protocol_error", code or ErrorCodes.PROTOCOL_ERROR, str(exc))


# -- recommended h2 configuration ---------------------------------------------

STREAM_WINDOW: Final = 4 * MiB
"""Per-stream receive window (ztunnel's value): enough for ~4 MiB in flight per RTT."""

CONNECTION_WINDOW: Final = 16 * MiB
"""Per-connection receive window: the bound on data buffered for one peer, however
many streams it opens (BAD_INPUTS 23)."""

_DEFAULT_CONNECTION_WINDOW: Final = 65535


@dataclass(frozen=True, slots=True)
class H2Tuning:
    """How to set up an ``H2Connection`` so that h2's own limits and the guard agree."""

    client_side: bool
    """Our role; passed to H2Configuration."""

    config_kwargs: Mapping[str, object]
    """Keyword arguments for ``h2.config.H2Configuration``."""

    local_settings: Mapping[SettingCodes, int]
    """Our SETTINGS, sent in the first SETTINGS frame."""

    connection_window: int
    """Connection receive window after the initial WINDOW_UPDATE."""

    guard_limits: H2GuardLimits
    """Guard limits consistent with ``local_settings``."""

    def configuration(self) -> H2Configuration:
        """A fresh H2Configuration for one connection."""
        return H2Configuration(**self.config_kwargs)  # type: ignore[arg-type]

    def start(self, conn: H2Connection) -> None:
        """Apply the settings to a fresh connection and queue the preface, SETTINGS
        and the connection WINDOW_UPDATE (read them with ``conn.data_to_send()``)."""
        values = dict(self.local_settings)
        conn.local_settings = Settings(client=self.client_side, initial_values=values)
        # h2 only moves these from local_settings on a SETTINGS ACK *change*; with
        # the values installed as initial ones there is no change, so set them here.
        conn.decoder.max_header_list_size = values[SettingCodes.MAX_HEADER_LIST_SIZE]
        conn.max_inbound_frame_size = values[SettingCodes.MAX_FRAME_SIZE]
        conn.initiate_connection()
        conn.increment_flow_control_window(self.connection_window - _DEFAULT_CONNECTION_WINDOW)

    def new_connection(self) -> H2Connection:
        """A started connection with this tuning (see :meth:`start`)."""
        conn = H2Connection(config=self.configuration())
        self.start(conn)
        return conn


def recommended_h2_config(
    role: Literal["client", "server"],
    *,
    max_concurrent_streams: int = 256,
    max_header_list_size: int = 64 * 1024,
    max_frame_size: int = 16384,
) -> H2Tuning:
    """h2 configuration and settings for meshfed's HTTP/2 hops.

    * INITIAL_WINDOW_SIZE 4 MiB per stream, 16 MiB per connection (raised by one
      WINDOW_UPDATE at start, as SETTINGS cannot change the connection window).
    * MAX_CONCURRENT_STREAMS (default 256): h2 refuses the 257th concurrent stream by
      closing the connection; a gateway pool opens another connection instead.
    * MAX_HEADER_LIST_SIZE (default 64 KiB): the hard limit h2 enforces by closing the
      connection; the guard rejects single streams above half of it first.
    * MAX_FRAME_SIZE stays 16 KiB: it bounds what h2 buffers per CONTINUATION, and
      pure-Python h2 is no faster with bigger frames.
    * ENABLE_PUSH 0 for clients: push is never used in the mesh.
    * header_encoding None (bytes): no decode cost and no UnicodeDecodeError path.
    """
    client_side = role == "client"
    settings: dict[SettingCodes, int] = {
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        SettingCodes.MAX_FRAME_SIZE: max_frame_size,
    }
    if client_side:
        settings[SettingCodes.ENABLE_PUSH] = 0
    limits = H2GuardLimits(
        max_header_list_size=max_header_list_size // 2,
        max_header_block_bytes=max_header_list_size,
        # Enough frames to carry a full header block at this frame size, plus slack
        # for peers that do not pack frames full (hyperium/h2's rule).
        max_continuation_frames=max(8, 2 * math.ceil(max_header_list_size / max_frame_size)),
    )
    return H2Tuning(
        client_side=client_side,
        config_kwargs={
            "client_side": client_side,
            "header_encoding": None,
            "validate_inbound_headers": True,
            "normalize_inbound_headers": True,
            "validate_outbound_headers": True,
        },
        local_settings=settings,
        connection_window=CONNECTION_WINDOW,
        guard_limits=limits,
    )


__all__ = [
    "ALLOW",
    "CONNECTION_WINDOW",
    "STREAM_WINDOW",
    "Allow",
    "Close",
    "CloseReason",
    "GracefulH2Connection",
    "H2Guard",
    "H2GuardLimits",
    "H2GuardStatistics",
    "H2Tuning",
    "RateLimit",
    "RejectReason",
    "RejectStream",
    "Verdict",
    "recommended_h2_config",
]


class GracefulH2Connection(H2Connection):
    """h2 that survives a graceful GOAWAY either way (h2 4.x closes on any GOAWAY).

    Shared by the sidecar's HTTP/2 layer and the gateway's tunnels: a received
    ``NO_ERROR`` GOAWAY gives h2's event without closing the state machine or dropping
    output queued earlier in the batch (SETTINGS/PING ACKs); :meth:`send_goaway` writes
    a GOAWAY frame without closing ours, so existing streams can still finish."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[ev.Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = ev.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_goaway(self, last_stream_id: int) -> None:
        """Queue GOAWAY ``NO_ERROR`` with ``last_stream_id``; the connection stays open."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self._prepare_for_sending([frame])
