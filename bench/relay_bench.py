"""Loopback throughput of meshfed's byte relays: one connection, one hop, bulk one way.

    .venv/bin/python bench/relay_bench.py [--mib 256] [--runs 3] [--out bench/results/relay.md]

Three processes, like an app, a proxy and a server on one host: a sender (blocking
``sendall`` of one reused buffer, then ``shutdown(SHUT_WR)``), the relay under test
(trio, its own process) and a sink (blocking ``recv_into`` until EOF, then it
answers with the byte count, which travels back through the relay). The figure
is bytes / (answer received - connect), in MB/s (10^6 bytes per second).

Paths: ``direct`` (no relay), ``relay`` (:func:`sidecar.relay.relay` over two
``trio.SocketStream`` s: the ``recv_into`` reusable-buffer path), ``relay-alloc``
(the same relay with each stream wrapped in a ``StapledStream``, which forces the
generic ``receive_some`` path that allocates a chunk per read), ``splice``
(:func:`gateway.splice.splice_relay`, zero-copy) and ``splice-fallback`` (the same
with ``use_splice=False``: ``recv_into``/``send``).

A plain script, not a test; wall-clock time is what it measures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import time
from multiprocessing.queues import Queue
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.splice import detach_socket, splice_relay, splice_supported
from sidecar.relay import relay

CHUNK = 256 * 1024
PATHS = ("direct", "relay", "relay-alloc", "splice", "splice-fallback")


def _sink(port_q: Queue[int]) -> None:
    """Accept connections forever; read each to EOF and answer with the count."""
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    buf = memoryview(bytearray(CHUNK))
    while True:
        conn, _ = srv.accept()
        total = 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(struct.pack("!Q", total))
        conn.close()


def _relay_proc(path: str, upstream: int, port_q: Queue[int]) -> None:
    async def handle(down: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream("127.0.0.1", upstream)
        if path == "relay":
            await relay(down, up)
        elif path == "relay-alloc":
            await relay(trio.StapledStream(down, down), trio.StapledStream(up, up))
        else:
            await splice_relay(detach_socket(down), detach_socket(up), use_splice=path == "splice")

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port_q.put(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


def _send(port: int, total: int) -> float:
    """Send ``total`` bytes to ``port``; return the seconds until the sink's answer."""
    data = memoryview(os.urandom(CHUNK))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        left = total
        while left:
            n = min(left, CHUNK)
            conn.sendall(data[:n])
            left -= n
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(8):
            answer += chunk
    elapsed = time.perf_counter() - start
    (received,) = struct.unpack("!Q", answer)
    if received != total:
        raise SystemExit(f"sink got {received} bytes, expected {total}")
    return elapsed


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine() -> list[str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return [
        f"- nproc: {os.cpu_count()}",
        f"- CPU: {model}",
        f"- kernel: {platform.release()}",
        f"- Python: {platform.python_version()}, trio {trio.__version__}",
        f"- splice supported: {splice_supported()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per path")
    parser.add_argument("--out", type=Path, default=Path("bench/results/relay.md"))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args = parser.parse_args()
    total = args.mib * 1024 * 1024

    ctx = mp.get_context("spawn")
    port_q: Queue[int] = ctx.Queue()
    sink = ctx.Process(target=_sink, args=(port_q,), daemon=True)
    sink.start()
    sink_port = port_q.get()

    # One relay process per path, all started up front; the runs then go round-robin
    # over the paths so that drift in the machine's load hits every path alike.
    procs: dict[str, mp.process.BaseProcess] = {}
    ports = {"direct": sink_port}
    for path in args.paths:
        if path != "direct":
            procs[path] = ctx.Process(
                target=_relay_proc, args=(path, sink_port, port_q), daemon=True
            )
            procs[path].start()
            ports[path] = port_q.get()
    rates: dict[str, list[float]] = {path: [] for path in args.paths}
    cpu_s: dict[str, float] = dict.fromkeys(args.paths, 0.0)
    for path in args.paths:
        _send(ports[path], 8 * 1024 * 1024)  # warm-up
    for _ in range(args.runs):
        for path in args.paths:
            pid = procs[path].pid if path in procs else None
            cpu0 = _cpu_seconds(pid) if pid else 0.0
            rates[path].append(total / _send(ports[path], total) / 1e6)
            cpu_s[path] += _cpu_seconds(pid) - cpu0 if pid else 0.0
    for proc in procs.values():
        proc.kill()
        proc.join()
    rows: list[tuple[str, list[float], float | None]] = []
    for path in args.paths:
        # Summed over all runs: /proc counts CPU in 10 ms ticks, too coarse for one run.
        cpu_per_gib = cpu_s[path] * (1 << 30) / (total * args.runs) if path in procs else None
        rows.append((path, rates[path], cpu_per_gib))
        cpu = "-" if cpu_per_gib is None else f"{cpu_per_gib:.2f}"
        print(
            f"{path:16} median {statistics.median(rates[path]):6.0f} MB/s  "
            f"range {min(rates[path]):.0f}-{max(rates[path]):.0f}  relay CPU {cpu} s/GiB",
            flush=True,
        )
    sink.kill()

    command = "python bench/relay_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "# Relay throughput, loopback, one connection, one hop",
        "",
        f"Command: `{command.strip()}` (from the repository root, project venv).",
        f"{args.mib} MiB per run, {args.runs} runs per path (round-robin over the paths) after "
        "an 8 MiB warm-up; sender, relay and sink are three processes. MB/s = 10^6 bytes/s.",
        "",
        *_machine(),
        "",
        "| path | median MB/s | range MB/s | relay process CPU s/GiB (all runs) |",
        "| --- | --- | --- | --- |",
    ]
    for path, path_rates, cpu_per_gib in rows:
        cpu = "-" if cpu_per_gib is None else f"{cpu_per_gib:.2f}"
        lines.append(
            f"| {path} | {statistics.median(path_rates):.0f} "
            f"| {min(path_rates):.0f}-{max(path_rates):.0f} "
            f"| {cpu} |"
        )
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
