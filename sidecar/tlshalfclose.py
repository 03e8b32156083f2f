"""TLS 1.3 half-close for the relay: ``send_eof`` sends ``close_notify`` and keeps reading.

``trio.SSLStream`` is not a :class:`trio.abc.HalfCloseableStream`, so the relay cannot
forward an EOF across a TLS leg; a request/response exchange where one side closes
first would then leave both sidecar legs open until the idle timeout. TLS 1.3 makes
``close_notify`` a write-side close (RFC 8446 6.1: the peer may keep sending), and
OpenSSL keeps ``SSL_read`` working after ``SSL_shutdown`` sent it, so this wrapper
sends it through the stream's own ordered-send path (``_retry``, as trio's ``aclose``
does) and reads on. The receiving SSLStream sees a clean EOF (``b""``).

Uses two private trio attributes (``_retry``, ``_ssl_object``); the project's tests of
the relay through a sidecar pair pin the behaviour.
"""

from __future__ import annotations

import ssl
from typing import Generic, TypeVar

import trio

__all__ = ["HalfCloseTls"]


StreamT = TypeVar("StreamT", bound=trio.abc.Stream)


class HalfCloseTls(trio.abc.HalfCloseableStream, Generic[StreamT]):
    """An SSLStream (handshake done) whose ``send_eof`` sends ``close_notify``."""

    def __init__(self, stream: trio.SSLStream[StreamT]) -> None:
        self.stream = stream
        self._eof_sent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            # The peer's close_notify after ours: a clean end, not a broken stream.
            if isinstance(exc.__cause__, ssl.SSLZeroReturnError):
                return b""
            raise

    async def send_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        ssl_object = self.stream._ssl_object
        await self.stream._retry(ssl_object.unwrap, ignore_want_read=True)

    async def aclose(self) -> None:
        await self.stream.aclose()
