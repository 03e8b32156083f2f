"""Roots and SVIDs change under running gateways (in process, real loopback sockets, so
the real clock; ``fail_after`` only guards against hangs).

Cluster b rotates its CA: b's gateway renews onto an SVID of the NEW root (its
``SvidRotator`` wired as in ``meshfed gateway run``) before a's gateway has the new
root. a refuses b's new tunnel until the catalog brings b's combined bundle; the
stream opened before any of it keeps flowing across both changes, on its old,
draining connection.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from federation.config.model import GatewayProbeSettings
from gateway.runner import Gateway, GatewayOptions
from gateway.tunnel import TunnelConnection, TunnelError, TunnelOptions, TunnelStream
from sidecar.runner import StaticCatalog
from sidecar.sni import MeshSni
from trust.ca import CertificateAuthority
from trust.spiffe import TrustDomain, gateway_id
from trust.svid import Svid, issue_svid
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

from .helpers import (
    NOW,
    Record,
    bundle_doc,
    catalog_with_bundles,
    cluster_record,
    endpoint,
    export,
    gateway_record,
    gateway_svid,
    td,
    write_gateway_config,
)

HOST = "127.0.0.1"
QUIET = GatewayProbeSettings(interval=3600.0, timeout=1.0, failure_threshold=100)
OPTIONS = GatewayOptions(
    bind=HOST,
    passthrough_port=0,
    tunnel_port=0,
    admin_port=0,
    probe=QUIET,
    tunnel=TunnelOptions(down_for=0.0),
    drain_timeout=1.0,
)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """Plain TCP echo: stands in for a's sidecar inbound (the gateway never decrypts)."""

    async def echo(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host=HOST))
        yield int(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def roundtrip(stream: TunnelStream, data: bytes) -> bytes:
    with trio.fail_after(10):
        await stream.send_all(data)
        got = b""
        while len(got) < len(data):
            got += await stream.receive_some(65536)
        return got


def server_handshake_failures(gw: Gateway) -> float:
    total = 0.0
    for metric in gw.metrics.handshake_failures.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("side") == "server":
                total += sample.value
    return total


async def wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


async def test_tunnels_survive_a_ca_rotation_and_new_roots_arrive_without_restart(
    tmp_path: Path,
) -> None:
    cfg = write_gateway_config(tmp_path / "fed.yaml", {"a": HOST, "b": HOST})
    made = NOW - dt.timedelta(hours=1)
    ca_a = CertificateAuthority.create(TrustDomain(td("a")), made)[0]
    ca_b_old = CertificateAuthority.create(TrustDomain(td("b")), made)[0]
    ca_b_new = CertificateAuthority.create(TrustDomain(td("b")), made)[0]
    start = TrustBundleSet(
        {ca_a.trust_domain: (ca_a.root,), ca_b_old.trust_domain: (ca_b_old.root,)}
    )
    bundles_v1 = {td("a"): bundle_doc((ca_a,), 1), td("b"): bundle_doc((ca_b_old,), 1)}
    # b's first SVID is due for renewal at once (issued 50 of its 60 minutes ago);
    # the renewal (b's CA has switched to the new root) waits for the test's go-ahead.
    b_id = gateway_id(ca_b_old.trust_domain)
    b_first = issue_svid(ca_b_old, b_id, NOW - dt.timedelta(minutes=50), dt.timedelta(hours=1))
    go = trio.Event()

    async def renew_b() -> Svid:
        await go.wait()
        return issue_svid(ca_b_new, b_id, dt.datetime.now(dt.UTC), dt.timedelta(hours=1))

    src_a, src_b = StaticCatalog(), StaticCatalog()
    gw_a = Gateway(
        cfg.cluster("a"),
        QUIET,
        TlsContextHolder(gateway_svid(ca_a), start),
        lambda: src_a.catalog,
        options=OPTIONS,
        source=src_a,
        rng=random.Random(1),
    )
    gw_b = Gateway(
        cfg.cluster("b"),
        QUIET,
        TlsContextHolder(b_first, start),
        lambda: src_b.catalog,
        options=OPTIONS,
        source=src_b,
        renew=renew_b,
        rng=random.Random(2),
    )
    async with echo_server() as echo_port, trio.open_nursery() as nursery:
        ports_a = await nursery.start(gw_a.run)
        await nursery.start(gw_b.run)
        assert ports_a.tunnel is not None
        a_gw = gateway_record("a", ("tunnel",), HOST, ports_a.tunnel, ports_a.passthrough)
        records: list[Record] = [cluster_record("a", HOST), cluster_record("b", HOST), a_gw]
        records += [export("a", "echo", ("b",)), endpoint("a", "echo", "e1", port=echo_port)]
        src_a.set(catalog_with_bundles("a", records, bundles_v1))
        src_b.set(catalog_with_bundles("b", records, bundles_v1))
        authority = MeshSni("echo", "demo", 8080, "a", "b").format()

        async def open_stream() -> TunnelStream:
            with trio.fail_after(10):
                return await gw_b.pool.open_stream((a_gw,), td("a"), authority)

        # Before anything changes: one stream b -> a, echoed by a's "sidecar".
        s1 = await open_stream()
        assert await roundtrip(s1, b"one") == b"one"
        (old_conn,) = gw_b.pool.connections()
        assert gw_a.tls.generation == 1  # the catalog's bundles equal the start roots

        # b renews onto the new root: its old connection drains (GOAWAY), s1 keeps going.
        go.set()
        assert gw_b.rotator is not None
        rotator = gw_b.rotator
        await wait_until(lambda: rotator.statistics().renewals == 1)
        assert gw_b.tls.svid.leaf.issuer == ca_b_new.root.subject
        assert old_conn.protocol.draining and not old_conn.closed
        assert await roundtrip(s1, b"two") == b"two"

        # a does not know the new root yet: b's new connection is refused by a.
        refused_before = server_handshake_failures(gw_a)
        with pytest.raises(TunnelError):
            s_refused = await open_stream()
            await roundtrip(s_refused, b"x")
        await wait_until(lambda: server_handshake_failures(gw_a) > refused_before)

        # The catalog brings b's combined bundle (CA rotation, publish step): a installs
        # it without a restart, drains its own old connections, and accepts b.
        bundles_v2 = {**bundles_v1, td("b"): bundle_doc((ca_b_old, ca_b_new), 2)}
        src_a.set(catalog_with_bundles("a", records, bundles_v2, version=2))
        await wait_until(lambda: len(gw_a.tls.bundles[ca_b_new.trust_domain]) == 2)
        assert all(c.protocol.draining for c in gw_a.server_connections)
        assert await roundtrip(s1, b"three") == b"three"
        s3 = await open_stream()
        assert await roundtrip(s3, b"four") == b"four"
        new_conn: TunnelConnection = s3.conn
        assert new_conn is not old_conn and new_conn.generation == gw_b.tls.generation
        assert gw_a.stats()["trust_domains"] == [td("a"), td("b")]

        # A rolled-back bundle (lower sequence) is refused; the combined roots stay.
        src_a.set(catalog_with_bundles("a", records, bundles_v1, version=3))
        await wait_until(lambda: gw_a.keeper.refusal_counts().get((td("b"), "rollback")) == 1)
        assert len(gw_a.tls.bundles[ca_b_new.trust_domain]) == 2

        # The first stream ends normally; its draining connection then closes.
        with trio.fail_after(10):
            await s1.send_eof()
            while await s1.receive_some(65536):
                pass
            await old_conn.wait_closed()
        assert await roundtrip(s3, b"five") == b"five"
        gw_a.stop()
        gw_b.stop()
