"""The catalog builder's import rule, versioning, resets, expiry, deltas and the view."""

from __future__ import annotations

import pytest

from federation import keys
from federation.catalog import Catalog, CatalogBuilder, CatalogView, Delta, NeedSnapshot
from federation.model import RecordError
from federation.store.api import Delete, Put, Reset
from tests.catalog import strategies as s


class Store:
    """A tiny in-memory stand-in that numbers revisions like etcd."""

    def __init__(self) -> None:
        self.rev = 0
        self.items: dict[str, bytes] = {}
        self.mod: dict[str, int] = {}

    def put(self, record_or_key, value: bytes | None = None) -> Put:
        key = record_or_key if isinstance(record_or_key, str) else record_or_key.key()
        data = value if value is not None else record_or_key.to_json()
        self.rev += 1
        self.items[key], self.mod[key] = data, self.rev
        return Put(s.kv(key, data, self.rev))

    def delete(self, record_or_key) -> Delete:
        key = record_or_key if isinstance(record_or_key, str) else record_or_key.key()
        self.rev += 1
        del self.items[key], self.mod[key]
        return Delete(key, self.rev)

    def reset(self) -> Reset:
        return Reset(
            self.rev, tuple(s.kv(k, self.items[k], self.mod[k]) for k in sorted(self.items))
        )


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def builder() -> CatalogBuilder:
    return CatalogBuilder(s.LOCAL, "inc-1")


def visible(builder: CatalogBuilder) -> set[str]:
    return set(builder.snapshot().entries)


def test_remote_endpoints_need_an_export_to_the_local_cluster(store, builder) -> None:
    ep = s.endpoint("c2", "a")
    builder.apply(store.put(ep), 1.0)
    assert ep.key() not in visible(builder)
    builder.apply(store.put(s.export("c2", "a", to=("c3",))), 2.0)
    assert visible(builder) == set()
    builder.apply(store.put(s.export("c2", "a", to=("c3", "c1"))), 3.0)
    assert visible(builder) == {ep.key(), s.export("c2", "a").key()}
    assert builder.snapshot().endpoints(s.NS, "a") == (ep,)
    builder.apply(store.put(s.export("c2", "a", to=("*",))), 4.0)
    assert ep.key() in visible(builder)
    builder.apply(store.delete(s.export("c2", "a")), 5.0)
    assert visible(builder) == set()
    assert builder.snapshot().services == {}


def test_local_services_appear_without_an_export(store, builder) -> None:
    ep = s.endpoint("c1", "a")
    builder.apply(store.put(ep), 1.0)
    assert builder.snapshot().endpoints(s.NS, "a") == (ep,)
    local_only = s.export("c1", "a", to=())
    builder.apply(store.put(local_only), 2.0)
    assert builder.snapshot().services[(s.NS, "a")].exports == {"c1": local_only}


def test_re_putting_identical_content_does_not_bump_the_version(store, builder) -> None:
    builder.apply(store.put(s.endpoint("c1", written_at=1.0)), 1.0)
    assert builder.version == 1
    again = builder.apply(store.put(s.endpoint("c1", written_at=99.0)), 2.0)
    assert (again.changed, again.version) == (False, 1)
    changed = builder.apply(store.put(s.endpoint("c1", healthy=False)), 3.0)
    assert (changed.changed, changed.version) == (True, 2)
    # The kept entry is the one of the version that introduced it.
    assert builder.snapshot().endpoints(s.NS, "a")[0].healthy is False


def test_invisible_changes_do_not_bump_the_version(store, builder) -> None:
    builder.apply(store.put(s.endpoint("c2", "a")), 1.0)
    builder.apply(store.put(s.export("c2", "a", to=("c3",))), 2.0)
    builder.apply(store.put(s.endpoint("c2", "a", weight=7)), 3.0)
    assert builder.version == 0


def test_a_reset_repairs_deletes_missed_while_away(store, builder) -> None:
    e1, e2 = s.endpoint("c1", eid="e1"), s.endpoint("c1", eid="e2")
    builder.apply(store.put(e1), 1.0)
    builder.apply(store.put(e2), 2.0)
    store.delete(e1)  # never delivered: the watch was down
    applied = builder.apply(store.reset(), 3.0)
    assert applied.changed and applied.version == 3
    assert visible(builder) == {e2.key()}
    assert builder.apply(store.reset(), 4.0).changed is False  # nothing lost: no churn
    assert builder.synced


def test_bad_keys_and_values_are_counted_and_never_crash(store, builder) -> None:
    ep = s.endpoint("c1")
    builder.apply(store.put(ep), 1.0)
    bad_key = builder.apply(store.put("/meshfed/v1/endpoints/c1/../x/y", b"{}"), 2.0)
    assert bad_key.rejected[0].key.endswith("/x/y") and not bad_key.changed
    bad_value = builder.apply(store.put(ep.key(), b'{"schema":1}'), 3.0)
    assert "EndpointRecord" in bad_value.rejected[0].reason
    # The key's current value is unusable: the entry is gone, exactly as for a fresh agent.
    assert visible(builder) == set() and bad_value.changed
    foreign = builder.apply(store.put(keys.endpoint("c3", s.NS, "a", "e1"), ep.to_json()), 4.0)
    assert "stored under" in foreign.rejected[0].reason
    stats = builder.statistics()
    assert (stats.ignored_keys, stats.bad_values) == (1, 2)
    fresh = CatalogBuilder(s.LOCAL, "inc-2")
    fresh.apply(store.reset(), 5.0)
    assert fresh.snapshot().entries == builder.snapshot().entries


def test_remote_gateway_counts_only_name_services_exported_to_us(store, builder) -> None:
    builder.apply(store.put(s.gateway("c2")), 1.0)
    assert builder.snapshot().clusters["c2"].gateways[0].healthy_endpoints == {}
    builder.apply(store.put(s.export("c2", "b", to=("c1",))), 2.0)
    view = builder.snapshot().clusters["c2"]
    assert dict(view.gateways[0].healthy_endpoints) == {"shop/b": 1}
    assert (view.healthy_endpoints(s.NS, "b"), view.healthy_endpoints(s.NS, "a")) == (1, 0)
    builder.apply(store.put(s.gateway("c1")), 3.0)
    assert builder.snapshot().clusters["c1"].healthy_endpoints(s.NS, "a") == 2
    assert set(builder.snapshot().remote_clusters) == {"c2"}


def test_trust_documents_and_policies_are_carried(store, builder) -> None:
    doc = b'{"keys":[],"spiffe_sequence":1}'
    builder.apply(store.put(keys.bundle("c2.acme.mesh"), doc), 1.0)
    builder.apply(store.put(keys.revocation("c2.acme.mesh", "0f"), b'{"serial":"0f"}'), 2.0)
    builder.apply(store.put(s.policy("p1")), 3.0)
    snap = builder.snapshot()
    assert snap.bundles == {"c2.acme.mesh": doc}
    assert snap.revocations == {("c2.acme.mesh", "0f"): b'{"serial":"0f"}'}
    assert snap.policies == {"p1": s.policy("p1")}


def test_expiry_drops_only_remote_clusters_past_the_limit(store, builder) -> None:
    builder.apply(store.put(s.endpoint("c1")), 0.0)
    builder.apply(store.put(s.export("c2", "a")), 0.0)
    builder.apply(store.put(s.endpoint("c2", "a")), 0.0)
    builder.apply(store.put(s.cluster("c3")), 50.0)
    builder.apply(store.put(keys.bundle("c2.acme.mesh"), b"{}"), 0.0)
    assert builder.expire_remote(100.0, None) == ()
    before = builder.version
    assert builder.expire_remote(100.0, 60.0) == ("c2",)
    assert builder.version == before + 1
    assert visible(builder) == {
        s.endpoint("c1").key(),
        s.cluster("c3").key(),
        keys.bundle("c2.acme.mesh"),
    }
    assert set(builder.last_seen) == {"c1", "c3"}
    # Back in touch: the next Reset brings c2 back, since it still exists in the store.
    builder.apply(store.reset(), 200.0)
    assert s.endpoint("c2", "a").key() in visible(builder)


def test_a_live_store_keeps_quiet_clusters(store, builder) -> None:
    builder.apply(store.put(s.cluster("c2")), 0.0)
    builder.mark_store_live(90.0)
    assert builder.expire_remote(100.0, 60.0) == ()
    assert builder.expire_remote(151.0, 60.0) == ("c2",)


def test_lag_is_reported_for_puts_that_carry_written_at(store, builder) -> None:
    applied = builder.apply(store.put(s.endpoint("c2", written_at=1000.0)), 1002.5)
    assert applied.lags == (("c2", 2.5),)
    assert builder.apply(store.reset(), 3000.0).lags == ()


def test_changes_since_merges_and_is_bounded(store) -> None:
    builder = CatalogBuilder(s.LOCAL, "inc-1", log_versions=2)
    e1 = s.endpoint("c1", eid="e1")
    builder.apply(store.put(e1), 1.0)  # v1
    builder.apply(store.put(s.endpoint("c1", eid="e2")), 2.0)  # v2
    builder.apply(store.delete(e1), 3.0)  # v3
    assert builder.changes_since(0) is None  # older than the log
    delta = builder.changes_since(1)
    assert delta is not None and (delta.from_version, delta.to_version) == (1, 3)
    assert [(c.key, c.value) for c in delta.changes] == [
        (e1.key(), None),
        (s.endpoint("c1", eid="e2").key(), s.endpoint("c1", eid="e2")),
    ]
    assert _delta(builder, 3).changes == ()
    assert builder.changes_since(4) is None
    assert builder.changes_since(1, epoch="other") is None


def _delta(builder: CatalogBuilder, version: int) -> Delta:
    delta = builder.changes_since(version)
    assert delta is not None
    return delta


def test_view_follows_deltas_and_refuses_gaps(store, builder) -> None:
    view = CatalogView()
    with pytest.raises(NeedSnapshot):
        view.apply_delta(_delta(builder, 0))
    view.apply_snapshot(builder.snapshot())
    builder.apply(store.put(s.endpoint("c1", eid="e1")), 1.0)
    builder.apply(store.put(s.endpoint("c1", eid="e2")), 2.0)
    skipped = _delta(builder, 1)
    with pytest.raises(NeedSnapshot, match="from version 1, view holds 0"):
        view.apply_delta(skipped)
    assert view.version == 0 and view.catalog is not None and view.catalog.entries == {}
    view.apply_delta(_delta(builder, 0))
    assert view.catalog == builder.snapshot()
    other = CatalogBuilder(s.LOCAL, "inc-2")
    with pytest.raises(NeedSnapshot, match="epoch"):
        view.apply_delta(_delta(other, 0))


def test_catalog_persists_and_reloads_exactly(store, builder) -> None:
    for record in (s.cluster("c2"), s.gateway("c2"), s.export("c2"), s.endpoint("c2")):
        builder.apply(store.put(record), 7.0)
    builder.apply(store.put(s.policy()), 7.5)
    builder.apply(store.put(keys.bundle("c2.acme.mesh"), b'{"keys":[]}'), 8.0)
    snap = builder.snapshot()
    again = Catalog.from_json(snap.to_json())
    assert again == snap and again.to_json() == snap.to_json()
    assert again.services == snap.services


def test_a_corrupt_persisted_catalog_is_refused_naming_the_entry(store, builder) -> None:
    builder.apply(store.put(s.endpoint("c1")), 1.0)
    data = builder.snapshot().to_json().replace(b'"port":15006', b'"port":-1')
    with pytest.raises(
        RecordError, match=r"Catalog.entries\['/meshfed/v1/endpoints/c1/shop/a/e1'\]"
    ):
        Catalog.from_json(data)
    with pytest.raises(RecordError, match="Catalog"):
        Catalog.from_json(b"")
