"""Three real agent processes (`python -m federation.cli.main agent run`) on one real etcd.

Endpoints are added by writing into cluster aws-use1's keys in the store under
their own lease (standing in for a sidecar registration, which goes through the
catalog stream); everything is read back through each agent's admin `/catalog`.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from federation import keys
from federation.model import EndpointRecord, Locality
from federation.store import open_store
from tests.agent.helpers import CLUSTERS, DEMO, ROOT, demo_config, make_ca, wait_for

pytestmark = pytest.mark.etcd

TTL = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    def __init__(self, base: Path, cluster: str, store_url: str) -> None:
        self.cluster = cluster
        self.store_url = store_url
        self.ca = make_ca(base, cluster)
        self.state = base / f"state-{cluster}"
        self.port = free_port()
        self.log = base / f"agent-{cluster}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "federation.cli.main",
            "agent",
            "run",
            "--config",
            str(DEMO),
            "--cluster",
            self.cluster,
            "--store",
            self.store_url,
            "--ca-dir",
            str(self.ca),
            "--state-dir",
            str(self.state),
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            str(self.port),
            "--lease-ttl",
            str(TTL),
            "--catalog-host",
            "127.0.0.1",
            "--catalog-port",
            "0",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    async def get(self, path: str) -> tuple[int, bytes]:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return 0, b""
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = bytearray()
            while chunk := await stream.receive_some(1 << 16):
                data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    async def entries(self) -> set[str]:
        code, body = await self.get("/catalog")
        return set(json.loads(body)["entries"]) if code == 200 else set()

    async def status(self) -> dict:
        code, body = await self.get("/status")
        return json.loads(body) if code == 200 else {}


async def eventually(cond, timeout: float = 40.0) -> None:
    with trio.fail_after(timeout):
        while not await cond():
            await trio.sleep(0.1)


def extra_endpoint(eid: str) -> EndpointRecord:
    return EndpointRecord(
        cluster="aws-use1",
        namespace="demo",
        service="whoami",
        endpoint_id=eid,
        address="127.0.0.2",
        port=17199,
        weight=1,
        healthy=True,
        locality=Locality("aws", "us-east-1", "us-east-1b", "aws-use1"),
        spiffe_id="spiffe://aws-use1.demo.mesh/ns/demo/sa/whoami",
        network="aws-use1",
    )


@pytest.fixture
def agents(tmp_path, etcd_server):
    procs = {c: AgentProcess(tmp_path, c, etcd_server.url) for c in CLUSTERS}
    for p in procs.values():
        p.start()
    yield procs
    for p in procs.values():
        p.kill(signal.SIGTERM)


async def test_three_agents_propagate_hide_unexported_and_recover_from_kill_and_etcd_restart(
    agents, etcd_server
):
    aws, gcp, onprem = agents["aws-use1"], agents["gcp-euw1"], agents["onprem-dc1"]
    greeter = keys.endpoint("gcp-euw1", "demo", "greeter", "greeter-0")
    audit = keys.endpoint("onprem-dc1", "finance", "audit", "audit-0")
    frontend = keys.endpoint("aws-use1", "demo", "frontend", "frontend-0")

    async def everyone_ready():
        return all([(await p.get("/ready"))[0] == 200 for p in agents.values()])

    await eventually(everyone_ready, 60)
    # greeter is exported to aws and onprem only; its endpoints show there.
    await eventually(lambda: _has(aws, greeter))
    await eventually(lambda: _has(onprem, greeter))
    # Unexported services never leave their cluster (but are in their own).
    await eventually(lambda: _has(onprem, audit))
    await eventually(lambda: _has(aws, frontend))
    for p in (aws, gcp):
        assert audit not in await p.entries()
    for p in (gcp, onprem):
        assert frontend not in await p.entries()

    async with open_store(etcd_server.url) as store:
        # An endpoint added in aws-use1 appears everywhere whoami is imported; removed, it goes.
        rec = extra_endpoint("dyn-1")
        lease = await store.grant_lease(30)
        await store.put(rec.key(), rec.to_json(), lease=lease.id)
        for p in (gcp, onprem):
            await eventually(lambda p=p: _has(p, rec.key()))
        await store.delete(rec.key())
        for p in (gcp, onprem):
            await eventually(lambda p=p: _lacks(p, rec.key()))
        await store.revoke_lease(lease.id)

        # SIGKILL gcp: after its lease TTL its endpoints are gone everywhere.
        gcp.kill()
        await eventually(lambda: _lacks(aws, greeter))
        await eventually(lambda: _lacks(onprem, greeter))
        gcp.start()
        await eventually(lambda: _has(aws, greeter))
        await eventually(lambda: _ready(gcp))

        # etcd restarts mid-run: agents go degraded, keep their catalogs, and converge.
        before = await onprem.entries()
        await trio.to_thread.run_sync(etcd_server.kill)
        await eventually(lambda: _degraded(onprem, True))
        assert await onprem.entries() == before
        assert (await onprem.get("/ready"))[0] == 200
        await trio.to_thread.run_sync(etcd_server.start)
        await eventually(lambda: _degraded(onprem, False))

        # Compaction while onprem's watch is down (SIGSTOP): it re-lists, loses no delete.
        rec2 = extra_endpoint("dyn-2")
        onprem.proc.send_signal(signal.SIGSTOP)
        await store.put(rec2.key(), rec2.to_json())
        await store.delete(rec2.key())
        rec3 = extra_endpoint("dyn-3")
        await store.put(rec3.key(), rec3.to_json())
        rev = await store.current_revision()
        await trio.to_thread.run_sync(etcd_server.compact, rev)
        onprem.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: _has(onprem, rec3.key()))
        assert rec2.key() not in await onprem.entries()
        await store.delete(rec3.key())

        # Everyone converges to what the store holds; exactly one registration per cluster.
        _, items = await store.get_prefix(keys.prefix("clusters"))
        assert len(items) == 3 and all(kv.lease for kv in items)
    # A resumed agent may still be re-listing after the compaction: wait until every
    # agent is active and fresh again (the outcome is the same; only timing varies).
    for p in agents.values():
        with trio.move_on_after(40):
            while not _active_and_fresh(st := await p.status()):
                await trio.sleep(0.1)
        assert _active_and_fresh(st), st


def _active_and_fresh(st) -> bool:
    return st["phase"] == "active" and not st["degraded"]


async def _has(p, key):
    return key in await p.entries()


async def _lacks(p, key):
    return key not in await p.entries()


async def _ready(p):
    return (await p.get("/ready"))[0] == 200


async def _degraded(p, value):
    return (await p.status()).get("degraded") is value


class Proxy:
    """A TCP proxy that can blackhole: existing connections are cut, new ones hang."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.blackholed = False
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    def blackhole(self, on: bool) -> None:
        self.blackholed = on
        if on:
            for cs in list(self._scopes):
                cs.cancel()

    async def _handle(self, client):
        with trio.CancelScope() as cs:
            self._scopes.add(cs)
            try:
                if self.blackholed:
                    await trio.sleep_forever()
                upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
                async with upstream, trio.open_nursery() as n:
                    n.start_soon(self._pipe, client, upstream)
                    n.start_soon(self._pipe, upstream, client)
            except (trio.BrokenResourceError, OSError):
                pass
            finally:
                self._scopes.discard(cs)
        await trio.aclose_forcefully(client)

    async def _pipe(self, src, dst):
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def test_agent_partitioned_past_its_lease_stops_writing_and_reregisters(
    tmp_path, etcd_server
):
    proxy = Proxy(etcd_server.client_port)
    async with trio.open_nursery() as n:
        await n.start(proxy.serve)
        aws = AgentProcess(tmp_path, "aws-use1", etcd_server.url)
        gcp = AgentProcess(tmp_path, "gcp-euw1", f"etcd://127.0.0.1:{proxy.port}")
        try:
            aws.start()
            gcp.start()
            greeter = keys.endpoint("gcp-euw1", "demo", "greeter", "greeter-0")
            await eventually(lambda: _has(aws, greeter), 60)
            first = await gcp.status()
            proxy.blackhole(True)
            await eventually(lambda: _lacks(aws, greeter))  # its lease expired in etcd
            st = await gcp.status()
            assert st["phase"] in ("fenced", "registering") and st["degraded"], st
            assert st["last_fence"] == "lease_deadline"
            assert greeter in await gcp.entries()  # it keeps serving its last catalog
            proxy.blackhole(False)
            await eventually(lambda: _has(aws, greeter))
            await eventually(lambda: _active(gcp))
            st = await gcp.status()
            assert st["registrations"] == first["registrations"] + 1
            assert st["lease_id"] != first["lease_id"]
        finally:
            aws.kill(signal.SIGTERM)
            gcp.kill(signal.SIGTERM)
            n.cancel_scope.cancel()


async def _active(p):
    return (await p.status()).get("phase") == "active"


async def test_two_agents_race_for_one_cluster_on_real_etcd(tmp_path, etcd_server):
    from federation.agent.registration import Phase
    from federation.agent.runner import Agent, AgentOptions

    config = demo_config()
    ca = make_ca(tmp_path, "aws-use1", config)
    opts = AgentOptions(serve_admin=False, serve_catalog=False, watch_gateway=False, lease_ttl=TTL)
    a = Agent(config, "aws-use1", etcd_server.url, ca, tmp_path / "a", opts)
    b = Agent(config, "aws-use1", etcd_server.url, ca, tmp_path / "b", opts)
    async with trio.open_nursery() as n:
        n.start_soon(a.run)
        n.start_soon(b.run)
        await wait_for(lambda: {a.phase, b.phase} == {Phase.ACTIVE, Phase.STANDBY}, 30)
        await trio.sleep(2 * TTL)
        assert {a.phase, b.phase} == {Phase.ACTIVE, Phase.STANDBY}
        n.cancel_scope.cancel()


async def test_own_endpoints_never_leave_the_catalog_across_partition_compaction_and_heal(
    tmp_path, etcd_server
):
    # Issue #9: aws-use1's agent is cut from etcd past its lease (its keys expire), etcd
    # compacts, the link heals: the watch re-lists (a Reset without aws-use1's keys)
    # before the agent has re-registered. Its own catalog must hold its endpoints
    # throughout, and the heal must not cost it a catalog version.
    proxy = Proxy(etcd_server.client_port)
    async with trio.open_nursery() as n:
        await n.start(proxy.serve)
        aws = AgentProcess(tmp_path, "aws-use1", f"etcd://127.0.0.1:{proxy.port}")
        gcp = AgentProcess(tmp_path, "gcp-euw1", etcd_server.url)
        whoami = keys.endpoint("aws-use1", "demo", "whoami", "whoami-a-0")
        greeter = keys.endpoint("gcp-euw1", "demo", "greeter", "greeter-0")
        try:
            aws.start()
            gcp.start()
            await eventually(lambda: _has(aws, greeter), 60)
            await eventually(lambda: _has(gcp, whoami))
            await eventually(lambda: _active(aws))
            own = {
                k for k in await aws.entries() if k.startswith(keys.prefix("endpoints", "aws-use1"))
            }
            assert whoami in own
            first = await aws.status()
            polls: list[set[str]] = []

            async def poll() -> None:
                while True:
                    polls.append(await aws.entries())
                    await trio.sleep(0.02)

            async with trio.open_nursery() as watcher:
                watcher.start_soon(poll)
                proxy.blackhole(True)
                await eventually(lambda: _lacks(gcp, whoami))  # aws-use1's lease expired
                async with open_store(etcd_server.url) as store:
                    rev = await store.current_revision()
                await trio.to_thread.run_sync(etcd_server.compact, rev)
                proxy.blackhole(False)
                await eventually(lambda: _has(gcp, whoami))  # re-registered
                await eventually(lambda: _active(aws))
                await eventually(lambda: _degraded(aws, False))
                await trio.sleep(1)
                watcher.cancel_scope.cancel()
            last = await aws.status()
            assert last["registrations"] == first["registrations"] + 1  # it did lose the lease
            assert polls and all(own <= seen for seen in polls if seen)
            assert last["catalog"]["version"] == first["catalog"]["version"]
            assert last["catalog"]["local_records"] == "publisher"
        finally:
            aws.kill(signal.SIGTERM)
            gcp.kill(signal.SIGTERM)
            n.cancel_scope.cancel()


async def test_real_etcd_reset_before_reregistration_keeps_own_endpoints(tmp_path, etcd_server):
    # The drill's order, forced: aws-use1's lease expires in a real etcd, etcd compacts,
    # and the watch re-lists while the agent's own calls still fail (it cannot have
    # re-registered yet). Then its calls come back and it re-publishes.
    from federation.agent.registration import Phase
    from federation.agent.runner import Agent, AgentOptions
    from tests.agent.test_own_records import SplitStore

    config = demo_config()
    opts = AgentOptions(serve_admin=False, serve_catalog=False, watch_gateway=False, lease_ttl=TTL)
    agent = Agent(
        config,
        "aws-use1",
        etcd_server.url,
        make_ca(tmp_path, "aws-use1", config),
        tmp_path / "state",
        opts,
    )
    whoami = keys.endpoint("aws-use1", "demo", "whoami", "whoami-a-0")
    async with open_store(etcd_server.url) as store, trio.open_nursery() as n:
        split = SplitStore(store)
        await n.start(lambda task_status: agent.run(store=split, task_status=task_status))
        await wait_for(lambda: agent.phase is Phase.ACTIVE and agent.source.synced)
        await wait_for(lambda: whoami in agent.source.snapshot().entries)
        await trio.sleep(0.5)
        before = agent.source.snapshot()
        split.calls_down = True
        split.set_down(True)
        with trio.fail_after(30):
            while await store.get(whoami) is not None:  # the lease expired in etcd
                await trio.sleep(0.1)
        await trio.to_thread.run_sync(etcd_server.compact, await store.current_revision())
        resets = agent.source.builder.statistics().resets
        split.set_down(False)
        await wait_for(lambda: agent.source.builder.statistics().resets > resets)
        assert agent.phase is not Phase.ACTIVE
        assert agent.source.snapshot().version == before.version
        assert agent.source.snapshot().entries == before.entries
        split.calls_down = False
        await wait_for(lambda: agent.phase is Phase.ACTIVE)
        with trio.fail_after(30):
            while await store.get(whoami) is None:
                await trio.sleep(0.1)
        await trio.sleep(0.5)
        assert agent.source.snapshot().version == before.version
        assert agent.source.snapshot().entries == before.entries
        n.cancel_scope.cancel()
