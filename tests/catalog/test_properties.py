"""Properties over random store histories: convergence, the import rule, versions, views."""

from __future__ import annotations

import contextlib
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from federation import keys
from federation.catalog import CatalogBuilder, CatalogView
from federation.model import (
    EndpointRecord,
    Entry,
    ExportRecord,
    GatewayRecord,
    RecordError,
    decode_store_value,
)
from federation.store.api import Delete, Put, Reset
from federation.stream_codec import StreamDecoder, encode
from tests.catalog import strategies as s

EXPORT_TARGETS = [(), ("c1",), ("*",), ("c3",), ("c1", "c2")]
cluster_names = st.sampled_from(s.CLUSTERS)
service_names = st.sampled_from(s.SERVICES)
endpoint_ids = st.sampled_from(s.ENDPOINT_IDS)

all_keys = st.one_of(
    st.builds(lambda c, sv: keys.export(c, s.NS, sv), cluster_names, service_names),
    st.builds(
        lambda c, sv, e: keys.endpoint(c, s.NS, sv, e), cluster_names, service_names, endpoint_ids
    ),
    st.builds(lambda c: keys.gateway(c, "gw-0"), cluster_names),
)

ops = st.one_of(
    st.tuples(st.just("export"), cluster_names, service_names, st.sampled_from(EXPORT_TARGETS)),
    st.tuples(
        st.just("endpoint"),
        cluster_names,
        service_names,
        endpoint_ids,
        st.booleans(),
        st.integers(1, 3),
    ),
    st.tuples(st.just("gateway"), cluster_names, st.integers(0, 3)),
    st.tuples(st.just("garbage"), all_keys),
    st.tuples(st.just("delete"), all_keys),
    st.tuples(st.just("rewrite"), all_keys),
    st.tuples(st.just("reset")),
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("sync_view")),
)


def expected_entries(items: dict[str, bytes], local: str) -> dict[str, Entry]:
    """The import rule, written out directly against the store's final content."""
    decoded: dict[str, Entry] = {}
    for key, value in items.items():
        with contextlib.suppress(RecordError):
            decoded[key] = decode_store_value(key, value)

    def imported(cluster: str, namespace: str, service: str) -> bool:
        export = decoded.get(keys.export(cluster, namespace, service))
        return cluster == local or (isinstance(export, ExportRecord) and export.exports_to(local))

    out: dict[str, Entry] = {}
    for key, entry in decoded.items():
        if isinstance(entry, EndpointRecord):
            if imported(entry.cluster, entry.namespace, entry.service):
                out[key] = entry
        elif isinstance(entry, ExportRecord):
            if entry.exports_to(local):
                out[key] = entry
        elif isinstance(entry, GatewayRecord):
            counts = {
                r: n
                for r, n in entry.healthy_endpoints.items()
                if imported(entry.cluster, *r.split("/"))
            }
            out[key] = dataclasses.replace(entry, healthy_endpoints=counts)
        else:
            out[key] = entry
    return out


class History:
    """A store, a builder that may miss events while 'disconnected', and a subscriber view."""

    def __init__(self) -> None:
        self.rev = 0
        self.items: dict[str, bytes] = {}
        self.mod: dict[str, int] = {}
        self.builder = CatalogBuilder(s.LOCAL, "inc-1", log_versions=3)
        self.connected = True
        self.view = CatalogView()
        self.decoder = StreamDecoder()
        self.now = 0.0

    def reset_event(self) -> Reset:
        return Reset(
            self.rev, tuple(s.kv(k, self.items[k], self.mod[k]) for k in sorted(self.items))
        )

    def deliver(self, event: Put | Delete | Reset) -> None:
        before = self.builder.snapshot()
        applied = self.builder.apply(event, self.now)
        after = self.builder.snapshot()
        changed = dict(before.entries) != dict(after.entries)
        # Monotonic, by exactly one, and only when something visible changed.
        assert applied.changed == changed
        assert after.version == before.version + (1 if changed else 0)
        self.check_import_rule()

    def check_import_rule(self) -> None:
        entries = self.builder.snapshot().entries
        for key, entry in entries.items():
            if isinstance(entry, ExportRecord):
                assert entry.exports_to(s.LOCAL), key
            if isinstance(entry, EndpointRecord) and entry.cluster != s.LOCAL:
                export = entries.get(keys.export(entry.cluster, entry.namespace, entry.service))
                assert isinstance(export, ExportRecord) and export.exports_to(s.LOCAL), key

    def write(self, key: str, value: bytes) -> None:
        self.rev += 1
        self.items[key], self.mod[key] = value, self.rev
        if self.connected:
            self.deliver(Put(s.kv(key, value, self.rev)))

    def run(self, op: tuple) -> None:  # type: ignore[type-arg]
        self.now += 1.0
        kind = op[0]
        if kind == "export":
            _, c, sv, to = op
            self.write(keys.export(c, s.NS, sv), s.export(c, sv, to=to).to_json())
        elif kind == "endpoint":
            _, c, sv, eid, healthy, weight = op
            record = s.endpoint(c, sv, eid, healthy=healthy, weight=weight, written_at=self.now)
            self.write(record.key(), record.to_json())
        elif kind == "gateway":
            _, c, n = op
            gw = s.gateway(c, healthy_endpoints={"shop/a": n, "shop/b": 3 - n})
            self.write(gw.key(), gw.to_json())
        elif kind == "garbage":
            self.write(op[1], b'{"schema": 1, "oops": true}')
        elif kind == "rewrite":
            if op[1] in self.items:
                self.write(op[1], self.items[op[1]])
        elif kind == "delete":
            if op[1] in self.items:
                self.rev += 1
                del self.items[op[1]], self.mod[op[1]]
                if self.connected:
                    self.deliver(Delete(op[1], self.rev))
        elif kind == "reset":
            self.connected = True
            self.deliver(self.reset_event())
        elif kind == "disconnect":
            self.connected = False
        elif kind == "sync_view":
            self.sync_view()

    def sync_view(self) -> None:
        delta = None
        if self.view.version is not None:
            delta = self.builder.changes_since(self.view.version, self.view.epoch)
        if delta is None:
            self.view.apply_snapshot(self.builder.snapshot())
        else:
            # Through the wire format, split at an awkward place, as a subscriber gets it.
            data = encode(delta)
            cut = len(data) // 3
            messages = self.decoder.feed(data[:cut]) + self.decoder.feed(data[cut:])
            assert messages == [delta]
            self.view.apply_delta(delta)
        assert self.view.catalog == self.builder.snapshot()


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, max_size=40))
def test_incremental_catalog_converges_to_the_one_built_from_the_final_state(ops_) -> None:
    history = History()
    for op in ops_:
        history.run(op)
    if not history.connected:
        history.run(("reset",))
    history.sync_view()

    fresh = CatalogBuilder(s.LOCAL, "inc-2")
    fresh.apply(history.reset_event(), history.now)
    built = dict(history.builder.snapshot().entries)
    assert built == dict(fresh.snapshot().entries)
    assert built == expected_entries(history.items, s.LOCAL)
    # No duplicates: one entry per key, one endpoint per endpoint key in the derived view.
    all_endpoints = [e for svc in fresh.snapshot().services.values() for e in svc.endpoints]
    assert len(all_endpoints) == len({e.key() for e in all_endpoints})


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(cluster_names, st.floats(0, 100), min_size=1),
    st.floats(100, 200),
    st.floats(0, 150),
)
def test_expiry_drops_exactly_the_remote_clusters_past_the_limit(seen, now, limit) -> None:
    builder = CatalogBuilder(s.LOCAL, "inc-1")
    for rev, (name, when) in enumerate(sorted(seen.items()), start=1):
        record = s.cluster(name)
        builder.apply(Put(s.kv(record.key(), record.to_json(), rev)), when)
    expired = builder.expire_remote(now, limit)
    expected = {c for c, t in seen.items() if c != s.LOCAL and now - t > limit}
    assert set(expired) == expected
    kept = {e.name for e in builder.snapshot().entries.values()}  # type: ignore[union-attr]
    assert kept == set(seen) - expected
