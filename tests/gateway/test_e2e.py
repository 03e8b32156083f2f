"""End to end with real `meshfed gateway run` processes on loopback.

Three clusters a (127.0.0.2), b (127.0.0.3), c (127.0.0.4), each with its own CA and
trust domain. The service `echo` runs only in c (a TLS echo server with c's
*workload* SVID stands in for sidecar B), behind a recording TCP hop that keeps
every byte the gateway delivers. `secret` runs in c and is exported to nobody.
A client in a (a workload SVID of a) reaches `echo`:

* passthrough: straight to c's gateway passthrough port;
* tunnel: to a's gateway passthrough port, which tunnels to c's gateway.

Real sockets, so no MockClock here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from sidecar.sni import MeshSni
from trust.errors import HandshakeRefused
from trust.spiffe import TrustDomain, workload_id
from trust.svid import Svid, issue_svid
from trust.tls import bootstrap_client_context, client_context, handshake_and_verify, server_context
from trust.validate import TrustBundleSet

from .helpers import (
    NOW,
    Record,
    bundle_set,
    cas,
    catalog,
    cluster_record,
    endpoint,
    export,
    gateway_record,
    gateway_svid,
    td,
)

ROOT = Path(__file__).resolve().parents[2]
HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
MODES = {"a": ("tunnel", "passthrough"), "b": ("tunnel",), "c": ("tunnel", "passthrough")}
SERVICE_PORT = 8080
PAYLOAD = b"the quick brown fox jumps over the lazy dog " * 1000


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Federation:
    ports: dict[str, dict[str, int]]
    procs: dict[str, subprocess.Popen[bytes]]
    echo_port: int
    recorder_port: int
    client_svid: Svid
    echo_svid: Svid
    bundles: TrustBundleSet
    logs: Path


def write_config(path: Path, ports: dict[str, dict[str, int]]) -> None:
    lines = [
        "version: 1",
        "federation:",
        "  name: test",
        "  settings:",
        "    gateway_probe: {interval: 200ms, timeout: 150ms, failure_threshold: 3}",
        "clusters:",
    ]
    for c, host in HOSTS.items():
        p = ports[c]
        lines += [
            f"  - name: {c}",
            f"    cloud: cloud-{c}",
            f"    region: region-{c}",
            f"    zones: [z{c}1]",
            f"    gateway: {{address: {host}, tunnel_port: {p['tunnel']}, "
            f"passthrough_port: {p['passthrough']}, admin_port: {p['admin']}, "
            f"modes: [{', '.join(MODES[c])}]}}",
            f"    agent: {{address: {host}, catalog_port: {p['agent']}}}",
        ]
    path.write_text("\n".join(lines) + "\n")


def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def wait_ready(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError, IndexError, ValueError):
            if http_get(host, port, "/ready")[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("e2e")
    ports = {
        c: {k: free_port(h) for k in ("tunnel", "passthrough", "admin", "agent")}
        for c, h in HOSTS.items()
    }
    echo_port, recorder_port = free_port(HOSTS["c"]), free_port(HOSTS["c"])
    authorities = cas("a", "b", "c")
    bundles = bundle_set(authorities)
    cfg = base / "fed.yaml"
    write_config(cfg, ports)
    records: list[Record] = [cluster_record(c, HOSTS[c]) for c in HOSTS]
    records += [
        gateway_record(c, MODES[c], HOSTS[c], ports[c]["tunnel"], ports[c]["passthrough"])
        for c in HOSTS
    ]
    echo_export = export("c", "echo", ("a",), SERVICE_PORT)
    secret_export = export("c", "secret", (), SERVICE_PORT)
    echo_ep = endpoint("c", "echo", "e1", address=HOSTS["c"], port=recorder_port)
    secret_ep = endpoint("c", "secret", "s1", address=HOSTS["c"], port=recorder_port)
    views: dict[str, list[Record]] = {
        # The import rule: a sees c's exports to a only; c sees everything of its own.
        "a": [*records, echo_export, echo_ep],
        "b": list(records),
        "c": [*records, echo_export, secret_export, echo_ep, secret_ep],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = base / "logs"
    logs.mkdir()
    for c in HOSTS:
        d = base / c
        (d / "svid" / "bundles").mkdir(parents=True)
        svid = gateway_svid(authorities[c])
        (d / "svid" / "svid.crt").write_bytes(svid.chain_pem())
        key = d / "svid" / "svid.key"
        key.write_bytes(svid.key_pem())
        key.chmod(0o600)
        for other, ca in authorities.items():
            bundle = ca.trust_bundle(1)
            (d / "svid" / "bundles" / f"{td(other)}.json").write_text(bundle.to_json())
        (d / "catalog.json").write_bytes(catalog(c, views[c]).to_json())
        log = logs / f"{c}.log"
        procs[c] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "federation.cli.main",
                "gateway",
                "run",
                "--config",
                str(cfg),
                "--cluster",
                c,
                "--state-dir",
                str(d / "state"),
                "--svid-dir",
                str(d / "svid"),
                "--catalog",
                str(d / "catalog.json"),
                "--drain-timeout",
                "1",
            ],
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
    try:
        for c in HOSTS:
            wait_ready(HOSTS[c], ports[c]["admin"], procs[c], logs / f"{c}.log")
        yield Federation(
            ports=ports,
            procs=procs,
            echo_port=echo_port,
            recorder_port=recorder_port,
            client_svid=issue_svid(
                authorities["a"],
                workload_id(TrustDomain(td("a")), "demo", "client"),
                NOW,
                dt.timedelta(hours=1),
            ),
            echo_svid=issue_svid(
                authorities["c"],
                workload_id(TrustDomain(td("c")), "demo", "echo"),
                NOW,
                dt.timedelta(hours=1),
            ),
            bundles=bundles,
            logs=logs,
        )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def echo_service(fed: Federation) -> AsyncIterator[list[bytes]]:
    """The echo workload of c (mTLS, any federated caller) behind a recording hop.
    Yields the list of byte chunks the gateway delivered to the workload."""
    recorded: list[bytes] = []
    ctx = server_context(fed.echo_svid, fed.bundles)

    async def echo(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        with contextlib.suppress(HandshakeRefused, trio.BrokenResourceError):
            await handshake_and_verify(stream, fed.bundles, lambda: dt.datetime.now(dt.UTC))
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.aclose()

    async def record(tcp: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(HOSTS["c"], fed.echo_port)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, keep: bool) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await src.receive_some(65536):
                    if keep:
                        recorded.append(data)
                    await dst.send_all(data)
                await dst.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(pump, tcp, upstream, True)
            n.start_soon(pump, upstream, tcp, False)

    async with trio.open_nursery() as nursery:
        l1 = await trio.open_tcp_listeners(fed.echo_port, host=HOSTS["c"])
        l2 = await trio.open_tcp_listeners(fed.recorder_port, host=HOSTS["c"])
        nursery.start_soon(trio.serve_listeners, echo, l1)
        nursery.start_soon(trio.serve_listeners, record, l2)
        yield recorded
        nursery.cancel_scope.cancel()


async def call(
    fed: Federation, host: str, port: int, service: str = "echo", *, mesh: bool = True
) -> bytes:
    """One mesh call from cluster a: TLS to (host, port) with the meshfed SNI, verify the
    echo workload of c end to end, send PAYLOAD, half-close, read the echo."""
    sni = MeshSni(service, "demo", SERVICE_PORT, "c", "a").format()
    ctx = (
        client_context(fed.client_svid, fed.bundles)
        if mesh
        else bootstrap_client_context(fed.bundles)
    )
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=sni)
    expected = {workload_id(TrustDomain(td("c")), "demo", "echo")}
    with trio.fail_after(10):
        await handshake_and_verify(
            stream, fed.bundles, lambda: dt.datetime.now(dt.UTC), expected=expected
        )
        got = bytearray()

        async def reader() -> None:
            while data := await stream.receive_some(65536):
                got.extend(data)
                if len(got) >= len(PAYLOAD):
                    return

        try:
            async with trio.open_nursery() as n:
                n.start_soon(reader)
                await stream.send_all(PAYLOAD)
        except BaseExceptionGroup as group:
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
    await stream.aclose()
    return bytes(got)


def metrics(fed: Federation, c: str) -> str:
    return http_get(HOSTS[c], fed.ports[c]["admin"], "/metrics")[1].decode()


def assert_only_tls_records(recorded: list[bytes]) -> None:
    wire = b"".join(recorded)
    assert wire[:1] == b"\x16" and wire[1:3] in (b"\x03\x01", b"\x03\x03")  # a ClientHello
    i = 0
    while i + 5 <= len(wire):  # every byte belongs to a TLS record
        assert wire[i] in (20, 21, 22, 23), f"not a TLS record at {i}"
        i += 5 + int.from_bytes(wire[i + 3 : i + 5], "big")
    assert i == len(wire)
    assert b"quick brown fox" not in wire


async def test_passthrough_direct_to_c(fed: Federation) -> None:
    async with echo_service(fed) as recorded:
        got = await call(fed, HOSTS["c"], fed.ports["c"]["passthrough"])
    assert got == PAYLOAD
    assert_only_tls_records(recorded)
    assert (
        'meshfed_gateway_connections_total{destination_cluster="c",destination_service="demo/echo",direction="inbound",mode="passthrough",source_cluster="a"}'
        in metrics(fed, "c")
    )


async def test_tunnel_via_a_to_c(fed: Federation) -> None:
    async with echo_service(fed) as recorded:
        for _ in range(3):  # several calls share one pooled tunnel connection
            assert await call(fed, HOSTS["a"], fed.ports["a"]["passthrough"]) == PAYLOAD
    assert_only_tls_records(recorded)
    m_a, m_c = metrics(fed, "a"), metrics(fed, "c")
    assert 'meshfed_gateway_tunnel_connections_total{peer_cluster="c",role="client"} 1.0' in m_a
    assert 'meshfed_gateway_tunnel_streams_total{peer_cluster="c",role="client"} 3.0' in m_a
    assert 'mode="tunnel",source_cluster="a"} 3.0' in m_c


def test_gateways_hold_only_their_gateway_svid(fed: Federation) -> None:
    for c in HOSTS:
        stats = json.loads(http_get(HOSTS[c], fed.ports[c]["admin"], "/stats")[1])
        assert stats["svid"] == f"spiffe://{td(c)}/ns/meshfed-system/sa/east-west-gateway"
        files = sorted(p.name for p in (fed.logs.parent / c / "svid").iterdir())
        assert files == ["bundles", "svid.crt", "svid.key"]


async def test_not_exported_service_is_refused(fed: Federation) -> None:
    async with echo_service(fed) as recorded:
        for host, port in (
            (HOSTS["c"], fed.ports["c"]["passthrough"]),
            (HOSTS["a"], fed.ports["a"]["passthrough"]),
        ):
            with pytest.raises((HandshakeRefused, trio.BrokenResourceError)):
                await call(fed, host, port, "secret")
    assert recorded == []
    assert (
        'meshfed_gateway_refusals_total{listener="passthrough",reason="not_exported"}'
        in metrics(fed, "c")
    )
    assert (
        'meshfed_gateway_refusals_total{listener="passthrough",reason="unknown_service"}'
        in metrics(fed, "a")
    )


async def test_non_mesh_client_reaches_nothing(fed: Federation) -> None:
    """BAD_INPUTS 22: a well-formed SNI without an SVID gets through the gateway's filter
    but the workload requires a federated SVID: no byte of the service comes back."""
    async with echo_service(fed):
        with pytest.raises((HandshakeRefused, trio.BrokenResourceError)):
            await call(fed, HOSTS["c"], fed.ports["c"]["passthrough"], mesh=False)


def test_zz_dead_peer_gateway_is_detected_and_fails_fast(fed: Federation) -> None:
    """Kill c's gateway: a's prober marks it dead; new tunnels to it fail fast."""

    def alive_on_a() -> bool | None:
        stats = json.loads(http_get(HOSTS["a"], fed.ports["a"]["admin"], "/stats")[1])
        alive: bool | None = stats["peer_alive"].get("c")
        return alive

    deadline = time.monotonic() + 10
    while alive_on_a() is not True and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive_on_a() is True
    fed.procs["c"].kill()
    fed.procs["c"].wait()
    killed = time.monotonic()
    while alive_on_a() is not False and time.monotonic() < killed + 10:
        time.sleep(0.02)
    detection = time.monotonic() - killed
    assert alive_on_a() is False
    print(f"\ndead gateway detected after {detection:.2f} s (interval 200ms, threshold 3)")
    (fed.logs / "detection.txt").write_text(f"{detection:.3f}\n")
    m = metrics(fed, "a")
    assert 'meshfed_gateway_peer_alive{gateway="gw-0",peer_cluster="c"} 0.0' in m

    async def fails_fast() -> float:
        start = trio.current_time()
        with pytest.raises((HandshakeRefused, trio.BrokenResourceError, OSError)):
            await call(fed, HOSTS["a"], fed.ports["a"]["passthrough"])
        return trio.current_time() - start

    elapsed = trio.run(fails_fast)
    assert 'reason="peer_down"' in metrics(fed, "a")
    print(f"a call to the dead cluster failed after {elapsed * 1000:.1f} ms")
