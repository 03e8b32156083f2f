"""Scenarios: one load run against a started topology, turned into named metrics.

Proxy CPU is the sum of ``utime + stime`` of every proxy process of the topology
(``/proc/<pid>/stat``, all threads) over the run; RSS is the sum of their
``VmRSS``, sampled every 100 ms (peak under load). The generator's own CPU is
reported as cores used (CPU seconds / wall seconds): near the number of generator
processes means the generator, not the proxy, was the limit.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from bench.harness.loadgen import Backend, LoadResult, LoadSpec, collect, start_load
from bench.harness.topology import Running

_TICK: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Metric:
    """One reported number."""

    key: str
    unit: str
    higher_is_better: bool
    title: str


@dataclass(frozen=True)
class Settings:
    """Load shape of every scenario; :data:`FULL` and :data:`SMOKE` are the two presets."""

    duration: float
    """Seconds of measured load per run."""
    warmup: float
    """Seconds between forking the generator and the measured window (connections open)."""
    processes: int
    """Generator processes for the multi-connection scenarios."""
    rr_connections: int = 32
    latency_rate: float = 1000.0
    latency_connections: int = 4
    connect_concurrency: int = 8
    bulk_many: int = 16
    changes: int = 1000
    """Control plane: sequential changes per propagation run."""
    sync_services: int = 1000
    """Control plane: services per cluster in the full sync (10 clusters, 10 endpoints each)."""
    settle: bool = True
    """Wait for the proxies to go idle after every run (:func:`quiesce`); off for smoke."""


FULL: Final = Settings(duration=3.0, warmup=0.3, processes=os.cpu_count() or 2)
SMOKE: Final = Settings(
    duration=0.3,
    warmup=0.1,
    processes=1,
    rr_connections=4,
    latency_rate=200.0,
    changes=50,
    sync_services=10,
    settle=False,
)


RunFn = Callable[[Running, "Settings", Backend], dict[str, float]]
"""A scenario's measurement: the topology, the load settings and the shared backend."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


QUIET_WINDOW: Final = 0.25
"""Seconds per quiescence check (see :func:`quiesce`)."""
QUIET_CPU: Final = 0.0125
"""CPU seconds all proxies together may use in one window and still count as quiet (5 %)."""
QUIET_TIMEOUT: Final = 30.0


def quiesce(running: Running) -> float:
    """Wait until the topology's proxies are idle again; return the seconds waited.

    After a load run ends, proxies can still be busy: bytes the generator already
    wrote sit in socket buffers, relay buffers and (tunnel) HTTP/2 flow-control
    windows, and are still being moved to the backend. The next run must not start
    on top of that backlog, so every run is followed by this wait (one window of
    ``QUIET_CPU`` or less, at most ``QUIET_TIMEOUT``); the time is reported as
    ``drain_s`` (how long the path kept working after the load stopped).
    """
    pids = running.pids
    if not pids:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < QUIET_TIMEOUT:
        cpu0 = sum(cpu_seconds(p) for p in pids)
        time.sleep(QUIET_WINDOW)
        if sum(cpu_seconds(p) for p in pids) - cpu0 <= QUIET_CPU:
            break
    return max(0.0, time.monotonic() - start - QUIET_WINDOW)


def role_rss(running: Running) -> dict[str, float]:
    """RSS in MiB of every proxy process, by role."""
    return {p.role: rss_mib(p.pid) for p in running.proxies}


@dataclass(frozen=True)
class Measured:
    """A load run with what was observed on the proxies meanwhile."""

    load: LoadResult
    proxy_cpu: float
    peak_rss: float
    received: int
    """Bulk bytes the backend received inside the window."""


def measure(spec: LoadSpec, running: Running, warmup: float, backend: Backend) -> Measured:
    """Run ``spec`` against ``running``, sampling its proxies' CPU and RSS."""
    pids = running.pids
    run = start_load(spec, warmup)
    delay = run.start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    received0 = backend.received()
    peak = 0.0
    while time.monotonic() < run.end:
        peak = max(peak, sum(rss_mib(p) for p in pids))
        time.sleep(min(0.1, max(0.0, run.end - time.monotonic())))
    received = backend.received() - received0
    load = collect(run)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    running.check_alive()
    return Measured(load, cpu, peak, received)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


def _gen_cores(m: Measured) -> float:
    return m.load.generator_cpu / m.load.elapsed


def _bulk(
    connections: Callable[[Settings], int],
) -> RunFn:
    def run(running: Running, s: Settings, backend: Backend) -> dict[str, float]:
        n = connections(s)
        spec = LoadSpec("bulk", running.port, n, min(n, s.processes), s.duration)
        m = measure(spec, running, s.warmup, backend)
        gb = m.received / 1e9
        return {
            "mb_per_s": m.received / m.load.elapsed / 1e6,
            "proxy_cpu_s_per_gb": m.proxy_cpu / gb if gb and running.pids else float("nan"),
            "gen_cores": _gen_cores(m),
            "errors": float(m.load.errors),
        }

    return run


def _rr_max(running: Running, s: Settings, backend: Backend) -> dict[str, float]:
    spec = LoadSpec("rr", running.port, s.rr_connections, s.processes, s.duration)
    m = measure(spec, running, s.warmup, backend)
    lat = m.load.latencies()
    reqs = m.load.requests
    return {
        "req_per_s": reqs / s.duration,
        "p50_us": _percentile(lat, 0.5),
        "p99_us": _percentile(lat, 0.99),
        "proxy_cpu_s_per_1k": m.proxy_cpu / reqs * 1000 if reqs and running.pids else float("nan"),
        "rss_load_mib": m.peak_rss if running.pids else float("nan"),
        "gen_cores": _gen_cores(m),
        "errors": float(m.load.errors),
    }


def _rr_pingpong(running: Running, s: Settings, backend: Backend) -> dict[str, float]:
    spec = LoadSpec("rr", running.port, 1, 1, s.duration)
    m = measure(spec, running, s.warmup, backend)
    lat = m.load.latencies()
    return {
        "p50_us": _percentile(lat, 0.5),
        "p99_us": _percentile(lat, 0.99),
        "req_per_s": m.load.requests / s.duration,
        "gen_cores": _gen_cores(m),
        "errors": float(m.load.errors),
    }


def _rr_latency(running: Running, s: Settings, backend: Backend) -> dict[str, float]:
    spec = LoadSpec("rr", running.port, s.latency_connections, 1, s.duration, rate=s.latency_rate)
    m = measure(spec, running, s.warmup, backend)
    lat = m.load.latencies()
    return {
        "p50_us": _percentile(lat, 0.5),
        "p99_us": _percentile(lat, 0.99),
        "req_per_s": m.load.requests / s.duration,
        "gen_cores": _gen_cores(m),
        "errors": float(m.load.errors),
    }


def _connect(running: Running, s: Settings, backend: Backend) -> dict[str, float]:
    spec = LoadSpec("connect", running.port, s.connect_concurrency, s.processes, s.duration)
    m = measure(spec, running, s.warmup, backend)
    done = m.load.requests
    return {
        "conn_per_s": done / s.duration,
        "proxy_cpu_s_per_1k": m.proxy_cpu / done * 1000 if done and running.pids else float("nan"),
        "gen_cores": _gen_cores(m),
        "errors": float(m.load.errors),
    }


def _idle(running: Running, s: Settings, backend: Backend) -> dict[str, float]:
    time.sleep(min(1.0, s.duration))
    if not running.pids:
        nan = float("nan")
        return {
            "rss_mib": nan,
            "rss_per_proxy_mib": nan,
            "rss_sidecar_mib": nan,
            "rss_gateway_mib": nan,
        }
    rss = role_rss(running)
    total = sum(rss.values())
    sidecars = [v for role, v in rss.items() if role.endswith("sidecar")]
    gateways = [v for role, v in rss.items() if role.endswith("gateway")]
    return {
        "rss_mib": total,
        "rss_per_proxy_mib": total / len(rss),
        "rss_sidecar_mib": max(sidecars) if sidecars else float("nan"),
        "rss_gateway_mib": max(gateways) if gateways else float("nan"),
    }


_WRK_RPS: Final = re.compile(r"Requests/sec:\s+([0-9.]+)")
_WRK_LAT: Final = re.compile(r"^\s+(50|99)%\s+([0-9.]+)(us|ms|s)\s*$", re.M)
_UNIT_US: Final = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _wrk(running: Running, s: Settings, backend: Backend) -> dict[str, float]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    argv = [
        wrk,
        "-t1",
        f"-c{s.rr_connections}",
        f"-d{max(1, round(s.duration))}s",
        "--latency",
        f"http://127.0.0.1:{running.port}/",
    ]
    pids = running.pids
    cpu0 = sum(cpu_seconds(p) for p in pids)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    text = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    running.check_alive()
    rps = _WRK_RPS.search(text)
    if proc.returncode != 0 or rps is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text.strip()[-300:]}")
    lat = {q: float(v) * _UNIT_US[u] for q, v, u in _WRK_LAT.findall(text)}
    req_per_s = float(rps.group(1))
    total = req_per_s * max(1, round(s.duration))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", text)
    return {
        "req_per_s": req_per_s,
        "p50_us": lat.get("50", float("nan")),
        "p99_us": lat.get("99", float("nan")),
        "proxy_cpu_s_per_1k": cpu / total * 1000 if total and pids else float("nan"),
        "gen_cores": (usage.ru_utime + usage.ru_stime) / wall,
        "errors": 0.0 if errors is None else 1.0,
    }


@dataclass(frozen=True)
class Scenario:
    """A named measurement with its metrics (the first is the headline)."""

    name: str
    title: str
    metrics: tuple[Metric, ...]
    run: RunFn
    needs: str | None = None
    """An external tool that must be on PATH (else the scenario is skipped with a note)."""

    def unavailable(self) -> str | None:
        if self.needs and shutil.which(self.needs) is None:
            return f"{self.needs} not installed"
        return None


_GEN = Metric("gen_cores", "cores", False, "generator CPU (cores busy)")
_ERR = Metric("errors", "count", False, "errors")
_CPU_1K = Metric("proxy_cpu_s_per_1k", "CPU s", False, "proxy CPU s per 1,000 requests")

SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario(
            "idle",
            "RSS of the idle proxies",
            (
                Metric("rss_mib", "MiB", False, "RSS, all proxies"),
                Metric("rss_per_proxy_mib", "MiB", False, "RSS per proxy process"),
                Metric("rss_sidecar_mib", "MiB", False, "RSS of the largest sidecar"),
                Metric("rss_gateway_mib", "MiB", False, "RSS of the largest gateway"),
            ),
            _idle,
        ),
        Scenario(
            "bulk_1",
            "bulk throughput, 1 connection",
            (
                Metric("mb_per_s", "MB/s", True, "MB/s"),
                Metric("proxy_cpu_s_per_gb", "CPU s", False, "proxy CPU s per GB"),
                _GEN,
                _ERR,
            ),
            _bulk(lambda s: 1),
        ),
        Scenario(
            "bulk_16",
            "bulk throughput, 16 connections",
            (
                Metric("mb_per_s", "MB/s", True, "MB/s"),
                Metric("proxy_cpu_s_per_gb", "CPU s", False, "proxy CPU s per GB"),
                _GEN,
                _ERR,
            ),
            _bulk(lambda s: s.bulk_many),
        ),
        Scenario(
            "rr_max",
            "1 KiB request/response at saturation (persistent connections, closed loop)",
            (
                Metric("req_per_s", "req/s", True, "req/s"),
                Metric("p50_us", "µs", False, "p50 at saturation"),
                Metric("p99_us", "µs", False, "p99 at saturation"),
                _CPU_1K,
                Metric("rss_load_mib", "MiB", False, "peak RSS under load, all proxies"),
                _GEN,
                _ERR,
            ),
            _rr_max,
        ),
        Scenario(
            "rr_pingpong",
            "1 KiB ping-pong round trip, 1 connection, back to back (as sockperf ping-pong)",
            (
                Metric("p50_us", "µs", False, "p50"),
                Metric("p99_us", "µs", False, "p99"),
                Metric("req_per_s", "req/s", True, "round trips/s"),
                _GEN,
                _ERR,
            ),
            _rr_pingpong,
        ),
        Scenario(
            "rr_latency",
            "1 KiB request/response latency at a fixed rate",
            (
                Metric("p50_us", "µs", False, "p50"),
                Metric("p99_us", "µs", False, "p99"),
                Metric("req_per_s", "req/s", True, "achieved req/s"),
                _GEN,
                _ERR,
            ),
            _rr_latency,
        ),
        Scenario(
            "connect",
            "new connections (full mTLS handshakes on every hop), 1 KiB exchange each",
            (
                Metric("conn_per_s", "conn/s", True, "connections/s"),
                Metric("proxy_cpu_s_per_1k", "CPU s", False, "proxy CPU s per 1,000 connections"),
                _GEN,
                _ERR,
            ),
            _connect,
        ),
        Scenario(
            "http_wrk",
            "HTTP/1.1 keep-alive, 1 KiB responses, wrk (C generator, 1 thread)",
            (
                Metric("req_per_s", "req/s", True, "req/s"),
                Metric("p50_us", "µs", False, "p50"),
                Metric("p99_us", "µs", False, "p99"),
                _CPU_1K,
                _GEN,
                _ERR,
            ),
            _wrk,
            needs="wrk",
        ),
    )
}


def median(values: list[float]) -> float:
    """Median ignoring NaN (NaN if nothing is left)."""
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")
