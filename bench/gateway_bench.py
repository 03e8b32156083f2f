"""Gateway throughput and added latency: direct mTLS vs passthrough vs tunnel.

    .venv/bin/python bench/gateway_bench.py [--mib 64] [--rounds 300]

Everything runs in ONE trio process on loopback (client, two gateways, the TLS echo
workload), so the numbers are a lower bound for separate processes on separate
cores: the client's and the workload's TLS share the CPU with the gateways.
Paths (the end-to-end mTLS is always client <-> workload):

* direct: client -> workload
* passthrough: client -> gateway C passthrough (SNI, os.splice) -> workload
* tunnel: client -> gateway A passthrough -> HTTP/2 CONNECT over mTLS -> gateway C -> workload
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.config.model import AgentSpec, Cluster, GatewayProbeSettings, GatewaySpec
from gateway.runner import Gateway, GatewayOptions
from sidecar.sni import MeshSni
from tests.gateway.helpers import (
    NOW,
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
from trust.spiffe import TrustDomain, workload_id
from trust.svid import issue_svid
from trust.tls import TlsContextHolder, client_context, server_context

HOST = "127.0.0.1"


def cluster(name: str) -> Cluster:
    return Cluster(
        name=name,
        cloud="cloud-" + name,
        region="region-" + name,
        zones=("z" + name + "1",),
        gateway=GatewaySpec(address=HOST, bind=HOST),
        agent=AgentSpec(address=HOST),
        trust_domain=td(name),
    )


async def main(mib: int, rounds: int) -> None:
    authorities = cas("a", "c")
    bundles = bundle_set(authorities)
    echo_svid = issue_svid(
        authorities["c"],
        workload_id(TrustDomain(td("c")), "demo", "echo"),
        NOW,
        dt.timedelta(hours=1),
    )
    client_svid = issue_svid(
        authorities["a"],
        workload_id(TrustDomain(td("a")), "demo", "cli"),
        NOW,
        dt.timedelta(hours=1),
    )
    sctx = server_context(echo_svid, bundles)
    cctx = client_context(client_svid, bundles)

    async def echo(tcp: trio.SocketStream) -> None:
        s = trio.SSLStream(tcp, sctx, server_side=True)
        try:
            while data := await s.receive_some(256 * 1024):
                await s.send_all(data)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        echo_l = await trio.open_tcp_listeners(0, host=HOST)
        echo_port = echo_l[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, echo, echo_l)
        gws: dict[str, Gateway] = {}
        cats: dict[str, object] = {}
        opts = GatewayOptions(passthrough_port=0, tunnel_port=0, admin_port=0)
        for name in ("a", "c"):
            tls = TlsContextHolder(gateway_svid(authorities[name]), bundles)
            gws[name] = Gateway(
                cluster(name),
                GatewayProbeSettings(interval=5.0),
                tls,
                lambda n=name: cats.get(n),
                options=opts,  # type: ignore[misc]
            )
        ports = {name: await nursery.start(gw.run) for name, gw in gws.items()}
        recs = [
            cluster_record("a"),
            cluster_record("c"),
            gateway_record(
                "a", tunnel_port=ports["a"].tunnel, passthrough_port=ports["a"].passthrough
            ),
            gateway_record(
                "c", tunnel_port=ports["c"].tunnel, passthrough_port=ports["c"].passthrough
            ),
            export("c", "echo", ("a",)),
            endpoint("c", "echo", "e1", address=HOST, port=echo_port),
        ]
        cats["a"] = catalog("a", recs)
        cats["c"] = catalog("c", recs)
        sni = MeshSni("echo", "demo", 8080, "c", "a").format()
        paths = {
            "direct": echo_port,
            "passthrough": ports["c"].passthrough,
            "tunnel": ports["a"].passthrough,
        }

        async def connect(port: int) -> trio.SSLStream[trio.SocketStream]:
            s = trio.SSLStream(await trio.open_tcp_stream(HOST, port), cctx, server_hostname=sni)
            await s.do_handshake()
            return s

        async def bulk(port: int, total: int) -> None:
            s = await connect(port)
            chunk = b"x" * (256 * 1024)

            async def send() -> None:
                for _ in range(total // len(chunk)):
                    await s.send_all(chunk)

            got = 0
            async with trio.open_nursery() as n:
                n.start_soon(send)
                while got < total:
                    got += len(await s.receive_some(256 * 1024))
            await trio.aclose_forcefully(s)

        results: list[str] = []
        for name, port in paths.items():
            await bulk(port, 4 * 1024 * 1024)  # warm up (pool connection, caches)
            for streams in (1, 8):
                total = mib * 1024 * 1024
                start = time.perf_counter()
                async with trio.open_nursery() as n:
                    for _ in range(streams):
                        n.start_soon(bulk, port, total // streams)
                secs = time.perf_counter() - start
                # Echo: every byte crosses the path twice.
                results.append(f"| {name} | {streams} | {2 * mib / secs:.0f} |")
            s = await connect(port)
            msg = b"p" * 1024
            rtts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await s.send_all(msg)
                got = 0
                while got < len(msg):
                    got += len(await s.receive_some(65536))
                rtts.append(time.perf_counter() - t0)
            await trio.aclose_forcefully(s)
            rtts.sort()
            p50 = statistics.median(rtts) * 1e6
            p99 = rtts[int(0.99 * (len(rtts) - 1))] * 1e6
            results.append(f"| {name} | rtt | p50 {p50:.0f} us, p99 {p99:.0f} us |")
        print(
            f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus, "
            f"{platform.platform()}"
        )
        print(f"bulk: {mib} MiB echoed per run (MB/s counts both directions)")
        print("| path | streams | MB/s |")
        print("| --- | --- | --- |")
        for line in results:
            print(line)
        for gw in gws.values():
            gw.stop()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=300)
    a = p.parse_args()
    trio.run(main, a.mib, a.rounds)
