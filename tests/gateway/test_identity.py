"""The gateway's SVID from its agent: the first one for a join token, renewals
authenticated by the current one, through the real agent stream server over memory
streams (real TLS; certificates minted at the real time, the trio clock mocked)."""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import pytest
import trio

from federation.agent.stream_server import CatalogStreamServer
from federation.bootstrap import agent_renewer, first_svid
from federation.catalog_client import CatalogClient, ClientConfig, RequestRefused
from federation.jointoken import JoinTokenFile
from gateway.runner import Gateway, GatewayOptions
from sidecar.runner import StaticCatalog
from tests.catalog_stream.harness import (
    AGENT,
    AGENT_TLS,
    BUNDLES,
    CA,
    REAL_NOW,
    TD,
    WORKLOAD_A,
    FakeRegistrar,
    FakeSigner,
    FakeSource,
    local_endpoint,
    memory_connector,
)
from trust.spiffe import gateway_id
from trust.tls import TlsContextHolder

from .helpers import write_gateway_config

GATEWAY = gateway_id(TD)


def agent(tmp_path: Path) -> tuple[CatalogStreamServer, FakeSigner, JoinTokenFile]:
    source = FakeSource()
    source.reset(local_endpoint("e1"))
    signer = FakeSigner()
    tokens = JoinTokenFile(tmp_path / "join-tokens.json")
    server = CatalogStreamServer(source, FakeRegistrar(), signer, AGENT_TLS, join_tokens=tokens)
    return server, signer, tokens


async def test_join_token_for_the_gateway_id_gives_the_gateway_svid_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    server, signer, tokens = agent(tmp_path)
    token = tokens.issue(GATEWAY, 600, time.time())
    async with trio.open_nursery() as nursery:
        connect = memory_connector(server, nursery)
        svid = await first_svid("agent.c1", 1, BUNDLES, AGENT, GATEWAY, token, connect=connect)
        assert svid.spiffe_id == GATEWAY
        assert svid.leaf.issuer == CA.root.subject
        assert signer.signed == [GATEWAY]
        with pytest.raises(RequestRefused) as used:
            await first_svid("agent.c1", 1, BUNDLES, AGENT, GATEWAY, token, connect=connect)
        assert used.value.reason == "token_used"
        nursery.cancel_scope.cancel()


async def test_a_workload_token_cannot_mint_a_gateway_svid(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    server, signer, tokens = agent(tmp_path)
    token = tokens.issue(WORKLOAD_A, 600, time.time())
    async with trio.open_nursery() as nursery:
        connect = memory_connector(server, nursery)
        with pytest.raises(RequestRefused) as refused:
            await first_svid("agent.c1", 1, BUNDLES, AGENT, GATEWAY, token, connect=connect)
        assert (refused.value.status, refused.value.reason) == (403, "identity_mismatch")
        assert signer.signed == []
        nursery.cancel_scope.cancel()


async def test_gateway_renews_through_the_agent_with_its_current_svid(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    server, signer, tokens = agent(tmp_path)
    cfg = write_gateway_config(tmp_path / "fed.yaml", {"c1": "127.0.0.1"}, {"c1": TD.name})
    token = tokens.issue(GATEWAY, 600, time.time())
    t0 = trio.current_time()

    def now() -> dt.datetime:  # wall time as the mocked trio clock moves it
        return REAL_NOW + dt.timedelta(seconds=trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        connect = memory_connector(server, nursery)
        first = await first_svid("agent.c1", 1, BUNDLES, AGENT, GATEWAY, token, connect=connect)
        tls = TlsContextHolder(first, BUNDLES)
        client = CatalogClient(
            "agent.c1",
            1,
            tls,
            lambda: tls.bundles,
            AGENT,
            None,
            config=ClientConfig(persist_in_thread=False),
            connect=connect,
        )
        gw = Gateway(
            cfg.cluster("c1"),
            cfg.federation.settings.gateway_probe,
            tls,
            lambda: None,
            options=GatewayOptions(),
            source=StaticCatalog(),
            renew=agent_renewer(client, GATEWAY),
            rng=random.Random(3),
            now_fn=now,
        )
        assert gw.rotator is not None
        await nursery.start(gw.rotator.run)
        # Renewal is due at about half the hour-long lifetime; the mock clock jumps there.
        while gw.rotator.statistics().renewals < 2:
            await trio.sleep(60)
        nursery.cancel_scope.cancel()
    stats = gw.stats()
    renewals = stats["svid_renewal"]["renewals"]
    assert renewals >= 2 and stats["svid_renewal"]["failures"] == 0
    # One signature for the token, one per renewal; each renewal installed in the holder.
    assert signer.signed == [GATEWAY] * (1 + renewals)
    assert stats["svid"] == str(GATEWAY) and stats["svid_generation"] == 1 + renewals
    assert tls.svid.serial != first.serial and tls.svid.leaf.issuer == CA.root.subject
