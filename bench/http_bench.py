"""HTTP through a sidecar pair versus direct, on loopback: requests/s and added latency.

    .venv/bin/python bench/http_bench.py [--requests 2000]

Starts two real `meshfed sidecar run` processes (the topology of
tests/sidecar_http_e2e/httpkit.py: `client` calls `web.demo` (protocol http),
served by `web-z1`), an app process that answers every request with 1 KiB over
HTTP/1.1 or h2c (prior knowledge), and drives both paths with h2load
(nghttp2-client): 1 KiB requests (`-d` a 1 KiB file, POST), sequentially on one
connection for latency (p50/p99 from h2load's per-request log) and with
concurrency for requests/s. The pair's app hop is HTTP/1.1 in both cases (the
service's port protocol); the front end is what varies. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "sidecar_http_e2e"))
sys.path.insert(0, str(ROOT))

BODY = b"x" * 1024


def serve_app(port: int) -> None:
    """The app: HTTP/1.1 (h11) or h2c (the sidecar's own H2Channel), 1 KiB answers."""
    import h11
    import trio

    from sidecar.http.h2io import H2Channel, H2Stream
    from sidecar.http.server import PrefixedStream, _sniff

    async def h2_stream(s: H2Stream) -> None:
        while await s.receive_data() is not None:
            pass
        await s.send_headers([(b":status", b"200"), (b"content-length", b"1024")])
        await s.send_data(BODY, end_stream=True)

    async def handler(stream: trio.SocketStream) -> None:
        kind, first = await _sniff(stream)
        if kind == "h2":
            await H2Channel(PrefixedStream(stream, first), "server", on_stream=h2_stream).run()
            return
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(first)
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(ev, h11.ConnectionClosed):
                    return
                if isinstance(ev, h11.EndOfMessage):
                    await stream.send_all(
                        conn.send(
                            h11.Response(
                                status_code=200, headers=[("content-length", "1024")], reason=b"OK"
                            )
                        )
                        + conn.send(h11.Data(data=BODY))
                        + conn.send(h11.EndOfMessage())
                    )
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return

    async def main() -> None:
        await trio.serve_tcp(handler, port, host="127.0.0.1")

    trio.run(main)


def wait_ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"sidecar admin {port} not ready")


def h2load(
    url: str, n: int, c: int, m: int, h1: bool, data: Path, log: Path
) -> tuple[float, list[float]]:
    args = [
        "h2load",
        "-n",
        str(n),
        "-c",
        str(c),
        "-m",
        str(m),
        "-d",
        str(data),
        "--log-file",
        str(log),
    ]
    if h1:
        args.append("--h1")
    out = subprocess.run([*args, url], capture_output=True, check=True, text=True).stdout
    done = re.search(r"(\d+) succeeded", out)
    if done is None or int(done.group(1)) != n:
        raise RuntimeError(f"h2load: not all requests succeeded:\n{out}")
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    lat = [float(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip()]
    return rps, lat


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--serve-app", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_app:
        serve_app(args.serve_app)
        return
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    from httpkit import Procs

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        procs = Procs(base)
        app = subprocess.Popen(
            [sys.executable, __file__, "--serve-app", str(procs.ports.app["web-z1"])]
        )
        try:
            for w in ("client", "web-z1"):
                procs.start(w)
            for w in ("client", "web-z1"):
                wait_ready(procs.ports.admin[w])
            data = base / "body"
            data.write_bytes(BODY)
            direct = f"http://127.0.0.1:{procs.ports.app['web-z1']}/bench"
            pair = f"http://127.0.0.1:{procs.ports.web_listen}/bench"
            n = args.requests
            rows = []
            for proto, h1, conc in (("HTTP/1.1", True, (8, 1)), ("HTTP/2", False, (4, 16))):
                for path, url in (("direct", direct), ("sidecar pair", pair)):
                    h2load(url, 200, 1, 1, h1, data, base / "warm")  # warm pools and JITs
                    _, lat = h2load(url, n, 1, 1, h1, data, base / "lat")
                    rps, _ = h2load(url, n * 2, conc[0], conc[1], h1, data, base / "rps")
                    rows.append((proto, path, statistics.median(lat), pct(lat, 99), rps, conc))
        finally:
            procs.stop_all()
            app.kill()
            app.wait()
    print(f"Command: `.venv/bin/python bench/http_bench.py --requests {args.requests}`")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}\n"
    )
    print("| protocol | path | p50 (µs) | p99 (µs) | req/s | load for req/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for proto, path, p50, p99, rps, (c, m) in rows:
        print(f"| {proto} | {path} | {p50:.0f} | {p99:.0f} | {rps:.0f} | {c} conns x {m} streams |")
    by = {(r[0], r[1]): r for r in rows}
    for proto in ("HTTP/1.1", "HTTP/2"):
        d, s = by[(proto, "direct")], by[(proto, "sidecar pair")]
        print(f"\nAdded by the pair, {proto}: p50 +{s[2] - d[2]:.0f} µs, p99 +{s[3] - d[3]:.0f} µs")


if __name__ == "__main__":
    main()
