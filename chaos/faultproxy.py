"""A TCP fault proxy for one link (listen -> upstream) with faults switchable at run time.

Faults (one active at a time, :class:`FaultSetting`):

* ``pass``: forward unchanged;
* ``latency``: hold each chunk ``delay + uniform(0, jitter)`` seconds (``rng`` is passed in)
  before forwarding it, per direction; order is kept because a direction has one chunk in
  flight;
* ``blackhole``: accept and hold: new connections are accepted but not connected upstream,
  and chunks are held, not dropped, so they arrive once the fault is lifted (like a
  partition that heals before TCP gives up);
* ``reset``: every live connection is aborted with RST (``SO_LINGER`` 0 before close), and
  new connections are reset as soon as they are accepted;
* ``bandwidth``: a token bucket per direction (``bytes_per_second``, ``burst``), shared by
  every connection on the link.

The runner controls a proxy in another process through a small HTTP admin API on
loopback (:func:`serve_admin`, :class:`FaultProxyClient`): ``GET /status`` and
``PUT /fault`` with a JSON :class:`FaultSetting`. ``status()`` reports the active fault, a
generation number bumped on every change and counters, so the runner can *verify* that a
fault took effect (e.g. ``connections_reset`` grew, ``bytes_held`` > 0) before it records
the fault as verified.

:class:`FaultLink` works on any trio stream (tests drive it over memory streams with a
MockClock); :func:`serve_fault_proxy` puts it on real sockets.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal, get_args

import h11
import trio

FaultMode = Literal["pass", "latency", "blackhole", "reset", "bandwidth"]
Direction = Literal["up", "down"]

CHUNK: Final = 64 * 1024
_LINGER_ABORT: Final = struct.pack("ii", 1, 0)
MAX_ADMIN_BODY: Final = 64 * 1024


class BadFault(ValueError):
    """A fault setting the proxy refuses (the admin API answers 400 with the message)."""


@dataclass(frozen=True, slots=True)
class FaultSetting:
    """The fault the proxy applies; parameters not used by ``mode`` must be left at 0."""

    mode: FaultMode = "pass"
    """Which fault is active."""
    delay: float = 0.0
    """``latency``: seconds added per chunk."""
    jitter: float = 0.0
    """``latency``: up to this many extra seconds, uniformly random."""
    bytes_per_second: int = 0
    """``bandwidth``: cap per direction."""
    burst: int = 0
    """``bandwidth``: bucket size in bytes; 0 means one second of ``bytes_per_second``."""

    def __post_init__(self) -> None:
        if self.mode not in get_args(FaultMode):
            raise BadFault(f"unknown fault mode {self.mode!r}")
        for name in ("delay", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadFault(f"{name} must be a number of seconds")
            if not math.isfinite(value) or value < 0:
                raise BadFault(f"{name} must be a finite number >= 0")
        for name in ("bytes_per_second", "burst"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadFault(f"{name} must be an integer >= 0")
        if self.mode == "latency" and self.delay <= 0:
            raise BadFault("latency needs delay > 0")
        if self.mode == "bandwidth" and self.bytes_per_second <= 0:
            raise BadFault("bandwidth needs bytes_per_second > 0")
        unused = {
            "delay": self.mode != "latency",
            "jitter": self.mode != "latency",
            "bytes_per_second": self.mode != "bandwidth",
            "burst": self.mode != "bandwidth",
        }
        for name, must_be_zero in unused.items():
            if must_be_zero and getattr(self, name):
                raise BadFault(f"{name} is not a parameter of {self.mode}")

    @classmethod
    def from_json(cls, data: Any) -> FaultSetting:
        """Strictly build from a decoded JSON object; BadFault on anything unexpected."""
        if not isinstance(data, dict):
            raise BadFault("expected a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadFault(f"unknown keys {unknown}")
        return cls(**data)


class TokenBucket:
    """Pure token bucket: ``reserve(n, now)`` takes ``n`` tokens and returns how long the
    caller must wait before sending them. Debt is allowed, so a chunk larger than the burst
    waits in proportion instead of never passing."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` tokens at ``now``; seconds to wait before they are available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass(slots=True)
class ProxyStatus:
    """What the proxy is doing; returned by ``status()`` and ``GET /status``."""

    fault: FaultSetting = field(default_factory=FaultSetting)
    """The active fault."""
    generation: int = 0
    """Bumped on every fault change."""
    connections_total: int = 0
    """Connections accepted."""
    connections_active: int = 0
    """Connections open now."""
    connections_reset: int = 0
    """Connections aborted with RST by the ``reset`` fault."""
    connections_held: int = 0
    """Connections accepted but held (not connected upstream) by ``blackhole`` now."""
    bytes_up: int = 0
    """Bytes forwarded client -> upstream."""
    bytes_down: int = 0
    """Bytes forwarded upstream -> client."""
    bytes_held: int = 0
    """Bytes held by ``blackhole`` now."""
    chunks_delayed: int = 0
    """Chunks delayed by ``latency``."""
    delay_total: float = 0.0
    """Seconds of delay added in total."""
    throttle_wait_total: float = 0.0
    """Seconds chunks waited for the ``bandwidth`` bucket in total."""

    def to_json(self) -> dict[str, Any]:
        """The JSON form served by the admin API."""
        return asdict(self)


class FaultLink:
    """The faults of one link and its live connections; safe to share between tasks."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._status = ProxyStatus()
        self._changed = trio.Event()
        self._live: set[_Connection] = set()
        self._buckets: dict[Direction, TokenBucket] = {}

    @property
    def fault(self) -> FaultSetting:
        """The active fault."""
        return self._status.fault

    def status(self) -> ProxyStatus:
        """A copy of the current status and counters."""
        return ProxyStatus(**{k: getattr(self._status, k) for k in ProxyStatus.__slots__})

    def set_fault(self, setting: FaultSetting) -> ProxyStatus:
        """Switch to ``setting`` now; ``reset`` aborts every live connection before returning."""
        self._status.fault = setting
        self._status.generation += 1
        self._buckets.clear()
        if setting.mode == "bandwidth":
            burst = setting.burst or setting.bytes_per_second
            now = trio.current_time()
            self._buckets = {
                d: TokenBucket(setting.bytes_per_second, burst, now) for d in get_args(Direction)
            }
        # Wake everything waiting on the old setting (held chunks, held connections).
        self._changed.set()
        self._changed = trio.Event()
        if setting.mode == "reset":
            for conn in list(self._live):
                self._abort(conn)
        return self.status()

    def _abort(self, conn: _Connection) -> None:
        if conn.aborted:
            return
        conn.aborted = True
        self._status.connections_reset += 1
        for stream in conn.streams:
            _linger_zero(stream)
        conn.scope.cancel()

    async def handle(
        self, client: trio.abc.Stream, connect: Callable[[], Awaitable[trio.abc.Stream]]
    ) -> None:
        """Serve one accepted connection until both directions end or a fault aborts it.
        Always closes ``client`` (and the upstream stream, if one was opened)."""
        status = self._status
        status.connections_total += 1
        status.connections_active += 1
        conn = _Connection(trio.CancelScope(), [client])
        self._live.add(conn)
        try:
            with conn.scope:
                if self.fault.mode == "reset":
                    self._abort(conn)
                    await trio.lowlevel.checkpoint()
                status.connections_held += 1
                try:
                    while self.fault.mode == "blackhole":
                        await self._changed.wait()
                finally:
                    status.connections_held -= 1
                upstream = await connect()
                conn.streams.append(upstream)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, "up", conn)
                    nursery.start_soon(self._pump, upstream, client, "down", conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side broke: the link ends, as a real network path would
        finally:
            self._live.discard(conn)
            status.connections_active -= 1
            for stream in conn.streams:
                await trio.aclose_forcefully(stream)

    async def _pump(
        self,
        src: trio.abc.ReceiveStream,
        dst: trio.abc.SendStream,
        direction: Direction,
        conn: _Connection,
    ) -> None:
        try:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    if isinstance(dst, trio.abc.HalfCloseableStream):
                        with contextlib.suppress(trio.BrokenResourceError, OSError):
                            await dst.send_eof()
                    return
                await self._gate(len(data), direction)
                await dst.send_all(data)
                if direction == "up":
                    self._status.bytes_up += len(data)
                else:
                    self._status.bytes_down += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            conn.scope.cancel()

    async def _gate(self, size: int, direction: Direction) -> None:
        """Wait as long as the active fault says before ``size`` bytes may pass."""
        status = self._status
        while True:
            mode = self.fault.mode
            if mode == "blackhole":
                status.bytes_held += size
                try:
                    await self._changed.wait()
                finally:
                    status.bytes_held -= size
                continue  # re-check: the next setting may be another fault
            if mode == "latency":
                delay = self.fault.delay + self._rng.uniform(0.0, self.fault.jitter)
                status.chunks_delayed += 1
                status.delay_total += delay
                await trio.sleep(delay)
            elif mode == "bandwidth":
                wait = self._buckets[direction].reserve(size, trio.current_time())
                status.throttle_wait_total += wait
                await trio.sleep(wait)
            return


@dataclass(eq=False, slots=True)
class _Connection:
    scope: trio.CancelScope
    streams: list[trio.abc.Stream]
    aborted: bool = False


def _linger_zero(stream: trio.abc.Stream) -> None:
    """Make the next close of a socket stream send RST; other streams are just closed."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)


async def serve_fault_proxy(
    link: FaultLink,
    listen_host: str,
    listen_port: int,
    upstream_host: str,
    upstream_port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen_host:listen_port`` (0: any free port, reported through
    ``task_status``) and relay every connection to the upstream through ``link``."""
    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
    port: int = listeners[0].socket.getsockname()[1]

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(upstream_host, upstream_port)

    async def handler(stream: trio.SocketStream) -> None:
        await link.handle(stream, connect)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(port)


# -- admin API -------------------------------------------------------------------------------


async def serve_admin(
    link: FaultLink,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The admin API on ``host:port``: ``GET /status``, ``PUT /fault`` (JSON body)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(10):  # a stuck admin client must not hold a task forever
                await _admin_exchange(link, stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


def admin_answer(link: FaultLink, method: str, target: str, body: bytes) -> tuple[int, Any]:
    """The admin API's decision for one request: (HTTP status, JSON document)."""
    if target == "/status":
        if method != "GET":
            return 405, {"error": "use GET /status"}
        return 200, link.status().to_json()
    if target == "/fault":
        if method != "PUT":
            return 405, {"error": "use PUT /fault"}
        try:
            setting = FaultSetting.from_json(json.loads(body or b"null"))
        except (BadFault, ValueError, TypeError) as exc:
            return 400, {"error": str(exc)}
        return 200, link.set_fault(setting).to_json()
    return 404, {"error": "unknown path; use GET /status or PUT /fault"}


async def _admin_exchange(link: FaultLink, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(CHUNK)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_ADMIN_BODY:
                return
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            break
        else:
            return  # malformed or closed: nothing to answer
    code, document = admin_answer(
        link, request.method.decode(), request.target.decode(), bytes(body)
    )
    payload = json.dumps(document, sort_keys=True).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(payload))),
        ("connection", "close"),
    ]
    await stream.send_all(conn.send(h11.Response(status_code=code, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


class AdminError(RuntimeError):
    """The admin API refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class FaultProxyClient:
    """Client of one proxy's admin API, for the drill runner."""

    host: str
    """Admin API host (loopback)."""
    port: int
    """Admin API port."""

    async def status(self) -> dict[str, Any]:
        """``GET /status``."""
        return await self._call("GET", "/status", b"")

    async def set_fault(self, setting: FaultSetting) -> dict[str, Any]:
        """``PUT /fault``; returns the status after the switch."""
        return await self._call("PUT", "/fault", json.dumps(asdict(setting)).encode())

    async def _call(self, method: str, target: str, body: bytes) -> dict[str, Any]:
        conn = h11.Connection(h11.CLIENT)
        headers = [
            ("host", f"{self.host}:{self.port}"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        async with await trio.open_tcp_stream(self.host, self.port) as stream:
            request = h11.Request(method=method, target=target, headers=headers)
            await stream.send_all(conn.send(request) or b"")
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            status = 0
            payload = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(CHUNK))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    payload += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        document = json.loads(payload)
        if status != 200:
            raise AdminError(status, str(document.get("error", document)))
        if not isinstance(document, dict):
            raise AdminError(status, "expected a JSON object")
        return document
