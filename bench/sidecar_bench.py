"""Sidecar pair versus direct, on loopback: latency, throughput, connection rate, idle RSS.

    .venv/bin/python bench/sidecar_bench.py [--seconds 3]

Starts two real `meshfed sidecar run` processes (the test topology of
tests/sidecar/sidecarkit.py: `client` calls `echo.demo`, served by `echo-z1`), a
threaded app in this process, and drives it with blocking sockets from this
process: 1 KiB ping-pong (p50/p99 round trip), one-connection bulk upload (MB/s),
new connections per second (each a full inner mTLS handshake end to end), and the
RSS of an idle sidecar process. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "sidecar"))
sys.path.insert(0, str(ROOT))

from sidecarkit import Mesh, Ports, config_text, make_config  # noqa: E402


def app_server(port: int) -> None:
    srv = socket.create_server(("127.0.0.1", port))

    def handle(c: socket.socket) -> None:
        with c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = c.recv(1)
            if mode == b"P":
                while True:
                    buf = b""
                    while len(buf) < 1024:
                        d = c.recv(1024 - len(buf))
                        if not d:
                            return
                        buf += d
                    c.sendall(buf)
            elif mode == b"T":
                (n,) = struct.unpack("!Q", recv_exact(c, 8))
                while n:
                    d = c.recv(min(n, 1 << 20))
                    if not d:
                        return
                    n -= len(d)
                c.sendall(b"k")
            elif mode == b"C":
                c.sendall(b"c")

    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def recv_exact(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = c.recv(n - len(buf))
        if not d:
            raise ConnectionError("EOF")
        buf += d
    return buf


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def pingpong(port: int, seconds: float) -> tuple[float, float]:
    s = connect(port)
    s.sendall(b"P")
    msg = b"x" * 1024
    rtts = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        s.sendall(msg)
        recv_exact(s, 1024)
        rtts.append(time.perf_counter() - t)
    s.close()
    rtts = rtts[len(rtts) // 20 :]  # drop warm-up
    q = statistics.quantiles(rtts, n=100)
    return q[49] * 1e6, q[98] * 1e6


def throughput(port: int, total: int = 512 << 20) -> float:
    s = connect(port)
    s.sendall(b"T" + struct.pack("!Q", total))
    chunk = b"x" * (256 << 10)
    t = time.perf_counter()
    left = total
    while left:
        n = min(left, len(chunk))
        s.sendall(chunk[:n])
        left -= n
    recv_exact(s, 1)
    dt = time.perf_counter() - t
    s.close()
    return total / dt / 1e6


def conn_rate(port: int, seconds: float) -> float:
    n = 0
    end = time.perf_counter() + seconds
    t = time.perf_counter()
    while time.perf_counter() < end:
        s = connect(port)
        s.sendall(b"C")
        recv_exact(s, 1)
        s.close()
        n += 1
    return n / (time.perf_counter() - t)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def wait_ready(port: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"sidecar admin {port} never ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    ports = Ports.pick()
    mesh = Mesh.build(make_config(ports))
    app_port = ports.app["echo-z1"]
    threading.Thread(target=app_server, args=(app_port,), daemon=True).start()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "mesh.yaml").write_text(config_text(ports))
        (base / "catalog.json").write_bytes(mesh.catalog().to_json())
        for wl in ("client", "echo-z1"):
            d = mesh.write_svid_dir(base, wl)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "federation.cli.main", "sidecar", "run",
                     "--config", str(base / "mesh.yaml"), "--workload", wl,
                     "--state-dir", str(base / f"s-{wl}"), "--svid-dir", str(d),
                     "--catalog", str(base / "catalog.json"), "--log-level", "WARNING"],
                    cwd=ROOT, stderr=subprocess.DEVNULL,
                )
            )
        try:
            for wl in ("client", "echo-z1"):
                wait_ready(ports.admin[wl])
            time.sleep(1.0)
            idle_rss = rss_kib(procs[0].pid)
            rows = []
            for name, port in (("direct", app_port), ("sidecar pair", ports.echo_listen)):
                p50, p99 = pingpong(port, args.seconds)
                mbs = throughput(port)
                rate = conn_rate(port, args.seconds)
                rows.append((name, p50, p99, mbs, rate))
        finally:
            for p in procs:
                p.terminate()
                p.wait()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"Python {platform.python_version()}")
    print("| path | 1 KiB RTT p50 (µs) | p99 (µs) | bulk MB/s (1 conn) | new conns/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, p50, p99, mbs, rate in rows:
        print(f"| {name} | {p50:.0f} | {p99:.0f} | {mbs:.0f} | {rate:.0f} |")
    print(f"\nidle sidecar RSS: {idle_rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
