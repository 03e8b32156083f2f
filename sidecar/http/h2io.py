"""The trio adapter of one HTTP/2 connection, either role; every HTTP/2 hop of the sidecar uses it.

An :class:`H2Channel` owns an ``h2`` connection set up with
:func:`federation.h2guard.recommended_h2_config` (4 MiB stream / 16 MiB connection
windows, bytes headers) and an :class:`~federation.h2guard.H2Guard` that judges the
raw bytes before h2 parses them and h2's events after (BAD_INPUTS 17-20): a
``RejectStream`` verdict answers that stream 431 and the connection lives on; a
``Close`` verdict or an h2 protocol error sends GOAWAY and ends the connection.

Three tasks' worth of rules keep it deadlock-free and bounded:

* **one reader** (:meth:`H2Channel.run`) feeds bytes to h2 and dispatches events to
  :class:`H2Stream` objects; it never waits on a write, so a peer that stops reading
  cannot stop us from reading its WINDOW_UPDATEs;
* **one writer** task drains ``data_to_send()`` to the transport whenever anything
  queued output (:meth:`H2Channel._kick`); senders never touch the transport;
* **flow control is the back-pressure**: DATA handed to a consumer is acknowledged
  only when the consumer asks for the next chunk, i.e. after it forwarded this one
  (the rule of :class:`sidecar.http.h2proxy.StreamForwarder`, applied to a pipeline
  whose other side may be HTTP/1.1). So buffered request or response bytes per
  stream stay below the window we advertise, whatever the other hop's speed.

Senders of DATA wait for send window (:meth:`H2Stream.send_data`), so what h2 buffers
for the writer is bounded by the peer's windows too.

A stream that breaks raises :class:`StreamReset` from whichever call notices it;
``refused`` says the peer never processed it (REFUSED_STREAM, or a stream above a
GOAWAY's last id), which makes any request safe to retry.

Connection lifetime (a timer task per connection, decisions in the pure
:class:`~sidecar.http.keepalive.Keepalive`):

* **keepalive** (``keepalive=``, pooled client connections): PING after
  ``interval`` without receiving anything; unanswered within ``timeout`` the
  connection is dead (``closed == "keepalive_timeout"``), its streams fail with a
  non-refused :class:`StreamReset` (the request may have been processed: the retry
  layer retries it as ``reset``, idempotent requests only), and the pool drops it;
  no streams for ``idle_timeout``: GOAWAY ``NO_ERROR`` and close;
* **graceful drain** (:meth:`H2Channel.drain`, server role, SIGTERM): RFC 9113
  section 6.8's two steps, GOAWAY with last id 2^31-1 plus a PING, then (on the PING's
  ACK, or after :data:`DRAIN_PING_TIMEOUT`) GOAWAY with the last stream id really
  accepted; streams up to it finish, later ones are refused (REFUSED_STREAM), and the
  connection closes when the last stream ends;
* **a received GOAWAY NO_ERROR** keeps the connection open (h2 4.x would close its
  state machine on any GOAWAY, so :class:`GracefulH2Connection` handles that one frame):
  our streams up to its last id run to completion, later ones are reported
  ``refused``, no new stream is opened, and the connection closes once idle. Any
  other GOAWAY ends the connection: streams up to the last id are reset (they may
  have been processed), later ones refused.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final, Literal

import h2.events as ev
import h2.exceptions as h2x
import trio
from h2.errors import ErrorCodes

from federation.h2guard import (
    Close,
    GracefulH2Connection,
    H2Guard,
    H2Tuning,
    RejectStream,
    recommended_h2_config,
)
from sidecar.http.headers import Header
from sidecar.http.keepalive import Action, Keepalive, KeepaliveConfig

__all__ = [
    "H2Channel",
    "H2Stream",
    "StreamHandler",
    "StreamReset",
    "lone_errors",
]

log = logging.getLogger("meshfed.sidecar")

READ_SIZE: Final = 256 * 1024
"""Bytes per transport read: large reads mean fewer wake-ups (DESIGN "Performance")."""

_STREAM_ERRORS: Final = (h2x.StreamClosedError, h2x.NoSuchStreamError, h2x.ProtocolError)

MAX_STREAM_ID: Final = 2**31 - 1
"""The first GOAWAY of a graceful drain carries this (RFC 9113 section 6.8)."""

DRAIN_PING_TIMEOUT: Final = 1.0
"""Drain: the final GOAWAY goes out after this even if the PING sent with the first one
is never acknowledged."""


@contextlib.contextmanager
def lone_errors() -> Iterator[None]:
    """Re-raise a nursery's single exception as itself.

    trio wraps whatever escapes a nursery in an ExceptionGroup; the pipeline's
    ``except SinkBroken`` / ``except StreamReset`` must still see a lone failure.
    Groups with several leaves propagate unchanged."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            e = pending.pop()
            if isinstance(e, BaseExceptionGroup):
                pending.extend(e.exceptions)
            else:
                leaves.append(e)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


class StreamReset(Exception):
    """The stream ended abnormally (reset by either side, or its connection died)."""

    def __init__(self, error_code: int, *, refused: bool = False, detail: str = "") -> None:
        super().__init__(f"stream reset ({error_code}){': ' + detail if detail else ''}")
        self.error_code = error_code
        """HTTP/2 error code (``CANCEL`` for a lost connection)."""
        self.refused = refused
        """The peer never processed the stream: safe to retry any request."""


StreamHandler = Callable[["H2Stream"], Awaitable[None]]


class H2Stream:
    """One stream of an :class:`H2Channel`, seen from the task that serves or sends it.

    ``head`` is the request (server role) or the response (client role) header block;
    body chunks come from :meth:`receive_data` in order, then ``trailers`` (or None).
    """

    def __init__(self, channel: H2Channel, stream_id: int) -> None:
        self.channel = channel
        self.stream_id = stream_id
        self.head: list[Header] | None = None
        self.trailers: list[Header] | None = None
        self._head_ready = trio.Event()
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._unacked = 0
        self._remote_ended = False
        self._local_ended = False
        self._error: StreamReset | None = None
        self._changed = trio.Event()
        self.received_bytes = 0
        self.sent_bytes = 0

    # -- state fed by the reader -----------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_head(self, headers: list[Header]) -> None:
        if self.head is None:
            self.head = headers
            self._head_ready.set()
        else:  # a second block is the trailers
            self.trailers = headers
        self._wake()

    def _on_data(self, data: bytes, flow: int) -> None:
        self._chunks.append((data, flow))
        self.received_bytes += len(data)
        self._wake()

    def _on_end(self) -> None:
        self._remote_ended = True
        self._head_ready.set()
        self._wake()
        self._maybe_forget()

    def _on_reset(self, error: StreamReset) -> None:
        if self._error is None and not (self._remote_ended and self._local_ended):
            self._error = error
        self._head_ready.set()
        self._wake()
        self.channel._forget(self.stream_id)

    def _maybe_forget(self) -> None:
        if self._remote_ended and self._local_ended:
            self._ack_consumed()
            self.channel._forget(self.stream_id)

    # -- receiving -------------------------------------------------------------------

    @property
    def remote_ended(self) -> bool:
        """The peer sent END_STREAM (everything it will send is queued here)."""
        return self._remote_ended

    @property
    def error(self) -> StreamReset | None:
        """Why the stream broke, if it did."""
        return self._error

    async def receive_head(self) -> list[Header]:
        """The header block (request or response); raises :class:`StreamReset`."""
        await self._head_ready.wait()
        if self.head is None:
            raise self._error or StreamReset(ErrorCodes.PROTOCOL_ERROR, detail="no headers")
        return self.head

    def _ack_consumed(self) -> None:
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.channel._acknowledge(self.stream_id, n)

    async def receive_data(self) -> bytes | None:
        """The next body chunk, or None at the end (then see ``trailers``).

        Calling it again acknowledges the previous chunk: the caller has forwarded it,
        so the peer may send that much more (back-pressure across the proxy).
        """
        self._ack_consumed()
        while True:
            if self._chunks:
                data, flow = self._chunks.popleft()
                self._unacked = flow
                return data
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                return None
            await self._changed.wait()

    # -- sending ---------------------------------------------------------------------

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self.channel.closed is not None:
            raise StreamReset(ErrorCodes.CANCEL, detail=f"connection {self.channel.closed}")

    async def send_headers(self, headers: Sequence[Header], *, end_stream: bool = False) -> None:
        """Send a header block (a response head, or trailers with ``end_stream``)."""
        self._check()
        try:
            self.channel._conn.send_headers(self.stream_id, list(headers), end_stream=end_stream)
        except _STREAM_ERRORS as exc:
            raise StreamReset(ErrorCodes.STREAM_CLOSED, detail=str(exc)) from None
        if end_stream:
            self._local_ended = True
        self.channel._kick()
        if end_stream:
            self._maybe_forget()

    async def send_data(self, data: bytes | memoryview, *, end_stream: bool = False) -> None:
        """Send ``data`` as DATA frames, waiting for flow-control window as needed.

        Slices a memoryview, so a large body is never re-copied per frame.
        """
        view = memoryview(data)
        conn = self.channel._conn
        sent = 0
        while sent < len(view):
            self._check()
            try:
                window = conn.local_flow_control_window(self.stream_id)
            except _STREAM_ERRORS as exc:
                raise StreamReset(ErrorCodes.STREAM_CLOSED, detail=str(exc)) from None
            if window <= 0:
                await self.channel._window_wait()
                continue
            n = min(window, len(view) - sent, conn.max_outbound_frame_size)
            last = end_stream and sent + n == len(view)
            try:
                conn.send_data(self.stream_id, view[sent : sent + n], end_stream=last)
            except _STREAM_ERRORS as exc:
                raise StreamReset(ErrorCodes.STREAM_CLOSED, detail=str(exc)) from None
            self.channel._guard.note_data_sent()
            sent += n
            self.sent_bytes += n
            self.channel._kick()
            if sent < len(view):
                # Let the writer drain between frames of a large body.
                await trio.lowlevel.checkpoint()
        if end_stream and not view:
            await self.end()
        elif end_stream:
            self._local_ended = True
            self._maybe_forget()

    async def end(self, trailers: Sequence[Header] | None = None) -> None:
        """Finish our side: trailers (END_STREAM) if any, else an empty END_STREAM DATA."""
        if self._local_ended:
            return
        if trailers:
            await self.send_headers(trailers, end_stream=True)
            return
        self._check()
        try:
            self.channel._conn.end_stream(self.stream_id)
        except _STREAM_ERRORS as exc:
            raise StreamReset(ErrorCodes.STREAM_CLOSED, detail=str(exc)) from None
        self._local_ended = True
        self.channel._kick()
        self._maybe_forget()

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abort the stream (no-op once it is finished); never raises."""
        if self._error is None and not (self._remote_ended and self._local_ended):
            self._error = StreamReset(code, detail="reset locally")
            if self.channel.closed is None:
                with contextlib.suppress(*_STREAM_ERRORS):
                    self.channel._conn.reset_stream(self.stream_id, error_code=code)
                self.channel._kick()
        self._ack_consumed()
        self._wake()
        self.channel._forget(self.stream_id)

    def __repr__(self) -> str:
        return (
            f"<H2Stream {self.stream_id} remote_ended={self._remote_ended} "
            f"local_ended={self._local_ended} error={self._error is not None}>"
        )


class H2Channel:
    """One HTTP/2 connection over a trio stream (see the module docstring).

    Client role: :meth:`open_stream` while :meth:`can_open`. Server role: every
    request stream is handed to ``on_stream`` in a task of the channel's own
    nursery, cancelled when the connection dies.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        role: Literal["client", "server"],
        *,
        on_stream: StreamHandler | None = None,
        tuning: H2Tuning | None = None,
        on_refused: Callable[[str], None] | None = None,
        keepalive: KeepaliveConfig | None = None,
    ) -> None:
        if role == "server" and on_stream is None:
            raise ValueError("a server channel needs on_stream")
        self.transport = transport
        self.role = role
        self._tuning = tuning or recommended_h2_config(role)
        self._conn = GracefulH2Connection(config=self._tuning.configuration())
        self._tuning.start(self._conn)
        self._guard = H2Guard(self._tuning.guard_limits, client_side=role == "client")
        self._on_stream = on_stream
        self._on_refused = on_refused
        self._streams: dict[int, H2Stream] = {}
        self._want_write = trio.Event()
        self._send_lock = trio.Lock()
        self._window = trio.Event()
        self._goaway = False
        """The peer sent GOAWAY: no new stream is opened (client) or accepted (server)."""
        self._keepalive = (
            Keepalive(keepalive, trio.current_time()) if keepalive is not None else None
        )
        self._ping_seq = 0
        self._keepalive_ping: bytes | None = None
        self._drain_ping: bytes | None = None
        self._drain_ping_deadline = math.inf
        self._last_accepted: int | None = None
        """Drain: the last id of our final GOAWAY; later request streams are refused."""
        self._timer_wake = trio.Event()
        self._reader_scope = trio.CancelScope()
        self.closed: str | None = None
        """Why the connection ended (``eof``, ``broken``, a guard reason...), or None."""
        self.streams_opened = 0
        """Streams opened over the connection's life (either role)."""
        self.idle_since = trio.current_time()
        self.on_capacity: Callable[[], None] | None = None
        """Called whenever a stream finishes (a pool waiting for room listens here)."""
        self._done = trio.Event()

    # -- bookkeeping -----------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        """Streams not yet finished."""
        return len(self._streams)

    @property
    def draining(self) -> bool:
        """Either side sent GOAWAY: streams finish, no new ones."""
        return self._goaway or self._drain_ping is not None

    def _forget(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        if not self._streams:
            self.idle_since = trio.current_time()
            if self._keepalive is not None:
                self._keepalive.streams_changed(0, self.idle_since)
                self._poke_timer()
            self._maybe_finish_drain()
        if self.on_capacity is not None:
            self.on_capacity()

    def _streams_opened(self) -> None:
        if self._keepalive is not None and len(self._streams) == 1:
            self._keepalive.streams_changed(1, trio.current_time())

    def _poke_timer(self) -> None:
        self._timer_wake.set()

    def _end(self, reason: str) -> None:
        """Stop the connection now: :meth:`run` resets what is left and closes."""
        if self.closed is None:
            self.closed = reason
        self._reader_scope.cancel()
        self._poke_timer()

    def _kick(self) -> None:
        self._want_write.set()

    async def _window_wait(self) -> None:
        if self.closed is None:
            await self._window.wait()

    def _window_opened(self) -> None:
        self._window.set()
        self._window = trio.Event()

    def _acknowledge(self, stream_id: int, n: int) -> None:
        if self.closed is None and n > 0:
            with contextlib.suppress(h2x.ProtocolError):
                self._conn.acknowledge_received_data(n, stream_id)
            self._kick()

    def can_open(self) -> bool:
        """Client: may another stream start here now (open, no GOAWAY, below the peer's
        MAX_CONCURRENT_STREAMS, stream ids left)?"""
        if self.closed is not None or self._goaway:
            return False
        if (self._conn.highest_outbound_stream_id or 0) >= 2**31 - 1024:
            return False
        return self._conn.open_outbound_streams < self._conn.remote_settings.max_concurrent_streams

    @property
    def capacity(self) -> int:
        """Client: streams that may still be opened now."""
        if not self.can_open():
            return 0
        return self._conn.remote_settings.max_concurrent_streams - self._conn.open_outbound_streams

    async def open_stream(self, headers: Sequence[Header], *, end_stream: bool) -> H2Stream:
        """Client: start a request stream with ``headers``; raises :class:`StreamReset`
        (``refused``) when this connection cannot take it."""
        if not self.can_open():
            raise StreamReset(ErrorCodes.REFUSED_STREAM, refused=True, detail="no capacity")
        sid = self._conn.get_next_available_stream_id()
        stream = H2Stream(self, sid)
        self._streams[sid] = stream
        self._conn.send_headers(sid, list(headers), end_stream=end_stream)
        stream._local_ended = end_stream
        self.streams_opened += 1
        self._streams_opened()
        self._kick()
        return stream

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; then every live stream is reset and the
        transport closed. ``started`` once the preface is queued."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timers)
                self._kick()
                task_status.started()
                try:
                    with self._reader_scope:
                        await self._reader(nursery)
                finally:
                    if self.closed is None:
                        self.closed = "eof"
                    self._fail_all(StreamReset(ErrorCodes.CANCEL, detail=self.closed))
                    # Give the writer a moment to flush a GOAWAY, never longer.
                    with trio.move_on_after(0.5):
                        await self._flush_now()
                    nursery.cancel_scope.cancel()
        finally:
            self._done.set()
            await trio.aclose_forcefully(self.transport)

    async def _flush_now(self) -> None:
        async with self._send_lock:  # never interleave with the writer's send
            data = self._conn.data_to_send()
            if data:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.transport.send_all(data)

    async def _writer(self) -> None:
        try:
            while True:
                await self._want_write.wait()
                self._want_write = trio.Event()
                async with self._send_lock:
                    data = self._conn.data_to_send()
                    if data:
                        await self.transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.closed = self.closed or "broken"
            # Unblock the reader: nothing more can be sent on this connection.
            self._fail_all(StreamReset(ErrorCodes.CANCEL, detail="write failed"))
            with contextlib.suppress(trio.ClosedResourceError):
                await trio.aclose_forcefully(self.transport)

    async def _reader(self, nursery: trio.Nursery) -> None:
        while self.closed is None:
            try:
                data = await self.transport.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.closed = self.closed or "broken"
                return
            if not data:
                self.closed = "eof"
                return
            now = trio.current_time()
            if self._keepalive is not None:
                self._keepalive.received(now)
            verdict = self._guard.observe_bytes(data, now)
            if isinstance(verdict, Close):
                self._close_for(verdict)
                return
            try:
                events = self._conn.receive_data(data)
            except h2x.ProtocolError as exc:
                close = self._guard.close_for_h2_error(exc)
                self.closed = close.reason
                self._refused(close.reason)
                return
            rejected: set[int] = set()
            for v in self._guard.observe_events(events, now):
                if isinstance(v, Close):
                    self._close_for(v)
                    return
                if isinstance(v, RejectStream):
                    rejected.add(v.stream_id)
                    self._reject(v)
            for event in events:
                self._dispatch(event, rejected, nursery)
            self._kick()

    def _refused(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)

    def _close_for(self, verdict: Close) -> None:
        with contextlib.suppress(h2x.ProtocolError):
            self._conn.close_connection(error_code=verdict.error_code)
        self.closed = verdict.reason
        self._refused(verdict.reason)

    def _reject(self, verdict: RejectStream) -> None:
        # BAD_INPUTS 17: one stream over the header limits gets 431 (server) or a
        # reset (client); the connection and its other streams live on.
        sid = verdict.stream_id
        self._refused(verdict.reason)
        with contextlib.suppress(*_STREAM_ERRORS):
            if self.role == "server":
                self._conn.send_headers(
                    sid,
                    [(b":status", str(verdict.http_status).encode()), (b"content-length", b"0")],
                    end_stream=True,
                )
            else:
                self._conn.reset_stream(sid, error_code=verdict.error_code)
        stream = self._streams.get(sid)
        if stream is not None:
            stream._on_reset(StreamReset(int(verdict.error_code), detail=verdict.reason))

    def _dispatch(self, event: ev.Event, rejected: set[int], nursery: trio.Nursery) -> None:
        sid = getattr(event, "stream_id", None)
        if isinstance(event, ev.RequestReceived):
            assert sid is not None
            if sid in rejected:
                return
            refuse = self.role != "server" or self._goaway
            if self._last_accepted is not None and sid > self._last_accepted:
                refuse = True  # after our final GOAWAY: never processed, safe to retry
            if refuse:
                with contextlib.suppress(*_STREAM_ERRORS):
                    self._conn.reset_stream(sid, error_code=ErrorCodes.REFUSED_STREAM)
                if self._on_refused is not None and self.draining:
                    self._on_refused("draining")
                return
            new = H2Stream(self, sid)
            self._streams[sid] = new
            self.streams_opened += 1
            self._streams_opened()
            new._on_head(list(event.headers or []))
            nursery.start_soon(self._serve_stream, new)
            return
        stream = self._streams.get(sid) if sid is not None else None
        if stream is None:
            if isinstance(event, ev.DataReceived) and event.flow_controlled_length:
                assert sid is not None
                self._acknowledge(sid, event.flow_controlled_length)
            elif isinstance(event, ev.WindowUpdated | ev.RemoteSettingsChanged):
                self._window_opened()
            elif isinstance(event, ev.ConnectionTerminated):
                self._on_goaway(event)
            elif isinstance(event, ev.PingAckReceived):
                self._on_ping_ack(bytes(event.ping_data or b""))
            return
        if isinstance(event, ev.ResponseReceived | ev.TrailersReceived):
            if sid not in rejected:
                stream._on_head(list(event.headers or []))
        elif isinstance(event, ev.DataReceived):
            flow = event.flow_controlled_length or 0
            if event.data:
                stream._on_data(bytes(event.data), flow)
            elif flow:
                self._acknowledge(stream.stream_id, flow)
        elif isinstance(event, ev.StreamEnded):
            stream._on_end()
        elif isinstance(event, ev.StreamReset):
            code = int(event.error_code or 0)
            stream._on_reset(StreamReset(code, refused=code == ErrorCodes.REFUSED_STREAM))
        elif isinstance(event, ev.WindowUpdated | ev.RemoteSettingsChanged):
            self._window_opened()
        elif isinstance(event, ev.ConnectionTerminated):
            self._on_goaway(event)

    def _on_goaway(self, event: ev.ConnectionTerminated) -> None:
        # last_stream_id counts streams *we* initiated (client: our requests; a server
        # initiates none). Ours above it were never processed: refused, safe to retry
        # anywhere. A graceful GOAWAY lets the others finish (GracefulH2Connection kept h2
        # open); any other one ended h2's state machine, so they are reset (not
        # refused: they may have been processed).
        self._goaway = True
        graceful = event.error_code == ErrorCodes.NO_ERROR
        last = event.last_stream_id if event.last_stream_id is not None else MAX_STREAM_ID
        code = int(event.error_code or 0)
        ours = 1 if self.role == "client" else 0
        for sid, stream in list(self._streams.items()):
            if sid % 2 == ours and sid > last:
                if graceful:
                    with contextlib.suppress(*_STREAM_ERRORS):
                        self._conn.reset_stream(sid, error_code=ErrorCodes.CANCEL)
                stream._on_reset(
                    StreamReset(ErrorCodes.REFUSED_STREAM, refused=True, detail="above GOAWAY")
                )
            elif not graceful:
                stream._on_reset(StreamReset(code, detail="peer GOAWAY"))
        if not graceful:
            self._end("peer_goaway")
        else:
            self._maybe_finish_drain()
        if self.on_capacity is not None:
            self.on_capacity()  # a pool waiting for room must dial another connection

    # -- keepalive, idle close, drain ------------------------------------------------

    def _next_ping(self) -> bytes:
        self._ping_seq += 1
        payload = self._ping_seq.to_bytes(8, "big")
        self._conn.ping(payload)
        self._kick()
        return payload

    def _on_ping_ack(self, payload: bytes) -> None:
        if payload == self._keepalive_ping and self._keepalive is not None:
            self._keepalive_ping = None
            self._keepalive.ping_acked(trio.current_time())
        if payload == self._drain_ping and self._last_accepted is None:
            self._final_goaway()
        self._poke_timer()

    def drain(self) -> None:
        """Graceful shutdown (server role): GOAWAY 2^31-1 + PING now, the final GOAWAY
        with the real last stream id once the PING comes back (or after
        :data:`DRAIN_PING_TIMEOUT`), then close when the last stream ends. Streams in
        flight run to completion; the runner's drain deadline bounds them."""
        if self.closed is not None or self._drain_ping is not None:
            return
        if self.role != "server":
            # A client has nothing in flight to wait for on the peer's side: GOAWAY and
            # stop opening streams; live ones finish.
            self._goaway = True
            self._conn.send_goaway(0)
            self._kick()
            self._maybe_finish_drain()
            return
        self._conn.send_goaway(MAX_STREAM_ID)
        self._drain_ping = self._next_ping()
        self._drain_ping_deadline = trio.current_time() + DRAIN_PING_TIMEOUT
        self._poke_timer()

    def _final_goaway(self) -> None:
        if self.closed is not None or self._last_accepted is not None:
            return
        self._last_accepted = self._conn.highest_inbound_stream_id or 0
        self._conn.send_goaway(self._last_accepted)
        self._kick()
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if self.closed is not None or self._streams:
            return
        if self._last_accepted is not None:
            self._end("drained")
        elif self._goaway and self.role == "client":
            self._end("peer_goaway")

    async def _timers(self) -> None:
        """Keepalive, idle close and the drain's PING deadline (one task, woken early
        whenever a deadline may have moved earlier)."""
        while self.closed is None:
            deadline = self._drain_ping_deadline if self._last_accepted is None else math.inf
            if self._keepalive is not None:
                deadline = min(deadline, self._keepalive.next_deadline())
            with trio.move_on_at(deadline):
                await self._timer_wake.wait()
            self._timer_wake = trio.Event()
            now = trio.current_time()
            if self._drain_ping is not None and now >= self._drain_ping_deadline:
                self._final_goaway()
            if self._keepalive is None or self.closed is not None:
                continue
            action = self._keepalive.poll(now)
            if action is Action.PING:
                self._keepalive_ping = self._next_ping()
            elif action is Action.DEAD:
                log.info(
                    json.dumps(
                        {"event": "http_connection_dead", "reason": action.value}, sort_keys=True
                    )
                )
                self._fail_all(StreamReset(ErrorCodes.CANCEL, detail=action.value))
                self._end(action.value)
            elif action is Action.IDLE:
                with contextlib.suppress(h2x.ProtocolError):
                    self._conn.close_connection()
                self._end(action.value)

    def _fail_all(self, error: StreamReset) -> None:
        for stream in list(self._streams.values()):
            stream._on_reset(error)
        self._window_opened()

    async def _serve_stream(self, stream: H2Stream) -> None:
        assert self._on_stream is not None
        try:
            await self._on_stream(stream)
        except Exception as exc:
            # One request's failure must never take the connection (or the process,
            # through the listener's nursery) down with it: log it, reset the stream.
            log.info(
                json.dumps(
                    {"event": "http_stream_failed", "error": repr(exc)[:300]}, sort_keys=True
                )
            )
        finally:
            # A handler that returned without finishing its side aborts the stream; one
            # that answered in full while the client still sends says NO_ERROR
            # (RFC 9113 8.1: the request body is no longer wanted).
            stream.reset(ErrorCodes.NO_ERROR if stream._local_ended else ErrorCodes.INTERNAL_ERROR)

    async def aclose(self) -> None:
        """Close now (GOAWAY NO_ERROR, then the transport); live streams are reset."""
        if self.closed is None:
            with contextlib.suppress(h2x.ProtocolError):
                self._conn.close_connection()
            self.closed = "local"
            self._fail_all(StreamReset(ErrorCodes.CANCEL, detail="closed locally"))
            with trio.move_on_after(0.5):
                await self._flush_now()
        await trio.aclose_forcefully(self.transport)

    async def wait_closed(self) -> None:
        """Return once :meth:`run` has finished."""
        await self._done.wait()

    def __repr__(self) -> str:
        return (
            f"<H2Channel {self.role} {'open' if self.closed is None else self.closed} "
            f"streams={len(self._streams)} opened={self.streams_opened}>"
        )
