"""Embedded-store behaviour beyond the shared contract, on trio's mock clock (exact times)."""

from __future__ import annotations

import pytest
import trio
from store_view import View
from trio.testing import MockClock

from federation.store import Delete, LeaseNotFound, Put, Reset, StoreClosed
from federation.store.embedded import EmbeddedState, open_embedded_store


async def test_lease_expires_exactly_at_its_ttl_and_keepalive_extends_it(
    autojump_clock: MockClock,
) -> None:
    async with open_embedded_store() as store:
        start = trio.current_time()
        lease = await store.grant_lease(3)
        await store.put("/l/a", b"1", lease=lease.id)
        await trio.sleep(2)
        assert await store.keepalive(lease.id) == 3
        async with store.watch_prefix("/l/") as events:
            assert isinstance(await events.__anext__(), Reset)
            event = await events.__anext__()
        assert event == Delete("/l/a", event.revision)
        # Refreshed at t=2 with TTL 3: gone at exactly t=5, not t=3.
        assert trio.current_time() - start == pytest.approx(5)
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease.id)


async def test_expiry_is_applied_before_reads_even_if_the_timer_has_not_run(
    autojump_clock: MockClock,
) -> None:
    async with open_embedded_store() as store:
        lease = await store.grant_lease(1)
        await store.put("/l/a", b"1", lease=lease.id)
        autojump_clock.jump(1)  # time passes without any task running
        assert await store.get("/l/a") is None


async def test_moving_a_key_to_another_lease_detaches_it_from_the_first(
    autojump_clock: MockClock,
) -> None:
    async with open_embedded_store() as store:
        short = await store.grant_lease(1)
        long = await store.grant_lease(100)
        await store.put("/l/a", b"1", lease=short.id)
        await store.put("/l/a", b"2", lease=long.id)
        await trio.sleep(2)
        kv = await store.get("/l/a")
        assert kv is not None and kv.value == b"2" and kv.lease == long.id


async def test_slow_watcher_never_blocks_writers_and_catches_up_with_a_reset() -> None:
    async with open_embedded_store(history_limit=10) as store:
        view = View()
        async with store.watch_prefix("/w/") as events:
            view.apply(await events.__anext__())
            # 100 writes while the watcher reads nothing: none of them waits.
            for i in range(100):
                await store.put(f"/w/{i % 7}", str(i).encode())
            await store.delete("/w/3")
            stats = store.statistics()
            assert stats.history_events <= 2 * 10  # bounded, however slow the watcher
            first = await events.__anext__()
            assert isinstance(first, Reset)  # its history was trimmed: it gets a Reset
            view.apply(first)
        _, truth = await store.get_prefix("/w/")
        assert view.held == {kv.key: kv for kv in truth}
        assert view.duplicate_puts() == []


async def test_watcher_within_history_catches_up_with_events_not_a_reset() -> None:
    async with open_embedded_store(history_limit=100) as store:
        async with store.watch_prefix("/w/") as events:
            assert isinstance(await events.__anext__(), Reset)
            for i in range(20):
                await store.put("/w/a", str(i).encode())
            got = [await events.__anext__() for _ in range(20)]
        assert all(isinstance(e, Put) for e in got)
        assert [e.kv.value for e in got if isinstance(e, Put)] == [
            str(i).encode() for i in range(20)
        ]


async def test_compaction_past_a_live_watcher_gives_it_a_fresh_reset() -> None:
    async with open_embedded_store() as store:
        await store.put("/w/a", b"1")
        view = View()
        async with store.watch_prefix("/w/") as events:
            view.apply(await events.__anext__())
            await store.delete("/w/a")
            await store.put("/w/b", b"1")
            await store.compact(await store.current_revision())
            reset = await events.__anext__()
            assert isinstance(reset, Reset)
            view.apply(reset)
        assert [type(e).__name__ for e in view.applied] == ["Put", "Delete", "Put"]
        assert list(view.held) == ["/w/b"]


async def test_closed_store_refuses_calls_and_ends_watches() -> None:
    async with open_embedded_store() as store:
        async with store.watch_prefix("/w/") as events:
            assert isinstance(await events.__anext__(), Reset)
            await store.aclose()
            with pytest.raises(StoreClosed):
                await events.__anext__()
        with pytest.raises(StoreClosed):
            await store.put("/w/a", b"1")


def test_state_core_is_pure_and_driven_by_explicit_time() -> None:
    state = EmbeddedState()
    lease = state.grant_lease(10, now=100.0)
    state.put("/a", b"1", lease=lease.id)
    assert state.expire(109.9) == 0 and state.get("/a") is not None
    assert state.next_deadline() == 110.0
    assert state.expire(110.0) == 1 and state.get("/a") is None
    with pytest.raises(ValueError):
        state.grant_lease(0, now=0.0)
    with pytest.raises(ValueError):
        EmbeddedState(history_limit=0)


def test_state_trims_history_only_at_revision_boundaries() -> None:
    state = EmbeddedState(history_limit=2)
    for i in range(4):
        state.put(f"/p/{i}", b"x")
    cursor = state.next_seq
    state.delete_prefix("/p/")  # 4 events at one revision
    assert not state.is_behind(cursor)  # the trim kept that revision whole
    events = []
    while True:
        ev, cursor = state.next_event(cursor, "/p/")
        if ev is None:
            break
        events.append(ev)
    assert len(events) == 4 and len({e.revision for e in events}) == 1
