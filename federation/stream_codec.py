"""The catalog stream's messages: newline-delimited JSON, one message per line.

The agent sends them to a proxy in the DATA frames of one HTTP/2 response;
frame boundaries mean nothing, so :class:`StreamDecoder` reassembles lines.

Order on a stream: ``Snapshot`` (or, on a resume, a ``Delta`` from the version
the proxy holds), ``Synced`` once the agent's first full store sync is done
(proxies wait for it before reporting ready), then ``Delta`` after ``Delta``,
with ``Heartbeat`` while nothing changes. A proxy whose view refuses a delta
(:class:`federation.catalog.NeedSnapshot`), or whose version differs from a
heartbeat's, reconnects asking for a snapshot.

Sans-IO: no sockets, no h2; ``encode`` gives bytes, ``StreamDecoder.feed`` takes bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from federation.catalog import Catalog, Delta, delta_from_obj, delta_to_obj
from federation.model import (
    RecordError,
    canonical_json,
    check_int_field,
    json_type_name,
    strict_loads,
)

__all__ = [
    "DEFAULT_MAX_LINE",
    "Delta",
    "Heartbeat",
    "LineTooLong",
    "MalformedMessage",
    "Message",
    "Snapshot",
    "StreamDecoder",
    "StreamError",
    "Synced",
    "TruncatedStream",
    "encode",
]

DEFAULT_MAX_LINE = 64 << 20
"""Longest line (one message) a decoder buffers by default: bounds a subscriber's memory.

A snapshot is one line, so this must exceed the largest catalog (about 0.5 KiB per endpoint)."""


@dataclass(frozen=True)
class Snapshot:
    """The whole catalog; replaces whatever the subscriber held."""

    version: int
    """Equals ``catalog.version``."""
    catalog: Catalog
    """The catalog."""

    def __post_init__(self) -> None:
        if self.version != self.catalog.version:
            raise ValueError(f"snapshot version {self.version} != catalog {self.catalog.version}")


@dataclass(frozen=True)
class Synced:
    """The agent finished its first full sync with the store (the start-up gate)."""

    version: int
    """The catalog version at which the sync completed."""


@dataclass(frozen=True)
class Heartbeat:
    """Sent while idle; lets the subscriber detect a dead stream or a missed change."""

    version: int
    """The agent's current catalog version."""
    agent_degraded: bool
    """True while the agent cannot reach the store: the catalog may be stale."""


Message: TypeAlias = Snapshot | Delta | Synced | Heartbeat


class StreamError(Exception):
    """The stream cannot be decoded further; drop the connection and resync from a snapshot.

    ``messages`` holds the messages decoded from the same ``feed`` call before the
    error, in order; the decoder refuses every later call with the same error.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.messages: list[Message] = []
        super().__init__(reason)


class LineTooLong(StreamError):
    """A line grew past the decoder's limit (a broken or hostile peer)."""


class MalformedMessage(StreamError):
    """A complete line that is not a valid message; ``reason`` names the field."""


class TruncatedStream(StreamError):
    """The stream ended in the middle of a line."""


def _message_obj(message: Message) -> dict[str, Any]:
    if isinstance(message, Snapshot):
        return {"type": "snapshot", "version": message.version, "catalog": message.catalog.to_obj()}
    if isinstance(message, Delta):
        return {"type": "delta", **delta_to_obj(message)}
    if isinstance(message, Synced):
        return {"type": "synced", "version": message.version}
    return {
        "type": "heartbeat",
        "version": message.version,
        "agent_degraded": message.agent_degraded,
    }


def encode(message: Message) -> bytes:
    """One message as one line (ASCII JSON, which never contains a raw newline, then ``\\n``)."""
    if isinstance(message, Snapshot):
        # The same bytes as canonical_json(_message_obj(message)) ("catalog" < "type" <
        # "version"), reusing the catalog's own JSON, which is computed once per version.
        return b"".join(
            (
                b'{"catalog":',
                message.catalog.to_json(),
                b',"type":"snapshot","version":%d}\n' % message.version,
            )
        )
    return canonical_json(_message_obj(message)) + b"\n"


def decode_line(line: bytes, max_line: int = DEFAULT_MAX_LINE) -> Message | None:
    """Decode one line (without its newline); None for a message type this code does not know.

    Unknown types are skipped so a newer agent can add informational messages; the
    ones that change the catalog are known to every version. Raises MalformedMessage.
    """
    try:
        obj = strict_loads(line, "message", max_line)
        if not isinstance(obj, dict):
            raise RecordError("message", f"must be a JSON object, got {json_type_name(obj)}")
        kind = obj.get("type")
        if kind == "snapshot":
            catalog = Catalog.from_obj(obj.get("catalog"))
            version = check_int_field(obj.get("version"), "Snapshot.version", 0, 1 << 62)
            if version != catalog.version:
                raise RecordError("Snapshot.version", f"{version} != catalog {catalog.version}")
            return Snapshot(version, catalog)
        if kind == "delta":
            return delta_from_obj(obj)
        if kind == "synced":
            return Synced(check_int_field(obj.get("version"), "Synced.version", 0, 1 << 62))
        if kind == "heartbeat":
            degraded = obj.get("agent_degraded")
            if not isinstance(degraded, bool):
                raise RecordError("Heartbeat.agent_degraded", "must be true or false")
            return Heartbeat(
                check_int_field(obj.get("version"), "Heartbeat.version", 0, 1 << 62), degraded
            )
        if not isinstance(kind, str):
            raise RecordError("message.type", "must be a string")
        return None
    except RecordError as e:
        raise MalformedMessage(str(e)) from None


class StreamDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get whole messages back.

    Memory is bounded by ``max_line`` plus one ``feed``'s bytes. Blank lines are
    skipped (a keepalive). After any StreamError the decoder stays failed.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be >= 1")
        self.max_line = max_line
        self._buffer = bytearray()
        self._failed: StreamError | None = None
        self.skipped = 0
        """Lines of unknown message types skipped so far."""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Decode every message completed by ``data``; raise StreamError on a bad stream."""
        if self._failed is not None:
            raise self._failed
        out: list[Message] = []
        # Only the new bytes can hold the newline that completes the buffered line,
        # so each byte is scanned once however the stream is split.
        start = 0
        view = memoryview(data)
        try:
            while True:
                nl = data.find(b"\n", start)
                if nl < 0:
                    break
                if len(self._buffer) + (nl - start) > self.max_line:
                    raise LineTooLong(f"a line is longer than {self.max_line} bytes")
                self._buffer += view[start:nl]
                line = bytes(self._buffer)
                self._buffer.clear()
                start = nl + 1
                if line.strip(b" \t\r") == b"":
                    continue
                message = decode_line(line, self.max_line)
                if message is None:
                    self.skipped += 1
                else:
                    out.append(message)
            if len(self._buffer) + (len(data) - start) > self.max_line:
                raise LineTooLong(f"a line is longer than {self.max_line} bytes")
            self._buffer += view[start:]
        except StreamError as e:
            self._buffer.clear()
            e.messages = out
            self._failed = e
            raise
        return out

    def close(self) -> None:
        """The stream ended; raise TruncatedStream if it stopped inside a line."""
        if self._failed is not None:
            raise self._failed
        if self._buffer.strip(b" \t\r"):
            size = len(self._buffer)
            self._buffer.clear()
            self._failed = TruncatedStream(f"stream ended inside a {size}-byte line")
            raise self._failed
