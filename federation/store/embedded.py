"""The embedded store: etcd's semantics in-process, for single-process runs (``meshfed up``).

Two layers, following the project's pure-core rule:

* :class:`EmbeddedState` is a plain, synchronous state machine with no I/O and no
  clock of its own: every operation that depends on time takes ``now``. It keeps
  the key space, a store-wide revision, leases with deadlines, and a bounded
  history log of :class:`~federation.store.api.Put`/:class:`~federation.store.api.Delete`
  events (what etcd calls MVCC history).
* :class:`EmbeddedStore` is the thin trio adapter implementing
  :class:`~federation.store.api.Store`. Time comes from :func:`trio.current_time`,
  so ``trio.testing.MockClock`` drives lease expiry in tests. Open it with
  :func:`open_embedded_store`, which runs the lease-expiry timer in a nursery.

Watches read the shared history log through a cursor instead of owning a queue:
a writer only appends to the log (it never waits for, or allocates per, a
watcher), and memory is bounded by ``history_limit`` however slow a watcher is.
A watcher whose cursor falls behind the retained history (auto-trimmed, or
explicitly compacted) gets a fresh :class:`~federation.store.api.Reset`, exactly
as an etcd watcher behind a compaction does.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from federation.store.api import (
    CasResult,
    Compacted,
    Delete,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    Reset,
    StoreClosed,
    WatchEvent,
)

DEFAULT_HISTORY_LIMIT = 10_000
"""Events kept for watchers to catch up from before older history is trimmed."""


@dataclass(slots=True)
class _LeaseState:
    """A live lease: its TTL, when it expires, and the keys attached to it."""

    id: int
    ttl: float
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class EmbeddedStatistics:
    """Counters for tests and metrics (see :meth:`EmbeddedStore.statistics`)."""

    revision: int
    """Current store revision."""
    compact_revision: int
    """History before this revision is gone."""
    keys: int
    """Live keys."""
    leases: int
    """Live leases."""
    history_events: int
    """Events retained in the history log."""
    open_watches: int
    """Watches whose ``async with`` has not exited."""


class EmbeddedState:
    """The embedded store's pure core: key space, revisions, leases and history.

    Invariants: ``revision`` only grows and bumps once per effective write
    (a delete of a missing key is not a write, as in etcd); events in the log
    are in revision order, and several events may share one revision (a
    ``delete_prefix`` or a lease expiry deletes all its keys at one revision);
    every event with revision >= ``compact_revision`` that was ever logged is
    still in the log.
    """

    def __init__(self, *, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        if history_limit < 1:
            raise ValueError(f"history_limit must be >= 1, got {history_limit}")
        self.history_limit = history_limit
        # etcd's empty store reports revision 1; matching it keeps both backends' numbers alike.
        self.revision = 1
        self.compact_revision = 0
        self._data: dict[str, KeyValue] = {}
        self._sorted_keys: list[str] = []
        self._leases: dict[int, _LeaseState] = {}
        self._next_lease_id = 1
        self._log: list[Put | Delete] = []
        self._log_start_seq = 0
        """Sequence number of ``_log[0]``; cursors are sequence numbers, stable across trims."""

    # -- reads ---------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        return self._data.get(key)

    def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        lo = bisect.bisect_left(self._sorted_keys, prefix)
        out: list[KeyValue] = []
        for key in self._sorted_keys[lo:]:
            if not key.startswith(prefix):
                break
            out.append(self._data[key])
        return self.revision, out

    @property
    def key_count(self) -> int:
        return len(self._data)

    @property
    def lease_count(self) -> int:
        return len(self._leases)

    @property
    def history_len(self) -> int:
        return len(self._log)

    # -- writes --------------------------------------------------------------

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        if lease and lease not in self._leases:
            raise LeaseNotFound(f"lease {lease:#x} not found (expired or revoked)")
        self.revision += 1
        self._put_at(key, value, lease)
        self._trim_history()
        return self.revision

    def delete(self, key: str) -> bool:
        if key not in self._data:
            return False
        self.revision += 1
        self._delete_at(key)
        self._trim_history()
        return True

    def delete_prefix(self, prefix: str) -> int:
        _, kvs = self.get_prefix(prefix)
        if not kvs:
            return 0
        self.revision += 1
        for kv in kvs:
            self._delete_at(kv.key)
        self._trim_history()
        return len(kvs)

    def compare_and_swap(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: int = 0
    ) -> CasResult:
        current = self._data.get(key)
        if (current.mod_revision if current else 0) != expected_mod_revision:
            return CasResult(False, self.revision, current)
        self.put(key, value, lease=lease)
        return CasResult(True, self.revision, self._data[key])

    def compare_and_delete(self, key: str, *, expected_mod_revision: int) -> bool:
        current = self._data.get(key)
        if current is None or current.mod_revision != expected_mod_revision:
            return False
        return self.delete(key)

    def _put_at(self, key: str, value: bytes, lease: int) -> None:
        old = self._data.get(key)
        if old is None:
            bisect.insort(self._sorted_keys, key)
            kv = KeyValue(key, value, self.revision, self.revision, 1, lease)
        else:
            if old.lease and old.lease != lease and old.lease in self._leases:
                self._leases[old.lease].keys.discard(key)
            kv = replace(
                old, value=value, mod_revision=self.revision, version=old.version + 1, lease=lease
            )
        if lease:
            self._leases[lease].keys.add(key)
        self._data[key] = kv
        self._log.append(Put(kv))

    def _delete_at(self, key: str) -> None:
        kv = self._data.pop(key)
        del self._sorted_keys[bisect.bisect_left(self._sorted_keys, key)]
        if kv.lease and kv.lease in self._leases:
            self._leases[kv.lease].keys.discard(key)
        self._log.append(Delete(key, self.revision))

    # -- leases --------------------------------------------------------------

    def grant_lease(self, ttl: float, *, now: float) -> Lease:
        if not ttl > 0 or math.isinf(ttl):
            raise ValueError(f"lease TTL must be a positive, finite number of seconds, got {ttl}")
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        self._leases[lease_id] = _LeaseState(lease_id, ttl, now + ttl)
        return Lease(lease_id, ttl)

    def keepalive(self, lease_id: int, *, now: float) -> float:
        state = self._leases.get(lease_id)
        if state is None:
            raise LeaseNotFound(f"lease {lease_id:#x} not found (expired or revoked)")
        state.deadline = now + state.ttl
        return state.ttl

    def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys at one revision. Revoking a gone lease is a no-op."""
        state = self._leases.pop(lease_id, None)
        if state is None or not state.keys:
            return
        self.revision += 1
        for key in sorted(state.keys):
            self._delete_at(key)
        self._trim_history()

    def expire(self, now: float) -> int:
        """Revoke every lease whose deadline is at or before ``now``; return how many."""
        due = sorted((s.deadline, s.id) for s in self._leases.values() if s.deadline <= now)
        for _, lease_id in due:
            self.revoke_lease(lease_id)
        return len(due)

    def next_deadline(self) -> float:
        """The earliest lease deadline, or ``inf`` if there are no leases."""
        return min((s.deadline for s in self._leases.values()), default=math.inf)

    # -- history -------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The cursor that points just past the newest event."""
        return self._log_start_seq + len(self._log)

    def is_behind(self, cursor: int) -> bool:
        """True if events the cursor still needs were trimmed or compacted away."""
        return cursor < self._log_start_seq

    def next_event(self, cursor: int, prefix: str) -> tuple[Put | Delete | None, int]:
        """The first event at or after ``cursor`` under ``prefix``, and the cursor after it.

        Returns ``(None, next_seq)`` when there is none yet. The caller must check
        :meth:`is_behind` first.
        """
        for idx in range(cursor - self._log_start_seq, len(self._log)):
            ev = self._log[idx]
            key = ev.kv.key if isinstance(ev, Put) else ev.key
            if key.startswith(prefix):
                return ev, self._log_start_seq + idx + 1
        return None, self.next_seq

    def compact(self, revision: int) -> None:
        """Drop history before ``revision``, as etcd's compaction does."""
        if revision > self.revision:
            raise ValueError(
                f"cannot compact to revision {revision}: it is in the future "
                f"(current revision {self.revision})"
            )
        if revision <= self.compact_revision:
            raise Compacted(
                f"revision {revision} is already compacted (compacted to {self.compact_revision})"
            )
        self.compact_revision = revision
        cut = 0
        while cut < len(self._log) and self._log[cut].revision < revision:
            cut += 1
        self._drop(cut)

    def _trim_history(self) -> None:
        # Trim in batches (down to the limit once it is exceeded twice over) so the
        # O(n) list deletion is amortised across many writes.
        if len(self._log) <= 2 * self.history_limit:
            return
        cut = len(self._log) - self.history_limit
        # Never split one revision's events (a watcher resumes at revision boundaries):
        # move the cut back to the start of its revision, keeping a little more.
        while cut > 0 and self._log[cut].revision == self._log[cut - 1].revision:
            cut -= 1
        if cut == 0:
            return
        self.compact_revision = max(self.compact_revision, self._log[cut].revision)
        self._drop(cut)

    def _drop(self, count: int) -> None:
        if count:
            del self._log[:count]
            self._log_start_seq += count


class EmbeddedStore:
    """The in-process :class:`~federation.store.api.Store`. Open with :func:`open_embedded_store`.

    All state lives in one trio thread, so no locks are needed: every method
    runs its state change without an intermediate ``await``.
    """

    def __init__(self, *, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self._state = EmbeddedState(history_limit=history_limit)
        self._changed = trio.Event()
        self._lease_wakeup = trio.Event()
        self._closed = False
        self._open_watches = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<EmbeddedStore rev={s.revision} keys={s.keys} leases={s.leases} "
            f"watches={s.open_watches}{' closed' if self._closed else ''}>"
        )

    def statistics(self) -> EmbeddedStatistics:
        st = self._state
        return EmbeddedStatistics(
            revision=st.revision,
            compact_revision=st.compact_revision,
            keys=st.key_count,
            leases=st.lease_count,
            history_events=st.history_len,
            open_watches=self._open_watches,
        )

    # -- plumbing ------------------------------------------------------------

    def _begin(self) -> EmbeddedState:
        """Check the store is open and apply due lease expiries, so reads never see dead keys."""
        if self._closed:
            raise StoreClosed("the embedded store was closed")
        self._expire_due()
        return self._state

    def _expire_due(self) -> None:
        before = self._state.next_seq
        self._state.expire(trio.current_time())
        if self._state.next_seq != before:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run_lease_timer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire leases on time even when nobody calls the store. Runs until cancelled."""
        task_status.started()
        while not self._closed:
            self._expire_due()
            with trio.move_on_at(self._state.next_deadline()):
                await self._lease_wakeup.wait()
            self._lease_wakeup = trio.Event()

    # -- Store ---------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        await trio.lowlevel.checkpoint()
        return self._begin().get(key)

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        await trio.lowlevel.checkpoint()
        return self._begin().get_prefix(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        await trio.lowlevel.checkpoint()
        rev = self._begin().put(key, value, lease=lease)
        self._notify()
        return rev

    async def delete(self, key: str) -> bool:
        await trio.lowlevel.checkpoint()
        deleted = self._begin().delete(key)
        if deleted:
            self._notify()
        return deleted

    async def delete_prefix(self, prefix: str) -> int:
        await trio.lowlevel.checkpoint()
        count = self._begin().delete_prefix(prefix)
        if count:
            self._notify()
        return count

    async def compare_and_swap(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: int = 0
    ) -> CasResult:
        await trio.lowlevel.checkpoint()
        result = self._begin().compare_and_swap(
            key, value, expected_mod_revision=expected_mod_revision, lease=lease
        )
        if result.succeeded:
            self._notify()
        return result

    async def compare_and_delete(self, key: str, *, expected_mod_revision: int) -> bool:
        await trio.lowlevel.checkpoint()
        deleted = self._begin().compare_and_delete(key, expected_mod_revision=expected_mod_revision)
        if deleted:
            self._notify()
        return deleted

    async def grant_lease(self, ttl: float) -> Lease:
        await trio.lowlevel.checkpoint()
        lease = self._begin().grant_lease(ttl, now=trio.current_time())
        self._lease_wakeup.set()  # the timer may be sleeping past this lease's deadline
        return lease

    async def keepalive(self, lease_id: int) -> float:
        await trio.lowlevel.checkpoint()
        return self._begin().keepalive(lease_id, now=trio.current_time())

    async def revoke_lease(self, lease_id: int) -> None:
        await trio.lowlevel.checkpoint()
        state = self._begin()
        before = state.next_seq
        state.revoke_lease(lease_id)
        if state.next_seq != before:
            self._notify()

    async def current_revision(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._begin().revision

    async def compact(self, revision: int) -> None:
        await trio.lowlevel.checkpoint()
        self._begin().compact(revision)
        # Wake watchers so one now behind the compaction point moves on to its Reset.
        self._notify()

    @asynccontextmanager
    async def watch_prefix(self, prefix: str) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        self._begin()
        stream = _EmbeddedWatch(self, prefix)
        self._open_watches += 1
        try:
            yield stream
        finally:
            stream.closed = True
            self._open_watches -= 1

    async def aclose(self) -> None:
        """Close the store: later calls, and open watches, raise StoreClosed."""
        await trio.lowlevel.checkpoint()
        self._closed = True
        self._notify()
        self._lease_wakeup.set()


class _EmbeddedWatch:
    """One watch: a cursor into the store's history log (no queue of its own)."""

    def __init__(self, store: EmbeddedStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self._cursor: int | None = None  # None: the next item is the initial Reset
        self.closed = False

    def __aiter__(self) -> _EmbeddedWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        await trio.lowlevel.checkpoint()
        while True:
            if self.closed:
                raise StopAsyncIteration
            state = self._store._begin()
            if self._cursor is None or state.is_behind(self._cursor):
                # Snapshot and cursor are taken together, with no await between, so
                # the Reset and the events after it neither overlap nor leave a gap.
                revision, items = state.get_prefix(self._prefix)
                self._cursor = state.next_seq
                return Reset(revision, tuple(items))
            event, self._cursor = state.next_event(self._cursor, self._prefix)
            if event is not None:
                return event
            await self._store._changed.wait()


@asynccontextmanager
async def open_embedded_store(
    *, history_limit: int = DEFAULT_HISTORY_LIMIT
) -> AsyncIterator[EmbeddedStore]:
    """Open an embedded store whose lease timer runs until the ``async with`` exits."""
    store = EmbeddedStore(history_limit=history_limit)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_lease_timer)
        try:
            yield store
        finally:
            await store.aclose()
            nursery.cancel_scope.cancel()


__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "EmbeddedState",
    "EmbeddedStatistics",
    "EmbeddedStore",
    "open_embedded_store",
]
