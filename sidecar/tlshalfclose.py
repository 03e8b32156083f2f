"""TLS 1.3 half-close for the relay, and its fast data path.

``send_eof`` sends ``close_notify`` and keeps reading: ``trio.SSLStream`` is not a
:class:`trio.abc.HalfCloseableStream`, so the relay could not forward an EOF across a
TLS leg; a request/response exchange where one side closes first would then leave
both sidecar legs open until the idle timeout. TLS 1.3 makes ``close_notify`` a
write-side close (RFC 8446 6.1: the peer may keep sending), and OpenSSL keeps
``SSL_read`` working after ``SSL_shutdown`` sent it, so this wrapper sends it through
the stream's own ordered-send path (``_retry``, as trio's ``aclose`` does) and reads
on. The receiving SSLStream sees a clean EOF (``b""``).

The data path (``docs/performance-notes.md``). ``SSLStream.receive_some`` returns at
most one TLS record (16 KiB) per call, after a 64 KiB transport read, a fresh
``bytes`` per record and two trips through trio's scheduler (its inner lock, then the
socket); ``send_all`` also takes a scheduler trip for its lock. Once the handshake is
done, this wrapper drives the same ``ssl.SSLObject`` and memory BIOs directly:

* :meth:`HalfCloseTls.receive_into` decrypts into the caller's buffer every record
  that has arrived (up to the buffer's size) and reads ciphertext from the transport
  256 KiB at a time (``recv_into`` a reused buffer for a ``SocketStream``);
* :meth:`HalfCloseTls.send_all` encrypts, then sends under trio's own FIFO send lock,
  taken without a scheduler trip when it is free (it always is in a relay).

Both keep trio's invariants: one transport reader at a time (trio's inner receive
lock), ciphertext sent in the order it left the outgoing BIO (trio's FIFO send lock,
shared with ``send_eof`` and ``aclose``), the stream marked broken on a TLS or
transport failure, and every call a checkpoint. Errors are the ones
``SSLStream`` raises. On a ``SocketStream`` transport the ciphertext moves with plain
non-blocking syscalls (``os.readv``/``os.write`` on the socket's descriptor, waiting
only when it is not ready). :meth:`HalfCloseTls.receive_into_unchecked` and
:meth:`HalfCloseTls.send_all_unchecked` are the same calls without the guaranteed
checkpoint, for :func:`sidecar.relay.relay`'s loop, which checkpoints once per chunk
(:class:`sidecar.relay.UncheckedStream`). One difference in timing only: bytes a
*read* makes OpenSSL queue (a TLS 1.3 KeyUpdate answer; meshfed never requests one)
leave with the next write, ``send_eof`` or ``aclose`` rather than at once; never
reordered or lost.
The fast path is used only when the SSLStream has the private attributes it relies
on (checked once, in :func:`fast_path_supported`); otherwise every method falls back
to the public ``SSLStream`` calls, so a trio upgrade that moves them costs speed,
never correctness. The relay tests run both paths.

Uses private trio attributes (``_retry``, ``_ssl_object``, the BIOs, the inner
locks, ``_state``); the project's tests of the relay through a sidecar pair and
``tests/relay/test_tls_fast_path.py`` pin the behaviour.
"""

from __future__ import annotations

import errno
import os
import ssl
from typing import Any, Final, Generic, TypeVar

import trio

__all__ = ["CIPHER_READ_SIZE", "HalfCloseTls", "fast_path_supported"]


StreamT = TypeVar("StreamT", bound=trio.abc.Stream)

CIPHER_READ_SIZE: Final = 256 * 1024
"""Ciphertext bytes per transport read on the fast path (trio reads 64 KiB)."""

_REQUIRED: Final = (
    "_ssl_object",
    "_incoming",
    "_outgoing",
    "_delayed_outgoing",
    "_inner_send_lock",
    "_inner_recv_lock",
    "_inner_recv_count",
    "_outer_send_conflict_detector",
    "_outer_recv_conflict_detector",
    "_check_status",
    "_retry",
    "_state",
)

_CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})
"""errnos that mean the socket was closed under us (trio maps them the same way)."""


def _broken_state(stream: trio.SSLStream[Any]) -> object | None:
    """trio's ``_State.BROKEN`` member, found through the stream's own state enum."""
    members = getattr(type(stream._state), "__members__", None)
    return None if members is None else members.get("BROKEN")


def fast_path_supported(stream: trio.SSLStream[Any]) -> bool:
    """True if ``stream`` has the trio internals the fast path drives and its handshake
    is done (before that, reads and writes would have handshake bytes to exchange)."""
    if not all(hasattr(stream, name) for name in _REQUIRED):
        return False
    if not getattr(getattr(stream, "_handshook", None), "done", False):
        return False
    return isinstance(stream._ssl_object, ssl.SSLObject) and _broken_state(stream) is not None


def _socket_fd(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    return fd


def _os_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """trio's mapping of a socket syscall's failure (``SocketStream`` does the same)."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def _recv_into_fd(sock: trio.socket.SocketType, view: memoryview) -> int:
    """Read into ``view`` with a plain syscall, waiting only while nothing has arrived.

    trio's ``recv_into`` takes two scheduler trips even when data is there."""
    while True:
        fd = _socket_fd(sock)
        try:
            return os.readv(fd, (view,))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
        except OSError as exc:
            raise _os_error(exc) from exc


async def _send_all_fd(sock: trio.socket.SocketType, data: memoryview) -> None:
    """Send all of ``data`` with plain syscalls, waiting only while the socket is full."""
    sent, total = 0, len(data)
    while sent < total:
        fd = _socket_fd(sock)
        try:
            sent += os.write(fd, data[sent:])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
        except OSError as exc:
            raise _os_error(exc) from exc


class HalfCloseTls(trio.abc.HalfCloseableStream, Generic[StreamT]):
    """An SSLStream (handshake done) whose ``send_eof`` sends ``close_notify``."""

    def __init__(self, stream: trio.SSLStream[StreamT], *, fast: bool = True) -> None:
        self.stream = stream
        self._eof_sent = False
        self.fast = fast and fast_path_supported(stream)
        """True when the fast data path is in use (see the module docstring)."""
        self._cipher: bytearray | None = None
        self._deferred: BaseException | None = None
        self._held = b""  # plaintext send_eof took out of OpenSSL (see send_eof)

    # -- sending -------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.fast or not data:
            await self.stream.send_all(data)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._send_all(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_all_unchecked(self, data: memoryview) -> None:
        """:meth:`send_all` for the relay's loop: waits only for a full socket and does
        not otherwise checkpoint (the relay checkpoints once per chunk)."""
        if not self.fast or not data:
            await self.stream.send_all(data)
            return
        await self._send_all(data)

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        stream = self.stream
        with stream._outer_send_conflict_detector:
            stream._check_status()
            try:
                stream._ssl_object.write(data)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                self._break()
                raise trio.BrokenResourceError from exc
            to_send = stream._outgoing.read()
            lock = stream._inner_send_lock
            # Strict FIFO: taking the lock right after reading the BIO, with no await in
            # between, keeps ciphertext in BIO order (trio's _retry relies on the same).
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:
                await lock.acquire()
            try:
                if stream._delayed_outgoing is not None:
                    to_send = stream._delayed_outgoing + to_send
                    stream._delayed_outgoing = None
                transport = stream.transport_stream
                if isinstance(transport, trio.SocketStream):
                    await _send_all_fd(transport.socket, memoryview(to_send))
                else:
                    await transport.send_all(to_send)
            except BaseException:
                # Some unknown part of the ciphertext was sent: the stream is doomed.
                self._break()
                raise
            finally:
                lock.release()

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    # -- receiving -----------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._held:
            size = len(self._held) if max_bytes is None else max_bytes
            data, self._held = self._held[:size], self._held[size:]
            await trio.lowlevel.checkpoint()
            return data
        if self.fast:
            size = CIPHER_READ_SIZE if max_bytes is None else max_bytes
            if size < 1:
                raise ValueError("max_bytes must be >= 1")
            buf = bytearray(size)
            n = await self.receive_into(memoryview(buf))
            del buf[n:]
            return buf
        try:
            return await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            # The peer's close_notify after ours: a clean end, not a broken stream.
            if isinstance(exc.__cause__, ssl.SSLZeroReturnError):
                return b""
            raise

    async def receive_into(self, buffer: memoryview) -> int:
        """Decrypt into ``buffer``; the number of bytes, 0 at the peer's close_notify.

        Waits only while nothing is decryptable; then fills ``buffer`` with every
        record already received (fewer bytes than ``len(buffer)`` is normal). Errors
        are ``SSLStream.receive_some``'s.
        """
        if len(buffer) < 1:
            raise ValueError("buffer must not be empty")
        if self._held:
            take = min(len(buffer), len(self._held))
            buffer[:take] = self._held[:take]
            self._held = self._held[take:]
            await trio.lowlevel.checkpoint()
            return take
        if not self.fast:
            data = await self.receive_some(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        n = await self._receive_into(buffer)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return n

    async def receive_into_unchecked(self, buffer: memoryview) -> int:
        """:meth:`receive_into` for the relay's loop: waits only while nothing is
        decryptable and does not otherwise checkpoint (the relay checkpoints once per
        chunk)."""
        if self._held or not self.fast:
            return await self.receive_into(buffer)
        if len(buffer) < 1:
            raise ValueError("buffer must not be empty")
        return await self._receive_into(buffer)

    async def _receive_into(self, buffer: memoryview) -> int:
        stream = self.stream
        with stream._outer_recv_conflict_detector:
            stream._check_status()
            n = self._decrypt_into(buffer)
            while n is None:
                await self._fill()  # waits only if the socket has nothing yet
                n = self._decrypt_into(buffer)
            return n

    def _decrypt_into(self, buffer: memoryview) -> int | None:
        """Decrypt buffered records into ``buffer``: bytes (0 = clean EOF), or None if
        nothing is decryptable until more ciphertext arrives. Never waits."""
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            self._break()
            raise trio.BrokenResourceError from exc
        ssl_object = self.stream._ssl_object
        # One call per 16 KiB record: skip ssl.SSLObject.read's Python frame and call the
        # C object it delegates to (same arguments, same errors) when it is there.
        read = getattr(ssl_object, "_sslobj", ssl_object).read
        size = len(buffer)
        n = 0
        while n < size:
            try:
                # With a buffer, read returns a count (typeshed says bytes).
                got: int = read(size - n, buffer[n:])  # type: ignore[assignment]
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                # The peer's close_notify after ours (see receive_some): a clean end.
                got = 0
            except (ssl.SSLError, ssl.CertificateError) as exc:
                if n:
                    self._deferred = exc  # deliver the bytes before it first
                    break
                self._break()
                raise trio.BrokenResourceError from exc
            if not got:  # clean EOF (close_notify); the next read sees it again
                return n
            n += got
        return n if n else None

    async def _fill(self) -> None:
        """One transport read into the incoming BIO (EOF recorded there too); waits
        (a checkpoint) only when the socket has nothing to read yet."""
        stream = self.stream
        lock = stream._inner_recv_lock
        count = stream._inner_recv_count
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if count != stream._inner_recv_count:
                # Another reader fed the BIO while we waited for the lock (trio's rule).
                await trio.lowlevel.checkpoint()
                return
            transport = stream.transport_stream
            if isinstance(transport, trio.SocketStream):
                if self._cipher is None:
                    self._cipher = bytearray(CIPHER_READ_SIZE)
                view = memoryview(self._cipher)
                got = await _recv_into_fd(transport.socket, view)
                data: bytes | bytearray | memoryview = view[:got]
            else:
                data = await transport.receive_some(CIPHER_READ_SIZE)
                got = len(data)
            if got:
                stream._incoming.write(data)
            else:
                stream._incoming.write_eof()
            stream._inner_recv_count += 1
        finally:
            lock.release()

    def _break(self) -> None:
        stream: Any = self.stream
        stream._state = _broken_state(stream)

    # -- closing -------------------------------------------------------------------

    async def send_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        stream = self.stream
        ssl_object = stream._ssl_object

        def shutdown() -> None:
            # SSLObject.unwrap calls SSL_shutdown a second time to look for the peer's
            # close_notify; that call fails on (or loses) application data it meets:
            # plaintext OpenSSL holds from a partly read record, and records waiting in
            # the incoming BIO. Take the first out (receive returns it first) and set
            # the second aside until unwrap is done.
            pending = ssl_object.pending()
            if pending:
                self._held += ssl_object.read(pending)
            unread = stream._incoming.read()
            try:
                ssl_object.unwrap()
            finally:
                if unread:
                    stream._incoming.write(unread)

        await stream._retry(shutdown, ignore_want_read=True)

    async def aclose(self) -> None:
        await self.stream.aclose()
