"""Zero-copy relay between two connected TCP sockets: the gateway's passthrough hop.

Each direction moves bytes socket -> pipe -> socket with Linux ``splice(2)``, so
the payload never enters Python (nor user space): the gateway never decrypts a
passthrough connection, it only needs the bytes moved. trio drives readiness
(``wait_readable``/``wait_writable``); every splice is non-blocking
(``SPLICE_F_NONBLOCK``) on non-blocking sockets.

Per direction, one pipe of up to :data:`PIPE_SIZE` bytes (``F_SETPIPE_SZ``; the
kernel default of 64 KiB is kept if raising it is refused). The loop fills the
empty pipe from the source (one splice, up to the pipe's size), then drains it
completely into the destination before filling again. So at most one pipe of
bytes per direction is in flight in the kernel on our behalf, the same bound as
:func:`sidecar.relay.relay`'s one chunk: a destination that stops reading leaves
the data in the source socket's receive buffer and TCP flow control pushes back
on the sender (BAD_INPUTS 23).

EOF: a splice that returns 0 from the source means the peer shut down its write
side; after the pipe is drained the relay calls ``shutdown(SHUT_WR)`` on the
destination (a correct half-close) and keeps the other direction running.
Errors on a splice from a socket are that socket's failure; errors writing to a
socket are the destination's. Ending, idle timeout, drain and counters are the
same as :func:`sidecar.relay.relay` (one :class:`~sidecar.relay.RelaySession`).

Without ``os.splice`` (not Linux, or a kernel/seccomp policy that refuses it:
:func:`splice_supported` probes once), the same loop runs over ``recv_into``
into one reusable buffer per direction and ``send`` from a view of it.

Sockets: pass ``socket.socket`` objects that this relay then owns and closes.
From a ``trio.SocketStream`` use :func:`detach_socket`, which takes the file
descriptor away from trio so that exactly one owner closes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import socket
import struct
from typing import Final

import trio

from sidecar.relay import (
    DEFAULT_CHUNK_SIZE,
    Direction,
    RelayEnd,
    RelayResult,
    RelaySession,
    RelayStats,
)

PIPE_SIZE: Final = 1024 * 1024
"""Pipe capacity asked for per direction; Linux caps unprivileged requests at
``/proc/sys/fs/pipe-max-size`` (1 MiB by default)."""

_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)

_LINGER_ABORT: Final = struct.pack("ii", 1, 0)
"""SO_LINGER on, timeout 0: close() sends RST and drops unsent data."""

_SIDE_BROKEN: Final = {
    Direction.A_TO_B: (RelayEnd.A_BROKEN, RelayEnd.B_BROKEN),
    Direction.B_TO_A: (RelayEnd.B_BROKEN, RelayEnd.A_BROKEN),
}


class _SideFailed(Exception):
    """Internal: one side's socket failed; carries the reason to record."""

    def __init__(self, reason: RelayEnd) -> None:
        super().__init__(reason.value)
        self.reason = reason


@functools.cache
def splice_supported() -> bool:
    """True if ``os.splice`` works here: probed once with a socketpair and a pipe."""
    if not hasattr(os, "splice") or not hasattr(os, "SPLICE_F_NONBLOCK"):
        return False
    try:
        left, right = socket.socketpair()
        r, w = os.pipe()
    except OSError:
        return False
    try:
        left.sendall(b"x")
        moved = os.splice(right.fileno(), w, 1, flags=_SPLICE_FLAGS)
        return moved == 1 and os.read(r, 1) == b"x"
    except OSError:
        # ENOSYS/EPERM (seccomp), EINVAL (a socket family that cannot splice).
        return False
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


def detach_socket(stream: trio.SocketStream) -> socket.socket:
    """Take the connected socket out of ``stream``, which is unusable afterwards.

    The returned ``socket.socket`` owns the file descriptor (trio's socket is
    detached, so closing the stream later is harmless and closes nothing).
    """
    tsock = stream.socket
    family, type_, proto = tsock.family, tsock.type, tsock.proto
    fd = tsock.detach()
    sock = socket.socket(family, type_, proto, fileno=fd)
    sock.setblocking(False)
    return sock


def _open_pipe(size: int) -> tuple[int, int, int]:
    """A non-blocking pipe with capacity raised toward ``size``: (read_fd, write_fd, capacity)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # EPERM past pipe-max-size for unprivileged users, or past the per-user pipe
    # page budget: keep the default capacity rather than fail the connection.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, size)
    return r, w, fcntl.fcntl(w, _F_GETPIPE_SZ)


async def _send_all_raw(sock: socket.socket, data: memoryview, dst_broken: RelayEnd) -> None:
    """Send all of ``data`` on a non-blocking socket, waiting for writability as needed."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except OSError as exc:
            raise _SideFailed(dst_broken) from exc


async def _pump_splice(
    session: RelaySession,
    direction: Direction,
    src: socket.socket,
    dst: socket.socket,
    pipe: tuple[int, int, int],
) -> None:
    src_broken, dst_broken = _SIDE_BROKEN[direction]
    pipe_r, pipe_w, capacity = pipe
    src_fd, dst_fd = src.fileno(), dst.fileno()
    while True:
        # Fill: the pipe is empty here, so EAGAIN can only mean "the source has nothing".
        try:
            filled = os.splice(src_fd, pipe_w, capacity, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        except OSError as exc:
            raise _SideFailed(src_broken) from exc
        if filled == 0:
            break
        session.progress(direction, 0)
        # Drain: partial splices are normal (the destination's send buffer fills up).
        while filled:
            try:
                moved = os.splice(pipe_r, dst_fd, filled, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst)
                continue
            except OSError as exc:
                raise _SideFailed(dst_broken) from exc
            filled -= moved
            session.progress(direction, moved)
        # A busy pair of sockets never makes splice return EAGAIN; without this the
        # task would never yield, starving others and ignoring cancellation.
        await trio.lowlevel.checkpoint()
    _shutdown_write(dst, dst_broken)


async def _pump_copy(
    session: RelaySession,
    direction: Direction,
    src: socket.socket,
    dst: socket.socket,
    chunk_size: int,
) -> None:
    src_broken, dst_broken = _SIDE_BROKEN[direction]
    view = memoryview(bytearray(chunk_size))
    while True:
        try:
            n = src.recv_into(view)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        except OSError as exc:
            raise _SideFailed(src_broken) from exc
        if n == 0:
            break
        session.progress(direction, 0)
        await _send_all_raw(dst, view[:n], dst_broken)
        session.progress(direction, n)
        await trio.lowlevel.checkpoint()
    _shutdown_write(dst, dst_broken)


def _shutdown_write(dst: socket.socket, dst_broken: RelayEnd) -> None:
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError as exc:
        # ENOTCONN: the peer already reset the connection.
        raise _SideFailed(dst_broken) from exc


async def splice_relay(
    a: socket.socket,
    b: socket.socket,
    *,
    initial_to_b: bytes = b"",
    idle_timeout: float | None = None,
    stats: RelayStats | None = None,
    use_splice: bool | None = None,
    pipe_size: int = PIPE_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> RelayResult:
    """Relay ``a <-> b`` between two connected TCP sockets; both are closed at the end.

    ``initial_to_b`` is sent to ``b`` before any byte read from ``a`` (the gateway
    replays the ClientHello it peeked); it counts in ``bytes_a_to_b``.
    ``use_splice=None`` uses splice when :func:`splice_supported`; ``False``
    forces the copy fallback (``chunk_size`` bytes per read); ``True`` insists.
    Results, idle timeout, drain and cancellation behave as in
    :func:`sidecar.relay.relay`. Argument errors (including ``use_splice=True``
    where splice is unavailable) are raised before the relay owns the sockets.
    """
    if use_splice is None:
        use_splice = splice_supported()
    elif use_splice and not splice_supported():
        raise OSError(errno.ENOSYS, "os.splice is not available here")
    if chunk_size < 1 or pipe_size < 1:
        raise ValueError("chunk_size and pipe_size must be >= 1")
    session = RelaySession(idle_timeout=idle_timeout, stats=stats)
    pipes: list[tuple[int, int, int]] = []
    a.setblocking(False)
    b.setblocking(False)

    try:
        if use_splice:
            pipes = [_open_pipe(pipe_size), _open_pipe(pipe_size)]
    except OSError:
        # Out of file descriptors or pipe buffers: close what we own and report it.
        for r, w, _ in pipes:
            os.close(r)
            os.close(w)
        a.close()
        b.close()
        raise

    async def run_direction(direction: Direction, src: socket.socket, dst: socket.socket) -> None:
        try:
            if direction is Direction.A_TO_B and initial_to_b:
                await _send_all_raw(dst, memoryview(initial_to_b), RelayEnd.B_BROKEN)
                session.progress(direction, len(initial_to_b))
            if use_splice:
                await _pump_splice(
                    session, direction, src, dst, pipes[direction is Direction.B_TO_A]
                )
            else:
                await _pump_copy(session, direction, src, dst, chunk_size)
        except _SideFailed as failed:
            session.fail(failed.reason)

    async def a_to_b() -> None:
        await run_direction(Direction.A_TO_B, a, b)

    async def b_to_a() -> None:
        await run_direction(Direction.B_TO_A, b, a)

    async def close(reason: RelayEnd) -> None:
        # No task waits on these fds any more (both pumps have returned), so a plain
        # close is safe; trio only needs notify_closing for fds still being waited on.
        for r, w, _ in pipes:
            os.close(r)
            os.close(w)
        if reason is not RelayEnd.EOF_BOTH:
            # Abortive close (RST) so the peers learn at once that the hop failed,
            # instead of reading a clean EOF that looks like a complete response.
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        a.close()
        b.close()
        await trio.lowlevel.checkpoint_if_cancelled()

    return await session.run(a_to_b, b_to_a, close)
