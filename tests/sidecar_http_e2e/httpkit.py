"""A federation with HTTP services for the end-to-end tests: real ``meshfed sidecar run``
processes on loopback, a static catalog, SVIDs from the project CA, apps in the test.

* ``web.demo`` (``http``, HTTP/1.1 apps) served by ``web-z1`` (c1/z1, label v1) and
  ``web-z2`` (c1/z2, label v2);
* ``rpc.demo`` (``http2``: a grpcio server, h2c) served by ``rpc-z1`` (c1/z1);
* ``client`` (c1/z1) calls both through its outbound listeners.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))

from sidecarkit import Mesh, free_ports

from federation.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ("client", "web-z1", "web-z2", "rpc-z1")


@dataclass
class Ports:
    inbound: dict[str, int]
    admin: dict[str, int]
    app: dict[str, int]
    web_listen: int
    rpc_listen: int

    @classmethod
    def pick(cls) -> Ports:
        n = len(WORKLOADS)
        p = free_ports(3 * n + 2)
        return cls(
            inbound={w: p[i] for i, w in enumerate(WORKLOADS)},
            admin={w: p[n + i] for i, w in enumerate(WORKLOADS)},
            app={w: p[2 * n + i] for i, w in enumerate(WORKLOADS)},
            web_listen=p[-2],
            rpc_listen=p[-1],
        )


def config_text(ports: Ports) -> str:
    def wl(name: str, zone: str, serves: str, labels: str = "{}") -> str:
        port = "http" if serves == "web" else "grpc"
        app = f"127.0.0.1:{ports.app[name]}"
        return f"""
  - name: {name}
    cluster: c1
    zone: {zone}
    namespace: demo
    address: 127.0.0.1
    inbound_port: {ports.inbound[name]}
    admin_port: {ports.admin[name]}
    labels: {labels}
    serves: [{{service: {serves}, port: {port}, app: "{app}"}}]"""

    return f"""version: 1
federation:
  name: t
  settings:
    gateway_probe: {{interval: 200ms, timeout: 200ms, failure_threshold: 2}}
clusters:
  - name: c1
    cloud: aws
    region: r1
    zones: [z1, z2]
    network: n1
    gateway: {{address: 127.0.0.5, tunnel_port: 15008, passthrough_port: 15443, admin_port: 15021}}
    agent: {{address: 127.0.0.5, catalog_port: 15010, admin_port: 15014}}
services:
  - name: web
    namespace: demo
    ports: [{{name: http, port: 8080, protocol: http}}]
    subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    routes:
      - name: to-v2
        match: {{prefix: /v2}}
        split: [{{subset: v2, weight: 100}}]
    traffic_policy:
      timeouts: {{connect: 1s, request: 60s}}
      retries: {{attempts: 3, retry_on: [connect-failure, refused-stream, reset, gateway-error]}}
      outlier_detection:
        consecutive_failures: 1
        base_ejection_time: 5s
        interval: 1s
        max_ejection_percent: 100
  - name: rpc
    namespace: demo
    ports: [{{name: grpc, port: 9090, protocol: http2}}]
workloads:
  - name: client
    cluster: c1
    zone: z1
    namespace: demo
    address: 127.0.0.1
    inbound_port: {ports.inbound["client"]}
    admin_port: {ports.admin["client"]}
    upstreams:
      - {{service: web.demo, listen: "127.0.0.1:{ports.web_listen}"}}
      - {{service: rpc.demo, listen: "127.0.0.1:{ports.rpc_listen}"}}
{wl("web-z1", "z1", "web", "{version: v1}")}
{wl("web-z2", "z2", "web", "{version: v2}")}
{wl("rpc-z1", "z1", "rpc")}
authorization:
  default_action: allow
"""


class Procs:
    """Sidecar processes of one test."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ports = Ports.pick()
        text = config_text(self.ports)
        self.cfg = parse_config(text, "http-e2e.yaml")
        self.mesh = Mesh.build(self.cfg)
        self.config = base / "mesh.yaml"
        self.config.write_text(text)
        self.catalog = base / "catalog.json"
        self.catalog.write_bytes(self.mesh.catalog().to_json())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, workload: str) -> None:
        svid_dir = self.base / f"svid-{workload}"
        if not svid_dir.exists():
            self.mesh.write_svid_dir(self.base, workload)
        log = open(self.log_path(workload), "ab")  # noqa: SIM115
        self.procs[workload] = subprocess.Popen(
            [
                sys.executable, "-m", "federation.cli.main", "sidecar", "run",
                "--config", str(self.config), "--workload", workload,
                "--state-dir", str(self.base / f"state-{workload}"),
                "--svid-dir", str(svid_dir), "--catalog", str(self.catalog), "--drain", "5",
            ],
            cwd=ROOT, stdout=log, stderr=log,
        )  # fmt: skip

    def log_path(self, workload: str) -> Path:
        return self.base / f"{workload}.log"

    def kill(self, workload: str) -> None:
        p = self.procs.pop(workload)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


# -- a tiny HTTP/1.1 client and app ----------------------------------------------------


class H1Client:
    """One keep-alive HTTP/1.1 connection (h11), for many requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> tuple[int, dict[str, str], bytes]:
        if self.stream is None or self.conn.our_state is not h11.IDLE:
            if self.stream is not None:
                await self.stream.aclose()
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self.conn = h11.Connection(h11.CLIENT)
        fields = [("host", "web"), ("content-length", str(len(body))), *(headers or [])]
        out = self.conn.send(h11.Request(method=method, target=path, headers=fields))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)
        status, resp_headers, data = 0, {}, bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                chunk = await self.stream.receive_some(65536)
                self.conn.receive_data(chunk)
                if not chunk and self.conn.their_state is not h11.DONE:
                    raise ConnectionError("closed before the response ended")
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                resp_headers = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                data += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("closed")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            await self.stream.aclose()
            self.stream = None
        return status, resp_headers, bytes(data)

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


ARRIVALS: list[tuple[str, str]] = []
"""(app name, request target) of every request a ``web_app`` received, in order."""

SLOW_SECONDS = 2.0
"""How long a ``web_app`` takes to answer a target starting with ``/slow``."""


async def web_app(
    name: str, port: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """HTTP/1.1 app: answers ``name``, the traceparent it got, and the body's length and sha256
    (targets under ``/slow`` after :data:`SLOW_SECONDS`)."""

    async def handler(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError
        ):
            while True:
                sha, size, req = hashlib.sha256(), 0, None
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(262144))
                        continue
                    if isinstance(ev, h11.ConnectionClosed):
                        return
                    if isinstance(ev, h11.Request):
                        req = ev
                        ARRIVALS.append((name, ev.target.decode()))
                    elif isinstance(ev, h11.Data):
                        sha.update(ev.data)
                        size += len(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                assert req is not None
                if req.target.startswith(b"/slow"):
                    await trio.sleep(SLOW_SECONDS)
                tp = dict(req.headers).get(b"traceparent", b"").decode()
                lines = [f"served_by={name}", f"traceparent={tp}", f"len={size}"]
                body = ("\n".join([*lines, f"sha256={sha.hexdigest()}"]) + "\n").encode()
                await stream.send_all(
                    conn.send(
                        h11.Response(status_code=200, headers=[("content-length", str(len(body)))])
                    )
                    + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage())
                )
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handler, listeners)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET on a new connection (admin endpoint)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
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


def parse_answer(body: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)


@contextlib.asynccontextmanager
async def running(base: Path, workloads: tuple[str, ...] = WORKLOADS) -> AsyncIterator[Procs]:
    """Apps and sidecars up and ready; everything stopped afterwards."""
    procs = Procs(base)
    try:
        async with trio.open_nursery() as nursery:
            for name in ("web-z1", "web-z2"):
                await nursery.start(web_app, name, procs.ports.app[name])
            for name in workloads:
                procs.start(name)
            for name in workloads:
                await wait_ready(procs.ports.admin[name])
            yield procs
            nursery.cancel_scope.cancel()
    finally:
        procs.stop_all()
