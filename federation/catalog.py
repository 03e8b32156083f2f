"""The catalog: what one cluster's agent merges from the store and streams to its proxies.

Pure code, no I/O and no clock (``now`` is an argument). Three parts:

* :class:`CatalogBuilder` (agent side) consumes the store's watch events for
  ``/meshfed/v1/`` and keeps the *visible entries*: every store key whose
  decoded value this cluster may see, under the import rule below. Any change
  to the visible entries bumps ``version`` by exactly one per applied event
  (a Reset counts as one event); anything else never does.
* :class:`Catalog` is an immutable snapshot of those entries, with derived views
  (services -> endpoints, clusters -> gateways, bundles, revocations, policies).
* :class:`CatalogView` (subscriber side) applies a snapshot, then deltas, and
  refuses a delta that does not start at its version (:class:`NeedSnapshot`).

Import rule (what a cluster ``L`` sees):

* clusters, gateways, bundles, revocations and policies: always;
* exports: ``L``'s own, and remote ones whose ``exported_to`` lists ``L`` or ``*``;
* endpoints: ``L``'s own always (local sidecars need them, exported or not);
  a remote endpoint only while its service's export is visible to ``L``;
* a remote gateway's ``healthy_endpoints`` only for services visible to ``L``.

The catalog is a function of the store's content (plus expiry): a value that
fails to decode makes its key absent (reported in :class:`Applied`), so an
agent that restarts builds exactly what a long-running one holds. One
exception, the *local overlay* (:meth:`CatalogBuilder.set_local_overlay`): while
the agent speaks for its cluster, the local cluster's records come from what it
publishes, not from the store round trip, so a re-list or a lease expiry that
removes them from the store while the agent is cut off never removes them here.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

from federation import keys
from federation.model import (
    CLUSTER_KINDS,
    SCHEMA,
    ClusterRecord,
    EndpointRecord,
    Entry,
    ExportRecord,
    GatewayRecord,
    PolicyRecord,
    RecordError,
    canonical_json,
    check_ident_field,
    check_int_field,
    check_label_field,
    check_time_field,
    decode_store_value,
    entry_from_obj,
    entry_to_obj,
    json_type_name,
    strict_loads,
)
from federation.names import InvalidName
from federation.store.api import Delete, KeyValue, Put, Reset, WatchEvent

__all__ = [
    "MAX_CATALOG_BYTES",
    "Applied",
    "BuilderStatistics",
    "Catalog",
    "CatalogBuilder",
    "CatalogView",
    "Change",
    "ClusterView",
    "Delta",
    "NeedSnapshot",
    "Rejected",
    "Service",
    "delta_from_obj",
    "delta_to_obj",
]

MAX_CATALOG_BYTES = 256 << 20
"""Largest persisted catalog :meth:`Catalog.from_json` reads."""


class NeedSnapshot(Exception):
    """A delta does not start where the view is (gap, other epoch, or no snapshot yet).

    The subscriber must drop the delta and fetch a snapshot; applying it would diverge.
    """


@dataclass(frozen=True, slots=True)
class Change:
    """One visible entry that changed."""

    key: str
    """The store key of the entry."""
    value: Entry | None
    """The entry now, or None if it is no longer visible."""


@dataclass(frozen=True)
class Delta:
    """Everything that changed between two versions of one builder's catalog."""

    epoch: str
    """The builder's epoch; versions of different epochs are unrelated."""
    from_version: int
    """The version the delta applies to."""
    to_version: int
    """The version after applying it; ``>= from_version``."""
    changes: tuple[Change, ...]
    """Net changes, one per key, sorted by key; a key added and removed again shows as removed."""
    last_seen: Mapping[str, float]
    """The builder's per-cluster ``last_seen`` at ``to_version`` (replaces the view's)."""


@dataclass(frozen=True)
class Service:
    """A service as this cluster sees it, across every cluster that runs it."""

    namespace: str
    """Namespace of the service."""
    name: str
    """Service name."""
    exports: Mapping[str, ExportRecord]
    """Visible exports by cluster: their ports and protocols."""
    endpoints: tuple[EndpointRecord, ...]
    """Visible endpoints, healthy or not, sorted by (cluster, endpoint_id)."""


@dataclass(frozen=True)
class ClusterView:
    """A cluster as this cluster sees it."""

    name: str
    """Cluster name."""
    record: ClusterRecord | None
    """Its cluster record (None while it has gateways but no record, e.g. mid-start)."""
    gateways: tuple[GatewayRecord, ...]
    """Its gateways, sorted by id, counts filtered to services visible to this cluster."""

    def healthy_endpoints(self, namespace: str, service: str) -> int:
        """Healthy endpoints of a service the cluster reports (the best of its gateways)."""
        return max((gw.healthy_count(namespace, service) for gw in self.gateways), default=0)


@dataclass(frozen=True)
class Catalog:
    """An immutable snapshot of one builder's visible entries at ``version``.

    Equality compares epoch, version, local cluster, entries and last_seen. The
    derived views (``services``, ``clusters``, ...) are computed once, on first use.
    """

    epoch: str
    """Epoch of the builder that made it (its agent incarnation)."""
    version: int
    """Catalog version within the epoch; bumps on every visible change."""
    local_cluster: str
    """The cluster whose view this is."""
    entries: Mapping[str, Entry]
    """Visible entries by store key: the whole content; everything else is derived."""
    last_seen: Mapping[str, float]
    """Per cluster, when its data was last confirmed (agent's clock); see the builder."""

    def __post_init__(self) -> None:
        # Read-only copies: a snapshot must not change after it was handed out.
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))
        seen = MappingProxyType(dict(sorted(self.last_seen.items())))
        object.__setattr__(self, "last_seen", seen)

    @classmethod
    def _wrap(
        cls,
        epoch: str,
        version: int,
        local_cluster: str,
        entries: Mapping[str, Entry],
        last_seen: Mapping[str, float],
    ) -> Catalog:
        """A catalog over ``entries`` without copying them (100k entries cost a copy each).

        The caller hands ``entries`` over: it must never change that mapping again (the
        builder and the view copy it before their next change). Fields are not
        re-validated: they come from a builder or view that already holds them valid.
        """
        self = cls.__new__(cls)
        object.__setattr__(self, "epoch", epoch)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "local_cluster", local_cluster)
        object.__setattr__(self, "entries", MappingProxyType(entries))
        seen = MappingProxyType(dict(sorted(last_seen.items())))
        object.__setattr__(self, "last_seen", seen)
        return self

    @cached_property
    def services(self) -> Mapping[tuple[str, str], Service]:
        """Services by (namespace, name): those with a visible export or endpoint."""
        exports: dict[tuple[str, str], dict[str, ExportRecord]] = {}
        endpoints: dict[tuple[str, str], list[EndpointRecord]] = {}
        for entry in self.entries.values():
            if isinstance(entry, ExportRecord):
                exports.setdefault((entry.namespace, entry.service), {})[entry.cluster] = entry
            elif isinstance(entry, EndpointRecord):
                endpoints.setdefault((entry.namespace, entry.service), []).append(entry)
        out = {}
        for ref in sorted(exports.keys() | endpoints.keys()):
            eps = sorted(endpoints.get(ref, ()), key=lambda e: (e.cluster, e.endpoint_id))
            by_cluster = MappingProxyType(dict(sorted(exports.get(ref, {}).items())))
            out[ref] = Service(ref[0], ref[1], by_cluster, tuple(eps))
        return MappingProxyType(out)

    def endpoints(self, namespace: str, service: str) -> tuple[EndpointRecord, ...]:
        """Visible endpoints of a service (empty if the service is not visible)."""
        found = self.services.get((namespace, service))
        return found.endpoints if found else ()

    @cached_property
    def clusters(self) -> Mapping[str, ClusterView]:
        """Every cluster with a record or a gateway, the local one included."""
        records: dict[str, ClusterRecord] = {}
        gateways: dict[str, list[GatewayRecord]] = {}
        for entry in self.entries.values():
            if isinstance(entry, ClusterRecord):
                records[entry.name] = entry
            elif isinstance(entry, GatewayRecord):
                gateways.setdefault(entry.cluster, []).append(entry)
        out = {}
        for name in sorted(records.keys() | gateways.keys()):
            gws = tuple(sorted(gateways.get(name, ()), key=lambda g: g.gateway_id))
            out[name] = ClusterView(name, records.get(name), gws)
        return MappingProxyType(out)

    @property
    def remote_clusters(self) -> Mapping[str, ClusterView]:
        """:attr:`clusters` without the local one."""
        return MappingProxyType({k: v for k, v in self.clusters.items() if k != self.local_cluster})

    def _raw(self, kind: str) -> dict[tuple[str, ...], bytes]:
        root = keys.ROOT + kind + "/"
        return {
            tuple(key[len(root) :].split("/")): value
            for key, value in sorted(self.entries.items())
            if key.startswith(root) and isinstance(value, bytes)
        }

    @cached_property
    def bundles(self) -> Mapping[str, bytes]:
        """Raw SPIFFE bundle documents by trust domain (validated by trust/, not here)."""
        return MappingProxyType({parts[0]: v for parts, v in self._raw("bundles").items()})

    @cached_property
    def revocations(self) -> Mapping[tuple[str, str], bytes]:
        """Raw revocation documents by (trust domain, serial)."""
        return MappingProxyType(
            {(parts[0], parts[1]): v for parts, v in self._raw("revocations").items()}
        )

    @cached_property
    def policies(self) -> Mapping[str, PolicyRecord]:
        """Policies by name."""
        return MappingProxyType(
            {e.name: e for _, e in sorted(self.entries.items()) if isinstance(e, PolicyRecord)}
        )

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form (what :meth:`to_json` writes and Snapshot messages carry)."""
        return {
            "schema": SCHEMA,
            "epoch": self.epoch,
            "version": self.version,
            "local_cluster": self.local_cluster,
            "last_seen": dict(self.last_seen),
            "entries": {key: entry_to_obj(self.entries[key]) for key in sorted(self.entries)},
        }

    def to_json(self) -> bytes:
        """Canonical JSON for persisting to disk (write it atomically: temp file + rename).

        Computed once per catalog (about 1 s at 100k entries): persisting and the
        stream's Snapshot message share it.
        """
        return self._canonical

    @cached_property
    def _canonical(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_obj(cls, obj: object) -> Catalog:
        """Validate and rebuild a catalog; every entry is checked as the store's would be."""
        if not isinstance(obj, dict):
            raise RecordError("Catalog", f"must be a JSON object, got {json_type_name(obj)}")
        for name in ("schema", "epoch", "version", "local_cluster", "last_seen", "entries"):
            if obj.get(name) is None:
                raise RecordError(f"Catalog.{name}", "is required")
        if obj["schema"] != SCHEMA or isinstance(obj["schema"], bool):
            raise RecordError("Catalog.schema", f"unsupported schema {obj['schema']!r}")
        last_seen = _checked_last_seen(obj["last_seen"], "Catalog.last_seen")
        raw_entries = obj["entries"]
        if not isinstance(raw_entries, dict):
            raise RecordError(
                "Catalog.entries", f"must be an object, got {json_type_name(raw_entries)}"
            )
        entries = {}
        for key, value in raw_entries.items():
            try:
                entries[key] = entry_from_obj(key, value)
            except RecordError as e:
                raise RecordError(f"Catalog.entries[{key!r}] {e.field}", e.reason) from None
        return cls(
            epoch=check_ident_field(obj["epoch"], "Catalog.epoch"),
            version=check_int_field(obj["version"], "Catalog.version", 0, 1 << 62),
            local_cluster=check_label_field(obj["local_cluster"], "Catalog.local_cluster"),
            entries=entries,
            last_seen=last_seen,
        )

    @classmethod
    def from_json(cls, data: bytes) -> Catalog:
        """Inverse of :meth:`to_json`; raises RecordError naming what is wrong."""
        return cls.from_obj(strict_loads(data, "Catalog", MAX_CATALOG_BYTES))


def _checked_last_seen(value: object, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise RecordError(where, f"must be an object, got {json_type_name(value)}")
    return {
        check_label_field(name, where): check_time_field(when, f"{where}[{name!r}]")
        for name, when in value.items()
    }


def delta_to_obj(delta: Delta) -> dict[str, Any]:
    """JSON-able form of a delta (the stream codec wraps it in a message)."""
    changes: list[dict[str, Any]] = []
    for change in delta.changes:
        if change.value is None:
            changes.append({"key": change.key, "deleted": True})
        else:
            changes.append({"key": change.key, "value": entry_to_obj(change.value)})
    return {
        "epoch": delta.epoch,
        "from_version": delta.from_version,
        "to_version": delta.to_version,
        "changes": changes,
        "last_seen": dict(delta.last_seen),
    }


def delta_from_obj(obj: dict[str, Any]) -> Delta:
    """Validate and rebuild a delta; each changed entry is checked as the store's would be."""
    for name in ("epoch", "from_version", "to_version", "changes", "last_seen"):
        if obj.get(name) is None:
            raise RecordError(f"Delta.{name}", "is required")
    from_version = check_int_field(obj["from_version"], "Delta.from_version", 0, 1 << 62)
    to_version = check_int_field(obj["to_version"], "Delta.to_version", from_version, 1 << 62)
    raw_changes = obj["changes"]
    if not isinstance(raw_changes, list):
        raise RecordError("Delta.changes", f"must be an array, got {json_type_name(raw_changes)}")
    changes = []
    seen: set[str] = set()
    for i, item in enumerate(raw_changes):
        where = f"Delta.changes[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise RecordError(where, "must be an object with a string 'key'")
        key = item["key"]
        if key in seen:
            raise RecordError(where, f"changes {key!r} twice")
        seen.add(key)
        if item.get("deleted") is True:
            try:
                keys.parse(key)
            except InvalidName as e:
                raise RecordError(where, str(e)) from None
            changes.append(Change(key, None))
            continue
        if "value" not in item:
            raise RecordError(where, "needs 'value' or 'deleted': true")
        try:
            changes.append(Change(key, entry_from_obj(key, item["value"])))
        except RecordError as e:
            raise RecordError(f"{where} {e.field}", e.reason) from None
    return Delta(
        epoch=check_ident_field(obj["epoch"], "Delta.epoch"),
        from_version=from_version,
        to_version=to_version,
        changes=tuple(sorted(changes, key=lambda c: c.key)),
        last_seen=MappingProxyType(_checked_last_seen(obj["last_seen"], "Delta.last_seen")),
    )


# --- the builder ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejected:
    """A store key the builder could not use; log it with the reason and count it."""

    key: str
    """The store key (truncated to 300 characters)."""
    reason: str
    """Why: an unparsable key or the RecordError of its value."""


@dataclass(frozen=True, slots=True)
class Applied:
    """What one :meth:`CatalogBuilder.apply` did."""

    version: int
    """The builder's version afterwards."""
    changed: bool
    """True if the visible catalog changed (and ``version`` was bumped by one)."""
    rejected: tuple[Rejected, ...]
    """Keys that were ignored (bad key) or made absent (bad value) by this event."""
    lags: tuple[tuple[str, float], ...]
    """(cluster, now - written_at) for each put record that carried ``written_at``;
    empty for a Reset, whose records may be old by design. For sync-lag metrics."""


@dataclass(frozen=True, slots=True)
class BuilderStatistics:
    """Counters of a builder, for metrics."""

    version: int
    """Current catalog version."""
    entries: int
    """Visible entries."""
    held_keys: int
    """Store keys held (visible or not, decodable or not)."""
    ignored_keys: int
    """Events ignored because the key is not a v1 key (total)."""
    bad_values: int
    """Events whose value failed to decode or did not match its key (total)."""
    resets: int
    """Resets applied."""
    expired_clusters: int
    """Remote clusters dropped by :meth:`CatalogBuilder.expire_remote` (total)."""
    log_versions: int
    """Versions currently reachable by :meth:`CatalogBuilder.changes_since`."""


DEFAULT_SLICE_RECORDS = 1000
"""Records decoded per slice of a stepwise Reset (:meth:`CatalogBuilder.apply_steps`)."""


@dataclass(slots=True)
class _LogEntry:
    to_version: int
    changes: dict[str, Entry | None]


class CatalogBuilder:
    """Merges store watch events into this cluster's catalog (sans-IO; the agent drives it).

    ``epoch`` names this builder's version sequence; pass the agent's incarnation id
    so a subscriber that reconnects to a restarted agent is sent a snapshot, never
    a delta from an unrelated history.

    ``last_seen[c]`` is when cluster ``c``'s data was last confirmed: a Put from
    ``c``, a Reset holding ``c``'s keys, or :meth:`mark_store_live`. Deletes do not
    count (lease expiry is the store's doing, not ``c``'s).
    """

    def __init__(
        self,
        local_cluster: str,
        epoch: str,
        *,
        log_versions: int = 1024,
        log_changes: int = 100_000,
    ) -> None:
        try:
            check_label_field(local_cluster, "local_cluster")
            check_ident_field(epoch, "epoch")
        except RecordError as e:
            raise ValueError(str(e)) from None
        if log_versions < 0 or log_changes < 0:
            raise ValueError("log limits must be >= 0")
        self.local_cluster = local_cluster
        self.epoch = epoch
        self._log_versions = log_versions
        self._log_changes = log_changes
        self._version = 0
        self._synced = False
        self._held: dict[str, KeyValue] = {}
        self._records: dict[str, Entry] = {}
        self._visible: dict[str, Entry] = {}
        self._endpoints_of: dict[tuple[str, str, str], set[str]] = {}
        self._gateways_of: dict[str, set[str]] = {}
        self._keys_of_cluster: dict[str, set[str]] = {}
        # The local overlay: records standing in for the local cluster's keys (None: off).
        self._overlay: dict[str, Entry] | None = None
        self._local_cluster_key = keys.cluster(local_cluster)
        self._local_prefixes = tuple(
            f"{keys.ROOT}{kind}/{local_cluster}/" for kind in CLUSTER_KINDS if kind != "clusters"
        )
        self._last_seen: dict[str, float] = {}
        self._log: deque[_LogEntry] = deque()
        self._log_size = 0
        self._snapshot: Catalog | None = None
        # Copy-on-write: True while ``_visible`` is the very dict a handed-out snapshot
        # wraps; the next change copies it first, so snapshots cost no copy.
        self._visible_shared = False
        # True while a stepwise Reset is between slices: other mutations must wait.
        self._busy = False
        self._ignored_keys = 0
        self._bad_values = 0
        self._resets = 0
        self._expired = 0

    @property
    def version(self) -> int:
        """Current catalog version (0 before anything visible arrived)."""
        return self._version

    @property
    def synced(self) -> bool:
        """True once the first Reset was applied: the start-up sync gate."""
        return self._synced

    @property
    def last_seen(self) -> Mapping[str, float]:
        """Per-cluster confirmation times (a read-only copy)."""
        return MappingProxyType(dict(self._last_seen))

    @property
    def busy(self) -> bool:
        """True while a stepwise Reset is between slices (mutations must wait for it)."""
        return self._busy

    # -- the local overlay --

    @property
    def local_overlay(self) -> Mapping[str, Entry] | None:
        """The records standing in for the local cluster's keys, or None (from the store)."""
        return None if self._overlay is None else MappingProxyType(self._overlay)

    def is_local_key(self, key: str) -> bool:
        """True for the local cluster's record, gateway, export and endpoint keys."""
        return key == self._local_cluster_key or key.startswith(self._local_prefixes)

    def set_local_overlay(self, records: Mapping[str, Entry] | None) -> bool:
        """Take the local cluster's records from ``records`` instead of the store.

        While an overlay is set, every local cluster-scoped key (cluster record,
        gateways, exports, endpoints) is visible exactly as ``records`` says (under the
        import rule), whatever the store holds: a Reset or a Delete of a local key
        changes nothing visible, and a local key the store holds but ``records`` lacks
        is not visible. ``None`` turns the overlay off: the local keys are the store's
        again. Remote clusters, bundles, revocations and policies always come from the
        store, and what is *held* from the store (``last_seen``, expiry, Reset diffs)
        is unaffected. Changes go through the same version log as store events: one
        bump if anything visible changed (returned True), none otherwise.

        Raises ValueError for a key that is not a local cluster-scoped key, a value
        that is not a cluster/gateway/export/endpoint record, or a record stored under
        a key that is not its own.
        """
        self._check_idle()
        new: dict[str, Entry] | None = None
        if records is not None:
            new = dict(records)
            for key, entry in new.items():
                if not self.is_local_key(key):
                    raise ValueError(f"overlay key {key!r} is not one of {self.local_cluster}'s")
                local_kinds = ClusterRecord | GatewayRecord | ExportRecord | EndpointRecord
                if not isinstance(entry, local_kinds) or entry.key() != key:
                    raise ValueError(f"overlay value for {key!r} is not that key's record")
        old = self._overlay
        affected: set[str] = set()
        if old is None or new is None:
            # The source of the local keys changes (or stays the store): every local key
            # on either side may change.
            affected.update(self._keys_of_cluster.get(self.local_cluster, ()))
            affected.update(old or ())
            affected.update(new or ())
        else:
            affected.update(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        self._overlay = new
        return self._publish(affected)

    # -- events --

    def apply(self, event: WatchEvent, now: float) -> Applied:
        """Apply one watch event. Never raises on bad data: bad keys/values are reported."""
        steps = self.apply_steps(event, now)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                applied: Applied = done.value
                return applied

    def apply_steps(
        self, event: WatchEvent, now: float, *, slice_records: int = DEFAULT_SLICE_RECORDS
    ) -> Generator[None, None, Applied]:
        """Apply one watch event in slices: a generator that yields between slices.

        Drive it with ``next()`` until ``StopIteration``, whose ``value`` is the
        :class:`Applied`; a caller on an event loop checkpoints at every yield. Only
        a Reset is sliced (about ``slice_records`` decoded records per slice, a few
        milliseconds); a Put or Delete is applied at the first ``next()``.

        Until it returns, readers (:meth:`snapshot`, :meth:`changes_since`,
        ``version``, ``synced``, ``last_seen``) see the catalog as it was before the
        event, never half of it: changed values are decoded first, then the indexes
        are updated, then the visible entries are swapped in one step. Mutating
        calls (``apply``, ``expire_remote``, ``mark_store_live``) raise RuntimeError
        meanwhile. Closing the generator early (e.g. on cancellation) abandons the
        Reset if no index was touched yet, and otherwise finishes it synchronously,
        so the builder is never left half-applied.
        """
        self._check_idle()
        if not isinstance(event, Reset):
            affected: set[str] = set()
            rejected: list[Rejected] = []
            lags: list[tuple[str, float]] = []
            self._raw_event(event, now, affected, rejected, lags)
            changed = self._publish(affected)
            return Applied(self._version, changed, tuple(rejected), tuple(lags))
        self._busy = True
        try:
            return (yield from self._reset_steps(event, now, max(1, slice_records)))
        finally:
            self._busy = False

    def _reset_steps(
        self, event: Reset, now: float, slice_records: int
    ) -> Generator[None, None, Applied]:
        # Work units: decoding a record costs about 8 times a key whose mod_revision
        # is unchanged (a re-list after a reconnect is mostly such keys: not decoded).
        budget = slice_records * 8
        cost = 0
        held = self._held
        fresh: dict[str, KeyValue] = {}
        items = event.items
        for start in range(0, len(items), budget):
            fresh.update((kv.key, kv) for kv in items[start : start + budget])
            yield
        staged: list[tuple[KeyValue, keys.ParsedKey | InvalidName, Entry | RecordError]] = []
        # 1. Decode what changed. Nothing is mutated: closing here abandons the Reset.
        for key, kv in fresh.items():
            old = held.get(key)
            if old is not None and old.mod_revision == kv.mod_revision:
                cost += 1
            else:
                staged.append(_decode(kv))
                cost += 8
            if cost >= budget:
                cost = 0
                yield
        deleted = [key for key in held if key not in fresh]
        # 2. Update held keys, records and indexes; readers only ever see ``_visible``.
        # From here on a close finishes the work without yielding again.
        closing = False
        affected: set[str] = set()
        rejected: list[Rejected] = []
        for key in deleted:
            self._forget(key, affected, touch_seen=False)
            cost += 1
            if cost >= budget and not closing:
                cost = 0
                try:
                    yield
                except GeneratorExit:
                    closing = True
        for kv, parsed, decoded in staged:
            self._put(kv, parsed, decoded, affected, rejected)
            cost += 2
            if cost >= budget and not closing:
                cost = 0
                try:
                    yield
                except GeneratorExit:
                    closing = True
        # Freeing 100k staged tuples takes a while too: a slice of its own.
        if not closing:
            try:
                yield
            except GeneratorExit:
                closing = True
        del staged, fresh, deleted
        if not closing:
            try:
                yield
            except GeneratorExit:
                closing = True
        # 3. Work out the visible changes.
        changes: dict[str, Entry | None] = {}
        for key in affected:
            self._visible_change(key, changes)
            cost += 2
            if cost >= budget and not closing:
                cost = 0
                try:
                    yield
                except GeneratorExit:
                    closing = True
        # 4. Swap, in one step. The store vouches for every key it holds right now:
        # each cluster with a held key is confirmed, one whose keys all went is forgotten.
        self._resets += 1
        self._synced = True
        self._last_seen = dict.fromkeys(self._keys_of_cluster, now)
        changed = self._commit(changes)
        rejected.sort(key=lambda r: r.key)
        return Applied(self._version, changed, tuple(rejected), ())

    def _check_idle(self) -> None:
        if self._busy:
            raise RuntimeError("a stepwise Reset is being applied; finish it first")

    def mark_store_live(self, now: float) -> None:
        """The watch is known to be live at ``now`` (e.g. an etcd progress notification).

        Every cluster with data is then current: a quiet but healthy cluster's
        leased keys would have vanished if it were gone. Without this, a cluster that
        writes nothing for ``limit`` seconds would be expired by :meth:`expire_remote`.
        """
        self._check_idle()
        for cluster in self._keys_of_cluster:
            self._last_seen[cluster] = now

    def expire_remote(self, now: float, limit: float | None) -> tuple[str, ...]:
        """Drop every remote cluster whose data was last confirmed more than ``limit`` ago.

        Drops its cluster record, gateways, exports and endpoints (held and
        visible), so a later Reset brings them back if they still exist. Bundles,
        revocations and policies are mesh-wide and never expire: dropping a
        revocation because its publisher went quiet would fail open. ``limit=None``
        turns expiry off. Returns the expired clusters; bumps the version if visible.
        """
        self._check_idle()
        if limit is None:
            return ()
        expired = tuple(
            sorted(
                c
                for c, seen in self._last_seen.items()
                if c != self.local_cluster and now - seen > limit
            )
        )
        affected: set[str] = set()
        for cluster in expired:
            for key in sorted(self._keys_of_cluster.get(cluster, ())):
                self._forget(key, affected)
            self._last_seen.pop(cluster, None)
        self._expired += len(expired)
        self._publish(affected)
        return expired

    # -- reading --

    def snapshot(self) -> Catalog:
        """The catalog at the current version (cached until the next change)."""
        if self._snapshot is None or self._snapshot.last_seen != self._last_seen:
            # Shares ``_visible`` (no copy of 100k entries per version); see _commit.
            self._snapshot = Catalog._wrap(
                self.epoch, self._version, self.local_cluster, self._visible, self._last_seen
            )
            self._visible_shared = True
        return self._snapshot

    def changes_since(self, version: int, epoch: str | None = None) -> Delta | None:
        """The net changes from ``version`` to now, or None if the caller needs a snapshot.

        None when ``epoch`` is given and is not this builder's, when ``version`` is
        ahead of this builder, or when it is older than the bounded change log.
        ``version == self.version`` gives an empty delta (only ``last_seen`` news).
        """
        if epoch is not None and epoch != self.epoch:
            return None
        if version > self._version or version < 0:
            return None
        merged: dict[str, Entry | None] = {}
        if version < self._version:
            if not self._log or self._log[0].to_version - 1 > version:
                return None
            for entry in self._log:
                if entry.to_version > version:
                    merged.update(entry.changes)
        return Delta(
            epoch=self.epoch,
            from_version=version,
            to_version=self._version,
            changes=tuple(Change(k, merged[k]) for k in sorted(merged)),
            last_seen=MappingProxyType(dict(sorted(self._last_seen.items()))),
        )

    def statistics(self) -> BuilderStatistics:
        return BuilderStatistics(
            version=self._version,
            entries=len(self._visible),
            held_keys=len(self._held),
            ignored_keys=self._ignored_keys,
            bad_values=self._bad_values,
            resets=self._resets,
            expired_clusters=self._expired,
            log_versions=len(self._log),
        )

    # -- internals --

    def _raw_event(
        self,
        event: Put | Delete,
        now: float,
        affected: set[str],
        rejected: list[Rejected],
        lags: list[tuple[str, float]],
    ) -> None:
        if isinstance(event, Delete):
            self._forget(event.key, affected)
            return
        kv = event.kv
        _, parsed, decoded = staged = _decode(kv)
        self._put(*staged, affected, rejected)
        if isinstance(parsed, InvalidName) or parsed.kind not in CLUSTER_KINDS:
            return
        cluster = parsed.parts[0]
        self._last_seen[cluster] = now
        written_at = None if isinstance(decoded, bytes | RecordError) else decoded.written_at
        if written_at is not None:
            lags.append((cluster, now - written_at))

    def _put(
        self,
        kv: KeyValue,
        parsed: keys.ParsedKey | InvalidName,
        decoded: Entry | RecordError,
        affected: set[str],
        rejected: list[Rejected],
    ) -> None:
        """Hold a put key and record its decoded value (or its absence); no ``last_seen``."""
        key = kv.key
        self._held[key] = kv
        if isinstance(parsed, InvalidName):
            # Held anyway so the next Reset's diff does not report it again as new.
            self._ignored_keys += 1
            rejected.append(Rejected(key[:300], str(parsed)))
            return
        if parsed.kind in CLUSTER_KINDS:
            self._keys_of_cluster.setdefault(parsed.parts[0], set()).add(key)
        if isinstance(decoded, RecordError):
            self._bad_values += 1
            rejected.append(Rejected(key[:300], str(decoded)))
            self._drop_record(key, affected)
            return
        # A replaced record needs no unindexing: the key fixes its index entries.
        self._set_record(key, decoded, affected)

    def _forget(self, key: str, affected: set[str], *, touch_seen: bool = True) -> None:
        """Remove a key entirely (deleted, or expired)."""
        self._held.pop(key, None)
        cluster = _cluster_of(key)
        if cluster is not None:
            owned = self._keys_of_cluster.get(cluster)
            if owned is not None:
                owned.discard(key)
                if not owned:
                    del self._keys_of_cluster[cluster]
                    # Nothing left to confirm: forget when it was last heard of too.
                    if touch_seen:
                        self._last_seen.pop(cluster, None)
        self._drop_record(key, affected)

    def _set_record(self, key: str, entry: Entry, affected: set[str]) -> None:
        self._records[key] = entry
        affected.add(key)
        if isinstance(entry, EndpointRecord):
            ref = (entry.cluster, entry.namespace, entry.service)
            self._endpoints_of.setdefault(ref, set()).add(key)
        elif isinstance(entry, GatewayRecord):
            self._gateways_of.setdefault(entry.cluster, set()).add(key)
        elif isinstance(entry, ExportRecord):
            self._affect_export(entry.cluster, entry.namespace, entry.service, affected)

    def _drop_record(self, key: str, affected: set[str]) -> None:
        entry = self._records.pop(key, None)
        affected.add(key)
        if isinstance(entry, EndpointRecord):
            ref = (entry.cluster, entry.namespace, entry.service)
            _discard(self._endpoints_of, ref, key)
        elif isinstance(entry, GatewayRecord):
            _discard(self._gateways_of, entry.cluster, key)
        elif isinstance(entry, ExportRecord):
            self._affect_export(entry.cluster, entry.namespace, entry.service, affected)

    def _affect_export(
        self, cluster: str, namespace: str, service: str, affected: set[str]
    ) -> None:
        # An export decides the visibility of its endpoints and of its cluster's gateway counts.
        affected.update(self._endpoints_of.get((cluster, namespace, service), ()))
        affected.update(self._gateways_of.get(cluster, ()))

    def _imports(self, cluster: str, namespace: str, service: str) -> bool:
        if cluster == self.local_cluster:
            return True
        export = self._records.get(f"{keys.ROOT}exports/{cluster}/{namespace}/{service}")
        return isinstance(export, ExportRecord) and export.exports_to(self.local_cluster)

    def _visible_value(self, key: str) -> Entry | None:
        if self._overlay is not None and self.is_local_key(key):
            entry = self._overlay.get(key)
        else:
            entry = self._records.get(key)
        if isinstance(entry, EndpointRecord):
            return entry if self._imports(entry.cluster, entry.namespace, entry.service) else None
        if isinstance(entry, ExportRecord):
            return entry if entry.exports_to(self.local_cluster) else None
        if isinstance(entry, GatewayRecord) and entry.cluster != self.local_cluster:
            counts = {
                ref: n
                for ref, n in entry.healthy_endpoints.items()
                if self._imports(entry.cluster, *ref.split("/", 1))
            }
            if len(counts) != len(entry.healthy_endpoints):
                return dataclasses.replace(entry, healthy_endpoints=counts)
        return entry

    def _visible_change(self, key: str, changes: dict[str, Entry | None]) -> None:
        new = self._visible_value(key)
        old = self._visible.get(key)
        if new is None:
            if old is not None:
                changes[key] = None
        elif old is None or old != new:
            # Equal content (written_at aside) keeps the old entry, so one version
            # always denotes the same bytes.
            changes[key] = new

    def _publish(self, affected: set[str]) -> bool:
        """Recompute visibility of ``affected`` keys; bump and log if anything visible changed."""
        changes: dict[str, Entry | None] = {}
        for key in affected:
            self._visible_change(key, changes)
        return self._commit(changes)

    def _commit(self, changes: dict[str, Entry | None]) -> bool:
        """Make ``changes`` visible as the next version (nothing if empty)."""
        if not changes:
            return False
        if not self._visible:
            # Nothing visible yet (the first sync): every change is an addition.
            self._visible = changes.copy()  # type: ignore[assignment]
            self._visible_shared = False
        else:
            if self._visible_shared:
                self._visible = self._visible.copy()
                self._visible_shared = False
            visible = self._visible
            for key, value in changes.items():
                if value is None:
                    del visible[key]
                else:
                    visible[key] = value
        self._version += 1
        self._snapshot = None
        self._log.append(_LogEntry(self._version, changes))
        self._log_size += len(changes)
        while self._log and (
            len(self._log) > self._log_versions or self._log_size > self._log_changes
        ):
            self._log_size -= len(self._log.popleft().changes)
        return True


def _discard(index: dict[Any, set[str]], ref: Any, key: str) -> None:
    keys_ = index.get(ref)
    if keys_ is not None:
        keys_.discard(key)
        if not keys_:
            del index[ref]


def _cluster_of(key: str) -> str | None:
    """The owning cluster of a cluster-scoped v1 key, else None (no validation beyond shape)."""
    if not key.startswith(keys.ROOT):
        return None
    kind = key[len(keys.ROOT) :].partition("/")[0]
    if kind not in CLUSTER_KINDS:
        return None
    try:
        return _parse_key(key).parts[0]
    except InvalidName:
        return None


# A v1 key that keys.parse accepts without a closer look: a known kind, then segments of
# printable ASCII other than '/' (at most 253 bytes each), none of them '.' or '..'.
# The segment count is checked against the kind's layout after the match.
_SEGMENT = r"(?!\.\.?(?:/|$))[!-.0-~]{1,253}"
_KEY_FAST_RE = re.compile(
    re.escape(keys.ROOT) + rf"({'|'.join(keys.LAYOUT)})/({_SEGMENT}(?:/{_SEGMENT})*)"
)


def _parse_key(key: str) -> keys.ParsedKey:
    """:func:`keys.parse` with a fast path for plain ASCII keys (same result, same errors)."""
    match = _KEY_FAST_RE.fullmatch(key)
    if match is not None:
        kind = match[1]
        parts = tuple(match[2].split("/"))
        if len(parts) == len(keys.LAYOUT[kind]):
            return keys.ParsedKey(kind, parts)
    return keys.parse(key)


def _decode(
    kv: KeyValue,
) -> tuple[KeyValue, keys.ParsedKey | InvalidName, Entry | RecordError]:
    """Parse a put key and decode its value; errors are returned, not raised."""
    try:
        parsed = _parse_key(kv.key)
    except InvalidName as e:
        return kv, e, RecordError("key", str(e))
    try:
        return kv, parsed, decode_store_value(parsed, kv.value)
    except RecordError as e:
        return kv, parsed, e


# --- the subscriber side ------------------------------------------------------------------


class CatalogView:
    """A subscriber's catalog: a snapshot, then deltas that must chain exactly.

    ``apply_delta`` refuses (:class:`NeedSnapshot`) a delta of another epoch or one
    whose ``from_version`` is not this view's version, and leaves the view as it was.
    """

    def __init__(self) -> None:
        self._epoch: str | None = None
        self._version: int | None = None
        self._local: str = ""
        self._entries: Mapping[str, Entry] = {}
        # ``_entries`` when this view may change it in place; None while it is shared
        # with a handed-out catalog (copied at the next delta, not at every snapshot).
        self._owned: dict[str, Entry] | None = None
        self._last_seen: Mapping[str, float] = MappingProxyType({})
        self._catalog: Catalog | None = None

    @property
    def version(self) -> int | None:
        """Version held, None before the first snapshot."""
        return self._version

    @property
    def epoch(self) -> str | None:
        """Epoch held, None before the first snapshot."""
        return self._epoch

    @property
    def catalog(self) -> Catalog | None:
        """The catalog held (built lazily after deltas), None before the first snapshot."""
        if self._catalog is None and self._version is not None and self._epoch is not None:
            self._catalog = Catalog._wrap(
                self._epoch, self._version, self._local, self._entries, self._last_seen
            )
            self._owned = None
        return self._catalog

    def apply_snapshot(self, catalog: Catalog) -> None:
        """Replace everything with ``catalog`` (any epoch, any version)."""
        self._epoch = catalog.epoch
        self._version = catalog.version
        self._local = catalog.local_cluster
        # Copied lazily, at the first delta: a snapshot is often replaced by the next one.
        self._entries = catalog.entries
        self._owned = None
        self._last_seen = catalog.last_seen
        self._catalog = catalog

    def apply_delta(self, delta: Delta) -> None:
        """Apply ``delta``; raise NeedSnapshot (changing nothing) if it does not chain."""
        if self._version is None:
            raise NeedSnapshot("no snapshot yet")
        if delta.epoch != self._epoch:
            raise NeedSnapshot(f"delta of epoch {delta.epoch!r}, view holds {self._epoch!r}")
        if delta.from_version != self._version:
            raise NeedSnapshot(
                f"delta from version {delta.from_version}, view holds {self._version}"
            )
        entries = self._owned
        if entries is None:
            entries = self._owned = dict(self._entries)
            self._entries = entries
        for change in delta.changes:
            if change.value is None:
                entries.pop(change.key, None)
            else:
                entries[change.key] = change.value
        self._version = delta.to_version
        self._last_seen = MappingProxyType(dict(delta.last_seen))
        self._catalog = None
