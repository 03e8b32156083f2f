"""The backend server and the load generator: plain blocking/epoll sockets, several processes.

No trio here: the measuring side must cost as little as possible and the same for
every topology. Each load run forks ``processes`` workers; every worker connects,
waits for a shared start instant (``time.monotonic`` is system-wide on Linux, so one
deadline serves all processes), runs until the shared end instant and reports its
counts and its own CPU seconds (``getrusage``), so a saturated generator is visible.

The backend (:func:`serve`) reads the first byte of each connection:

* ``B`` bulk: discard everything, adding the byte count to this process's slot of a
  shared counter (:attr:`Backend.received`); the harness reads it at the start and
  end instants, so MB/s is what reached the backend inside the window (no EOF
  handshake needed: meshfed's TLS hops do not forward a half-close, ``sidecar/relay.py``);
* ``R`` request/response: for every :data:`MESSAGE` bytes received, answer :data:`MESSAGE`
  bytes (one request in flight per connection, so responses never overrun);
* ``C`` one request, one response, then the server closes (new-connection scenario:
  the server closes first, so TIME_WAIT lands on listening sides, not on client ports);
* anything else is HTTP/1.1 keep-alive: every request head gets a 200 with a
  :data:`MESSAGE`-byte body (for ``wrk``).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import resource
import selectors
import socket
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final, Literal

MESSAGE: Final = 1024
"""Request and response size of the request/response scenarios (1 KiB)."""
BULK_CHUNK: Final = 256 * 1024
_HTTP_RESPONSE: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n"
    % MESSAGE
    + b"x" * MESSAGE
)

LoadKind = Literal["bulk", "rr", "connect"]


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- backend server


@dataclass
class _Conn:
    sock: socket.socket
    mode: int = 0
    pending: int = 0
    """Request bytes received and not yet answered (R/C) or total received (B)."""
    out: bytearray = field(default_factory=bytearray)
    http: bytearray = field(default_factory=bytearray)
    close_after_send: bool = False


def _serve_loop(listener: socket.socket, received: Any, slot: int) -> None:
    """One backend process: an epoll loop over the shared listening socket.

    ``received[slot]`` (shared memory, written only by this process) counts bulk bytes.
    """
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    buf = bytearray(BULK_CHUNK)
    view = memoryview(buf)
    response = b"r" * MESSAGE

    def close(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    def flush(c: _Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            close(c)
            return
        del c.out[:sent]
        if c.out:
            sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        elif c.close_after_send:
            close(c)
        else:
            sel.modify(c.sock, selectors.EVENT_READ, c)

    while True:
        for key, events in sel.select():
            if key.data is None:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(sock, selectors.EVENT_READ, _Conn(sock))
                continue
            c: _Conn = key.data
            if events & selectors.EVENT_WRITE:
                flush(c)
                if c.sock.fileno() < 0:
                    continue
            if not events & selectors.EVENT_READ:
                continue
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                close(c)
                continue
            if n == 0:
                close(c)
                continue
            data = view[:n]
            if c.mode == 0:
                c.mode = data[0]
                if c.mode in b"BRC":
                    data = data[1:]
            if c.mode == ord("B"):
                received[slot] += len(data)
                continue
            if c.mode in b"RC":
                c.pending += len(data)
                answers, c.pending = divmod(c.pending, MESSAGE)
                if answers:
                    c.out += response * answers
                    c.close_after_send = c.mode == ord("C")
                    flush(c)
                continue
            c.http += data
            while (end := c.http.find(b"\r\n\r\n")) >= 0:
                del c.http[: end + 4]
                c.out += _HTTP_RESPONSE
            if c.out:
                flush(c)


class Backend:
    """The benchmark's upstream server: ``processes`` forked epoll loops on one listening socket."""

    def __init__(self, processes: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port: int = self._listener.getsockname()[1]
        ctx = mp.get_context("fork")
        self._received = ctx.Array(ctypes.c_longlong, processes, lock=False)
        self._procs = [
            ctx.Process(target=_serve_loop, args=(self._listener, self._received, k), daemon=True)
            for k in range(processes)
        ]
        for proc in self._procs:
            proc.start()

    def received(self) -> int:
        """Bulk bytes received so far by all backend processes."""
        return int(sum(self._received[:]))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def stop(self) -> None:
        for proc in self._procs:
            proc.kill()
            proc.join()
        self._listener.close()


# ---------------------------------------------------------------- load generator


@dataclass(frozen=True)
class LoadSpec:
    """One load run against ``port``."""

    kind: LoadKind
    port: int
    connections: int
    """Total concurrent connections (bulk, rr) or concurrent connect loops (connect)."""
    processes: int
    duration: float
    rate: float | None = None
    """rr only: total requests/s, paced (latency at a fixed rate); None = closed loop."""


@dataclass
class WorkerResult:
    """What one worker process measured."""

    bytes: int = 0
    requests: int = 0
    errors: int = 0
    latencies_us: array[float] = field(default_factory=lambda: array("d"))
    """rr: per-request latency, from the send of the request to the last byte of the response."""
    cpu_seconds: float = 0.0
    error_text: str = ""


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _bulk_one(port: int, start: float, end: float, out: WorkerResult, lock: threading.Lock) -> None:
    data = memoryview(os.urandom(BULK_CHUNK))
    sent = 0
    try:
        with _connect(port) as sock:
            sock.sendall(b"B")
            _sleep_until(start)
            # Keep the pipe full a little past the end so the window ends under load.
            while time.monotonic() < end + 0.05:
                sock.sendall(data)
                sent += BULK_CHUNK
            # RST, not FIN: every proxy then tears the path down at once (a TLS hop
            # that cannot forward a half-close would otherwise hold it open).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with lock:
            out.bytes += sent
    except OSError as exc:
        with lock:
            out.errors += 1
            out.error_text = repr(exc)


def _connect_loop(
    port: int, start: float, end: float, out: WorkerResult, lock: threading.Lock
) -> None:
    request = b"C" + b"q" * MESSAGE
    buf = bytearray(MESSAGE)
    done = errors = 0
    last = ""
    _sleep_until(start)
    while time.monotonic() < end:
        try:
            with _connect(port) as sock:
                sock.sendall(request)
                got = 0
                while got < MESSAGE:
                    n = sock.recv_into(memoryview(buf)[got:])
                    if n == 0:
                        raise ConnectionError("closed before the response")
                    got += n
            done += 1
        except OSError as exc:
            errors += 1
            last = repr(exc)
    with lock:
        out.requests += done
        out.errors += errors
        out.error_text = last or out.error_text


def _rr_loop(port: int, conns: int, start: float, end: float, rate: float | None) -> WorkerResult:
    """Closed-loop (``rate`` None) or paced request/response over ``conns`` connections."""
    out = WorkerResult()
    request = b"q" * MESSAGE
    socks = [_connect(port) for _ in range(conns)]
    sel = selectors.DefaultSelector()
    received = dict.fromkeys(range(conns), 0)
    sent_at = dict.fromkeys(range(conns), 0.0)
    free: list[int] = []
    buf = bytearray(64 * 1024)
    for i, sock in enumerate(socks):
        sock.sendall(b"R")
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
    interval = None if rate is None else 1.0 / rate
    _sleep_until(start)
    next_due = start

    def send(i: int, at: float) -> None:
        try:
            socks[i].send(request)  # 1 KiB always fits an empty socket buffer
        except OSError as exc:
            out.errors += 1
            out.error_text = repr(exc)
            return
        sent_at[i] = at

    if interval is None:
        for i in range(conns):
            send(i, time.perf_counter())
    else:
        free = list(range(conns))
    now_mono = time.monotonic()
    while now_mono < end:
        if interval is not None:
            while free and next_due <= now_mono:
                # Latency counts from the actual send: epoll timeouts have 1 ms granularity,
                # so "scheduled" instants would charge the generator's own jitter to the proxy.
                # A connection is nearly always free at the fixed rate (RTT << interval).
                send(free.pop(), time.perf_counter())
                next_due += interval
            timeout = max(0.0, min(next_due, end) - now_mono) if free else end - now_mono
        else:
            timeout = end - now_mono
        for key, _ in sel.select(timeout):
            i = key.data
            try:
                n = socks[i].recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                out.errors += 1
                out.error_text = repr(exc)
                sel.unregister(socks[i])
                continue
            if n == 0:
                out.errors += 1
                out.error_text = "server closed the connection"
                sel.unregister(socks[i])
                continue
            received[i] += n
            if received[i] >= MESSAGE:
                received[i] -= MESSAGE
                out.requests += 1
                out.latencies_us.append((time.perf_counter() - sent_at[i]) * 1e6)
                if interval is None:
                    send(i, time.perf_counter())
                else:
                    free.append(i)
        now_mono = time.monotonic()
    for sock in socks:
        sock.close()
    return out


def _worker(spec: LoadSpec, share: int, start: float, end: float, conn: Connection) -> None:
    cpu0 = _cpu_self()
    out = WorkerResult()
    try:
        if spec.kind == "rr":
            rate = None if spec.rate is None else spec.rate * share / spec.connections
            out = _rr_loop(spec.port, share, start, end, rate)
        else:
            lock = threading.Lock()
            target = _bulk_one if spec.kind == "bulk" else _connect_loop
            threads = [
                threading.Thread(target=target, args=(spec.port, start, end, out, lock))
                for _ in range(share)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    except OSError as exc:
        out.errors += 1
        out.error_text = repr(exc)
    out.cpu_seconds = _cpu_self() - cpu0
    conn.send(out)
    conn.close()


@dataclass(frozen=True)
class LoadResult:
    """A whole load run: the workers' sums and the run's window."""

    spec: LoadSpec
    start: float
    end: float
    workers: list[WorkerResult]

    @property
    def bytes(self) -> int:
        return sum(w.bytes for w in self.workers)

    @property
    def requests(self) -> int:
        return sum(w.requests for w in self.workers)

    @property
    def errors(self) -> int:
        return sum(w.errors for w in self.workers)

    @property
    def error_text(self) -> str:
        return next((w.error_text for w in self.workers if w.error_text), "")

    @property
    def generator_cpu(self) -> float:
        return sum(w.cpu_seconds for w in self.workers)

    @property
    def elapsed(self) -> float:
        """Seconds of the measured window."""
        return self.end - self.start

    def latencies(self) -> list[float]:
        return sorted(v for w in self.workers for v in w.latencies_us)


@dataclass
class RunningLoad:
    """Workers forked and counting down to ``start``."""

    spec: LoadSpec
    start: float
    end: float
    pipes: list[Connection]
    procs: list[mp.process.BaseProcess]


def start_load(spec: LoadSpec, warmup: float = 0.3) -> RunningLoad:
    """Fork the workers; they connect now and all begin at ``now + warmup``."""
    ctx = mp.get_context("fork")
    start = time.monotonic() + warmup
    end = start + spec.duration
    pipes: list[Connection] = []
    procs: list[mp.process.BaseProcess] = []
    processes = max(1, min(spec.processes, spec.connections))
    base, extra = divmod(spec.connections, processes)
    for k in range(processes):
        share = base + (1 if k < extra else 0)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(spec, share, start, end, send), daemon=True)
        proc.start()
        send.close()
        pipes.append(recv)
        procs.append(proc)
    return RunningLoad(spec, start, end, pipes, procs)


def collect(run: RunningLoad) -> LoadResult:
    """Wait for every worker's result (blocking) and reap the workers."""
    spec = run.spec
    workers: list[WorkerResult] = []
    for pipe in run.pipes:
        if not pipe.poll(spec.duration + 60):
            raise TimeoutError(f"a load worker did not report within {spec.duration + 60:.0f} s")
        try:
            workers.append(pipe.recv())
        except EOFError:
            workers.append(WorkerResult(errors=1, error_text="worker died"))
        pipe.close()
    for proc in run.procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return LoadResult(spec, run.start, run.end, workers)


def port_accepts(port: int) -> bool:
    """Whether something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
