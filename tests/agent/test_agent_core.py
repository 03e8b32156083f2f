"""The agent's adapters over the embedded store, driven by MockClock (exact virtual time).

Covers: publishing from config, registrar ownership, lease loss -> fenced ->
re-registered, two agents racing for one cluster, --takeover, a store outage
(degraded, static catalog, recovery with no new versions), an outage past the
lease (fenced locally, keys gone for everyone, clean re-registration), the
persisted catalog at start, and bundle refusals.
"""

from __future__ import annotations

import dataclasses

import pytest
import trio

from federation import keys
from federation.agent.importer import CATALOG_FILE
from federation.agent.registrar import RegistrationRefused
from federation.agent.registration import FenceReason, Phase
from federation.agent.runner import Agent, AgentOptions
from federation.catalog import CatalogBuilder
from federation.model import EndpointRecord, Locality
from federation.store import Reset, open_embedded_store
from tests.agent.helpers import FlakyStore, demo_config, make_ca, wait_for
from trust.bundle import TrustBundle
from trust.spiffe import TrustDomain

TTL = 3.0


@pytest.fixture
def config():
    return demo_config()


async def inline_io(fn):
    fn()


def new_agent(tmp_path, config, cluster, *, takeover=False, name=None):
    base = tmp_path / (name or cluster)
    base.mkdir(parents=True, exist_ok=True)
    ca = base / "ca"
    if not ca.exists():
        make_ca(base, cluster, config).rename(ca)
    opts = AgentOptions(
        takeover=takeover,
        serve_admin=False,
        serve_catalog=False,
        watch_gateway=False,
        lease_ttl=TTL,
        wall=trio.current_time,
        file_io=inline_io,
    )
    return Agent(config, cluster, "memory://", ca, base / "state", opts)


async def start(nursery, agent, store):
    await nursery.start(lambda task_status: agent.run(store=store, task_status=task_status))
    return agent


def truth(store_items, cluster):
    """The catalog a fresh builder makes from the store content (the convergence oracle)."""
    b = CatalogBuilder(cluster, "oracle")
    b.apply(Reset(1, tuple(store_items)), 0.0)
    return dict(b.snapshot().entries)


async def test_agent_publishes_its_config_records_leased(tmp_path, config, autojump_clock):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        agent = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
        await wait_for(lambda: agent.phase is Phase.ACTIVE and agent.source.synced)
        await wait_for(lambda: agent.publisher.bundle_published)
        _, items = await store.get_prefix(keys.ROOT)
        by_key = {kv.key: kv for kv in items}
        ep = keys.endpoint("aws-use1", "demo", "whoami", "whoami-b-1")
        assert EndpointRecord.from_json(by_key[ep].value).port == 17103  # replica 1 on loopback
        assert EndpointRecord.from_json(by_key[ep].value).spiffe_id == (
            "spiffe://aws-use1.demo.mesh/ns/demo/sa/whoami"
        )
        expected_leased = {
            keys.cluster("aws-use1"),
            keys.gateway("aws-use1", "gw-0"),
            keys.endpoint("aws-use1", "demo", "frontend", "frontend-0"),
            keys.endpoint("aws-use1", "demo", "whoami", "whoami-a-0"),
            keys.endpoint("aws-use1", "demo", "whoami", "whoami-b-0"),
            ep,
        }
        assert {k for k, kv in by_key.items() if kv.lease} == expected_leased
        assert {k for k, kv in by_key.items() if not kv.lease} == {
            keys.export("aws-use1", "demo", "frontend"),
            keys.export("aws-use1", "demo", "whoami"),
            keys.bundle("aws-use1.demo.mesh"),
        }
        # Its own catalog holds exactly what the store says it may see.
        await wait_for(lambda: dict(agent.source.snapshot().entries) == truth(items, "aws-use1"))
        n.cancel_scope.cancel()
    # Graceful exit revoked the lease: only unleased keys remain.


async def test_graceful_exit_revokes_the_lease(tmp_path, config, autojump_clock):
    async with open_embedded_store() as store:
        async with trio.open_nursery() as n:
            agent = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
            await wait_for(lambda: agent.phase is Phase.ACTIVE)
            n.cancel_scope.cancel()
        _, items = await store.get_prefix(keys.ROOT)
        assert all(kv.lease == 0 for kv in items)
        assert await store.get(keys.cluster("aws-use1")) is None


async def test_registrar_publishes_by_owner_and_drop_owner_withdraws(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        agent = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
        await wait_for(lambda: agent.phase is Phase.ACTIVE)
        rec = EndpointRecord(
            cluster="aws-use1",
            namespace="demo",
            service="whoami",
            endpoint_id="dyn-1",
            address="127.0.0.2",
            port=17190,
            locality=Locality("aws", "us-east-1", "us-east-1a", "aws-use1"),
            weight=1,
            healthy=True,
            spiffe_id="spiffe://aws-use1.demo.mesh/ns/demo/sa/whoami",
            network="aws-use1",
        )
        await agent.registrar.register(rec, owner="conn-1")
        key = rec.key()
        await wait_for(lambda: key in agent.publisher.written_keys())
        kv = await store.get(key)
        assert kv is not None and kv.lease == agent.registration.lease_id
        with pytest.raises(RegistrationRefused, match="another owner"):
            await agent.registrar.register(rec, owner="conn-2")
        # A declared endpoint is published unhealthy until its sidecar registers it;
        # a registration that contradicts the declaration is refused.
        static = keys.endpoint("aws-use1", "demo", "whoami", "whoami-a-0")
        declared = EndpointRecord.from_json((await store.get(static)).value)
        assert declared.healthy is False
        with pytest.raises(RegistrationRefused, match="does not match its declaration"):
            await agent.registrar.register(
                dataclasses.replace(declared, port=declared.port + 1, healthy=True), owner="c-1"
            )
        await agent.registrar.register(dataclasses.replace(declared, healthy=True), owner="c-9")

        async def static_health() -> bool:
            return EndpointRecord.from_json((await store.get(static)).value).healthy

        while not await static_health():
            await trio.sleep(0.1)
        await agent.registrar.drop_owner("c-9")  # its sidecar went away
        while await static_health():
            await trio.sleep(0.1)
        # The gateway counts the extra healthy endpoint of an exported service.
        gw = await store.get(keys.gateway("aws-use1", "gw-0"))
        assert b'"demo/whoami":1' in gw.value  # only the registered one is healthy
        await agent.registrar.drop_owner("conn-1")
        await wait_for(lambda: key not in agent.publisher.written_keys())
        assert await store.get(key) is None
        n.cancel_scope.cancel()


async def test_lease_loss_fences_then_reregisters_and_republishes(tmp_path, config, autojump_clock):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        agent = await start(n, new_agent(tmp_path, config, "gcp-euw1"), store)
        await wait_for(lambda: agent.phase is Phase.ACTIVE)
        first_lease = agent.registration.lease_id
        ep = keys.endpoint("gcp-euw1", "demo", "greeter", "greeter-0")
        await store.revoke_lease(first_lease)  # etcd lost it (or an operator revoked it)
        assert await store.get(ep) is None
        await wait_for(lambda: agent.registration.status().registrations == 2)
        st = agent.registration.status()
        assert st.fences == 1 and st.last_fence is FenceReason.LEASE_LOST
        assert st.phase is Phase.ACTIVE and st.lease_id != first_lease
        await wait_for(lambda: agent.publisher.written_keys().get(ep))
        kv = await store.get(ep)
        assert kv is not None and kv.lease == st.lease_id
        n.cancel_scope.cancel()


async def test_two_agents_racing_for_one_cluster_exactly_one_is_active(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        a = new_agent(tmp_path, config, "aws-use1", name="a")
        b = new_agent(tmp_path, config, "aws-use1", name="b")
        n.start_soon(lambda: a.run(store=store))
        n.start_soon(lambda: b.run(store=store))
        await wait_for(lambda: {a.phase, b.phase} == {Phase.ACTIVE, Phase.STANDBY})
        await trio.sleep(3 * TTL)  # stays that way: the standby never writes
        assert {a.phase, b.phase} == {Phase.ACTIVE, Phase.STANDBY}
        winner, loser = (a, b) if a.phase is Phase.ACTIVE else (b, a)
        rec = await store.get(keys.cluster("aws-use1"))
        assert winner.epoch.encode() in rec.value
        assert loser.publisher.written_keys() == {}
        n.cancel_scope.cancel()


async def test_standby_takes_over_after_the_holder_goes(tmp_path, config, autojump_clock):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        a = new_agent(tmp_path, config, "aws-use1", name="a")
        b = new_agent(tmp_path, config, "aws-use1", name="b")
        scope_a = trio.CancelScope()
        n.start_soon(_run_in, scope_a, a, store)
        await wait_for(lambda: a.phase is Phase.ACTIVE)
        n.start_soon(lambda: b.run(store=store))
        await wait_for(lambda: b.phase is Phase.STANDBY)
        scope_a.cancel()  # the holder exits (its lease is revoked on the way out)
        await wait_for(lambda: b.phase is Phase.ACTIVE)
        rec = await store.get(keys.cluster("aws-use1"))
        assert b.epoch.encode() in rec.value
        n.cancel_scope.cancel()


async def _run_in(scope, agent, store):
    with scope:
        await agent.run(store=store)


async def test_takeover_fences_the_old_agent_which_then_stands_by(tmp_path, config, autojump_clock):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        old = await start(n, new_agent(tmp_path, config, "aws-use1", name="old"), store)
        await wait_for(lambda: old.phase is Phase.ACTIVE)
        new = await start(
            n, new_agent(tmp_path, config, "aws-use1", name="new", takeover=True), store
        )
        await wait_for(lambda: new.phase is Phase.ACTIVE)
        await wait_for(lambda: old.phase is Phase.STANDBY)
        assert old.registration.status().fences == 1
        await trio.sleep(3 * TTL)
        assert (old.phase, new.phase) == (Phase.STANDBY, Phase.ACTIVE)
        # Every cluster key now belongs to the new agent's lease.
        _, items = await store.get_prefix(keys.ROOT)
        leases = {kv.lease for kv in items if kv.lease}
        assert leases == {new.registration.lease_id}
        n.cancel_scope.cancel()


async def test_store_outage_degrades_keeps_catalog_and_recovers_without_new_versions(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        aws = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
        flaky = FlakyStore(store)
        gcp = await start(n, new_agent(tmp_path, config, "gcp-euw1"), flaky)
        await wait_for(lambda: aws.phase is Phase.ACTIVE and gcp.phase is Phase.ACTIVE)
        aws_ep = keys.endpoint("aws-use1", "demo", "whoami", "whoami-a-0")
        await wait_for(lambda: aws_ep in gcp.source.snapshot().entries)
        await trio.sleep(2)
        before = gcp.source.snapshot()
        flaky.set_down(True)
        await wait_for(lambda: gcp.source.degraded)
        assert gcp.ready()  # synced once: stays ready, serves the last catalog
        assert gcp.source.snapshot().entries == before.entries
        await trio.sleep(0.5)  # well within the lease: renewals resume before its deadline
        assert gcp.phase is Phase.ACTIVE
        flaky.set_down(False)
        await wait_for(lambda: not gcp.source.degraded)
        await trio.sleep(2)
        after = gcp.source.snapshot()
        assert after.entries == before.entries
        assert after.version == before.version  # the re-list duplicated nothing
        assert gcp.registration.status().fences == 0
        n.cancel_scope.cancel()


async def test_outage_past_the_lease_fences_locally_and_reregisters_cleanly(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        aws = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
        flaky = FlakyStore(store)
        gcp = await start(n, new_agent(tmp_path, config, "gcp-euw1"), flaky)
        greeter = keys.endpoint("gcp-euw1", "demo", "greeter", "greeter-0")
        await wait_for(lambda: greeter in aws.source.snapshot().entries)
        flaky.set_down(True)
        t0 = trio.current_time()
        await wait_for(lambda: gcp.phase is Phase.FENCED or gcp.phase is Phase.REGISTERING)
        # Fenced by its own clock no later than one TTL after the last renewal.
        assert trio.current_time() - t0 <= TTL + 0.01
        assert gcp.registration.status().last_fence is FenceReason.LEASE_DEADLINE
        # The store expires its lease: gone for everyone else.
        await wait_for(lambda: greeter not in aws.source.snapshot().entries)
        writes_before = gcp.metrics.writes.labels("ok")._value.get()
        await trio.sleep(2 * TTL)
        assert gcp.metrics.writes.labels("ok")._value.get() == writes_before  # wrote nothing
        flaky.set_down(False)
        await wait_for(lambda: gcp.phase is Phase.ACTIVE)
        await wait_for(lambda: greeter in aws.source.snapshot().entries)
        _, items = await store.get_prefix(keys.ROOT)
        for agent, name in ((aws, "aws-use1"), (gcp, "gcp-euw1")):
            await wait_for(
                lambda a=agent, c=name: dict(a.source.snapshot().entries) == truth(items, c)
            )
        n.cancel_scope.cancel()


async def test_persisted_catalog_is_served_not_synced_while_the_store_is_unreachable(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store:
        async with trio.open_nursery() as n:
            aws = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
            await start(n, new_agent(tmp_path, config, "gcp-euw1"), store)
            ledger = keys.endpoint("onprem-dc1", "finance", "ledger", "ledger-0")
            greeter = keys.endpoint("gcp-euw1", "demo", "greeter", "greeter-0")
            await wait_for(lambda: greeter in aws.source.snapshot().entries)
            await wait_for(
                lambda: (
                    aws.source.persist_count > 0
                    and (tmp_path / "aws-use1/state" / CATALOG_FILE).exists()
                )
            )
            await trio.sleep(2)
            persisted = aws.source.snapshot()
            n.cancel_scope.cancel()
        assert ledger not in persisted.entries
        dead = FlakyStore(store)
        dead.set_down(True)
        async with trio.open_nursery() as n:
            again = await start(n, new_agent(tmp_path, config, "aws-use1"), dead)
            await trio.sleep(6)  # past the 5 s sync gate
            src = again.source
            assert not src.synced and src.degraded and not again.ready()
            assert src.snapshot().entries == persisted.entries
            assert src.epoch == persisted.epoch != again.epoch
            assert again.status()["catalog"]["source"] == "persisted"
            assert again.sync_gate_expired  # demo sync_gate_timeout is 5s
            dead.set_down(False)
            await wait_for(lambda: src.synced and again.phase is Phase.ACTIVE)
            assert src.epoch == again.epoch  # subscribers resnapshot on the new epoch
            n.cancel_scope.cancel()


async def test_refused_bundle_is_counted_and_the_last_good_one_kept(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        aws = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
        gcp = await start(n, new_agent(tmp_path, config, "gcp-euw1"), store)
        bkey = keys.bundle("gcp-euw1.demo.mesh")
        await wait_for(lambda: bkey in aws.source.snapshot().entries)
        good = aws.source.snapshot().entries[bkey]
        # A rollback straight into the store: sequence 0 with another root.
        other = make_ca(tmp_path / "rogue", "gcp-euw1", config)
        from trust.rotation import CaDirectory

        rogue = CaDirectory.open(other).active()
        td = TrustDomain.parse("spiffe://gcp-euw1.demo.mesh")
        bad = TrustBundle(td, (rogue.root,), 0).to_json().encode()
        await store.put(bkey, bad)
        await wait_for(lambda: aws.source.keeper.refusal_counts())
        assert aws.source.keeper.refusal_counts() == {("gcp-euw1.demo.mesh", "rollback"): 1}
        assert aws.source.snapshot().entries[bkey] == good
        refused = aws.metrics.bundle_refusals.labels("gcp-euw1.demo.mesh", "rollback")
        assert refused._value.get() == 1
        del gcp
        n.cancel_scope.cancel()


def _with_stale_limit(config, seconds):
    settings = dataclasses.replace(config.federation.settings, remote_stale_after=seconds)
    return dataclasses.replace(
        config, federation=dataclasses.replace(config.federation, settings=settings)
    )


async def test_remote_data_is_dropped_after_the_stale_limit_and_only_then(
    tmp_path, config, autojump_clock
):
    # Off by default: a long outage keeps serving every remote record (static stability).
    # With remote_stale_after, an agent cut off from the store longer than the limit
    # drops the other clusters' records and keeps its own.
    limited = _with_stale_limit(config, 20.0)
    async with open_embedded_store() as store, trio.open_nursery() as n:
        await start(n, new_agent(tmp_path, config, "aws-use1"), store)
        cut_off = FlakyStore(store)
        gcp = await start(n, new_agent(tmp_path, limited, "gcp-euw1"), cut_off)
        unlimited_store = FlakyStore(store)
        onprem = await start(n, new_agent(tmp_path, config, "onprem-dc1"), unlimited_store)
        aws_ep = keys.endpoint("aws-use1", "demo", "whoami", "whoami-a-0")
        gcp_ep = keys.endpoint("gcp-euw1", "demo", "greeter", "greeter-0")
        await wait_for(
            lambda: aws_ep in gcp.source.snapshot().entries
            and aws_ep in onprem.source.snapshot().entries
        )
        cut_off.set_down(True)
        unlimited_store.set_down(True)
        await trio.sleep(10)  # within the limit: nothing dropped yet
        assert aws_ep in gcp.source.snapshot().entries
        await trio.sleep(20)  # past it
        await wait_for(lambda: aws_ep not in gcp.source.snapshot().entries)
        assert gcp_ep in gcp.source.snapshot().entries  # its own records stay
        assert aws_ep in onprem.source.snapshot().entries  # no limit: kept
        cut_off.set_down(False)
        unlimited_store.set_down(False)
        await wait_for(lambda: aws_ep in gcp.source.snapshot().entries)  # back after re-list
        n.cancel_scope.cancel()
