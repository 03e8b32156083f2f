"""Graceful shutdown of the sidecar's server-side HTTP connections (SIGTERM).

A :class:`ServerDrain` groups the connections one front end serves (the inbound side's
peer connections, or one HTTP upstream's app connections). :meth:`ServerDrain.start`:

* every HTTP/2 connection gets :meth:`~sidecar.http.h2io.H2Channel.drain` (GOAWAY
  2^31-1 + PING, then GOAWAY with the real last stream id): streams in flight finish,
  streams above the last id are refused, so callers retry them elsewhere; each
  connection closes when its last stream ends;
* HTTP/1.1 connections answer their current request with ``Connection: close`` and
  close; one waiting between requests is closed at once (nothing is in flight there).

The runner bounds it all with the drain deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from sidecar.http.h2io import H2Channel

__all__ = ["ServerDrain"]


class ServerDrain:
    """The server-side HTTP connections of one listener group, drained together on SIGTERM.

    :meth:`start` is idempotent and final; a connection tracked after it started is
    drained at once."""

    def __init__(self) -> None:
        self.draining = False
        """:meth:`start` was called: HTTP/1.1 responses carry ``Connection: close``."""
        self._channels: set[H2Channel] = set()
        self._idle: set[trio.CancelScope] = set()
        self._closed = trio.Event()

    @contextlib.contextmanager
    def track(self, channel: H2Channel) -> Iterator[None]:
        """An HTTP/2 server connection, for as long as it runs."""
        self._channels.add(channel)
        if self.draining:
            channel.drain()
        try:
            yield
        finally:
            self._channels.discard(channel)
            if self.draining and not self._channels:
                self._closed.set()

    @contextlib.contextmanager
    def idle(self) -> Iterator[trio.CancelScope]:
        """Scope of an HTTP/1.1 connection waiting for its next request: cancelled
        when the drain starts (nothing in flight there)."""
        scope = trio.CancelScope()
        if self.draining:
            scope.cancel()
        self._idle.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._idle.discard(scope)

    def start(self) -> None:
        """Drain every tracked connection (see the module docstring)."""
        self.draining = True
        for channel in list(self._channels):
            channel.drain()
        for scope in list(self._idle):
            scope.cancel()
        if not self._channels:
            self._closed.set()

    async def wait_closed(self) -> None:
        """After :meth:`start`: return once every tracked HTTP/2 connection has closed
        (each closes when its last stream ends)."""
        await self._closed.wait()

    @property
    def connections(self) -> int:
        """HTTP/2 connections tracked now."""
        return len(self._channels)
