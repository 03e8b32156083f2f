"""Inbound refusals over memory streams with real TLS (MockClock), and revocation of a
live connection (real loopback app, real clock)."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing
from sidecarkit import Mesh, Ports, make_config

from federation.config.model import Authorization, Policy, PolicySource
from sidecar.authz import InboundPolicy, ServedPort
from sidecar.inbound import InboundServer, InboundSettings
from sidecar.metrics import SidecarMetrics
from sidecar.ratelimit import RateLimitConfig, RateLimiter
from sidecar.sni import MeshSni
from trust.enforcement import RevocationEnforcer
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import TrustDomain
from trust.svid import Svid
from trust.tls import TlsContextHolder, bootstrap_client_context, client_context

SNI = MeshSni("echo", "demo", 7000, "c1", "c1").format()
CLIENT_ID = "spiffe://c1.t.mesh/ns/demo/sa/client"


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh.build(make_config(Ports.pick()), extra_domains=("stranger.mesh",))


def make_server(
    mesh: Mesh,
    *,
    app_port: int = 1,
    auth: Authorization | None = None,
    rate: RateLimitConfig | None = None,
    enforcer: RevocationEnforcer | None = None,
) -> InboundServer:
    holder = TlsContextHolder(mesh.svid_for("echo-z1"), mesh.bundles())
    policy = InboundPolicy(
        local_cluster="c1",
        served=(ServedPort("demo", "echo", 7000, "127.0.0.1", app_port),),
        cluster_trust_domains={"c1": "c1.t.mesh", "c2": "c2.t.mesh"},
        authorization=auth or Authorization(default_action="allow"),
    )
    return InboundServer(
        InboundSettings(local_cluster="c1", handshake_timeout=5.0),
        holder,
        enforcer or RevocationEnforcer(),
        policy,
        RateLimiter(rate or RateLimitConfig()),
        SidecarMetrics(),
    )


def refusals(server: InboundServer) -> dict[str, float]:
    out = {}
    for metric in server.metrics.inbound_refusals.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                out[sample.labels["reason"]] = sample.value
    return out


async def call(server: InboundServer, ctx: ssl.SSLContext, sni: str | None = SNI) -> bytes:
    """Handshake as a client over memory streams, send a ping, return what came back."""
    a, b = trio.testing.memory_stream_pair()
    client = trio.SSLStream(b, ctx, server_hostname=sni)
    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, a)
        try:
            await client.do_handshake()
            await client.send_all(b"ping")
            got = await client.receive_some(100)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            got = b""
        finally:
            await trio.aclose_forcefully(client)
    return got


def ctx_for(mesh: Mesh, svid: Svid) -> ssl.SSLContext:
    return client_context(svid, mesh.bundles())


@pytest.fixture
def autojump(request):
    return trio.testing.MockClock(autojump_threshold=0)


async def test_no_client_certificate_is_refused(mesh: Mesh) -> None:
    server = make_server(mesh)
    assert await call(server, bootstrap_client_context(mesh.bundles())) == b""
    assert refusals(server) == {"no_peer_certificate": 1}


async def test_untrusted_domain_is_refused(mesh: Mesh) -> None:
    server = make_server(mesh)
    stranger = mesh.svid("stranger.mesh", "spiffe://stranger.mesh/ns/demo/sa/x")
    ctx = client_context(stranger, mesh.bundles("c1.t.mesh", "c2.t.mesh", "stranger.mesh"))
    assert await call(server, ctx) == b""
    # OpenSSL already refuses a root outside the union of trusted roots.
    assert refusals(server) == {"bad_chain": 1}


async def test_cross_domain_forged_svid_is_refused(mesh: Mesh) -> None:
    server = make_server(mesh)
    # c2's CA signs an identity in c1's domain: OpenSSL accepts it (c2 is trusted), the
    # per-domain check does not.
    forged = mesh.svid("c1.t.mesh", CLIENT_ID, signer="c2.t.mesh")
    assert await call(server, ctx_for(mesh, forged)) == b""
    assert refusals(server) == {"bad_chain": 1}


async def test_revoked_svid_is_refused(mesh: Mesh) -> None:
    svid = mesh.svid("c1.t.mesh", CLIENT_ID)
    rev = Revocation(TrustDomain("c1.t.mesh"), svid.serial, None, "test", svid.not_before)
    server = make_server(mesh, enforcer=RevocationEnforcer(RevocationSet.of([rev])))
    assert await call(server, ctx_for(mesh, svid)) == b""
    assert refusals(server) == {"revoked": 1}


async def test_identity_denied_by_policy(mesh: Mesh) -> None:
    deny = Policy("no-client", "demo", "echo", "deny", PolicySource(spiffe_ids=(CLIENT_ID,)))
    server = make_server(mesh, auth=Authorization(default_action="allow", policies=(deny,)))
    assert await call(server, ctx_for(mesh, mesh.svid("c1.t.mesh", CLIENT_ID))) == b""
    assert refusals(server) == {"denied": 1}


async def test_sni_source_cluster_must_match_the_callers_domain(mesh: Mesh) -> None:
    server = make_server(mesh)
    lying = MeshSni("echo", "demo", 7000, "c1", "c2").format()  # a c1 caller claiming c2
    got = await call(server, ctx_for(mesh, mesh.svid("c1.t.mesh", CLIENT_ID)), sni=lying)
    assert got == b""
    assert refusals(server) == {"source_cluster_mismatch": 1}


async def test_missing_and_malformed_sni_and_unknown_service(mesh: Mesh) -> None:
    server = make_server(mesh)
    ctx = ctx_for(mesh, mesh.svid("c1.t.mesh", CLIENT_ID))
    assert await call(server, ctx, sni=None) == b""
    assert await call(server, ctx, sni="echo.demo.svc.cluster.local") == b""
    assert await call(server, ctx, sni=MeshSni("nope", "demo", 7000, "c1", "c1").format()) == b""
    assert refusals(server) == {"no_sni": 1, "bad_sni": 1, "unknown_service": 1}


async def test_stalled_handshake_times_out_in_virtual_time(mesh: Mesh, autojump) -> None:
    server = make_server(mesh)
    a, _b = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await server.handle(a)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert refusals(server) == {"handshake_timeout": 1}


async def _echo_app(task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data.upper())

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_rate_limit_and_revocation_closes_a_live_connection(mesh: Mesh) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_echo_app)
        enforcer = RevocationEnforcer()
        server = make_server(
            mesh, app_port=port, enforcer=enforcer, rate=RateLimitConfig(rate=0.001, burst=1)
        )
        svid = mesh.svid("c1.t.mesh", CLIENT_ID)
        ctx = ctx_for(mesh, svid)
        a, b = trio.testing.memory_stream_pair()
        client = trio.SSLStream(b, ctx, server_hostname=SNI)
        nursery.start_soon(server.handle, a)
        await client.do_handshake()
        await client.send_all(b"ping")
        assert await client.receive_some(100) == b"PING"
        # A second connection from the same caller is over its rate.
        assert await call(server, ctx) == b""
        assert refusals(server) == {"rate_limited": 1}
        # Revoke the live caller: its connection is closed.
        rev = Revocation(TrustDomain("c1.t.mesh"), svid.serial, None, "test", svid.not_before)
        assert enforcer.update(RevocationSet.of([rev])) == 1
        with trio.fail_after(10):
            try:
                data = await client.receive_some(100)
            except trio.BrokenResourceError:
                data = b""
        assert data == b""
        await trio.aclose_forcefully(client)
        nursery.cancel_scope.cancel()
