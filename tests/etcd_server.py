"""A real etcd process for tests: free loopback ports, a private data dir, kill -9 and restart.

Used through the ``etcd_server`` fixture in ``tests/conftest.py``::

    async def test_x(etcd_server):
        async with open_store(etcd_server.url) as store: ...
        await trio.to_thread.run_sync(etcd_server.kill)     # SIGKILL, like a crash
        await trio.to_thread.run_sync(etcd_server.restart)  # same ports, same data dir

Methods are blocking (they wait for etcd to become healthy); from trio tests call
them through ``trio.to_thread.run_sync`` so open watches keep being served.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL_BINARY = shutil.which("etcdctl") or "/usr/bin/etcdctl"


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message carries the tail of its log."""


def etcd_available() -> bool:
    return os.access(ETCD_BINARY, os.X_OK)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One single-member etcd cluster owned by a test.

    Fast-failure settings: heartbeat 10 ms and election timeout 100 ms make the
    minimum lease TTL 1 s (etcd's minimum is 1.5 x election timeout, rounded up),
    so lease tests stay short.
    """

    name = "meshfed-test"

    def __init__(self, data_dir: Path, client_port: int, peer_port: int) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def launch(cls, base_dir: Path, *, attempts: int = 3) -> EtcdServer:
        """Start etcd on fresh free ports under ``base_dir`` (retrying if a port was taken)."""
        last: Exception | None = None
        for i in range(attempts):
            server = cls(base_dir / f"etcd-{i}", _free_port(), _free_port())
            try:
                server.start()
                return server
            except EtcdStartError as err:  # most likely a port race with another process
                server.kill()
                last = err
        raise EtcdStartError(f"etcd did not start after {attempts} attempts: {last}")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EtcdServer {self.endpoint} {state} data={self.data_dir}>"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """The store URL for :func:`federation.store.open_store`."""
        return f"etcd://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, health_checks: int = 400) -> None:
        """Start etcd (same ports and data dir as before) and wait until it is healthy."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        client = f"http://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            ETCD_BINARY,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=10",
            "--election-timeout=100",
        ]
        # ETCD_* variables from the environment would silently override the flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        for _ in range(health_checks):
            if self._proc.poll() is not None:
                raise EtcdStartError(f"etcd exited with {self._proc.returncode}: {self.log_tail()}")
            if self._healthy():
                return
            time.sleep(0.025)
        raise EtcdStartError(f"etcd at {self.endpoint} not healthy: {self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would, and reap it. The data dir is kept."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """Stop etcd gracefully (SIGTERM), falling back to SIGKILL."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self._proc = None

    def restart(self) -> None:
        """kill -9, then start again on the same ports and data dir."""
        self.kill()
        self.start()

    def etcdctl(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        env["ETCDCTL_API"] = "3"
        out = subprocess.run(
            [ETCDCTL_BINARY, f"--endpoints={self.endpoint}", *args],
            env=env,
            capture_output=True,
            check=True,
            timeout=30,
        )
        return out.stdout.decode()

    def compact(self, revision: int) -> None:
        """Compact etcd's history up to ``revision`` (out of band, via etcdctl)."""
        self.etcdctl("compact", str(revision), "--physical")

    def metric(self, name: str) -> float:
        """A Prometheus gauge/counter from etcd's /metrics (e.g. the server-side watcher count)."""
        with urllib.request.urlopen(f"http://{self.endpoint}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(f"etcd exposes no metric {name!r}")

    def watchers(self) -> int:
        """Watchers etcd currently serves (all clients)."""
        return int(self.metric("etcd_debugging_mvcc_watcher_total"))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
