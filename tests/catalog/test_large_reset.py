"""Full syncs at scale: a sliced Reset yields to the loop, is never seen half-applied,
and builds exactly the catalog a one-shot Reset builds; cheap snapshots stay immutable."""

from __future__ import annotations

import json

import pytest
import trio

from federation import keys
from federation.agent.health import StoreHealth
from federation.agent.importer import CatalogImporter
from federation.agent.metrics import AgentMetrics
from federation.catalog import Catalog, CatalogBuilder, CatalogView, Delta, _parse_key
from federation.model import EndpointRecord, RecordError, canonical_json
from federation.names import InvalidName
from federation.store.api import KeyValue, Put, Reset
from federation.stream_codec import Snapshot, _message_obj, encode
from tests.catalog import strategies as s


def big_store(services: int, *, port: int = 15006, drop_every: int = 0) -> list[KeyValue]:
    """3 clusters x ``services`` x 5 endpoints, plus exports (some to c1 only, some to none),
    gateways, one bad value and one non-v1 key: every path of the import rule."""
    items: list[tuple[str, bytes]] = []
    for c in s.CLUSTERS:
        items.append((keys.cluster(c), s.cluster(c).to_json()))
        items.append((keys.gateway(c, "gw-0"), s.gateway(c).to_json()))
        for i in range(services):
            svc = f"svc-{i}"
            to = ("*",) if i % 3 == 0 else ("c1",) if i % 3 == 1 else ("c3",)
            items.append((keys.export(c, s.NS, svc), s.export(c, svc, to=to).to_json()))
            for e in range(5):
                if drop_every and (i * 5 + e) % drop_every == 0:
                    continue
                ep = s.endpoint(c, svc, f"e{e}", port=port, weight=1 + e)
                items.append((ep.key(), ep.to_json()))
    items.append((keys.endpoint("c2", s.NS, "svc-0", "bad"), b'{"schema":1}'))
    items.append(("/meshfed/v1/endpoints/c2/../x/y", b"{}"))
    return [s.kv(k, v, rev) for rev, (k, v) in enumerate(sorted(items), start=1)]


def one_shot(items: list[KeyValue], now: float) -> CatalogBuilder:
    builder = CatalogBuilder(s.LOCAL, "inc-1")
    builder.apply(Reset(len(items), tuple(items)), now)
    return builder


def same_catalog(a: Catalog, b: Catalog) -> None:
    assert a == b
    assert a.to_json() == b.to_json()


def importer() -> CatalogImporter:
    src = CatalogImporter(
        s.LOCAL, "inc-1", health=StoreHealth(), metrics=AgentMetrics(), wall=lambda: 50.0
    )
    src.health.ok(0)
    return src


async def test_a_large_reset_yields_to_the_loop_and_builds_the_same_catalog() -> None:
    items = big_store(1400)  # 3 x 1400 x 6 + 8: about 25k keys
    assert len(items) > 20_000
    src = importer()
    ticks = 0
    seen_during: set[tuple[int, bool]] = set()
    done = False

    async def other_task() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            seen_during.add((src.version, src.synced))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        before = ticks
        await src.apply_async(Reset(len(items), tuple(items)))
        during = ticks - before
        done = True
    assert during >= 10  # the loop ran another task many times during one Reset
    assert seen_during == {(0, False)}  # ...and it only ever saw the catalog before it
    assert src.synced and src.version == 1
    same_catalog(src.builder.snapshot(), one_shot(items, 50.0).snapshot())
    assert src.builder.statistics() == one_shot(items, 50.0).statistics()


async def test_a_second_reset_after_changes_matches_a_fresh_builder() -> None:
    first, second = big_store(300), big_store(300, port=16000, drop_every=7)
    # Keep mod_revisions of unchanged keys, bump the changed ones: a re-list after a reconnect.
    old = {kv.key: kv for kv in first}
    relist = [
        kv if kv.key in old and old[kv.key].value == kv.value else s.kv(kv.key, kv.value, 10_000)
        for kv in second
    ]
    src = importer()
    await src.apply_async(Reset(1, tuple(first)))
    await src.apply_async(Reset(2, tuple(relist)))
    fresh = one_shot(relist, 50.0)
    assert src.builder.snapshot().entries == fresh.snapshot().entries
    assert src.builder.snapshot().last_seen == fresh.snapshot().last_seen
    assert src.version == 2
    delta = src.changes_since(1)
    assert delta is not None and delta.changes  # endpoints dropped and re-ported


def test_readers_see_the_old_catalog_until_the_stepwise_reset_returns() -> None:
    items = big_store(200)
    builder = CatalogBuilder(s.LOCAL, "inc-1")
    builder.apply(Put(s.kv(keys.cluster("c9"), s.cluster("c9").to_json(), 1)), 1.0)
    before = builder.snapshot()
    steps = builder.apply_steps(Reset(99, tuple(items)), 2.0, slice_records=50)
    slices = 0
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
            slices += 1
            assert builder.snapshot() is before
            assert builder.version == 1 and builder.last_seen == {"c9": 1.0}
            assert builder.changes_since(1) == Delta("inc-1", 1, 1, (), before.last_seen)
            with pytest.raises(RuntimeError):
                builder.expire_remote(3.0, 0.5)
            with pytest.raises(RuntimeError):
                builder.apply(Put(items[0]), 3.0)
    assert slices > 20
    applied = done.value.value
    assert applied.changed and applied.version == 2
    assert [r.key for r in applied.rejected] == sorted(r.key for r in applied.rejected)
    assert len(applied.rejected) == 2
    whole = one_shot(items, 2.0).snapshot()
    assert builder.snapshot().entries == whole.entries  # c9 is gone: the Reset lacks it
    assert builder.snapshot().last_seen == whole.last_seen
    assert before.version == 1 and len(before.entries) == 1  # the old snapshot is untouched


@pytest.mark.parametrize("stop_after", [1, 5, 12, 25, 60])
def test_a_stepwise_reset_closed_early_leaves_old_or_whole_state(stop_after: int) -> None:
    items = big_store(120)
    builder = CatalogBuilder(s.LOCAL, "inc-1")
    steps = builder.apply_steps(Reset(99, tuple(items)), 2.0, slice_records=40)
    for _ in range(stop_after):
        next(steps)
    steps.close()
    whole = one_shot(items, 2.0)
    if builder.version == 0:
        assert builder.statistics().held_keys == 0 and not builder.synced
    else:
        same_catalog(builder.snapshot(), whole.snapshot())
    builder.apply(Reset(99, tuple(items)), 2.0)  # usable afterwards, and converges
    same_catalog(builder.snapshot(), whole.snapshot())


async def test_a_cancelled_sliced_reset_never_publishes_half_a_catalog() -> None:
    items = big_store(300)
    for budget in (0.0, 1e-4, 1e-3):
        src = importer()
        with trio.move_on_after(budget):
            await src.apply_async(Reset(1, tuple(items)))
        if src.version:
            same_catalog(src.builder.snapshot(), one_shot(items, 50.0).snapshot())
        else:
            assert src.builder.snapshot().entries == {}
        src.apply(Reset(1, tuple(items)))
        same_catalog(src.builder.snapshot(), one_shot(items, 50.0).snapshot())


def test_a_relist_with_unchanged_revisions_decodes_nothing(monkeypatch) -> None:
    items = big_store(50)
    builder = one_shot(items, 1.0)
    calls = 0
    import federation.catalog as catalog_module

    real = catalog_module.decode_store_value

    def counting(*args: object) -> object:
        nonlocal calls
        calls += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog_module, "decode_store_value", counting)
    applied = builder.apply(Reset(len(items) + 1, tuple(items)), 2.0)
    assert calls == 0 and not applied.changed
    assert set(builder.last_seen.values()) == {2.0}  # but every cluster is confirmed


def test_snapshots_share_entries_but_never_change() -> None:
    builder = CatalogBuilder(s.LOCAL, "inc-1")
    builder.apply(Put(s.kv(s.endpoint("c1").key(), s.endpoint("c1").to_json(), 1)), 1.0)
    first = builder.snapshot()
    assert builder.snapshot() is first
    builder.apply(Put(s.kv(s.endpoint("c1", eid="e2").key(), s.endpoint("c1").to_json(), 2)), 2.0)
    ep2 = s.endpoint("c1", eid="e2")
    builder.apply(Put(s.kv(ep2.key(), ep2.to_json(), 3)), 3.0)
    second = builder.snapshot()
    assert list(first.entries) == [s.endpoint("c1").key()]
    assert set(second.entries) == {s.endpoint("c1").key(), ep2.key()}
    with pytest.raises(TypeError):
        first.entries[ep2.key()] = ep2  # type: ignore[index]


def test_a_view_catalog_is_not_changed_by_later_deltas() -> None:
    builder = CatalogBuilder(s.LOCAL, "inc-1")
    builder.apply(Put(s.kv(s.endpoint("c1").key(), s.endpoint("c1").to_json(), 1)), 1.0)
    view = CatalogView()
    snap = builder.snapshot()
    view.apply_snapshot(snap)
    ep2 = s.endpoint("c1", eid="e2")
    builder.apply(Put(s.kv(ep2.key(), ep2.to_json(), 2)), 2.0)
    delta = builder.changes_since(1)
    assert delta is not None
    view.apply_delta(delta)
    held = view.catalog
    assert held is not None and held.entries == builder.snapshot().entries
    assert len(snap.entries) == 1
    builder.apply(Put(s.kv(ep2.key(), s.endpoint("c1", eid="e2", port=1).to_json(), 3)), 3.0)
    delta = builder.changes_since(2)
    assert delta is not None
    view.apply_delta(delta)
    assert held.entries[ep2.key()] == ep2  # the catalog handed out before the delta
    assert view.catalog is not None and view.catalog.entries == builder.snapshot().entries


def test_catalog_json_and_snapshot_line_are_the_canonical_bytes() -> None:
    builder = one_shot(big_store(20), 1.0)
    catalog = builder.snapshot()
    assert catalog.to_json() == canonical_json(catalog.to_obj())
    assert catalog.to_json() is catalog.to_json()  # computed once per catalog
    snapshot = Snapshot(catalog.version, catalog)
    assert encode(snapshot) == canonical_json(_message_obj(snapshot)) + b"\n"
    assert Catalog.from_json(catalog.to_json()) == catalog


@pytest.mark.parametrize(
    "key",
    [
        "/meshfed/v1/endpoints/c/n/s/e1",
        "/meshfed/v1/endpoints/c/n/s/..",
        "/meshfed/v1/endpoints/c/n/./e",
        "/meshfed/v1/endpoints/c/n/s",
        "/meshfed/v1/endpoints/c/n/s/e/f",
        "/meshfed/v1/clusters/.a",
        "/meshfed/v1/clusters/..a",
        "/meshfed/v1/clusters/",
        "/meshfed/v1/clusters//",
        "/meshfed/v1/nope/a",
        "/meshfed/v1/clusters/a\n",
        "/meshfed/v1/clusters/a b",
        "/meshfed/v1/clusters/\u00e9",
        "/meshfed/v1/clusters/" + "a" * 253,
        "/meshfed/v1/clusters/" + "a" * 254,
        "/meshfed/v1/clusters/a\x7f",
        "/meshfed/v1/revocations/td/0f",
        "/meshfed/v2/clusters/a",
    ],
)
def test_the_fast_key_parser_agrees_with_keys_parse(key: str) -> None:
    def outcome(parse):  # type: ignore[no-untyped-def]
        try:
            return parse(key)
        except InvalidName as e:
            return str(e)

    assert outcome(_parse_key) == outcome(keys.parse)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint_id", "e1\n"),
        ("address", "gw.example\n"),
        ("cluster", "c1\n"),
        ("address", "10.0.0.1 "),
        ("address", "::ffff:10.0.0.1\n"),
    ],
)
def test_field_checks_refuse_a_trailing_newline(field: str, value: str) -> None:
    obj = json.loads(s.endpoint("c1").to_json())
    obj[field] = value
    with pytest.raises(RecordError) as err:
        EndpointRecord.from_obj(obj)
    assert err.value.field == f"EndpointRecord.{field}"
