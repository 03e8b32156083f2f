"""The store contract shared by the etcd and embedded backends.

Semantics (both backends, checked by ``tests/store/test_store_contract.py``):

* Every write bumps a store-wide ``revision``; each key carries
  ``create_revision``, ``mod_revision`` and ``version`` like etcd.
* ``compare_and_swap(key, value, expected_mod_revision=R)`` writes only if the
  key's current ``mod_revision`` is ``R`` (``R == 0``: the key must not exist).
  Of two racing writers that read the same revision exactly one wins.
* Leases: ``grant_lease(ttl)``; keys put with ``lease=`` vanish (with Delete
  events) when the lease expires or is revoked; ``keepalive`` refreshes the TTL
  and raises :class:`LeaseNotFound` once the lease is gone.
* ``watch_prefix`` yields a :class:`Reset` first (the full state of the prefix
  at one revision), then :class:`Put`/:class:`Delete` in revision order. After a
  compaction past the watcher's position, or a reconnect, it yields a fresh
  ``Reset``; consumers call :func:`diff_reset` against what they hold, so a
  delete that happened while they were away is never lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """Base of all store errors."""


class StoreUnavailable(StoreError):
    """The backend could not be reached (after the configured retries)."""


class LeaseNotFound(StoreError):
    """The lease expired or was revoked; keys attached to it are gone."""


class StoreClosed(StoreError):
    """The store was closed by its owner (``aclose`` or leaving ``open_store``); a usage error."""


class Compacted(StoreError):
    """A read or watch asked for a revision older than the compaction point."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key with its value and etcd-style metadata."""

    key: str
    """Full key, e.g. ``/meshfed/v1/clusters/aws-use1``."""
    value: bytes
    """Opaque value (JSON records in meshfed)."""
    create_revision: int
    """Store revision at which the key was (last) created."""
    mod_revision: int
    """Store revision of the last write to the key; the CAS token."""
    version: int
    """Number of writes since creation (1 after the first put)."""
    lease: int = 0
    """Lease id the key is attached to; 0 for none."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease."""

    id: int
    """Backend lease id (never 0)."""
    ttl: float
    """Granted time to live in seconds."""


@dataclass(frozen=True, slots=True)
class CasResult:
    """Outcome of a compare-and-swap."""

    succeeded: bool
    """True if the write happened."""
    revision: int
    """Store revision after the call."""
    current: KeyValue | None
    """On failure, what the key holds now (None if absent); on success, the new key."""


@dataclass(frozen=True, slots=True)
class Reset:
    """The full state of the watched prefix at ``revision``; replaces what the consumer holds."""

    revision: int
    """Revision the snapshot was read at; later events have higher revisions."""
    items: tuple[KeyValue, ...]
    """Every key under the prefix at ``revision``, sorted by key."""


@dataclass(frozen=True, slots=True)
class Put:
    """A key was created or updated."""

    kv: KeyValue
    """The key as written; ``kv.mod_revision`` is the event's revision."""

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class Delete:
    """A key was deleted (explicitly, or by lease expiry)."""

    key: str
    """The deleted key."""
    revision: int
    """Revision of the delete."""


WatchEvent = Reset | Put | Delete


def diff_reset(held: Mapping[str, KeyValue], reset: Reset) -> list[Put | Delete]:
    """Events that turn ``held`` into the state described by ``reset``.

    Keys held but absent from the reset become Deletes (at ``reset.revision``);
    keys that are new or whose ``mod_revision`` changed become Puts. Keys whose
    ``mod_revision`` is unchanged produce nothing, so a reconnect that lost
    nothing produces no events (no duplicates).
    """
    fresh = {kv.key: kv for kv in reset.items}
    out: list[Put | Delete] = [
        Delete(key, reset.revision) for key in sorted(held) if key not in fresh
    ]
    for key in sorted(fresh):
        kv = fresh[key]
        old = held.get(key)
        if old is None or old.mod_revision != kv.mod_revision:
            out.append(Put(kv))
    return out


def apply_events(held: dict[str, KeyValue], events: Iterable[Put | Delete]) -> None:
    """Apply Put/Delete events to a consumer's view in place."""
    for ev in events:
        if isinstance(ev, Put):
            held[ev.kv.key] = ev.kv
        else:
            held.pop(ev.key, None)


@runtime_checkable
class Store(Protocol):
    """The async store interface. All methods may raise :class:`StoreUnavailable`."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """All keys under ``prefix`` at one revision, sorted by key, and that revision."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write unconditionally; return the new store revision."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; return how many."""
        ...

    async def compare_and_swap(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: int = 0
    ) -> CasResult: ...

    async def compare_and_delete(self, key: str, *, expected_mod_revision: int) -> bool: ...

    async def grant_lease(self, ttl: float) -> Lease: ...

    async def keepalive(self, lease_id: int) -> float:
        """Refresh a lease; return its TTL. Raises LeaseNotFound if it is gone."""
        ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def current_revision(self) -> int: ...

    async def compact(self, revision: int) -> None:
        """Discard history before ``revision``; watchers behind it get a new Reset."""
        ...

    def watch_prefix(self, prefix: str) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        """``async with store.watch_prefix(p) as events: async for ev in events: ...``

        Leaving the ``async with`` (or cancelling) stops the watch and frees its resources.
        """
        ...

    async def aclose(self) -> None: ...
