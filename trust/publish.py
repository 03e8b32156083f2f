"""Store adapter for trust material: bundles and revocations in and out of the store.

Writers:

* :func:`publish_bundle` writes ``/meshfed/v1/bundles/<td>`` by compare-and-swap
  on the key's ``mod_revision``, after applying the :class:`BundleKeeper` rules
  locally to what the store holds (so a publisher never writes what every reader
  would refuse: a lower sequence, the same sequence with other content, another
  domain's root). Of two racing publishers exactly one wins; the loser re-reads
  and is refused (``sequence_conflict``) or, with a higher sequence, wins next.
* :func:`publish_revocation` / :func:`withdraw_revocation` write one record under
  ``/meshfed/v1/revocations/<td>/<segment>``.

Readers (long-running tasks for ``nursery.start``):

* :func:`watch_bundles` feeds every bundle under ``/meshfed/v1/bundles/`` into a
  :class:`BundleKeeper` and reports refusals. A bundle written straight into
  etcd with a lower sequence (a rollback attack) is refused and the last good
  one stays in force. A *deleted* bundle also keeps the last good one: deletion
  is the cheapest rollback of all; a domain leaves the federation through config
  (``BundleKeeper.forget``), never by losing its key in the store.
* :func:`watch_revocations` turns ``/meshfed/v1/revocations/`` into a
  :class:`RevocationSet` on every change.

Both watchers treat a ``Reset`` with :func:`diff_reset`, so a delete or put
missed during a reconnect or compaction is never lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import trio

from federation import keys
from federation.names import InvalidName
from federation.store.api import KeyValue, Put, Reset, Store, apply_events, diff_reset
from trust.bundle import Accepted, BundleKeeper, Refused, TrustBundle
from trust.errors import InvalidSpiffeId, RevocationError, TrustError
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import TrustDomain
from trust.validate import TrustBundleSet

__all__ = [
    "PublishRefused",
    "PublishResult",
    "publish_bundle",
    "publish_revocation",
    "read_bundles",
    "read_revocations",
    "watch_bundles",
    "watch_revocations",
    "withdraw_revocation",
]

log = logging.getLogger(__name__)

BUNDLES_PREFIX = keys.prefix("bundles")
REVOCATIONS_PREFIX = keys.prefix("revocations")


class PublishRefused(TrustError):
    """A bundle was not published; ``reason`` is a bundle refusal reason or ``conflict``.

    ``conflict``: other writers kept winning the compare-and-swap (retry later).
    """

    def __init__(self, trust_domain: TrustDomain, reason: str, detail: str) -> None:
        self.trust_domain = trust_domain
        self.reason = reason
        self.detail = detail
        super().__init__(f"bundle for {trust_domain} not published ({reason}): {detail}")


@dataclass(frozen=True, slots=True)
class PublishResult:
    """A successful :func:`publish_bundle`."""

    bundle: TrustBundle
    """What the store holds for the domain now."""
    written: bool
    """False if the store already held exactly this bundle (nothing written)."""
    mod_revision: int
    """The key's mod_revision after the call."""


def _domain_of_key(key: str, kind: str) -> TrustDomain | None:
    """The trust domain segment of a bundles/revocations key, or None if it is not one."""
    try:
        parsed = keys.parse(key)
        if parsed.kind != kind:
            return None
        return TrustDomain.parse("spiffe://" + parsed["trust_domain"])
    except (InvalidName, InvalidSpiffeId):
        return None


async def publish_bundle(store: Store, bundle: TrustBundle, *, attempts: int = 3) -> PublishResult:
    """Write ``bundle`` to its domain's key if every reader would accept it.

    Raises :class:`PublishRefused` (``rollback``, ``sequence_conflict``,
    ``foreign_root``, ``root_of_other_domain``, or ``conflict`` after
    ``attempts`` lost compare-and-swaps) and ``StoreUnavailable``.
    """
    td = bundle.trust_domain
    key = keys.bundle(td.name)
    for _ in range(attempts):
        _, items = await store.get_prefix(BUNDLES_PREFIX)
        # The readers' keeper, replayed locally: other domains first (their roots
        # may not be reused), then what this key holds now, then the new bundle.
        keeper = BundleKeeper()
        current: KeyValue | None = None
        for kv in items:
            if kv.key == key:
                current = kv
            elif (other := _domain_of_key(kv.key, "bundles")) is not None:
                keeper.offer_json(other, kv.value)
        if current is not None:
            # A malformed current value is refused here and thus simply overwritten.
            keeper.offer_json(td, current.value)
        outcome = keeper.offer(bundle)
        if isinstance(outcome, Refused):
            raise PublishRefused(td, outcome.reason, outcome.detail)
        if not outcome.changed:
            assert current is not None
            return PublishResult(bundle, False, current.mod_revision)
        result = await store.compare_and_swap(
            key,
            bundle.to_json().encode(),
            expected_mod_revision=0 if current is None else current.mod_revision,
        )
        if result.succeeded:
            assert result.current is not None
            return PublishResult(bundle, True, result.current.mod_revision)
    raise PublishRefused(td, "conflict", f"lost the compare-and-swap {attempts} times; retry")


async def read_bundles(store: Store) -> tuple[dict[TrustDomain, KeyValue], list[str]]:
    """Every bundle key at one revision, by domain, and the keys that name no domain."""
    _, items = await store.get_prefix(BUNDLES_PREFIX)
    out: dict[TrustDomain, KeyValue] = {}
    strays: list[str] = []
    for kv in items:
        td = _domain_of_key(kv.key, "bundles")
        if td is None:
            strays.append(kv.key)
        else:
            out[td] = kv
    return out, strays


async def watch_bundles(
    store: Store,
    keeper: BundleKeeper,
    *,
    on_change: Callable[[TrustBundleSet], None] | None = None,
    on_accepted: Callable[[TrustBundle], None] | None = None,
    on_refused: Callable[[Refused], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Keep ``keeper`` in step with the store's bundles; start with ``nursery.start``.

    ``task_status.started()`` fires after the first ``Reset`` is applied, so the
    caller's first handshake already sees the published bundles. ``on_change``
    gets the new bundle set after each batch that changed a bundle (wire it to
    ``TlsContextHolder.update(bundles=...)``: roots reload without a restart).
    ``on_refused`` gets every refusal (wire it to ``TrustMetrics.bundle_refused``;
    do not also set ``keeper.on_refusal`` to the same counter).
    """
    held: dict[str, KeyValue] = {}
    started = False
    async with store.watch_prefix(BUNDLES_PREFIX) as events:
        async for event in events:
            changes = diff_reset(held, event) if isinstance(event, Reset) else [event]
            apply_events(held, changes)
            changed = False
            for change in changes:
                if not isinstance(change, Put):
                    log.warning(
                        "trust bundle deleted from the store; keeping the last good one",
                        extra={"key": change.key},
                    )
                    continue
                td = _domain_of_key(change.kv.key, "bundles")
                if td is None:
                    log.warning("ignoring a key that names no trust domain",
                                extra={"key": change.kv.key})
                    continue
                outcome = keeper.offer_json(td, change.kv.value)
                if isinstance(outcome, Accepted):
                    if outcome.changed:
                        changed = True
                        if on_accepted is not None:
                            on_accepted(outcome.bundle)
                    continue
                log.error(
                    "trust bundle refused; keeping the last good one",
                    extra={"trust_domain": td.name, "reason": outcome.reason,
                           "detail": outcome.detail},
                )
                if on_refused is not None:
                    on_refused(outcome)
            if changed and on_change is not None:
                on_change(keeper.bundle_set())
            if not started:
                started = True
                task_status.started()
    raise AssertionError("store watches never end")  # pragma: no cover


async def publish_revocation(store: Store, revocation: Revocation) -> str:
    """Write one revocation record; return its key. Re-publishing the same record is harmless."""
    key = keys.revocation(revocation.trust_domain.name, revocation.store_segment())
    await store.put(key, revocation.to_json().encode())
    return key


async def withdraw_revocation(store: Store, revocation: Revocation) -> bool:
    """Delete a revocation record (re-admit the certificate or ID); True if it existed."""
    key = keys.revocation(revocation.trust_domain.name, revocation.store_segment())
    return await store.delete(key)


def _parse_revocation(kv: KeyValue) -> Revocation | None:
    """The record at ``kv`` if its key agrees with it; None (and a log line) otherwise."""
    try:
        parsed = keys.parse(kv.key)
        rev = Revocation.from_json(kv.value)
    except (InvalidName, RevocationError) as exc:
        log.error("ignoring a malformed revocation", extra={"key": kv.key, "error": str(exc)})
        return None
    # A record must sit under its own domain and segment: one domain's key space
    # cannot be used to revoke another domain's certificates.
    if parsed["trust_domain"] != rev.trust_domain.name or parsed["serial"] != rev.store_segment():
        log.error("ignoring a revocation stored under another key", extra={"key": kv.key})
        return None
    return rev


async def read_revocations(store: Store) -> RevocationSet:
    """Every well-formed revocation in the store, at one revision."""
    _, items = await store.get_prefix(REVOCATIONS_PREFIX)
    return RevocationSet.of(r for kv in items if (r := _parse_revocation(kv)) is not None)


async def watch_revocations(
    store: Store,
    on_change: Callable[[RevocationSet], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Call ``on_change`` with the full revocation set after every change in the store.

    Wire ``on_change`` to ``RevocationEnforcer.update``: new handshakes and live
    connections are then both covered. ``started()`` fires after the first set.
    """
    held: dict[str, KeyValue] = {}
    parsed: dict[str, Revocation] = {}
    started = False
    async with store.watch_prefix(REVOCATIONS_PREFIX) as events:
        async for event in events:
            changes = diff_reset(held, event) if isinstance(event, Reset) else [event]
            apply_events(held, changes)
            for change in changes:
                if isinstance(change, Put):
                    rev = _parse_revocation(change.kv)
                    if rev is None:
                        parsed.pop(change.kv.key, None)
                    else:
                        parsed[change.kv.key] = rev
                else:
                    parsed.pop(change.key, None)
            if changes or not started:
                on_change(RevocationSet.of(parsed[k] for k in sorted(parsed)))
            if not started:
                started = True
                task_status.started()
    raise AssertionError("store watches never end")  # pragma: no cover
