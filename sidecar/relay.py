"""Byte relay between two trio streams: the L4 path of every meshfed proxy hop.

:func:`relay` copies ``a -> b`` and ``b -> a`` concurrently until both directions
have ended, the relay has been idle for ``idle_timeout``, one side breaks, or it
is cancelled. It is not a stream wrapper; it owns both streams for its lifetime
and always closes both before it returns or raises.

Invariants (each has a test in ``tests/relay/``):

* **Bounded memory.** Each direction has at most one read outstanding, and the
  write of a chunk completes before the next read starts, so a direction holds at
  most ``chunk_size`` bytes in this process. A peer that stops reading blocks
  ``send_all``; that blocks the next ``receive_some`` and the kernel's (or the
  transport's) flow control pushes back on the sender. Memory never grows with
  the backlog (BAD_INPUTS 23). The other direction keeps running.
* **Half-close.** When one side's ``receive_some`` returns ``b""`` the relay calls
  ``send_eof()`` on the other side if it is a :class:`trio.abc.HalfCloseableStream`
  (a ``SocketStream``; a ``StapledStream``) and keeps the opposite direction
  running until it ends too. ``trio.SSLStream`` cannot half-close (TLS 1.3 has no
  portable write-side close without closing the session), so for an SSLStream
  destination the EOF is *not* forwarded: the peer keeps seeing an open stream
  until the other direction ends, then both are closed (its ``aclose`` sends
  ``close_notify``). Protocols that need a half-closed TLS leg must not be
  relayed through a TLS hop; HTTP and gRPC never need one.
* **Idle timeout.** A deadline ``idle_timeout`` after the last byte that moved in
  either direction, reset when a chunk is received and again when its write
  completes. A write blocked by a peer that does not read moves no bytes, so it
  counts as idle (Envoy's tcp_proxy ``idle_timeout`` has the same meaning). Per
  chunk only the time is recorded; a watchdog task sleeps to the deadline that
  time implies and cancels the relay there, exactly.
* **Errors** (``BrokenResourceError``, ``ClosedResourceError``, ``OSError`` on a
  raw socket) on one side end the whole relay with ``a_broken``/``b_broken``; the
  first failure wins, both sides are closed forcefully. Any other exception is a
  bug and propagates, after both sides are closed.
* **Cancellation** from the caller closes both sides forcefully, counts the relay
  as ``cancelled`` in :class:`RelayStats` and re-raises ``Cancelled``, as trio
  requires. :meth:`RelayStats.drain` cancels relays from the inside, so those
  return a :class:`RelayResult` with ``reason=cancelled``.

Allocation: ``receive_some(max_bytes)`` allocates a fresh ``bytes`` per chunk
(CPython's ``socket.recv`` allocates ``max_bytes`` and shrinks it). When the
source is a plain ``trio.SocketStream`` the relay instead reads with
``socket.recv_into`` into one reusable ``bytearray`` per direction, and a source
with a ``receive_into(buffer) -> int`` method (:class:`ReceiveIntoStream`: the
sidecar's TLS legs, :class:`sidecar.tlshalfclose.HalfCloseTls`, which decrypts
every record that has arrived straight into it) the same way; other streams
(memory streams, HTTP/2 tunnel streams) keep the allocating path.

The hot loop (both sides a ``SocketStream`` or an :class:`UncheckedStream`, which is
every sidecar TCP relay): plain non-blocking syscalls (``os.readv`` into the reused
buffer, ``os.write``), waiting on the socket only when it is not ready, and one
``trio.lowlevel.checkpoint()`` per chunk, which keeps the loop cancellable and fair.
trio's own socket calls take two scheduler trips per call even when the socket is
ready. ``bench/results/relay.md`` and ``docs/performance-notes.md`` have the
measured differences.

:class:`RelaySession` is the bookkeeping every relay implementation shares (this
module's stream relay, ``gateway.splice``'s socket relay): idle deadline, first
failure wins, byte counters, the end reason and registration with
:class:`RelayStats`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import trio

DEFAULT_CHUNK_SIZE: Final = 256 * 1024
"""Bytes per read: large reads mean few wake-ups, which is what matters on these machines."""

CLOSE_GRACE: Final = 1.0
"""Seconds a graceful ``aclose`` (an SSLStream's ``close_notify``) may take after a clean
end; past it the close is forced. A peer that stops reading cannot hold a relay open."""


_LINGER_ABORT: Final = struct.pack("ii", 1, 0)
"""SO_LINGER on with timeout 0: ``close()`` sends RST and drops unsent data."""


@runtime_checkable
class ReceiveIntoStream(Protocol):
    """A stream that can read into a caller's buffer (the relay then reuses one)."""

    async def receive_into(self, buffer: memoryview) -> int:
        """Read at least one byte into ``buffer`` (waiting if needed); 0 means EOF.
        Raises what ``receive_some`` raises."""
        ...


@runtime_checkable
class UncheckedStream(Protocol):
    """A stream with the relay's hot-loop calls: they wait only when they must and,
    unlike trio's stream methods, need not checkpoint when they do not wait. The relay
    checkpoints once per chunk instead (:class:`sidecar.tlshalfclose.HalfCloseTls`)."""

    async def receive_into_unchecked(self, buffer: memoryview) -> int:
        """As ``receive_into``, without the guaranteed checkpoint."""
        ...

    async def send_all_unchecked(self, data: memoryview) -> None:
        """As ``send_all``, without the guaranteed checkpoint."""
        ...


class _SocketFd:
    """A ``trio.SocketStream``'s socket driven with plain non-blocking syscalls.

    trio's socket methods take two scheduler trips per successful call (a cancellation
    check before, a cancel-shielded checkpoint after); these take none unless the
    socket is not ready. The stream keeps owning the socket: its ``send_eof`` and
    ``aclose`` still do the shutdown and the close, after the pumps have stopped.
    """

    __slots__ = ("_sock",)

    def __init__(self, stream: trio.SocketStream) -> None:
        self._sock = stream.socket

    def _fd(self) -> int:
        fd = self._sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return fd

    async def receive_into_unchecked(self, buffer: memoryview) -> int:
        while True:
            fd = self._fd()
            try:
                return os.readv(fd, (buffer,))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)

    async def send_all_unchecked(self, data: memoryview) -> None:
        sent, total = 0, len(data)
        while sent < total:
            fd = self._fd()
            try:
                sent += os.write(fd, data[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)


class RelayEnd(enum.Enum):
    """Why a relay ended."""

    EOF_BOTH = "eof_both"
    """Both directions reached EOF cleanly."""
    IDLE_TIMEOUT = "idle_timeout"
    """No byte moved either way for ``idle_timeout`` seconds."""
    A_BROKEN = "a_broken"
    """Side ``a`` failed (reset, closed, TLS error); both sides were closed."""
    B_BROKEN = "b_broken"
    """Side ``b`` failed; both sides were closed."""
    CANCELLED = "cancelled"
    """Cancelled: by :meth:`RelayStats.drain` (returned) or by the caller (re-raised)."""


class Direction(enum.Enum):
    """One of the two copy directions."""

    A_TO_B = "a_to_b"
    """Bytes read from ``a``, written to ``b``."""
    B_TO_A = "b_to_a"
    """Bytes read from ``b``, written to ``a``."""


@dataclass(frozen=True, slots=True)
class RelayResult:
    """What one relay did."""

    reason: RelayEnd
    """Why it ended."""
    bytes_a_to_b: int
    """Bytes written to ``b`` (including any initial bytes the implementation sent first)."""
    bytes_b_to_a: int
    """Bytes written to ``a``."""
    duration: float
    """Seconds from start to end, on trio's clock."""


@dataclass(frozen=True, slots=True)
class RelayStatistics:
    """A snapshot of :class:`RelayStats`, for a metrics adapter."""

    relays_started: int
    """Relays registered since creation."""
    relays_active: int
    """Relays running now."""
    bytes_a_to_b: int
    """Bytes written to ``b`` sides, counted as each write completes (live, not at the end)."""
    bytes_b_to_a: int
    """Bytes written to ``a`` sides, counted as each write completes."""
    ended_eof_both: int
    """Relays that ended with :attr:`RelayEnd.EOF_BOTH`."""
    ended_idle_timeout: int
    """Relays that ended with :attr:`RelayEnd.IDLE_TIMEOUT`."""
    ended_a_broken: int
    """Relays that ended with :attr:`RelayEnd.A_BROKEN`."""
    ended_b_broken: int
    """Relays that ended with :attr:`RelayEnd.B_BROKEN`."""
    ended_cancelled: int
    """Relays that ended with :attr:`RelayEnd.CANCELLED` (drain or caller)."""
    draining: bool
    """True once :meth:`RelayStats.drain` has been called."""


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What :meth:`RelayStats.drain` did."""

    finished: int
    """Relays that ended on their own before the deadline."""
    cancelled: int
    """Relays still running at the deadline, cancelled and closed."""


class RelayStats:
    """Counters and the set of live relays for one group (a listener, a gateway port).

    Share one instance among the relays of a group; a metrics adapter reads
    :meth:`statistics`. Byte counters move with every chunk, so long-lived
    connections show up in rates while they run. Not thread-safe: use it from
    the trio thread only.
    """

    def __init__(self) -> None:
        self._started = 0
        self._live: set[RelaySession] = set()
        self._bytes = {Direction.A_TO_B: 0, Direction.B_TO_A: 0}
        self._ended = dict.fromkeys(RelayEnd, 0)
        self._draining = False
        self._finished_during_drain = 0
        self._all_done = trio.Event()
        self._all_done.set()

    def statistics(self) -> RelayStatistics:
        """Counters as of now."""
        return RelayStatistics(
            relays_started=self._started,
            relays_active=len(self._live),
            bytes_a_to_b=self._bytes[Direction.A_TO_B],
            bytes_b_to_a=self._bytes[Direction.B_TO_A],
            ended_eof_both=self._ended[RelayEnd.EOF_BOTH],
            ended_idle_timeout=self._ended[RelayEnd.IDLE_TIMEOUT],
            ended_a_broken=self._ended[RelayEnd.A_BROKEN],
            ended_b_broken=self._ended[RelayEnd.B_BROKEN],
            ended_cancelled=self._ended[RelayEnd.CANCELLED],
            draining=self._draining,
        )

    async def drain(self, deadline: float) -> DrainResult:
        """Graceful shutdown (BAD_INPUTS 31): let live relays finish until ``deadline``
        (absolute, on trio's clock), then cancel the rest; returns once all have closed.

        Stopping the listeners first is the caller's job; relays that start while
        draining are cancelled at the deadline too. An L4 relay cannot see request
        boundaries, so there is nothing gentler to do at the deadline than to
        close; callers get an EOF or a reset, never silently lost bytes.
        """
        self._draining = True
        self._finished_during_drain = 0
        with trio.move_on_at(deadline):
            await self._all_done.wait()
        finished = self._finished_during_drain
        still = list(self._live)
        for session in still:
            session.cancel_for_drain()
        # Cancelled relays close forcefully, which never blocks, so this wait is short.
        await self._all_done.wait()
        return DrainResult(finished=finished, cancelled=len(still))

    def _register(self, session: RelaySession) -> None:
        self._started += 1
        if not self._live:
            self._all_done = trio.Event()
        self._live.add(session)

    def _count(self, direction: Direction, n: int) -> None:
        self._bytes[direction] += n

    def _unregister(self, session: RelaySession, reason: RelayEnd) -> None:
        self._live.discard(session)
        self._ended[reason] += 1
        if reason is not RelayEnd.CANCELLED or not session.drained:
            self._finished_during_drain += 1
        if not self._live:
            self._all_done.set()


class RelaySession:
    """Bookkeeping shared by the two pumps of one relay run.

    A relay implementation creates one per run, calls :meth:`progress` after
    every chunk moved, :meth:`fail` when a side breaks, and hands its two pumps
    and a close function to :meth:`run`. The pumps just return at EOF; they never
    need to catch cancellation.
    """

    def __init__(self, *, idle_timeout: float | None, stats: RelayStats | None) -> None:
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError("idle_timeout must be > 0 or None")
        self._idle_timeout = idle_timeout
        self._stats = stats
        self._scope = trio.CancelScope()
        self._watch_scope = trio.CancelScope()
        self._last_progress = 0.0
        self._idle_fired = False
        self._failure: RelayEnd | None = None
        self._drained = False
        self.bytes_a_to_b = 0
        """Bytes written to ``b`` so far."""
        self.bytes_b_to_a = 0
        """Bytes written to ``a`` so far."""

    @property
    def drained(self) -> bool:
        """True if :meth:`RelayStats.drain` cancelled this relay."""
        return self._drained

    def progress(self, direction: Direction, n: int) -> None:
        """``n`` bytes moved in ``direction`` (0 for a read whose write is still to come)."""
        if direction is Direction.A_TO_B:
            self.bytes_a_to_b += n
        else:
            self.bytes_b_to_a += n
        if self._stats is not None and n:
            self._stats._count(direction, n)
        if self._idle_timeout is not None:
            # A clock read and a store: the watchdog (see run) turns it into the idle
            # deadline. Moving a CancelScope deadline per chunk cost a context manager
            # and a heap update twice per chunk.
            self._last_progress = trio.current_time()

    async def _watch_idle(self, idle_timeout: float) -> None:
        """Cancel the relay ``idle_timeout`` after the last progress, exactly: sleeps to
        the deadline the last progress implies and re-arms if bytes moved meanwhile."""
        with self._watch_scope:
            while True:
                deadline = self._last_progress + idle_timeout
                if trio.current_time() >= deadline:
                    self._idle_fired = True
                    self._scope.cancel()
                    return
                await trio.sleep_until(deadline)

    def fail(self, reason: RelayEnd) -> None:
        """A side broke: end the relay with ``reason`` unless an earlier failure won."""
        if self._failure is None:
            self._failure = reason
        self._scope.cancel()

    def cancel_for_drain(self) -> None:
        """End the relay with :attr:`RelayEnd.CANCELLED` (used by :meth:`RelayStats.drain`)."""
        self._drained = True
        self._scope.cancel()

    async def run(
        self,
        pump_a_to_b: Callable[[], Awaitable[None]],
        pump_b_to_a: Callable[[], Awaitable[None]],
        close: Callable[[RelayEnd], Awaitable[None]],
    ) -> RelayResult:
        """Run both pumps to their end, close both sides with ``close(reason)``, report.

        ``close`` gets :attr:`RelayEnd.EOF_BOTH` for a clean end (a graceful close
        is allowed, bounded by the implementation) and any other reason for a
        forced one; it runs even when the caller cancels us, then ``Cancelled``
        propagates.
        """
        start = trio.current_time()
        self._last_progress = start
        if self._stats is not None:
            self._stats._register(self)
        reason = RelayEnd.CANCELLED
        pumps_left = 2

        async def run_pump(pump: Callable[[], Awaitable[None]]) -> None:
            nonlocal pumps_left
            await pump()
            pumps_left -= 1
            if not pumps_left:
                self._watch_scope.cancel()  # both directions ended: stop the watchdog

        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    if self._idle_timeout is not None:
                        nursery.start_soon(self._watch_idle, self._idle_timeout)
                    nursery.start_soon(run_pump, pump_a_to_b)
                    nursery.start_soon(run_pump, pump_b_to_a)
            if self._failure is not None:
                reason = self._failure
            elif self._drained:
                reason = RelayEnd.CANCELLED
            elif self._idle_fired:
                reason = RelayEnd.IDLE_TIMEOUT
            else:
                reason = RelayEnd.EOF_BOTH
        finally:
            # Reached with reason CANCELLED only when the caller's cancellation (or a bug's
            # exception) is on its way out; close must still run, and forcefully.
            try:
                await close(reason)
            finally:
                if self._stats is not None:
                    self._stats._unregister(self, reason)
        return RelayResult(
            reason=reason,
            bytes_a_to_b=self.bytes_a_to_b,
            bytes_b_to_a=self.bytes_b_to_a,
            duration=trio.current_time() - start,
        )


_SIDE_BROKEN: Final = {
    Direction.A_TO_B: (RelayEnd.A_BROKEN, RelayEnd.B_BROKEN),
    Direction.B_TO_A: (RelayEnd.B_BROKEN, RelayEnd.A_BROKEN),
}
"""Per direction: (reason when the source fails, reason when the destination fails)."""

_STREAM_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


async def _pump(
    session: RelaySession,
    direction: Direction,
    src: trio.abc.Stream,
    dst: trio.abc.Stream,
    chunk_size: int,
) -> None:
    src_broken, dst_broken = _SIDE_BROKEN[direction]
    fast_src = _unchecked(src)
    fast_dst = _unchecked(dst)
    if fast_src is not None and fast_dst is not None:
        await _pump_unchecked(session, direction, fast_src, fast_dst, dst, chunk_size)
        return
    if isinstance(src, trio.SocketStream):
        # SocketStream.receive_some maps these to Broken/ClosedResourceError; we read its
        # socket directly, so we map them ourselves (EBADF: closed under us).
        await _pump_into(session, direction, src.socket.recv_into, (OSError,), dst, chunk_size)
        return
    if isinstance(src, ReceiveIntoStream):
        await _pump_into(session, direction, src.receive_into, _STREAM_ERRORS, dst, chunk_size)
        return
    while True:
        try:
            data = await src.receive_some(chunk_size)
        except _STREAM_ERRORS:
            session.fail(src_broken)
            return
        if not data:
            break
        session.progress(direction, 0)
        try:
            await dst.send_all(data)
        except _STREAM_ERRORS:
            session.fail(dst_broken)
            return
        session.progress(direction, len(data))
    await _forward_eof(session, dst, dst_broken)


def _unchecked(stream: trio.abc.Stream) -> UncheckedStream | None:
    """The hot-loop face of ``stream``, if it has one."""
    if isinstance(stream, trio.SocketStream):
        return _SocketFd(stream)
    if isinstance(stream, UncheckedStream):
        return stream
    return None


_UNCHECKED_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""Failures of an unchecked call: trio's, and ``OSError`` from a raw socket syscall."""


async def _pump_unchecked(
    session: RelaySession,
    direction: Direction,
    src: UncheckedStream,
    dst: UncheckedStream,
    dst_stream: trio.abc.Stream,
    chunk_size: int,
) -> None:
    """The hot loop: one reused buffer, syscalls only, one checkpoint per chunk.

    Read and write wait only when their socket is not ready; the explicit checkpoint
    after each chunk keeps the loop cancellable (revocation, drain, idle timeout) and
    fair to the other direction when both sockets are always ready.
    """
    src_broken, dst_broken = _SIDE_BROKEN[direction]
    view = memoryview(bytearray(chunk_size))
    receive_into = src.receive_into_unchecked
    send_all = dst.send_all_unchecked
    progress = session.progress
    checkpoint = trio.lowlevel.checkpoint
    while True:
        try:
            n = await receive_into(view)
        except _UNCHECKED_ERRORS:
            session.fail(src_broken)
            return
        if n == 0:
            break
        progress(direction, 0)
        try:
            await send_all(view[:n])
        except _UNCHECKED_ERRORS:
            session.fail(dst_broken)
            return
        progress(direction, n)
        await checkpoint()
    await _forward_eof(session, dst_stream, dst_broken)


async def _pump_into(
    session: RelaySession,
    direction: Direction,
    read_into: Callable[[memoryview], Awaitable[int]],
    read_errors: tuple[type[Exception], ...],
    dst: trio.abc.Stream,
    chunk_size: int,
) -> None:
    """The same loop, reading into one buffer reused for every chunk.

    Safe because ``send_all`` has handed every byte over (to the kernel, the TLS
    object, a memory buffer) before it returns, and the next read starts only then.
    ``read_errors`` are the source's failures (for a raw socket, ``OSError``).
    """
    src_broken, dst_broken = _SIDE_BROKEN[direction]
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    while True:
        try:
            n = await read_into(view)
        except read_errors:
            session.fail(src_broken)
            return
        if n == 0:
            break
        session.progress(direction, 0)
        try:
            await dst.send_all(view[:n])
        except _STREAM_ERRORS:
            session.fail(dst_broken)
            return
        session.progress(direction, n)
    await _forward_eof(session, dst, dst_broken)


async def _forward_eof(session: RelaySession, dst: trio.abc.Stream, dst_broken: RelayEnd) -> None:
    if isinstance(dst, trio.abc.HalfCloseableStream):
        try:
            await dst.send_eof()
        except _STREAM_ERRORS:
            session.fail(dst_broken)
        except OSError as exc:  # shutdown() on a socket the peer already reset
            if exc.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                raise
            session.fail(dst_broken)
    # else: SSLStream and other one-way-closing streams: the EOF is not forwarded (see the
    # module docstring); the other direction runs on, and the final close ends this one.


async def _close_stream(stream: trio.abc.Stream, graceful: bool) -> None:
    if graceful:
        with trio.move_on_after(CLOSE_GRACE):
            await stream.aclose()
        # A cancelled aclose still closes (trio's contract), so nothing is left open.
    else:
        if isinstance(stream, trio.SocketStream):
            # Abortive close (RST): the peer learns at once that the hop failed instead
            # of reading a clean EOF that could pass for a complete response.
            with contextlib.suppress(OSError):
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        await trio.aclose_forcefully(stream)


async def relay(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    idle_timeout: float | None = None,
    stats: RelayStats | None = None,
) -> RelayResult:
    """Copy ``a <-> b`` until both directions end, idle timeout, a failure, or drain.

    Both streams are closed when this returns or raises. ``a`` and ``b`` are any
    trio streams; half-close is forwarded where the destination supports it (see
    the module docstring). Raises ``Cancelled`` if the caller cancels, after
    closing both.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    session = RelaySession(idle_timeout=idle_timeout, stats=stats)

    async def a_to_b() -> None:
        await _pump(session, Direction.A_TO_B, a, b, chunk_size)

    async def b_to_a() -> None:
        await _pump(session, Direction.B_TO_A, b, a, chunk_size)

    async def close(reason: RelayEnd) -> None:
        graceful = reason is RelayEnd.EOF_BOTH
        try:
            await _close_stream(a, graceful)
        finally:
            await _close_stream(b, graceful)

    return await session.run(a_to_b, b_to_a, close)
