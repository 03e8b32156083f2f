"""The agent's catalog shows its own cluster as the agent publishes it (issue #9).

Embedded store, MockClock. The partitioned agent's lease expires in the store, so
its own keys are deleted there; when its watch comes back before it could
re-register (a re-list without its keys, or the Deletes themselves), the catalog
its sidecars follow must not lose a single own endpoint, and the heal must not
cost a catalog version. What it really withdraws still leaves at once.
"""

from __future__ import annotations

import dataclasses

import pytest
import trio

from federation import keys
from federation.agent.registration import Phase
from federation.catalog import Catalog, CatalogView
from federation.model import EndpointRecord, Locality
from federation.store import open_embedded_store
from federation.store.api import StoreUnavailable
from tests.agent.helpers import FlakyStore, demo_config, wait_for
from tests.agent.test_agent_core import new_agent, start, truth

GCP = "gcp-euw1"
GREETER = keys.endpoint(GCP, "demo", "greeter", "greeter-0")


@pytest.fixture
def config():
    return demo_config()


class SplitStore(FlakyStore):
    """A FlakyStore whose calls and watch are cut separately: ``calls_down`` fails every
    call (keepalives, claims, writes); ``set_down`` cuts the watch, which re-opens with a
    Reset when set up again."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.calls_down = False

    def _check(self) -> None:
        if self.calls_down:
            raise StoreUnavailable("calls cut")


async def follow(source, seen: list[Catalog]) -> None:
    """Follow the source as a catalog-stream subscriber does: snapshot, then deltas."""
    view = CatalogView()
    while True:
        state = (source.version, source.synced, source.degraded)
        delta = None
        if view.version is not None:
            delta = source.changes_since(view.version, view.epoch)
        if delta is None:
            view.apply_snapshot(source.snapshot())
        else:
            view.apply_delta(delta)
        seen.append(view.catalog)
        await source.wait_changed(*state)


def own_endpoints(catalog: Catalog) -> dict[str, EndpointRecord]:
    return {
        k: e
        for k, e in catalog.entries.items()
        if isinstance(e, EndpointRecord) and e.cluster == GCP
    }


def dynamic_endpoint() -> EndpointRecord:
    return EndpointRecord(
        cluster=GCP,
        namespace="demo",
        service="greeter",
        endpoint_id="dyn-1",
        address="127.0.0.3",
        port=17190,
        locality=Locality("gcp", "europe-west1", "europe-west1-b", GCP),
        weight=1,
        healthy=True,
        spiffe_id="spiffe://gcp-euw1.demo.mesh/ns/demo/sa/greeter",
        network="gcp-euw1",
    )


async def two_agents(n, tmp_path, config, store):
    """aws-use1 on the store; gcp-euw1 behind a SplitStore with two sidecar registrations."""
    aws = await start(n, new_agent(tmp_path, config, "aws-use1"), store)
    split = SplitStore(store)
    gcp = await start(n, new_agent(tmp_path, config, GCP), split)
    await wait_for(lambda: gcp.phase is Phase.ACTIVE and GREETER in gcp.publisher.written_keys())
    declared = EndpointRecord.from_json((await store.get(GREETER)).value)
    await gcp.registrar.register(dataclasses.replace(declared, healthy=True), owner="sidecar-0")
    await gcp.registrar.register(dynamic_endpoint(), owner="sidecar-1")

    async def published() -> bool:
        kv = await store.get(GREETER)
        return kv is not None and EndpointRecord.from_json(kv.value).healthy

    while not await published() or await store.get(dynamic_endpoint().key()) is None:
        await trio.sleep(0.1)
    await wait_for(lambda: GREETER in aws.source.snapshot().entries)
    await trio.sleep(2)  # settled: every echo of the writes is in
    return aws, split, gcp


async def test_a_reset_before_reregistration_keeps_every_own_endpoint(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        aws, split, gcp = await two_agents(n, tmp_path, config, store)
        before = gcp.source.snapshot()
        own = own_endpoints(before)
        assert GREETER in own and own[GREETER].healthy and dynamic_endpoint().key() in own
        assert gcp.source.local_from_publisher
        seen: list[Catalog] = []
        n.start_soon(follow, gcp.source, seen)
        await trio.sleep(0)

        split.calls_down = True
        split.set_down(True)  # cut off entirely
        # Its lease expires in the store: its endpoints are gone for everyone else.
        await wait_for(lambda: GREETER not in aws.source.snapshot().entries)
        assert await store.get(GREETER) is None
        resets = gcp.source.builder.statistics().resets
        split.set_down(False)  # the watch is back first: a re-list without its own keys
        await wait_for(lambda: gcp.source.builder.statistics().resets > resets)
        assert gcp.phase is not Phase.ACTIVE  # not re-registered yet
        assert gcp.source.version == before.version
        assert own_endpoints(gcp.source.snapshot()) == own

        split.calls_down = False  # now it re-registers and re-publishes
        await wait_for(lambda: gcp.phase is Phase.ACTIVE)
        await wait_for(lambda: GREETER in aws.source.snapshot().entries)
        await trio.sleep(2)
        after = gcp.source.snapshot()
        # Nothing visible changed across the whole partition and heal: no remove, no re-add.
        assert after.version == before.version and after.entries == before.entries
        assert seen and all(own_endpoints(c) == own for c in seen)
        _, items = await store.get_prefix(keys.ROOT)
        assert dict(after.entries) == truth(items, GCP)  # and the store agrees again
        n.cancel_scope.cancel()


async def test_deletes_of_own_expired_keys_on_the_watch_change_nothing(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        aws, split, gcp = await two_agents(n, tmp_path, config, store)
        before = gcp.source.snapshot()
        _, items = await store.get_prefix(keys.ROOT)
        leased = [kv.key for kv in items if kv.lease and keys.parse(kv.key).parts[0] == GCP]
        applied = gcp.source.events_applied
        split.calls_down = True  # keepalives fail, the watch stays: it sees the expiry
        await wait_for(lambda: gcp.source.events_applied >= applied + len(leased))
        assert [await store.get(k) for k in leased] == [None] * len(leased)
        assert gcp.phase is not Phase.ACTIVE
        assert gcp.source.snapshot().version == before.version
        assert gcp.source.snapshot().entries == before.entries
        split.calls_down = False
        await wait_for(lambda: gcp.phase is Phase.ACTIVE)
        await wait_for(lambda: GREETER in aws.source.snapshot().entries)
        await trio.sleep(2)
        assert gcp.source.snapshot().version == before.version
        n.cancel_scope.cancel()


async def test_a_withdrawal_while_cut_off_leaves_the_catalog_at_once(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        aws, split, gcp = await two_agents(n, tmp_path, config, store)
        before = gcp.source.snapshot()
        split.calls_down = True
        split.set_down(True)
        await wait_for(lambda: gcp.phase is not Phase.ACTIVE)
        # Both sidecars go away while the store cannot be told.
        await gcp.registrar.drop_owner("sidecar-0")
        await gcp.registrar.drop_owner("sidecar-1")
        now = gcp.source.snapshot()
        assert now.version == before.version + 2  # one version per withdrawal, no flapping
        assert dynamic_endpoint().key() not in now.entries
        assert now.entries[GREETER].healthy is False  # back to declared-unhealthy
        split.set_down(False)
        split.calls_down = False
        await wait_for(lambda: gcp.phase is Phase.ACTIVE)

        async def converged() -> bool:
            _, items = await store.get_prefix(keys.ROOT)
            return dict(gcp.source.snapshot().entries) == truth(items, GCP)

        while not await converged():
            await trio.sleep(0.1)
        assert gcp.source.snapshot().version == now.version  # the store's echo adds nothing
        assert dynamic_endpoint().key() not in aws.source.snapshot().entries
        n.cancel_scope.cancel()


async def test_a_standby_agent_shows_its_cluster_as_the_store_has_it(
    tmp_path, config, autojump_clock
):
    async with open_embedded_store() as store, trio.open_nursery() as n:
        old = await start(n, new_agent(tmp_path, config, GCP, name="old"), store)
        await wait_for(lambda: old.phase is Phase.ACTIVE and old.source.local_from_publisher)
        new = await start(n, new_agent(tmp_path, config, GCP, name="new", takeover=True), store)
        await wait_for(lambda: old.phase is Phase.STANDBY)
        assert not old.source.local_from_publisher
        assert old.status()["catalog"]["local_records"] == "store"
        record = keys.cluster(GCP)
        await wait_for(
            lambda: (
                getattr(old.source.snapshot().entries.get(record), "incarnation", None) == new.epoch
            )
        )
        _, items = await store.get_prefix(keys.ROOT)
        await wait_for(lambda: dict(old.source.snapshot().entries) == truth(items, GCP))
        n.cancel_scope.cancel()
