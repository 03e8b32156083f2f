"""Real TLS handshakes over trio memory streams: BAD_INPUTS cases 1, 4, 9, 10, 11.

OpenSSL checks validity against the real clock, so these certificates are
minted relative to the real time; the SPIFFE check uses ``now_fn``.
"""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
import trio
import trio.testing
from trustkit import make_leaf

from trust.ca import CertificateAuthority
from trust.errors import HandshakeRefused, TlsConfigError
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import TrustDomain, gateway_id, workload_id
from trust.svid import Svid, issue_svid
from trust.tls import TlsContextHolder, client_context, handshake_and_verify, server_context
from trust.validate import TrustBundleSet

REAL_NOW = dt.datetime.now(dt.UTC)
TD_A, TD_B = TrustDomain("a.mesh"), TrustDomain("b.mesh")
CA_A, _ = CertificateAuthority.create(TD_A, REAL_NOW)
CA_A_INT, _ = CertificateAuthority.create(TD_A, REAL_NOW, intermediate=True)
CA_B, _ = CertificateAuthority.create(TD_B, REAL_NOW)
BUNDLES = TrustBundleSet({TD_A: (CA_A.root, CA_A_INT.root), TD_B: (CA_B.root,)})
ALICE, BOB = workload_id(TD_A, "shop", "alice"), workload_id(TD_B, "shop", "bob")
SVID_ALICE = issue_svid(CA_A, ALICE, REAL_NOW)
SVID_BOB = issue_svid(CA_B, BOB, REAL_NOW)
SERVER = TlsContextHolder(SVID_ALICE, BUNDLES)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def run_pair(server_ctx, client_ctx, **server_kw):
    """Handshake both ends; returns (server outcome, client outcome), each a peer or an error."""
    a, b = trio.testing.memory_stream_pair()
    srv = trio.SSLStream(a, server_ctx, server_side=True)
    cli = trio.SSLStream(b, client_ctx, server_hostname="payments.shop.svc")
    out: dict[str, object] = {}

    async def side(name, stream, **kw):
        try:
            out[name] = await handshake_and_verify(stream, BUNDLES, now, **kw)
        except HandshakeRefused as exc:
            out[name] = exc

    async with trio.open_nursery() as n:
        n.start_soon(lambda: side("server", srv, **server_kw))
        n.start_soon(lambda: side("client", cli))
    return out["server"], out["client"], srv, cli


async def test_mutual_handshake_identifies_both_peers():
    server, client, srv, cli = await run_pair(SERVER.server, client_context(SVID_BOB, BUNDLES))
    assert server.spiffe_id == BOB and client.spiffe_id == ALICE
    assert srv.version() == "TLSv1.3"
    await cli.send_all(b"ping")
    assert await srv.receive_some(10) == b"ping"


async def test_intermediate_chain_is_sent_and_verified():
    svid = issue_svid(CA_A_INT, workload_id(TD_A, "x", "y"), REAL_NOW)
    server, _, _, _ = await run_pair(SERVER.server, client_context(svid, BUNDLES))
    assert len(server.chain) == 3 and server.chain[-1] == CA_A_INT.root


def _svid_from(issuer_ca, **leaf_kw) -> Svid:
    leaf_kw.setdefault("not_before", REAL_NOW - dt.timedelta(minutes=1))
    leaf_kw.setdefault("not_after", REAL_NOW + dt.timedelta(hours=1))
    key, leaf = make_leaf((issuer_ca.signing_key, issuer_ca.certificate), **leaf_kw)
    return Svid.from_certificates([leaf], key)


async def test_expired_client_leaf_is_refused_by_the_server():
    svid = _svid_from(
        CA_A,
        uris=(str(ALICE),),
        not_before=REAL_NOW - dt.timedelta(hours=2),
        not_after=REAL_NOW - dt.timedelta(hours=1),
    )
    server, _, _, _ = await run_pair(SERVER.server, client_context(svid, BUNDLES))
    assert isinstance(server, HandshakeRefused) and server.reason == "expired"


async def test_domain_b_ca_minting_domain_a_identity_is_refused_though_openssl_accepts():
    forged = _svid_from(CA_B, uris=(str(ALICE),))
    server, _, _, _ = await run_pair(SERVER.server, client_context(forged, BUNDLES))
    assert isinstance(server, HandshakeRefused) and server.reason == "bad_chain"


async def test_unexpected_identity_is_refused():
    server, _, _, _ = await run_pair(
        SERVER.server, client_context(SVID_BOB, BUNDLES), expected={gateway_id(TD_B)}
    )
    assert isinstance(server, HandshakeRefused) and server.reason == "unexpected_identity"


async def test_revoked_peer_is_refused_on_new_handshakes():
    revoked = RevocationSet.of([Revocation(TD_B, SVID_BOB.serial, None, "test", REAL_NOW)])
    server, _, srv, _ = await run_pair(
        SERVER.server, client_context(SVID_BOB, BUNDLES), revoked=revoked
    )
    assert isinstance(server, HandshakeRefused) and server.reason == "revoked"
    with pytest.raises(trio.ClosedResourceError):
        await srv.send_all(b"x")


async def test_client_that_presents_no_certificate_is_refused():
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    server, _, _, _ = await run_pair(SERVER.server, bare)
    assert isinstance(server, HandshakeRefused)
    assert server.reason in {"no_peer_certificate", "handshake_failed"}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2]
)
async def test_old_tls_versions_are_refused(version):
    old = client_context(SVID_BOB, BUNDLES)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = version
    server, client, _, _ = await run_pair(SERVER.server, old)
    assert isinstance(server, HandshakeRefused) and server.reason == "handshake_failed"
    assert isinstance(client, HandshakeRefused)


async def test_plaintext_on_the_tls_port_is_closed_cleanly():
    a, b = trio.testing.memory_stream_pair()
    srv = trio.SSLStream(a, SERVER.server, server_side=True)
    got: list[bytes] = []

    async def plaintext_client():
        await b.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while chunk := await b.receive_some(4096):
            got.append(chunk)

    async with trio.open_nursery() as n:
        n.start_soon(plaintext_client)
        with pytest.raises(HandshakeRefused) as err:
            await handshake_and_verify(srv, BUNDLES, now)
    assert err.value.reason == "handshake_failed"
    assert b"HTTP" not in b"".join(got)  # nothing but (at most) a TLS alert came back


async def test_stalled_handshake_times_out(autojump_clock):
    a, _b = trio.testing.memory_stream_pair()
    srv = trio.SSLStream(a, SERVER.server, server_side=True)
    start = trio.current_time()
    with pytest.raises(HandshakeRefused) as err:
        await handshake_and_verify(srv, BUNDLES, now, handshake_timeout=5.0)
    assert err.value.reason == "handshake_timeout"
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_client_sends_sni():
    seen: list[str | None] = []
    ctx = server_context(SVID_ALICE, BUNDLES)
    ctx.sni_callback = lambda _sock, name, _ctx: seen.append(name)
    await run_pair(ctx, client_context(SVID_BOB, BUNDLES))
    assert seen == ["payments.shop.svc"]


async def test_holder_rebuilds_contexts_and_new_handshakes_use_them():
    holder = TlsContextHolder(SVID_ALICE, BUNDLES)
    old_server = holder.server
    renewed = issue_svid(CA_A, ALICE, REAL_NOW)
    holder.update(svid=renewed)
    assert holder.generation == 2 and holder.server is not old_server
    _, client, _, _ = await run_pair(holder.server, client_context(SVID_BOB, BUNDLES))
    assert client.serial == renewed.serial
    with pytest.raises(TlsConfigError):
        holder.update(bundles=TrustBundleSet.empty())
    assert holder.generation == 2 and holder.bundles == BUNDLES


async def test_contexts_are_tls13_only_and_require_client_certs():
    ctx = server_context(SVID_ALICE, BUNDLES)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    cctx = client_context(SVID_ALICE, BUNDLES)
    assert not cctx.check_hostname and cctx.verify_mode == ssl.CERT_REQUIRED
