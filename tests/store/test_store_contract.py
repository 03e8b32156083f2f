"""The store contract (federation/store/api.py), run against the embedded store and real etcd.

Lease tests use real time here (etcd cannot run on a mock clock) with the 1 s
minimum TTL; ``trio.fail_after`` only guards against hangs, it asserts nothing.
"""

from __future__ import annotations

import pytest
import trio
from store_view import View

from federation.store import (
    Compacted,
    Delete,
    KeyValue,
    LeaseNotFound,
    Put,
    Reset,
    Store,
    WatchEvent,
    apply_events,
    diff_reset,
)

HANG_GUARD = 20


async def test_put_get_delete_track_revisions_and_versions(store: Store) -> None:
    rev1 = await store.put("/t/a", b"1")
    kv = await store.get("/t/a")
    assert kv == KeyValue("/t/a", b"1", rev1, rev1, 1)
    rev2 = await store.put("/t/a", b"2")
    assert rev2 == rev1 + 1
    assert await store.get("/t/a") == KeyValue("/t/a", b"2", rev1, rev2, 2)
    assert await store.current_revision() == rev2
    assert await store.delete("/t/a") is True
    assert await store.get("/t/a") is None
    assert await store.delete("/t/a") is False
    # A no-op delete is not a write: the revision does not move.
    assert await store.current_revision() == rev2 + 1
    # Re-created keys start a new life: create_revision moves, version restarts at 1.
    rev4 = await store.put("/t/a", b"3")
    assert await store.get("/t/a") == KeyValue("/t/a", b"3", rev4, rev4, 1)


async def test_delete_prefix_removes_only_keys_under_the_prefix(store: Store) -> None:
    for key in ("/p/a", "/p/b", "/p/c/d", "/pa", "/q"):
        await store.put(key, b"x")
    assert await store.delete_prefix("/p/") == 3
    _, left = await store.get_prefix("/")
    assert [kv.key for kv in left] == ["/pa", "/q"]
    assert await store.delete_prefix("/p/") == 0


async def test_get_prefix_reads_sorted_keys_at_one_revision(store: Store) -> None:
    for key in ("/r/c", "/r/a", "/r/b", "/s/a"):
        last = await store.put(key, key.encode())
    revision, kvs = await store.get_prefix("/r/")
    assert revision == last
    assert [kv.key for kv in kvs] == ["/r/a", "/r/b", "/r/c"]
    assert all(kv.mod_revision <= revision for kv in kvs)


async def test_cas_with_zero_is_create_only(store: Store) -> None:
    first = await store.compare_and_swap("/c/k", b"v1", expected_mod_revision=0)
    assert first.succeeded
    assert first.current is not None and first.current.version == 1
    assert first.current == await store.get("/c/k")
    again = await store.compare_and_swap("/c/k", b"v2", expected_mod_revision=0)
    assert not again.succeeded
    assert again.current == first.current
    assert (await store.get("/c/k")) == first.current


async def test_cas_on_mod_revision_updates_and_reports_the_new_key(store: Store) -> None:
    rev = await store.put("/c/k", b"v1")
    ok = await store.compare_and_swap("/c/k", b"v2", expected_mod_revision=rev)
    assert ok.succeeded
    assert ok.current == KeyValue("/c/k", b"v2", rev, ok.revision, 2)
    assert ok.current == await store.get("/c/k")
    stale = await store.compare_and_swap("/c/k", b"v3", expected_mod_revision=rev)
    assert not stale.succeeded
    assert stale.current == ok.current


async def test_cas_race_exactly_one_of_two_writers_wins(store: Store) -> None:
    rounds = 25
    for i in range(rounds):
        await store.put(f"/race/{i}", b"start")

    async def round_(i: int) -> None:
        key = f"/race/{i}"
        seen = await store.get(key)
        assert seen is not None
        results = []

        async def writer(name: bytes) -> None:
            results.append(
                await store.compare_and_swap(key, name, expected_mod_revision=seen.mod_revision)
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, b"A")
            nursery.start_soon(writer, b"B")
        winners = [r for r in results if r.succeeded]
        losers = [r for r in results if not r.succeeded]
        assert len(winners) == 1 and len(losers) == 1
        final = await store.get(key)
        assert final == winners[0].current
        assert losers[0].current == final
        assert final is not None and final.version == 2

    async with trio.open_nursery() as nursery:
        for i in range(rounds):
            nursery.start_soon(round_, i)


async def test_compare_and_delete_needs_the_current_mod_revision(store: Store) -> None:
    rev = await store.put("/d/k", b"v")
    assert await store.compare_and_delete("/d/k", expected_mod_revision=rev - 1) is False
    assert await store.get("/d/k") is not None
    assert await store.compare_and_delete("/d/k", expected_mod_revision=rev) is True
    assert await store.get("/d/k") is None
    assert await store.compare_and_delete("/d/k", expected_mod_revision=0) is False


async def test_put_with_unknown_lease_raises_lease_not_found(store: Store) -> None:
    lease = await store.grant_lease(5)
    await store.revoke_lease(lease.id)
    with pytest.raises(LeaseNotFound):
        await store.put("/l/k", b"v", lease=lease.id)
    assert await store.get("/l/k") is None


async def test_lease_keepalive_then_revoke_deletes_keys_with_events(store: Store) -> None:
    lease = await store.grant_lease(5)
    assert lease.id != 0 and lease.ttl >= 5
    await store.put("/l/a", b"1", lease=lease.id)
    await store.put("/l/b", b"2", lease=lease.id)
    await store.put("/l/c", b"3")
    assert await store.keepalive(lease.id) == lease.ttl
    assert (await store.get("/l/a")) is not None and (await store.get("/l/a")).lease == lease.id  # type: ignore[union-attr]
    async with store.watch_prefix("/l/") as events:
        reset = await events.__anext__()
        assert isinstance(reset, Reset) and len(reset.items) == 3
        await store.revoke_lease(lease.id)
        with trio.fail_after(HANG_GUARD):
            deletes = [await events.__anext__(), await events.__anext__()]
    assert {(type(e), e.key) for e in deletes if isinstance(e, Delete)} == {
        (Delete, "/l/a"),
        (Delete, "/l/b"),
    }
    # One revoke is one revision, like any other single write.
    assert deletes[0].revision == deletes[1].revision
    assert [kv.key for kv in (await store.get_prefix("/l/"))[1]] == ["/l/c"]
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease.id)
    await store.revoke_lease(lease.id)  # revoking a gone lease is a no-op


async def test_expired_lease_deletes_keys_and_watchers_see_deletes(store: Store) -> None:
    lease = await store.grant_lease(1)
    await store.put("/e/a", b"1", lease=lease.id)
    await store.put("/e/b", b"2", lease=lease.id)
    async with store.watch_prefix("/e/") as events:
        reset = await events.__anext__()
        assert isinstance(reset, Reset) and [kv.key for kv in reset.items] == ["/e/a", "/e/b"]
        with trio.fail_after(HANG_GUARD):
            gone = [await events.__anext__(), await events.__anext__()]
    assert sorted(e.key for e in gone if isinstance(e, Delete)) == ["/e/a", "/e/b"]
    assert await store.get("/e/a") is None
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease.id)


async def test_watch_starts_with_reset_then_ordered_events(store: Store) -> None:
    await store.put("/w/a", b"1")
    await store.put("/w/b", b"1")
    await store.put("/x/ignored", b"1")
    async with store.watch_prefix("/w/") as events:
        reset = await events.__anext__()
        assert isinstance(reset, Reset)
        assert [kv.key for kv in reset.items] == ["/w/a", "/w/b"]
        assert reset.revision == await store.current_revision()
        r1 = await store.put("/w/c", b"1")
        await store.put("/x/ignored", b"2")
        r2 = await store.put("/w/a", b"2")
        assert await store.delete("/w/b")
        await store.delete_prefix("/w/")  # /w/a and /w/c at one revision
        got: list[WatchEvent] = []
        with trio.fail_after(HANG_GUARD):
            while len(got) < 5:
                got.append(await events.__anext__())
    assert [type(e) for e in got] == [Put, Put, Delete, Delete, Delete]
    assert isinstance(got[0], Put) and got[0].kv.key == "/w/c" and got[0].revision == r1
    assert isinstance(got[1], Put) and got[1].kv.value == b"2" and got[1].revision == r2
    revisions = [e.revision for e in got]
    assert revisions == sorted(revisions) and revisions[0] > reset.revision
    assert revisions[3] == revisions[4]
    assert {e.key for e in got[3:] if isinstance(e, Delete)} == {"/w/a", "/w/c"}


async def test_leaving_the_watch_stops_it(store: Store) -> None:
    async with store.watch_prefix("/s/") as events:
        assert isinstance(await events.__anext__(), Reset)
    assert store.statistics().open_watches == 0  # type: ignore[attr-defined]
    # The store stays usable, and a new watch starts from a fresh Reset.
    await store.put("/s/a", b"1")
    async with store.watch_prefix("/s/") as events:
        reset = await events.__anext__()
        assert isinstance(reset, Reset) and [kv.key for kv in reset.items] == ["/s/a"]


async def test_compaction_while_watch_is_down_resets_to_exactly_the_missed_changes(
    store: Store,
) -> None:
    for key in ("/m/a", "/m/b", "/m/c"):
        await store.put(key, b"old")
    view = View()
    async with store.watch_prefix("/m/") as events:
        view.apply(await events.__anext__())
    held_before = dict(view.held)
    # While the consumer is away: a delete, an update, a create, then compaction.
    await store.delete("/m/a")
    await store.put("/m/b", b"new")
    await store.put("/m/d", b"new")
    await store.compact(await store.current_revision())
    async with store.watch_prefix("/m/") as events:
        reset = await events.__anext__()
    assert isinstance(reset, Reset)
    changes = diff_reset(held_before, reset)
    assert [(type(c).__name__, c.key if isinstance(c, Delete) else c.kv.key) for c in changes] == [
        ("Delete", "/m/a"),
        ("Put", "/m/b"),
        ("Put", "/m/d"),
    ]
    apply_events(held_before, changes)
    _, truth = await store.get_prefix("/m/")
    assert held_before == {kv.key: kv for kv in truth}


async def test_compact_refuses_old_and_future_revisions(store: Store) -> None:
    await store.put("/k/a", b"1")
    rev = await store.put("/k/a", b"2")
    await store.compact(rev)
    with pytest.raises(Compacted):
        await store.compact(rev - 1)
    with pytest.raises(ValueError):
        await store.compact(rev + 100)
    assert (await store.get("/k/a")) is not None
