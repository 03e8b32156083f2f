"""Who may do what: client certificates, join tokens, renewal, endpoint ownership."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from federation.agent.stream_server import CatalogStreamServer
from federation.catalog_client import RequestRefused
from federation.jointoken import JoinTokenFile
from tests.catalog.strategies import endpoint
from tests.catalog_stream.harness import (
    AGENT_TLS,
    BUNDLES,
    CA_EVIL,
    CA_OTHER,
    TD_EVIL,
    TD_OTHER,
    TLS_A,
    WORKLOAD_A,
    WORKLOAD_B,
    FakeRegistrar,
    FakeSigner,
    FakeSource,
    holder_for,
    local_endpoint,
    make_client,
    memory_connector,
    raw_session,
)
from trust.spiffe import workload_id
from trust.svid import make_csr
from trust.tls import bootstrap_client_context
from trust.validate import TrustBundleSet, spiffe_id_of


def setup(tmp_path=None, clock=None):
    source = FakeSource()
    source.reset(local_endpoint("e1"))
    registrar, signer = FakeRegistrar(), FakeSigner()
    tokens = JoinTokenFile(tmp_path / "tokens.json") if tmp_path is not None else None
    server = CatalogStreamServer(
        source,
        registrar,
        signer,
        AGENT_TLS,
        join_tokens=tokens,
        token_clock=(lambda: clock[0]) if clock is not None else (lambda: 0.0),
    )
    return source, registrar, signer, tokens, server


def csr_for(sid):
    return make_csr(ec.generate_private_key(ec.SECP256R1()), sid)


async def test_a_client_from_an_untrusted_domain_is_refused(autojump_clock):
    _, _, _, _, server = setup()
    evil = holder_for(CA_EVIL, workload_id(TD_EVIL, "shop", "a"))
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery), tls=evil)
        await nursery.start(client.run)
        await trio.sleep(30)
        assert client.catalog is None and client.degraded and not client.synced.is_set()
        refusals = server.statistics().handshake_refusals
        assert sum(refusals.values()) >= 2 and set(refusals) <= {"bad_chain", "handshake_failed"}
        assert server.statistics().accepted == 0
        nursery.cancel_scope.cancel()


async def test_a_client_of_another_trusted_domain_gets_403(autojump_clock):
    _, _, _, _, server = setup()
    other = holder_for(CA_OTHER, workload_id(TD_OTHER, "shop", "a"))
    async with trio.open_nursery() as nursery:
        session = await raw_session(server, nursery, other.client)
        status, headers, _ = await session.request("GET", "/v1/catalog", [])
        assert status == 403 and headers[b"meshfed-reason"] == b"foreign_trust_domain"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/catalog"), ("POST", "/v1/endpoints"), ("DELETE", "/v1/endpoints/shop/a/e1")],
)
async def test_no_client_certificate_gets_401(autojump_clock, method, path):
    _, registrar, _, _, server = setup()
    async with trio.open_nursery() as nursery:
        session = await raw_session(server, nursery, bootstrap_client_context(BUNDLES))
        body = local_endpoint().to_json() if method == "POST" else b""
        status, headers, _ = await session.request(method, path, [], body)
        assert status == 401 and headers[b"meshfed-reason"] == b"client_certificate_required"
        assert registrar.records == {}
        nursery.cancel_scope.cancel()


async def test_bootstrap_csr_without_token_gets_401(autojump_clock, tmp_path):
    _, _, signer, _, server = setup(tmp_path)
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        with pytest.raises(RequestRefused) as info:
            # No token and no certificate: the bootstrap connection with no token header.
            session = await raw_session(server, nursery, bootstrap_client_context(BUNDLES))
            status, headers, _ = await session.request("POST", "/v1/svid", [], csr_for(WORKLOAD_B))
            raise RequestRefused(status, headers[b"meshfed-reason"].decode(), "")
        assert info.value.status == 401 and signer.signed == []
        del client
        nursery.cancel_scope.cancel()


async def test_join_token_bootstraps_once_then_is_refused(autojump_clock, tmp_path):
    clock = [1000.0]
    _, _, signer, tokens, server = setup(tmp_path, clock)
    token = tokens.issue(WORKLOAD_B, ttl=600, now=clock[0])
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        with pytest.raises(RequestRefused) as info:
            await client.request_svid(csr_for(WORKLOAD_A), join_token=token)
        assert (info.value.status, info.value.reason) == (403, "identity_mismatch")

        chain = await client.request_svid(csr_for(WORKLOAD_B), join_token=token)
        assert spiffe_id_of(chain[0]) == WORKLOAD_B and signer.signed == [WORKLOAD_B]

        with pytest.raises(RequestRefused) as info:
            await client.request_svid(csr_for(WORKLOAD_B), join_token=token)
        assert (info.value.status, info.value.reason) == (403, "token_used")
        # A restarted agent reads the burn from disk.
        assert JoinTokenFile(tmp_path / "tokens.json").book.entries() == tokens.book.entries()
        nursery.cancel_scope.cancel()


async def test_expired_unknown_and_malformed_tokens_are_refused_with_the_reason(
    autojump_clock, tmp_path
):
    clock = [1000.0]
    _, _, signer, tokens, server = setup(tmp_path, clock)
    token = tokens.issue(WORKLOAD_B, ttl=10, now=clock[0])
    clock[0] += 11
    unknown = "mfjt1.0123456789abcdef." + "A" * 43
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        for bad, reason in (
            (token, "token_expired"),
            (unknown, "token_unknown"),
            ("hello", "token_malformed"),
        ):
            with pytest.raises(RequestRefused) as info:
                await client.request_svid(csr_for(WORKLOAD_B), join_token=bad)
            assert (info.value.status, info.value.reason) == (403, reason)
        assert signer.signed == []
        nursery.cancel_scope.cancel()


async def test_renewal_is_for_the_callers_own_identity_only(autojump_clock):
    _, _, signer, _, server = setup()
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        chain = await client.request_svid(csr_for(WORKLOAD_A))
        assert spiffe_id_of(chain[0]) == WORKLOAD_A
        with pytest.raises(RequestRefused) as info:
            await client.request_svid(csr_for(WORKLOAD_B))
        assert (info.value.status, info.value.reason) == (403, "identity_mismatch")
        assert signer.signed == [WORKLOAD_A]
        nursery.cancel_scope.cancel()


async def test_endpoint_registration_is_for_own_identity_and_cluster(autojump_clock):
    _, registrar, _, _, server = setup()
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        await nursery.start(client.run)
        await client.synced.wait()
        mine = local_endpoint("e7")
        await client.register_endpoint(mine)
        assert registrar.records[mine.key()][0] == mine
        with pytest.raises(RequestRefused) as info:
            await client.register_endpoint(local_endpoint("e8", service="b"))
        assert (info.value.status, info.value.reason) == (403, "spiffe_id_mismatch")
        with pytest.raises(RequestRefused) as info:
            await client.register_endpoint(endpoint("c2", "a", "e9", spiffe_id=str(WORKLOAD_A)))
        assert (info.value.status, info.value.reason) == (403, "foreign_cluster")
        assert list(registrar.records) == [mine.key()]
        await client.deregister_endpoint(mine.key())
        assert registrar.records == {}
        nursery.cancel_scope.cancel()


async def test_drop_owner_when_the_connection_closes_and_reregister_on_reconnect(autojump_clock):
    _, registrar, _, _, server = setup()
    mine = local_endpoint("e7")
    async with trio.open_nursery() as nursery:
        client = make_client(memory_connector(server, nursery))
        async with trio.open_nursery() as client_nursery:
            await client_nursery.start(client.run)
            await client.synced.wait()
            await client.register_endpoint(mine)
            owner = registrar.records[mine.key()][1]
            client_nursery.cancel_scope.cancel()
        await registrar.owner_dropped.wait()
        assert registrar.dropped == [owner] and registrar.records == {}
        # The same client object reconnecting registers its endpoints again.
        await nursery.start(client.run)
        while mine.key() not in registrar.records:
            await trio.sleep(0.1)
        assert registrar.records[mine.key()][1] != owner
        nursery.cancel_scope.cancel()


async def test_malformed_requests_get_4xx_and_the_connection_survives(autojump_clock):
    _, registrar, _, _, server = setup()
    async with trio.open_nursery() as nursery:
        session = await raw_session(server, nursery, TLS_A.client)
        cases = [
            (
                "GET",
                "/v1/catalog",
                [(b"meshfed-epoch", b"x"), (b"meshfed-version", b"-1")],
                b"",
                400,
                b"bad_version",
            ),
            ("GET", "/v1/catalog", [(b"meshfed-epoch", b"x")], b"", 400, b"bad_resume"),
            ("GET", "/v1/nothing", [], b"", 404, b"not_found"),
            ("PUT", "/v1/endpoints", [], b"", 405, b"method_not_allowed"),
            ("POST", "/v1/endpoints", [], b"{not json", 400, b"bad_record"),
            ("POST", "/v1/endpoints", [], b"x" * 70_000, 413, b"body_too_large"),
            ("POST", "/v1/svid", [], b"-----BEGIN nothing", 400, b"bad_csr"),
            ("DELETE", "/v1/endpoints/shop/a/e1", [], b"", 404, b"not_registered_here"),
            ("DELETE", "/v1/endpoints/shop/../e1", [], b"", 400, b"bad_endpoint_path"),
            ("GET", "/v1/catalog", [(b"x-big", b"v" * 9000)], b"", 431, b"header_list_too_large"),
        ]
        for method, path, headers, body, status, reason in cases:
            got, resp_headers, _ = await session.request(method, path, headers, body)
            assert (got, resp_headers.get(b"meshfed-reason")) == (status, reason), path
        assert registrar.records == {}
        # Still serving on the same connection.
        mine = local_endpoint("e7")
        status, _, _ = await session.request("POST", "/v1/endpoints", [], mine.to_json())
        assert status == 204 and mine.key() in registrar.records
        assert server.statistics().open_connections == 1
        nursery.cancel_scope.cancel()


_ = (dt, TrustBundleSet)
