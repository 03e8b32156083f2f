"""Sans-IO HTTP/2 CONNECT tunnel between two east-west gateways (client and server roles).

One :class:`TunnelProtocol` is one HTTP/2 connection. It does no I/O and reads no
clock: the trio adapter (``gateway/tunnel.py``) feeds it the bytes it read with
``receive_data(data, now)``, acts on the :class:`TunnelEvent` list it returns, and
writes what ``data_to_send()`` hands back. Every proxied TCP connection is one
CONNECT stream (RFC 9113 section 8.5): ``:method CONNECT``, ``:authority`` = the
meshfed SNI, a ``200`` answer, then DATA both ways; END_STREAM is the TCP
half-close (``shutdown(SHUT_WR)``) and RST_STREAM the abort.

Outbound DATA is scheduled, not written in call order: :meth:`TunnelProtocol.queue_data`
only queues a stream's bytes, and :meth:`TunnelProtocol.data_to_send` frames them
round-robin over the streams with queued bytes and send window, at most
``send_quantum`` bytes per stream per turn, after all control output (HEADERS,
WINDOW_UPDATE, PING/SETTINGS ACKs, RST_STREAM, GOAWAY), so one bulk stream cannot
make a small one wait behind its backlog. An END_STREAM asked for while bytes are
still queued goes out right after them.

Flow control is the back-pressure: the protocol never acknowledges DATA on its
own. The adapter calls :meth:`acknowledge` only once the bytes were written to the
local socket, so a reader that stops reading closes its own stream's window
(4 MiB) and nothing else; the connection window (16 MiB) bounds what one peer can
make us buffer in total. DATA for a stream the adapter has released is
acknowledged at once (connection level), so a closed stream never leaks window.

Abuse (BAD_INPUTS 17-20) is judged by :class:`federation.h2guard.H2Guard` on both
roles: raw frames before h2 parses them, then h2's events. A ``Close`` verdict or
an h2 protocol error ends the connection with a GOAWAY and a
:class:`ConnectionClosed` event carrying a stable reason.

Graceful drain (GOAWAY ``NO_ERROR``), which h2 4.x does not support on its own:

* h2's ``close_connection`` moves the connection to CLOSED, after which even
  existing streams cannot send. :meth:`start_drain` instead writes the GOAWAY
  frame itself (hyperframe) and keeps h2 open; CONNECTs on later stream ids are
  refused with ``REFUSED_STREAM`` (never processed, so the client may retry).
* h2 treats *any* received GOAWAY as fatal and drops its queued output. The
  connection subclass below handles a ``NO_ERROR`` GOAWAY as RFC 9113 section 6.8
  says: streams up to ``last_stream_id`` run to completion, newer ones are
  reported reset with ``REFUSED_STREAM``, and no new stream may be opened.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

import h2.events as ev
import h2.exceptions as h2x
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from federation.h2guard import (
    Close,
    GracefulH2Connection,
    H2Guard,
    H2GuardLimits,
    H2Tuning,
    RejectStream,
    recommended_h2_config,
)

__all__ = [
    "REASON_HEADER",
    "ConnectRequest",
    "ConnectResponse",
    "ConnectionClosed",
    "Data",
    "EndOfStream",
    "GoawayReceived",
    "PingAcked",
    "StreamRefusedLocally",
    "StreamReset",
    "TunnelEvent",
    "TunnelProtocol",
    "WindowOpened",
]

REASON_HEADER: Final = b"meshfed-reason"
"""Response header carrying the stable refusal reason of a non-200 CONNECT answer."""

_MAX_STREAM_ID: Final = 2**31 - 1
_STREAM_ID_HEADROOM: Final = 1024
"""Stop opening streams this close to the id space's end; the pool dials anew."""

SEND_QUANTUM: Final = 32 * 1024
"""Default bytes one stream may frame per round-robin turn of ``data_to_send``."""


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Server: the peer opened a CONNECT stream; answer with ``accept`` or ``refuse``."""

    stream_id: int
    """The stream."""
    authority: str
    """The ``:authority`` (ASCII): the meshfed SNI of the destination, not yet parsed."""


@dataclass(frozen=True, slots=True)
class ConnectResponse:
    """Client: the answer to our CONNECT."""

    stream_id: int
    """The stream."""
    status: int
    """HTTP status; 200 means the tunnel stream is established."""
    reason: str
    """``meshfed-reason`` of a refusal (empty for 200 or when absent)."""


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes for a stream; acknowledge ``flow_length`` once they were written locally."""

    stream_id: int
    """The stream."""
    data: bytes
    """Payload."""
    flow_length: int
    """Flow-controlled length (payload plus padding), for :meth:`TunnelProtocol.acknowledge`."""


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer half-closed the stream (END_STREAM): shut down the local socket's write side."""

    stream_id: int
    """The stream."""


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was aborted (RST_STREAM from the peer, or refused by a draining peer)."""

    stream_id: int
    """The stream."""
    error_code: int
    """HTTP/2 error code."""


@dataclass(frozen=True, slots=True)
class StreamRefusedLocally:
    """We refused a peer's stream before the adapter saw it (a metric, nothing to do)."""

    stream_id: int
    """The stream."""
    reason: str
    """``bad_connect``, ``draining``, or a guard reason (``header_list_too_large`` ...)."""


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Send window grew (WINDOW_UPDATE or SETTINGS): blocked senders may continue."""

    stream_id: int | None
    """The stream, or None for the connection (every stream may continue)."""


@dataclass(frozen=True, slots=True)
class PingAcked:
    """Our keepalive PING came back."""

    payload: bytes
    """The 8 opaque bytes."""
    rtt: float
    """Seconds between :meth:`TunnelProtocol.ping` and the ACK, on the adapter's clock."""


@dataclass(frozen=True, slots=True)
class GoawayReceived:
    """The peer drains: open no new stream here; streams up to ``last_stream_id`` go on."""

    last_stream_id: int
    """Highest of our streams the peer will process."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Terminal: send ``data_to_send()`` (the GOAWAY), then close the transport."""

    reason: str
    """Stable reason: a guard/h2 close reason, ``peer_goaway`` or ``local``."""
    error_code: int
    """HTTP/2 error code of the GOAWAY (sent or received)."""
    detail: str = ""
    """Free text for logs."""


TunnelEvent = (
    ConnectRequest
    | ConnectResponse
    | Data
    | EndOfStream
    | StreamReset
    | StreamRefusedLocally
    | WindowOpened
    | PingAcked
    | GoawayReceived
    | ConnectionClosed
)


def _status_of(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, str]:
    status, reason = 0, ""
    for name, value in headers:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
        elif name == REASON_HEADER:
            reason = value.decode("ascii", "replace")[:64]
    return status, reason


# -- the protocol ----------------------------------------------------------------------------


class TunnelProtocol:
    """One gateway-to-gateway HTTP/2 connection, either role (see the module docstring).

    Invariants: no method does I/O; every method that changes h2 state moves h2's
    output into :meth:`data_to_send`; after :class:`ConnectionClosed` the protocol
    accepts nothing more (``receive_data`` returns ``[]``, senders get 0).
    """

    def __init__(
        self,
        role: Literal["client", "server"],
        *,
        tuning: H2Tuning | None = None,
        guard_limits: H2GuardLimits | None = None,
        send_quantum: int = SEND_QUANTUM,
    ) -> None:
        if send_quantum < 1:
            raise ValueError("send_quantum must be >= 1")
        self.role = role
        self.send_quantum = send_quantum
        self._tuning = tuning or recommended_h2_config(role)
        self._h2 = GracefulH2Connection(config=self._tuning.configuration())
        self._tuning.start(self._h2)
        self._guard = H2Guard(
            guard_limits or self._tuning.guard_limits, client_side=role == "client"
        )
        self._out: list[bytes] = []
        self._out_len = 0
        self._live: set[int] = set()
        """Streams the adapter owns: DATA for any other stream is acknowledged at once."""
        self._closed: ConnectionClosed | None = None
        self._draining = False
        self._peer_draining = False
        self._goaway_last_id: int | None = None
        self._highest_peer_stream = 0
        self._pings: dict[bytes, float] = {}
        self._ping_seq = 0
        self._queues: dict[int, collections.deque[memoryview]] = {}
        """Outbound bytes per stream, not yet framed (the caller's views, never copied)."""
        self._queued: dict[int, int] = {}
        """Byte count of each queue in ``_queues``."""
        self._turns: collections.deque[int] = collections.deque()
        """Round-robin order of the streams in ``_queues`` (each exactly once)."""
        self._eof_after: set[int] = set()
        """Streams whose END_STREAM waits for their queued bytes."""
        self._pull()

    # -- state -------------------------------------------------------------------------------

    @property
    def closed(self) -> ConnectionClosed | None:
        """The terminal event, once the connection has ended."""
        return self._closed

    @property
    def draining(self) -> bool:
        """Either side sent a graceful GOAWAY: no new stream will be accepted/opened."""
        return self._draining or self._peer_draining

    @property
    def open_streams(self) -> int:
        """Streams the adapter still owns."""
        return len(self._live)

    @property
    def pending_output(self) -> int:
        """Bytes waiting in :meth:`data_to_send` (bound it: a peer that does not read)."""
        return self._out_len

    @property
    def queued_bytes(self) -> int:
        """Outbound DATA bytes queued on all streams and not yet framed."""
        return sum(self._queued.values())

    def queued(self, stream_id: int) -> int:
        """Outbound DATA bytes of ``stream_id`` queued and not yet framed."""
        return self._queued.get(stream_id, 0)

    def wants_write(self) -> bool:
        """Would :meth:`data_to_send` return bytes now? (Output, or queued DATA with window.)"""
        self._pull()
        if self._out:
            return True
        if self._closed is not None:
            return False
        return any(self.send_window(sid) > 0 for sid in self._turns)

    @property
    def outstanding_pings(self) -> int:
        """PINGs sent and not yet acknowledged."""
        return len(self._pings)

    def can_open(self) -> bool:
        """Client: may a new CONNECT stream be opened on this connection now?"""
        if self._closed is not None or self.draining:
            return False
        if (self._h2.highest_outbound_stream_id or 0) >= _MAX_STREAM_ID - _STREAM_ID_HEADROOM:
            return False
        limit = self._h2.remote_settings.max_concurrent_streams
        return self._h2.open_outbound_streams < limit

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on ``stream_id`` now (stream and connection windows)."""
        if self._closed is not None:
            return 0
        try:
            return self._h2.local_flow_control_window(stream_id)
        except (h2x.StreamClosedError, h2x.NoSuchStreamError, h2x.ProtocolError):
            return 0

    # -- output ------------------------------------------------------------------------------

    def _pull(self) -> None:
        data = self._h2.data_to_send()
        if data:
            self._out.append(data)
            self._out_len += len(data)

    def data_to_send(self, max_data: int | None = None) -> bytes:
        """What to write to the transport now: all control output, then queued DATA.

        DATA is framed round-robin (see the module docstring), until about
        ``max_data`` bytes of it (None: everything the windows allow). Streams
        without send window keep their bytes queued until a :class:`WindowOpened`.
        """
        self._pull()
        if self._turns and self._closed is None:
            self._schedule(max_data)
        if not self._out:
            return b""
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        return data

    def _schedule(self, max_data: int | None) -> None:
        budget = max_data if max_data is not None else -1
        quantum = self.send_quantum
        turns = self._turns
        # One pass visits every stream once; a stream with bytes left (and window) goes
        # to the back, so the next call (or pass) starts with the next stream in turn.
        blocked: list[int] = []
        while turns and budget != 0:
            sid = turns.popleft()
            take = min(quantum, self._queued[sid])
            if budget > 0:
                take = min(take, budget)
            sent = self._frame_queued(sid, take)
            if budget > 0:
                budget -= sent
            if self._queued.get(sid):
                if sent:
                    turns.append(sid)
                elif self._h2_stream_closed(sid):
                    # Reset by the peer or closed under us: nothing more can be sent.
                    del self._queues[sid], self._queued[sid]
                    self._eof_after.discard(sid)
                else:
                    blocked.append(sid)
            else:
                self._finish_queue(sid)
        # Window-blocked streams keep their place ahead of the ones that just sent.
        turns.extendleft(reversed(blocked))
        self._pull()

    def _frame_queued(self, sid: int, limit: int) -> int:
        queue = self._queues[sid]
        sent = 0
        while queue and sent < limit:
            view = queue[0]
            n = self._frame(sid, view[: limit - sent])
            if n == 0:
                break
            sent += n
            if n == len(view):
                queue.popleft()
            else:
                queue[0] = view[n:]
        self._queued[sid] -= sent
        return sent

    def _h2_stream_closed(self, sid: int) -> bool:
        stream = self._h2.streams.get(sid)
        return stream is None or stream.closed

    def _finish_queue(self, sid: int) -> None:
        del self._queues[sid]
        del self._queued[sid]
        if sid in self._eof_after:
            self._eof_after.discard(sid)
            self._end_stream_now(sid)

    def _drop_queue(self, sid: int) -> None:
        if self._queues.pop(sid, None) is not None:
            del self._queued[sid]
            self._turns.remove(sid)
        self._eof_after.discard(sid)

    def _drop_all_queues(self) -> None:
        self._queues.clear()
        self._queued.clear()
        self._turns.clear()
        self._eof_after.clear()

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray, now: float) -> list[TunnelEvent]:
        """Feed bytes read from the transport; returns what happened, in order."""
        if self._closed is not None:
            return []
        verdict = self._guard.observe_bytes(data, now)
        if isinstance(verdict, Close):
            return [self._close_for(verdict)]
        try:
            h2_events = self._h2.receive_data(data)
        except h2x.ProtocolError as exc:
            close = self._guard.close_for_h2_error(exc)
            self._pull()  # h2 queued its own GOAWAY
            self._closed = ConnectionClosed(close.reason, int(close.error_code), close.detail)
            self._drop_all_queues()
            return [self._closed]
        rejected: set[int] = set()
        for v in self._guard.observe_events(h2_events, now):
            if isinstance(v, Close):
                return [self._close_for(v)]
            if isinstance(v, RejectStream):
                rejected.add(v.stream_id)
        out: list[TunnelEvent] = []
        for event in h2_events:
            self._translate(event, now, rejected, out)
            if self._closed is not None:
                break
        self._pull()
        return out

    def _close_for(self, verdict: Close) -> ConnectionClosed:
        code = verdict.error_code
        self._h2.close_connection(error_code=code, last_stream_id=self._highest_peer_stream)
        self._pull()
        self._closed = ConnectionClosed(verdict.reason, int(code), verdict.detail)
        self._live.clear()
        self._drop_all_queues()
        return self._closed

    def _translate(
        self, event: ev.Event, now: float, rejected: set[int], out: list[TunnelEvent]
    ) -> None:
        if isinstance(event, ev.RequestReceived):
            sid = event.stream_id
            assert sid is not None
            self._highest_peer_stream = max(self._highest_peer_stream, sid)
            out.append(self._on_request(sid, event.headers or [], rejected))
        elif isinstance(event, ev.ResponseReceived):
            sid = event.stream_id
            assert sid is not None
            status, reason = _status_of(event.headers or [])
            if sid in self._live:
                if status != 200:
                    self._live.discard(sid)
                out.append(ConnectResponse(sid, status, reason))
        elif isinstance(event, ev.DataReceived):
            sid = event.stream_id
            assert sid is not None
            length = event.flow_controlled_length or 0
            if sid in self._live and event.data:
                out.append(Data(sid, event.data, length))
            elif length:
                self._ack(sid, length)
        elif isinstance(event, ev.StreamEnded):
            if event.stream_id in self._live:
                assert event.stream_id is not None
                out.append(EndOfStream(event.stream_id))
        elif isinstance(event, ev.StreamReset):
            sid = event.stream_id
            assert sid is not None
            self._drop_queue(sid)
            if sid in self._live:
                assert sid is not None
                self._live.discard(sid)
                out.append(StreamReset(sid, int(event.error_code or 0)))
        elif isinstance(event, ev.WindowUpdated):
            out.append(WindowOpened(event.stream_id or None))
        elif isinstance(event, ev.RemoteSettingsChanged):
            out.append(WindowOpened(None))
        elif isinstance(event, ev.PingAckReceived):
            payload = bytes(event.ping_data or b"")
            sent = self._pings.pop(payload, None)
            if sent is not None:
                out.append(PingAcked(payload, now - sent))
        elif isinstance(event, ev.ConnectionTerminated):
            self._on_goaway(event, out)
        elif isinstance(event, ev.TrailersReceived):
            # CONNECT streams carry no trailers; treat them as a broken stream.
            sid = event.stream_id
            assert sid is not None
            self.reset(sid, ErrorCodes.PROTOCOL_ERROR)
            out.append(StreamReset(sid, int(ErrorCodes.PROTOCOL_ERROR)))

    def _on_request(
        self, sid: int, headers: list[tuple[bytes, bytes]], rejected: set[int]
    ) -> TunnelEvent:
        if sid in rejected:
            # BAD_INPUTS 17: over the header limits; answer 431, the connection lives on.
            self._answer(sid, 431, "header_limits")
            return StreamRefusedLocally(sid, "header_limits")
        if self.role == "client":
            self._reset_quietly(sid, ErrorCodes.PROTOCOL_ERROR)
            return StreamRefusedLocally(sid, "bad_connect")
        if self._draining:
            self._reset_quietly(sid, ErrorCodes.REFUSED_STREAM)
            return StreamRefusedLocally(sid, "draining")
        fields: dict[bytes, bytes] = {}
        for name, value in headers:
            fields.setdefault(name, value)
        authority = fields.get(b":authority", b"")
        if (
            fields.get(b":method") != b"CONNECT"
            or not authority
            or b":path" in fields
            or b":scheme" in fields
            or b":protocol" in fields
            or not authority.isascii()
        ):
            self._answer(sid, 400, "bad_connect")
            return StreamRefusedLocally(sid, "bad_connect")
        self._live.add(sid)
        return ConnectRequest(sid, authority.decode("ascii"))

    def _on_goaway(self, event: ev.ConnectionTerminated, out: list[TunnelEvent]) -> None:
        code = int(event.error_code or 0)
        if code != ErrorCodes.NO_ERROR:
            self._live.clear()
            self._drop_all_queues()
            self._closed = ConnectionClosed("peer_goaway", code, str(event.additional_data or ""))
            out.append(self._closed)
            return
        self._peer_draining = True
        last = event.last_stream_id or 0
        out.append(GoawayReceived(last))
        if self.role == "client":
            # Streams the peer will not process were never seen by it: report them
            # refused so the caller can retry them on another connection.
            for sid in sorted(s for s in self._live if s > last):
                self._live.discard(sid)
                self._drop_queue(sid)
                self._reset_quietly(sid, ErrorCodes.REFUSED_STREAM)
                out.append(StreamReset(sid, int(ErrorCodes.REFUSED_STREAM)))

    def _answer(self, sid: int, status: int, reason: str) -> None:
        headers = [(b":status", str(status).encode()), (REASON_HEADER, reason.encode())]
        try:
            self._h2.send_headers(sid, headers, end_stream=True)
        except (h2x.ProtocolError, h2x.StreamClosedError):
            self._reset_quietly(sid, ErrorCodes.REFUSED_STREAM)

    def _reset_quietly(self, sid: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2x.ProtocolError, h2x.StreamClosedError, h2x.NoSuchStreamError):
            self._h2.reset_stream(sid, error_code=code)

    def _ack(self, sid: int, n: int) -> None:
        # A ProtocolError means the connection is closing: nothing to give back.
        with contextlib.suppress(h2x.ProtocolError):
            self._h2.acknowledge_received_data(n, sid)

    # -- commands ----------------------------------------------------------------------------

    def open_connect(self, authority: str) -> int:
        """Client: open a CONNECT stream to ``authority``; returns its id (see :meth:`can_open`)."""
        if not self.can_open():
            raise h2x.ProtocolError("cannot open a stream on this connection")
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(
            sid, [(b":method", b"CONNECT"), (b":authority", authority.encode("ascii"))]
        )
        self._live.add(sid)
        self._pull()
        return sid

    def accept(self, stream_id: int) -> None:
        """Server: the tunnel stream is established (answers 200)."""
        self._h2.send_headers(stream_id, [(b":status", b"200")])
        self._pull()

    def refuse(self, stream_id: int, status: int, reason: str) -> None:
        """Server: refuse a CONNECT with ``status`` and the stable ``reason`` header."""
        self._live.discard(stream_id)
        self._answer(stream_id, status, reason)
        self._pull()

    def send_data(self, stream_id: int, data: memoryview) -> int:
        """Frame as much of ``data`` as the windows allow, now; returns how many bytes were taken.

        Bypasses the round-robin scheduler (the adapter uses :meth:`queue_data`); do not
        mix the two on one stream. ``data`` is sliced, never copied (h2 copies once
        into the frame).
        """
        if self._closed is not None or stream_id not in self._live:
            return 0
        return self._frame(stream_id, data)

    def _frame(self, stream_id: int, data: memoryview) -> int:
        n = min(len(data), self.send_window(stream_id))
        frame = self._h2.max_outbound_frame_size
        sent = frames = 0
        while sent < n:
            chunk = data[sent : min(n, sent + frame)]
            self._h2.send_data(stream_id, chunk)
            sent += len(chunk)
            frames += 1
        if frames:
            self._guard.note_data_sent(frames)
            self._pull()
        return n

    def queue_data(self, stream_id: int, data: memoryview) -> bool:
        """Queue ``data`` for the stream; :meth:`data_to_send` frames it in its turn.

        The view is kept, not copied: the caller must not change the bytes until
        :meth:`queued` no longer counts them. Returns False (nothing queued) if the
        stream is not live or the connection is closed.
        """
        if self._closed is not None or stream_id not in self._live:
            return False
        if not data:
            return True
        queue = self._queues.get(stream_id)
        if queue is None:
            queue = self._queues[stream_id] = collections.deque()
            self._queued[stream_id] = 0
            self._turns.append(stream_id)
        queue.append(data)
        self._queued[stream_id] += len(data)
        return True

    def copy_queued(self, stream_id: int) -> None:
        """Replace the stream's queued views by copies (the caller wants its buffer back)."""
        queue = self._queues.get(stream_id)
        if queue:
            self._queues[stream_id] = collections.deque(memoryview(bytes(v)) for v in queue)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side of the stream (the local socket read EOF), after its queued bytes."""
        if self._closed is not None:
            return
        if stream_id in self._queues:
            self._eof_after.add(stream_id)
            return
        self._end_stream_now(stream_id)

    def _end_stream_now(self, stream_id: int) -> None:
        try:
            self._h2.end_stream(stream_id)
        except (h2x.ProtocolError, h2x.StreamClosedError):
            return
        self._pull()

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abort the stream (the local socket broke) and release it; queued bytes are dropped."""
        self._live.discard(stream_id)
        self._drop_queue(stream_id)
        if self._closed is None:
            self._reset_quietly(stream_id, code)
            self._pull()

    def release(self, stream_id: int) -> None:
        """The adapter is done with the stream; later DATA on it is acknowledged at once.

        Bytes still queued for it are sent (with a pending END_STREAM) unless it was reset.
        """
        self._live.discard(stream_id)

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """``flow_length`` bytes of the stream were written locally: reopen the windows."""
        if self._closed is None and flow_length > 0:
            self._ack(stream_id, flow_length)
            self._pull()

    def ping(self, now: float) -> bytes:
        """Send a keepalive PING; its :class:`PingAcked` reports the round trip."""
        self._ping_seq += 1
        payload = self._ping_seq.to_bytes(8, "big")
        self._pings[payload] = now
        self._h2.ping(payload)
        self._pull()
        return payload

    def start_drain(self) -> None:
        """Graceful GOAWAY (NO_ERROR): running streams finish, new ones are refused."""
        if self._closed is not None or self._draining:
            return
        self._draining = True
        self._pull()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._highest_peer_stream
        frame.error_code = ErrorCodes.NO_ERROR
        self._goaway_last_id = self._highest_peer_stream
        data = frame.serialize()
        self._out.append(data)
        self._out_len += len(data)

    def close(
        self, reason: str = "local", code: ErrorCodes = ErrorCodes.NO_ERROR
    ) -> ConnectionClosed:
        """End the connection now (GOAWAY); returns the terminal event."""
        if self._closed is None:
            self._h2.close_connection(error_code=code, last_stream_id=self._highest_peer_stream)
            self._pull()
            self._closed = ConnectionClosed(reason, int(code))
            self._live.clear()
            self._drop_all_queues()
        return self._closed

    def guard_allows(self) -> bool:
        """False once the guard has closed the connection."""
        return not isinstance(self._guard.closed, Close)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("draining" if self.draining else "open")
        return f"<TunnelProtocol {self.role} {state} streams={len(self._live)}>"
