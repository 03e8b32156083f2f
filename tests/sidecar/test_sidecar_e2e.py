"""End to end: real `meshfed sidecar run` processes on loopback, static catalog, SVIDs
from the project CA, echo apps that say which zone served them.

Zone failover (SIGKILL the zone's endpoint sidecar) and whole-cluster failover (every
c1 endpoint) with zero client-visible errors, recovery after revival, an unmodified
redis-cli/redis-server through a sidecar pair, and SIGTERM draining to exit 0.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from sidecarkit import ECHO_WORKLOADS, Mesh, Ports, make_config

ROOT = Path(__file__).resolve().parents[2]


class Procs:
    def __init__(self, base: Path, mesh: Mesh, ports: Ports) -> None:
        self.base, self.mesh, self.ports = base, mesh, ports
        self.config = base / "mesh.yaml"
        self.catalog = base / "catalog.json"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, workload: str) -> None:
        svid_dir = self.base / f"svid-{workload}"
        if not svid_dir.exists():
            self.mesh.write_svid_dir(self.base, workload)
        log = open(self.base / f"{workload}.log", "ab")  # noqa: SIM115
        self.procs[workload] = subprocess.Popen(
            [
                sys.executable, "-m", "federation.cli.main", "sidecar", "run",
                "--config", str(self.config), "--workload", workload,
                "--state-dir", str(self.base / f"state-{workload}"),
                "--svid-dir", str(svid_dir), "--catalog", str(self.catalog), "--drain", "5",
            ],
            cwd=ROOT, stdout=log, stderr=log,
        )

    def kill(self, workload: str) -> None:
        p = self.procs.pop(workload)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        async for chunk in stream:
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def wait_ready(port: int, timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                if (await http_get(port, "/ready"))[0] == 200:
                    return
            except OSError:
                pass
            await trio.sleep(0.1)


async def zone_app(name: str, port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answers each line with '<name> <line>'."""

    async def handler(stream: trio.SocketStream) -> None:
        # One line, one answer, then close: the TLS leg cannot forward a half-close
        # (see sidecar/relay.py), so the server side ends the exchange.
        buf = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in stream:
                buf += chunk
                if b"\n" in buf:
                    line = buf.split(b"\n", 1)[0]
                    await stream.send_all(name.encode() + b" " + line + b"\n")
                    break

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handler, listeners)


async def call(port: int) -> str:
    """One new connection through the client sidecar; returns who answered or raises."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"ping\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(100)
                if not chunk:
                    raise ConnectionError(f"EOF after {data!r}")
                data += chunk
    name, _, rest = data.decode().strip().partition(" ")
    assert rest == "ping"
    return name


async def calls(port: int, n: int) -> tuple[list[str], int]:
    served, errors = [], 0
    for _ in range(n):
        try:
            served.append(await call(port))
        except (OSError, ConnectionError, trio.BrokenResourceError, trio.TooSlowError):
            errors += 1
    return served, errors


async def until_served_by(port: int, name: str, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while (await calls(port, 1))[0] != [name]:
            await trio.sleep(0.1)


@pytest.fixture
def mesh_procs(tmp_path: Path):
    ports = Ports.pick()
    cfg = make_config(ports)
    mesh = Mesh.build(cfg)
    procs = Procs(tmp_path, mesh, ports)
    from sidecarkit import config_text

    procs.config.write_text(config_text(ports))
    procs.catalog.write_bytes(mesh.catalog().to_json())
    try:
        yield procs
    finally:
        procs.stop_all()


async def test_locality_failover_zone_then_cluster_with_zero_client_errors(mesh_procs) -> None:
    p = mesh_procs
    async with trio.open_nursery() as nursery:
        for name in ECHO_WORKLOADS:
            await nursery.start(zone_app, name, p.ports.app[name])
        for name in ("client", *ECHO_WORKLOADS):
            p.start(name)
        for name in ("client", *ECHO_WORKLOADS):
            await wait_ready(p.ports.admin[name])
        listen = p.ports.echo_listen

        served, errors = await calls(listen, 20)
        assert (set(served), errors) == ({"echo-z1"}, 0)

        # The zone's only endpoint dies: the next tier (same cluster) serves, invisibly.
        p.kill("echo-z1")
        served, errors = await calls(listen, 20)
        assert (set(served), errors) == ({"echo-z2"}, 0)

        # Revived: traffic returns to the zone once ejection ends and checks pass.
        p.start("echo-z1")
        await until_served_by(listen, "echo-z1")
        served, errors = await calls(listen, 10)
        assert (set(served), errors) == ({"echo-z1"}, 0)

        # The whole cluster's endpoints die: the other cluster (same network) serves.
        p.kill("echo-z1")
        p.kill("echo-z2")
        served, errors = await calls(listen, 20)
        assert (set(served), errors) == ({"echo-c2"}, 0)

        p.start("echo-z1")
        p.start("echo-z2")
        await until_served_by(listen, "echo-z1")
        served, errors = await calls(listen, 10)
        assert (set(served), errors) == ({"echo-z1"}, 0)

        code, body = await http_get(p.ports.admin["client"], "/metrics")
        text = body.decode()
        assert code == 200
        assert 'meshfed_sidecar_failovers_total{destination_cluster="c2"' in text
        assert "meshfed_sidecar_connect_retries_total" in text
        code, body = await http_get(p.ports.admin["client"], "/stats")
        stats = json.loads(body)
        assert [t["name"] for t in stats["upstreams"]["echo.demo"]["tiers"]] == [
            "zone", "cluster", "cloud",
        ]

        # SIGTERM: drain and exit 0.
        proc = p.procs.pop("client")
        proc.send_signal(signal.SIGTERM)
        rc = await trio.to_thread.run_sync(proc.wait, 30)
        assert rc == 0
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli")),
    reason="needs Debian's redis-server and redis-tools",
)
async def test_unmodified_redis_client_and_server_through_a_sidecar_pair(
    mesh_procs, tmp_path: Path
) -> None:
    p = mesh_procs
    app_port = p.ports.app["redis-srv"]
    redis = subprocess.Popen(
        ["redis-server", "--port", str(app_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        p.start("client")
        p.start("redis-srv")
        await wait_ready(p.ports.admin["client"])
        await wait_ready(p.ports.admin["redis-srv"])

        def cli(*args: str, stdin: bytes | None = None) -> str:
            out = subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(p.ports.redis_listen), *args],
                capture_output=True, timeout=20, check=True, input=stdin,
            )
            return out.stdout.decode().strip()

        with trio.fail_after(30):
            while (await trio.to_thread.run_sync(cli, "PING")) != "PONG":
                await trio.sleep(0.2)
        assert await trio.to_thread.run_sync(cli, "SET", "mesh", "fed") == "OK"
        assert await trio.to_thread.run_sync(cli, "GET", "mesh") == "fed"
        big = b"x" * 300_000  # several TLS records and relay chunks; -x reads it from stdin
        assert await trio.to_thread.run_sync(lambda: cli("-x", "SET", "big", stdin=big)) == "OK"
        assert await trio.to_thread.run_sync(cli, "STRLEN", "big") == "300000"
        _code, body = await http_get(p.ports.admin["redis-srv"], "/metrics")
        assert 'direction="inbound"' in body.decode()
    finally:
        redis.terminate()
        redis.wait()



