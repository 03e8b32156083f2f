"""Publishing bundles and revocations through the store (embedded and real etcd)."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
from prometheus_client import CollectorRegistry

from federation import keys
from trust.bundle import Accepted, BundleKeeper, Refused, TrustBundle
from trust.ca import CertificateAuthority
from trust.metrics import TrustMetrics
from trust.publish import (
    PublishRefused,
    PublishResult,
    publish_bundle,
    publish_revocation,
    read_revocations,
    watch_bundles,
    watch_revocations,
)
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import TrustDomain, workload_id

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
TD_A, TD_B = TrustDomain("a.mesh"), TrustDomain("b.mesh")
ROOT_A1 = CertificateAuthority.create(TD_A, T0)[0].root
ROOT_A2 = CertificateAuthority.create(TD_A, T0)[0].root
ROOT_A3 = CertificateAuthority.create(TD_A, T0)[0].root
ROOT_B = CertificateAuthority.create(TD_B, T0)[0].root


def bundle(seq: int, *roots, td: TrustDomain = TD_A) -> TrustBundle:
    return TrustBundle(td, tuple(roots), seq)


async def test_publish_creates_then_advances_and_is_idempotent(store):
    first = await publish_bundle(store, bundle(1, ROOT_A1))
    assert first.written
    again = await publish_bundle(store, bundle(1, ROOT_A1))
    assert not again.written and again.mod_revision == first.mod_revision
    combined = await publish_bundle(store, bundle(2, ROOT_A1, ROOT_A2))
    assert combined.written and combined.mod_revision > first.mod_revision
    kv = await store.get(keys.bundle("a.mesh"))
    assert kv is not None
    assert TrustBundle.from_json(TD_A, kv.value) == bundle(2, ROOT_A1, ROOT_A2)


@pytest.mark.parametrize(
    ("offered", "reason"),
    [
        (bundle(1, ROOT_A1), "rollback"),
        (bundle(2, ROOT_A3), "sequence_conflict"),
        (bundle(3, ROOT_B, td=TD_A), "foreign_root"),
    ],
)
async def test_publish_refuses_what_readers_would_refuse(store, offered, reason):
    await publish_bundle(store, bundle(2, ROOT_A1, ROOT_A2))
    before = await store.get(keys.bundle("a.mesh"))
    with pytest.raises(PublishRefused) as err:
        await publish_bundle(store, offered)
    assert err.value.reason == reason
    assert await store.get(keys.bundle("a.mesh")) == before  # nothing written


async def test_publish_refuses_a_root_already_trusted_for_another_domain(store):
    await publish_bundle(store, bundle(1, ROOT_B, td=TD_B))
    # A root that names a.mesh but whose key b.mesh already uses cannot be built
    # with the CA, so reuse b's root cert under a's key: refused as foreign first.
    with pytest.raises(PublishRefused) as err:
        await publish_bundle(store, bundle(1, ROOT_B, td=TD_A))
    assert err.value.reason in {"foreign_root", "root_of_other_domain"}


async def test_publish_overwrites_garbage(store):
    await store.put(keys.bundle("a.mesh"), b"not json")
    assert (await publish_bundle(store, bundle(1, ROOT_A1))).written


async def test_two_racing_publishers_exactly_one_wins(store):
    await publish_bundle(store, bundle(1, ROOT_A1))
    results: list[PublishResult | PublishRefused] = []

    async def publish(b: TrustBundle) -> None:
        try:
            results.append(await publish_bundle(store, b))
        except PublishRefused as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish, bundle(2, ROOT_A1, ROOT_A2))
        nursery.start_soon(publish, bundle(2, ROOT_A1, ROOT_A3))
    winners = [r for r in results if isinstance(r, PublishResult)]
    losers = [r for r in results if isinstance(r, PublishRefused)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].reason == "sequence_conflict"
    kv = await store.get(keys.bundle("a.mesh"))
    assert kv is not None and TrustBundle.from_json(TD_A, kv.value) == winners[0].bundle


async def test_watch_refuses_rollback_written_directly_and_keeps_last_good(store):
    registry = CollectorRegistry()
    metrics = TrustMetrics(registry)
    keeper = BundleKeeper()
    send, receive = trio.open_memory_channel[Accepted | Refused | TrustBundle](100)
    sets = []

    async def next_event():
        with trio.fail_after(10):
            return await receive.receive()

    await publish_bundle(store, bundle(1, ROOT_A1))
    await publish_bundle(store, bundle(1, ROOT_B, td=TD_B))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: watch_bundles(
                store,
                keeper,
                on_change=sets.append,
                on_accepted=lambda b: (metrics.bundle_accepted(b), send.send_nowait(b)),
                on_refused=lambda r: (metrics.bundle_refused(r), send.send_nowait(r)),
                task_status=task_status,
            )
        )
        # started() fires after the first Reset: both bundles are already in force.
        assert keeper.current(TD_A) == bundle(1, ROOT_A1)
        assert set(sets[-1]) == {TD_A, TD_B}
        await next_event()
        await next_event()

        await publish_bundle(store, bundle(2, ROOT_A1, ROOT_A2))
        assert await next_event() == bundle(2, ROOT_A1, ROOT_A2)
        assert sets[-1][TD_A] == (ROOT_A1, ROOT_A2)  # roots reload, no restart

        # The attack: a lower sequence written straight into etcd.
        await store.put(keys.bundle("a.mesh"), bundle(1, ROOT_A1).to_json().encode())
        refused = await next_event()
        assert isinstance(refused, Refused) and refused.reason == "rollback"
        # And a deletion: the last good bundle stays in force.
        await store.delete(keys.bundle("a.mesh"))
        await store.put(keys.bundle("b.mesh"), b"{garbage")
        refused = await next_event()
        assert isinstance(refused, Refused) and refused.reason == "malformed"
        nursery.cancel_scope.cancel()

    assert keeper.current(TD_A) == bundle(2, ROOT_A1, ROOT_A2)
    assert keeper.current(TD_B) == bundle(1, ROOT_B, td=TD_B)
    sample = registry.get_sample_value
    assert sample(
        "meshfed_trust_bundle_refusals_total", {"trust_domain": "a.mesh", "reason": "rollback"}
    ) == 1
    assert sample(
        "meshfed_trust_bundle_refusals_total", {"trust_domain": "b.mesh", "reason": "malformed"}
    ) == 1
    assert sample("meshfed_trust_bundle_sequence", {"trust_domain": "a.mesh"}) == 2


async def test_revocations_round_trip_and_watch(store):
    web = workload_id(TD_A, "shop", "web")
    by_serial = Revocation(TD_A, 0xABC, None, "lost laptop", T0)
    by_id = Revocation(TD_A, None, web, "compromised", T0)
    seen: list[RevocationSet] = []
    changed = trio.Event()

    def on_change(revoked: RevocationSet) -> None:
        seen.append(revoked)
        changed.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_revocations, store, on_change)
        assert len(seen[-1]) == 0
        key = await publish_revocation(store, by_serial)
        assert key == "/meshfed/v1/revocations/a.mesh/s-abc"
        for expected in (1, 2):
            if expected == 2:
                await publish_revocation(store, by_id)
            while len(seen[-1]) < expected:
                changed = trio.Event()
                with trio.fail_after(10):
                    await changed.wait()
        # A record under another domain's key (or garbage) is ignored, not obeyed.
        other = Revocation(TD_B, 0xDEF, None, "", T0)
        await store.put(keys.revocation("a.mesh", "s-def"), other.to_json().encode())
        await store.put(keys.revocation("a.mesh", "s-1"), b"garbage")
        await store.put(keys.revocation("b.mesh", "s-def"), other.to_json().encode())
        while len(seen[-1]) < 3:
            changed = trio.Event()
            with trio.fail_after(10):
                await changed.wait()
        nursery.cancel_scope.cancel()
    final = seen[-1]
    assert set(final.revocations) == {by_serial, by_id, other}
    assert final.is_revoked(TD_A, 0xABC, web) and not final.is_revoked(
        TD_A, 0xDEF, workload_id(TD_A, "x", "y")
    )
    assert (await read_revocations(store)) == final
