"""The builder's local overlay: the local cluster's records as the agent publishes them.

Plain calls for each rule, then a property over random interleavings of store
events (puts, deletes, lost events, Resets) and overlay changes: the local part
of the catalog is always the overlay, the remote part always the store's, and
the version log replays to every snapshot.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import keys
from federation.catalog import Catalog, CatalogBuilder, CatalogView, Change
from federation.model import Entry
from federation.store.api import Delete, Put, Reset
from tests.catalog import strategies as s
from tests.catalog.test_properties import expected_entries

L = s.LOCAL
LOCAL_EP = s.endpoint(L, "a", "e1", written_at=None)
LOCAL_EXPORT = s.export(L, "a", to=("*",))
REMOTE_EP = s.endpoint("c2", "a", "e1")
REMOTE_EXPORT = s.export("c2", "a", to=("*",))


def store_with(*records: object) -> Reset:
    items = tuple(
        s.kv(r.key(), r.to_json(), rev)  # type: ignore[attr-defined]
        for rev, r in enumerate(records, start=1)
    )
    return Reset(len(items), items)


def local_part(catalog: Catalog) -> dict[str, Entry]:
    b = CatalogBuilder(L, "probe")
    return {k: v for k, v in catalog.entries.items() if b.is_local_key(k)}


def synced_builder() -> CatalogBuilder:
    b = CatalogBuilder(L, "inc-1")
    b.apply(store_with(LOCAL_EP, LOCAL_EXPORT, REMOTE_EP, REMOTE_EXPORT), 1.0)
    return b


def test_equal_overlay_changes_no_version():
    b = synced_builder()
    v = b.version
    # The store's records carry written_at; the publisher's do not: same content.
    assert not b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP, LOCAL_EXPORT.key(): LOCAL_EXPORT})
    assert b.version == v


def test_a_reset_without_the_local_keys_removes_nothing_local():
    b = synced_builder()
    b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP, LOCAL_EXPORT.key(): LOCAL_EXPORT})
    v = b.version
    # The agent's lease expired while it was cut off: the re-list lacks its keys.
    applied = b.apply(store_with(REMOTE_EP, REMOTE_EXPORT), 2.0)
    assert not applied.changed and b.version == v
    assert LOCAL_EP.key() in b.snapshot().entries
    # ... and the re-registration that follows changes nothing either.
    again = dataclasses.replace(LOCAL_EP, written_at=3.0)
    assert not b.apply(Put(s.kv(again.key(), again.to_json(), 9)), 3.0).changed
    assert b.version == v


def test_deletes_of_local_keys_change_nothing_while_the_overlay_is_on():
    b = synced_builder()
    b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP})
    v = b.version
    assert not b.apply(Delete(LOCAL_EP.key(), 7), 2.0).changed
    assert b.version == v and LOCAL_EP.key() in b.snapshot().entries
    # A remote delete still lands.
    assert b.apply(Delete(REMOTE_EP.key(), 8), 2.0).changed
    assert REMOTE_EP.key() not in b.snapshot().entries


def test_a_withdrawn_local_record_leaves_at_once_in_one_version():
    b = synced_builder()
    b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP, LOCAL_EXPORT.key(): LOCAL_EXPORT})
    v = b.version
    # The sidecar went away before the store could be told: gone from the catalog now,
    # although the store (as last seen) still holds it.
    assert b.set_local_overlay({LOCAL_EXPORT.key(): LOCAL_EXPORT})
    assert b.version == v + 1
    delta = b.changes_since(v)
    assert delta is not None and delta.changes == (Change(LOCAL_EP.key(), None),)
    # The store's delete arriving later is a no-op.
    assert not b.apply(Delete(LOCAL_EP.key(), 9), 3.0).changed


def test_a_changed_local_record_shows_the_publishers_version():
    b = synced_builder()
    unhealthy = dataclasses.replace(LOCAL_EP, healthy=False)
    assert b.set_local_overlay({LOCAL_EP.key(): unhealthy})
    assert b.snapshot().entries[LOCAL_EP.key()] == unhealthy
    # The store still echoes the old (healthy) value: not shown.
    assert not b.apply(Put(s.kv(LOCAL_EP.key(), LOCAL_EP.to_json(), 9)), 2.0).changed
    assert b.snapshot().entries[LOCAL_EP.key()] == unhealthy


def test_overlay_off_shows_the_store_again():
    b = synced_builder()
    b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP})
    b.apply(store_with(REMOTE_EP, REMOTE_EXPORT), 2.0)
    v = b.version
    assert b.set_local_overlay(None)  # another agent holds the cluster: the store decides
    assert b.version == v + 1
    assert local_part(b.snapshot()) == {}
    assert REMOTE_EP.key() in b.snapshot().entries


def test_remote_records_come_only_from_the_store():
    b = synced_builder()
    # An unexported remote service stays invisible whatever the local overlay holds.
    b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP})
    b.apply(Put(s.kv(REMOTE_EXPORT.key(), s.export("c2", "a", to=("c3",)).to_json(), 9)), 2.0)
    assert REMOTE_EP.key() not in b.snapshot().entries


@pytest.mark.parametrize(
    ("key", "record"),
    [
        (REMOTE_EP.key(), REMOTE_EP),  # another cluster's key
        (keys.endpoint(L, s.NS, "a", "e2"), LOCAL_EP),  # not the record's own key
        (keys.bundle("c1.acme.mesh"), LOCAL_EP),  # not a cluster-scoped key
        (keys.cluster("c10"), s.cluster("c10")),  # a cluster whose name starts like ours
    ],
)
def test_overlay_refuses_what_is_not_a_local_record(key, record):
    b = synced_builder()
    with pytest.raises(ValueError, match="overlay"):
        b.set_local_overlay({key: record})
    assert b.local_overlay is None


def test_overlay_waits_for_a_sliced_reset():
    b = synced_builder()
    steps = b.apply_steps(store_with(REMOTE_EP), 2.0, slice_records=1)
    next(steps)
    assert b.busy
    with pytest.raises(RuntimeError, match="stepwise Reset"):
        b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP})
    for _ in steps:
        pass
    assert not b.busy
    b.set_local_overlay({LOCAL_EP.key(): LOCAL_EP})


# -- the property -----------------------------------------------------------------------

cluster_names = st.sampled_from(s.CLUSTERS)
service_names = st.sampled_from(s.SERVICES)
endpoint_ids = st.sampled_from(s.ENDPOINT_IDS)
EXPORT_TARGETS = [(), ("c2",), ("*",), ("c1", "c3")]

local_records = st.one_of(
    st.builds(
        lambda sv, e, h, w: s.endpoint(L, sv, e, healthy=h, weight=w, written_at=None),
        service_names,
        endpoint_ids,
        st.booleans(),
        st.integers(1, 3),
    ),
    st.builds(
        lambda sv, to: s.export(L, sv, to=to), service_names, st.sampled_from(EXPORT_TARGETS)
    ),
    st.builds(
        lambda n: s.gateway(L, healthy_endpoints={"shop/a": n}, peer_alive={}),
        st.integers(0, 3),
    ),
    st.builds(lambda inc: s.cluster(L, incarnation=inc), st.sampled_from(["inc-1", "inc-2"])),
)
store_records = st.one_of(
    st.builds(
        lambda c, sv, e, h: s.endpoint(c, sv, e, healthy=h),
        cluster_names,
        service_names,
        endpoint_ids,
        st.booleans(),
    ),
    st.builds(
        lambda c, sv, to: s.export(c, sv, to=to),
        cluster_names,
        service_names,
        st.sampled_from(EXPORT_TARGETS),
    ),
    st.builds(
        lambda c, n: s.gateway(c, healthy_endpoints={"shop/a": n}), cluster_names, st.integers(0, 3)
    ),
)
ops = st.one_of(
    st.tuples(st.just("put"), store_records),
    st.tuples(st.just("delete"), store_records),
    st.tuples(st.just("expire_local")),  # the agent's lease ran out: its leased keys go
    st.tuples(st.just("reset")),
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("overlay"), st.lists(local_records, max_size=5)),
    st.tuples(st.just("overlay_off")),
    st.tuples(st.just("sync_view")),
)


class Run:
    """A store, a builder that may miss events while disconnected, a subscriber view."""

    def __init__(self) -> None:
        self.rev = 0
        self.items: dict[str, bytes] = {}
        self.mod: dict[str, int] = {}
        self.seen: dict[str, bytes] = {}  # the store as the builder last heard of it
        self.connected = True
        self.overlay: dict[str, Entry] | None = None
        self.builder = CatalogBuilder(L, "inc-1", log_versions=4)
        self.builder.apply(Reset(0, ()), 0.0)
        self.view = CatalogView()
        self.now = 0.0

    def deliver(self, event: Put | Delete | Reset) -> None:
        before = self.builder.snapshot()
        applied = self.builder.apply(event, self.now)
        if isinstance(event, Put):
            self.seen[event.kv.key] = event.kv.value
        elif isinstance(event, Delete):
            self.seen.pop(event.key, None)
        else:
            self.seen = dict(self.items)
        self.check(before, applied.changed)

    def check(self, before: Catalog, changed: bool) -> None:
        after = self.builder.snapshot()
        assert changed == (dict(before.entries) != dict(after.entries))
        assert after.version == before.version + (1 if changed else 0)
        from_store = expected_entries(self.seen, L)
        local = {k: v for k, v in from_store.items() if self.builder.is_local_key(k)}
        remote = {k: v for k, v in from_store.items() if k not in local}
        if self.overlay is not None:
            # Every local record is visible to its own cluster: the overlay, exactly.
            local = self.overlay
        assert local_part(after) == local
        assert {k: v for k, v in after.entries.items() if not self.builder.is_local_key(k)} == (
            remote
        )

    def write(self, key: str, value: bytes | None) -> None:
        self.rev += 1
        if value is None:
            if key not in self.items:
                return
            del self.items[key], self.mod[key]
            if self.connected:
                self.deliver(Delete(key, self.rev))
            return
        self.items[key], self.mod[key] = value, self.rev
        if self.connected:
            self.deliver(Put(s.kv(key, value, self.rev)))

    def run(self, op: tuple) -> None:  # type: ignore[type-arg]
        self.now += 1.0
        kind = op[0]
        if kind == "put":
            self.write(op[1].key(), op[1].to_json())
        elif kind == "delete":
            self.write(op[1].key(), None)
        elif kind == "expire_local":
            for key in sorted(self.items):
                if self.builder.is_local_key(key) and "/exports/" not in key:
                    self.write(key, None)
        elif kind == "reset":
            self.connected = True
            self.deliver(
                Reset(
                    self.rev, tuple(s.kv(k, self.items[k], self.mod[k]) for k in sorted(self.items))
                )
            )
        elif kind == "disconnect":
            self.connected = False
        elif kind == "overlay":
            before = self.builder.snapshot()
            self.overlay = {r.key(): r for r in op[1]}
            self.check(before, self.builder.set_local_overlay(self.overlay))
        elif kind == "overlay_off":
            before = self.builder.snapshot()
            self.overlay = None
            self.check(before, self.builder.set_local_overlay(None))
        elif kind == "sync_view":
            self.sync_view()

    def sync_view(self) -> None:
        delta = None
        if self.view.version is not None:
            delta = self.builder.changes_since(self.view.version, self.view.epoch)
        if delta is None:
            self.view.apply_snapshot(self.builder.snapshot())
        else:
            self.view.apply_delta(delta)
        assert self.view.catalog == self.builder.snapshot()


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=40))
def test_local_part_is_the_overlay_and_remote_part_the_store_for_any_history(ops_) -> None:
    run = Run()
    for op in ops_:
        run.run(op)
    run.run(("reset",))
    run.sync_view()


@settings(max_examples=100, deadline=None)
@given(st.lists(local_records, max_size=5), st.lists(ops, max_size=30))
def test_a_kept_local_record_is_never_removed_or_changed_by_store_events(records, ops_) -> None:
    # The agent keeps publishing the same records throughout: whatever the store does
    # (lease expiry, lost events, re-lists, other writers), no version ever touches them.
    run = Run()
    run.run(("overlay", records))
    pinned = {r.key(): r for r in records}
    start = run.builder.version
    for op in ops_:
        if op[0] in ("overlay", "overlay_off"):
            continue
        run.run(op)
    delta = run.builder.changes_since(start)
    if delta is not None:  # None only when the bounded log was outrun
        assert not {c.key for c in delta.changes} & pinned.keys()
    assert local_part(run.builder.snapshot()) == pinned
