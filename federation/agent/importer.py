"""The importing side of the agent: one store watch into a CatalogBuilder (a CatalogSource).

* One watch on ``/meshfed/v1/``; every event goes to :class:`CatalogBuilder`
  (a Reset is diffed, so a re-list after an outage or a compaction neither loses
  deletes nor duplicates anything: an unchanged key changes no version).
* Trust bundles go through trust's :class:`BundleKeeper`: a refused bundle
  (rollback, conflict, foreign root, malformed) is counted and the catalog keeps
  serving the last good document for that domain, so proxies never see it.
* Static stability: the catalog is persisted to ``<state-dir>/catalog.json``
  (atomically) after the first sync, and loaded at start. Until the first Reset
  the source serves the persisted catalog under its own (old) epoch, not synced;
  after it, the builder's catalog under the new epoch (subscribers resnapshot).
* Its own cluster's records come from the publisher, not the store round trip
  (:meth:`CatalogImporter.set_local_records`, the builder's local overlay): while
  the agent speaks for its cluster, a Reset that lacks its expired keys or the
  Deletes of a lease expiry change nothing its local sidecars see; a record the
  agent withdraws leaves at once. Remote clusters come only from the store.
* ``degraded`` mirrors :class:`StoreHealth`; waiters are woken on every change
  of version, synced or degraded.
* A Reset (100k keys on a full re-list) is applied in slices with a checkpoint
  between them (:meth:`CatalogBuilder.apply_steps`), so the trio loop keeps
  serving; readers see the old catalog until the whole Reset is in. Builder
  mutations (events, expiry, liveness) take ``_builder_lock`` so housekeeping
  waits for a Reset in progress instead of interleaving with it.

Clock: the builder's ``now`` is the wall clock (``last_seen`` and sync lag are
compared with other machines' ``written_at``); sleeps use trio.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final, NoReturn

import trio

from federation import keys
from federation.agent.health import StoreHealth
from federation.agent.metrics import AgentMetrics
from federation.catalog import (
    DEFAULT_SLICE_RECORDS,
    Applied,
    Catalog,
    CatalogBuilder,
    Change,
    Delta,
)
from federation.model import Entry, RecordError
from federation.names import InvalidName
from federation.store.api import KeyValue, Put, Reset, Store, WatchEvent, apply_events, diff_reset
from trust.atomicfile import write_atomic
from trust.bundle import Accepted, BundleKeeper
from trust.spiffe import TrustDomain

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.json"
BUNDLES_PREFIX = keys.prefix("bundles")


# -- persistence (synchronous file I/O; run it in a worker thread from trio) ----------------


def load_persisted(state_dir: Path, local_cluster: str) -> tuple[Catalog | None, str]:
    """The persisted catalog (or None) and a one-line note on what happened."""
    path = state_dir / CATALOG_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"no persisted catalog at {path}"
    except OSError as exc:
        return None, f"{path} unreadable ({exc.strerror}); starting empty"
    try:
        catalog = Catalog.from_json(data)
    except RecordError as exc:
        return None, f"{path} is not a valid catalog ({exc}); starting empty"
    if catalog.local_cluster != local_cluster:
        return None, f"{path} is cluster {catalog.local_cluster}'s catalog; ignoring it"
    return catalog, f"loaded {path}: version {catalog.version}, {len(catalog.entries)} entries"


async def _in_thread(fn: Callable[[], None]) -> None:
    await trio.to_thread.run_sync(fn)


class _Nothing:
    """No local records waiting to be applied."""


_NOTHING: Final = _Nothing()


# -- the source -------------------------------------------------------------------------------


class CatalogImporter:
    """This cluster's catalog, fed by the store watch; the stream server's CatalogSource."""

    def __init__(
        self,
        local_cluster: str,
        epoch: str,
        *,
        health: StoreHealth,
        metrics: AgentMetrics,
        keeper: BundleKeeper | None = None,
        preloaded: Catalog | None = None,
        state_dir: Path | None = None,
        remote_stale_after: float | None = None,
        wall: Callable[[], float] = time.time,
        persist_interval: float = 1.0,
        file_io: Callable[[Callable[[], None]], Awaitable[None]] | None = None,
        slice_records: int = DEFAULT_SLICE_RECORDS,
    ) -> None:
        self.builder = CatalogBuilder(local_cluster, epoch)
        self._slice_records = slice_records
        self._builder_lock = trio.Lock()
        self.health = health
        self.metrics = metrics
        self.keeper = keeper if keeper is not None else BundleKeeper()
        self.preloaded = preloaded
        self.state_dir = state_dir
        self.remote_stale_after = remote_stale_after
        self._wall = wall
        self._persist_interval = persist_interval
        # Disk writes go to a worker thread; MockClock tests pass an inline runner,
        # since virtual time would race ahead of a real thread.
        self._file_io = file_io if file_io is not None else _in_thread
        self._changed = trio.Event()
        self._bundles_held: dict[str, KeyValue] = {}
        self._good_bundles: dict[str, bytes] = {}
        self._bundle_gen = 0
        self._filtered: tuple[int, int, Catalog, Catalog] | None = None
        self._watch_fresh = False
        self._persisted_version: tuple[str, int] | None = None
        self.persist_count = 0
        self.events_applied = 0
        self._local_pending: Mapping[str, Entry] | _Nothing | None = _NOTHING
        health.subscribe(self._on_health)

    # -- CatalogSource --

    @property
    def epoch(self) -> str:
        if not self.builder.synced and self.preloaded is not None:
            return self.preloaded.epoch
        return self.builder.epoch

    @property
    def version(self) -> int:
        if not self.builder.synced and self.preloaded is not None:
            return self.preloaded.version
        return self.builder.version

    @property
    def synced(self) -> bool:
        return self.builder.synced

    @property
    def degraded(self) -> bool:
        return not self.health.up

    def snapshot(self) -> Catalog:
        if not self.builder.synced and self.preloaded is not None:
            return self.preloaded
        raw = self.builder.snapshot()
        cached = self._filtered
        if cached is not None and cached[0] == self._bundle_gen and cached[2] is raw:
            return cached[3]
        out = self._with_good_bundles(raw)
        self._filtered = (self._bundle_gen, 0, raw, out)
        return out

    def changes_since(self, version: int, epoch: str | None = None) -> Delta | None:
        if not self.builder.synced and self.preloaded is not None:
            pre = self.preloaded
            if epoch == pre.epoch and version == pre.version:
                return Delta(pre.epoch, version, version, (), pre.last_seen)
            return None
        delta = self.builder.changes_since(version, epoch)
        if delta is None:
            return None
        changes = tuple(self._good_change(c) for c in delta.changes)
        return Delta(delta.epoch, delta.from_version, delta.to_version, changes, delta.last_seen)

    async def wait_changed(self, version: int, synced: bool, degraded: bool) -> None:
        while (self.version, self.synced, self.degraded) == (version, synced, degraded):
            await self._changed.wait()

    # -- its own cluster --

    def set_local_records(self, records: Mapping[str, Entry] | None) -> None:
        """This cluster's records as the agent publishes them (None: take them from the
        store). Applied at once, or right after a Reset that is being applied in slices
        (the newest call wins); subscribers are woken if the catalog changed."""
        self._local_pending = records
        self._apply_local_records()

    @property
    def local_from_publisher(self) -> bool:
        """True while the catalog's own-cluster records come from the publisher."""
        return self.builder.local_overlay is not None

    def _apply_local_records(self) -> None:
        records = self._local_pending
        if isinstance(records, _Nothing) or self.builder.busy:
            return
        self._local_pending = _NOTHING
        before = (self.epoch, self.version, self.synced)
        self.builder.set_local_overlay(records)
        if (self.epoch, self.version, self.synced) != before:
            self._notify()

    # -- running --

    async def run(
        self, store: Store, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Apply the store watch until cancelled; ``started()`` after the first Reset."""
        started = False
        async with store.watch_prefix(keys.ROOT) as events:
            async for event in events:
                await self.apply_async(event)
                if not started:
                    started = True
                    task_status.started()
        raise AssertionError("store watches never end")  # pragma: no cover

    def apply(self, event: WatchEvent) -> None:
        """Apply one watch event in one go (tests call it directly; ``run`` slices Resets)."""
        before = (self.epoch, self.version, self.synced)
        self._applied(event, before, self.builder.apply(event, self._wall()))

    async def apply_async(self, event: WatchEvent) -> None:
        """Apply one watch event, checkpointing between the slices of a Reset.

        The loop is never held for more than one slice (a few milliseconds); other
        tasks read the previous catalog meanwhile. Cancelled mid-Reset, the builder
        either abandons it (nothing changed yet) or finishes it before unwinding.
        """
        async with self._builder_lock:
            before = (self.epoch, self.version, self.synced)
            steps = self.builder.apply_steps(event, self._wall(), slice_records=self._slice_records)
            # A full sync allocates ~10^6 tracked objects: with the collector on, its
            # full passes (each longer than the last, 70-200 ms at 100k keys) would land
            # inside slices and cost ~30% more CPU. Off for the Reset, restored after.
            gc_was_enabled = isinstance(event, Reset) and gc.isenabled()
            if gc_was_enabled:
                gc.disable()
            try:
                while True:
                    try:
                        next(steps)
                    except StopIteration as done:
                        applied: Applied = done.value
                        break
                    await trio.lowlevel.checkpoint()
            except BaseException:
                steps.close()  # abandons the Reset, or finishes it if it was half-way in
                if (self.epoch, self.version, self.synced) != before:
                    self._notify()
                raise
            finally:
                if gc_was_enabled:
                    gc.enable()
                # Local records handed over while the Reset was in slices (it saw the
                # previous ones, so nothing local flapped meanwhile).
                self._apply_local_records()
            self._applied(event, before, applied)

    def _applied(self, event: WatchEvent, before: tuple[str, int, bool], applied: Applied) -> None:
        self.events_applied += 1
        if isinstance(event, Reset):
            self._watch_fresh = True
        if applied.rejected:
            self.metrics.rejected_records.inc(len(applied.rejected))
            for r in applied.rejected[:5]:
                log.warning("store key not used: %s (%s)", r.key, r.reason)
        for cluster, lag in applied.lags:
            if cluster != self.builder.local_cluster:
                self.metrics.sync_lag.labels(cluster).observe(max(0.0, lag))
        self._offer_bundles(event)
        if (self.epoch, self.version, self.synced) != before:
            self._notify()

    async def housekeeping(self, *, period: float = 1.0) -> NoReturn:
        """Expire stale remote clusters, confirm liveness, persist; every ``period`` seconds."""
        last_persist = -float("inf")
        while True:
            await trio.sleep(period)
            async with self._builder_lock:  # never in the middle of a sliced Reset
                now = self._wall()
                if self.health.up and self._watch_fresh:
                    self.builder.mark_store_live(now)
                before = self.builder.version
                expired = self.builder.expire_remote(now, self.remote_stale_after)
            if expired:
                self.metrics.expired_clusters.inc(len(expired))
                log.warning("dropped stale remote clusters: %s", ", ".join(expired))
            if self.builder.version != before:
                self._notify()
            if trio.current_time() - last_persist >= self._persist_interval:
                last_persist = trio.current_time()
                await self.persist()

    async def persist(self) -> bool:
        """Write the catalog to the state dir if it changed; only once synced (never
        overwrite a good file with an empty, unsynced catalog). True if written."""
        if self.state_dir is None or not self.builder.synced:
            return False
        catalog = self.snapshot()
        marker = (catalog.epoch, catalog.version)
        if marker == self._persisted_version:
            return False
        path = self.state_dir / CATALOG_FILE
        try:
            # Serialising 100k entries takes a while: do it in the worker too (the
            # catalog is immutable, so the thread reads a consistent version).
            await self._file_io(lambda: write_atomic(path, catalog.to_json(), mode=0o644))
        except OSError as exc:
            self.metrics.persist_failures.inc()
            log.error("could not persist the catalog to %s: %s", path, exc)
            return False
        self._persisted_version = marker
        self.persist_count += 1
        return True

    def refresh_metrics(self) -> None:
        b = self.builder
        self.metrics.catalog_version.set(self.version)
        self.metrics.catalog_entries.set(len(self.snapshot().entries))
        self.metrics.synced.set(1 if b.synced else 0)
        self.metrics.store_up.set(1 if self.health.up else 0)
        remote = {c: t for c, t in b.last_seen.items() if c != b.local_cluster}
        self.metrics.refresh_peers(self._wall(), remote, self.health.up and self._watch_fresh)

    # -- internals --

    def _on_health(self, up: bool) -> None:
        if not up:
            # The watch may have missed events; it is fresh again at its next Reset.
            self._watch_fresh = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _offer_bundles(self, event: WatchEvent) -> None:
        if isinstance(event, Reset):
            items = tuple(kv for kv in event.items if kv.key.startswith(BUNDLES_PREFIX))
            changes = diff_reset(self._bundles_held, Reset(event.revision, items))
        elif isinstance(event, Put):
            if not event.kv.key.startswith(BUNDLES_PREFIX):
                return
            changes = [event]
        else:
            # A deleted bundle keeps the last good one (deletion is the cheapest rollback).
            return
        apply_events(self._bundles_held, [c for c in changes if isinstance(c, Put)])
        for change in changes:
            if not isinstance(change, Put):
                continue
            key = change.kv.key
            try:
                td_name = keys.parse(key)["trust_domain"]
                td = TrustDomain.parse("spiffe://" + td_name)
            except (InvalidName, ValueError):
                continue
            outcome = self.keeper.offer_json(td, change.kv.value)
            if isinstance(outcome, Accepted):
                if outcome.changed or key not in self._good_bundles:
                    self._good_bundles[key] = change.kv.value
                    self._bundle_gen += 1
            else:
                self.metrics.bundle_refusals.labels(td.name, outcome.reason).inc()
                log.error(
                    "trust bundle for %s refused (%s): %s; keeping the last good one",
                    td.name,
                    outcome.reason,
                    outcome.detail,
                )
                self._bundle_gen += 1

    def _good_change(self, change: Change) -> Change:
        if not change.key.startswith(BUNDLES_PREFIX):
            return change
        return Change(change.key, self._good_bundles.get(change.key))

    def _with_good_bundles(self, raw: Catalog) -> Catalog:
        bundle_keys = [k for k in raw.entries if k.startswith(BUNDLES_PREFIX)]
        if all(raw.entries[k] == self._good_bundles.get(k) for k in bundle_keys) and all(
            k in raw.entries for k in self._good_bundles
        ):
            return raw
        entries = {k: v for k, v in raw.entries.items() if not k.startswith(BUNDLES_PREFIX)}
        entries.update(self._good_bundles)
        return Catalog(raw.epoch, raw.version, raw.local_cluster, entries, raw.last_seen)
