"""The publishing side of the agent: lease, cluster record, own keys, trust bundle (trio adapter).

Drives :class:`~federation.agent.registration.Registration` with real store
calls. Every write of the cluster's keys is a compare-and-swap on the
``mod_revision`` this agent last wrote (0 to create): a stale agent's write
fails instead of overwriting a fresh one, and the failure fences it.

After each successful claim the agent lists its cluster's prefixes and
reconciles them against the desired state (config + run-time registrations):
equal content under the current lease is left alone, anything else is
rewritten by CAS on the listed revision, keys nobody wants are deleted. So a
restart, a takeover or a re-registration converges without duplicates.

The publisher is also the source of the agent's *own* catalog for its cluster
(:meth:`ClusterPublisher.set_local_view`): whenever the desired state or the
registration phase changes, it hands the importer the records it means to
publish (or None while another agent holds the cluster), so a lease expiry or a
re-list while it is cut off never empties its local sidecars' view of their own
cluster (docs/agent.md "Its own cluster's records").

Time: timers use ``trio.current_time()``; ``written_at`` uses the injected
wall clock (``wall``), because other clusters compare it with their own clocks
for the sync-lag metric.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import trio

from federation import keys
from federation.agent.health import StoreHealth
from federation.agent.metrics import AgentMetrics
from federation.agent.records import (
    Desired,
    Record,
    own_prefixes,
    with_gateway_counts,
)
from federation.agent.registrar import EndpointRegistry
from federation.agent.registration import (
    ClaimReplace,
    ClaimWait,
    FenceReason,
    Phase,
    Registration,
)
from federation.config.model import Cluster
from federation.model import ClusterRecord, RecordError, decode_store_value
from federation.store.api import KeyValue, LeaseNotFound, Store, StoreUnavailable
from trust.bundle import TrustBundle
from trust.publish import PublishRefused, publish_bundle

log = logging.getLogger(__name__)

UNDECODABLE = "<undecodable>"
"""Epoch reported for a cluster record that does not decode (never overwritten silently)."""


class _Fenced(Exception):
    """Internal: leave the ACTIVE session (the registration says why)."""


def _epoch_of(kv: KeyValue | None) -> str | None:
    if kv is None:
        return None
    try:
        rec = ClusterRecord.from_json(kv.value)
    except RecordError:
        return UNDECODABLE
    return rec.incarnation


class ClusterPublisher:
    """Keeps the cluster's keys in the store while it may; see the module docstring."""

    def __init__(
        self,
        cluster: Cluster,
        static: dict[str, Desired],
        registration: Registration,
        registry: EndpointRegistry,
        health: StoreHealth,
        metrics: AgentMetrics,
        *,
        bundle: TrustBundle | None = None,
        wall: Callable[[], float] = time.time,
        retry_max: float = 2.0,
    ) -> None:
        self.cluster = cluster
        self.registration = registration
        self.registry = registry
        self.health = health
        self.metrics = metrics
        self.bundle = bundle
        self._static = static
        self._wall = wall
        self._retry_max = retry_max
        self._cluster_key = keys.cluster(cluster.name)
        # What this agent last wrote: key -> (mod_revision, record, lease). The CAS tokens.
        self._written: dict[str, tuple[int, Record | None, int]] = {}
        self._dirty = trio.Event()
        self._peer_alive: dict[str, bool] = {}
        self.bundle_published: bool = False
        self.last_bundle_error: str = ""
        self._local_view: Callable[[Mapping[str, Record] | None], None] | None = None
        registry.set_on_change(self.poke)
        metrics.set_phase(registration.phase)

    # -- inputs --

    def poke(self) -> None:
        """The desired state changed (a registration): reconcile soon."""
        self._dirty.set()
        self._push_local_view()

    def set_local_view(self, sink: Callable[[Mapping[str, Record] | None], None]) -> None:
        """Hand ``sink`` this cluster's records as the agent's own catalog must show them:
        the desired records while the registration speaks for the cluster, else None
        (take them from the store). Called now and on every change of either."""
        self._local_view = sink
        self._push_local_view()

    def local_records(self) -> dict[str, Record] | None:
        """What :meth:`set_local_view` hands over right now."""
        if not self.registration.speaks_for_cluster:
            return None
        return {key: d.record for key, d in self.desired().items()}

    def set_peer_alive(self, alive: dict[str, bool]) -> None:
        """Peer-gateway liveness from this cluster's gateway (federation/agent/gatewaywatch.py)."""
        if alive != self._peer_alive:
            self._peer_alive = dict(alive)
            self.poke()

    def desired(self) -> dict[str, Desired]:
        out = dict(self._static)
        for key, rec in self.registry.records().items():
            # A live registration overrides the declared (unhealthy) endpoint.
            out[key] = Desired(rec, leased=True)
        return with_gateway_counts(self.cluster, out, peer_alive=self._peer_alive)

    def written_keys(self) -> dict[str, int]:
        """Keys this agent holds in the store and their mod_revisions (for tests and /status)."""
        return {k: v[0] for k, v in sorted(self._written.items())}

    @property
    def interval(self) -> float:
        """Keepalive period: a third of the TTL, so two can fail before the lease does."""
        return self.registration.ttl / 3

    # -- the loop --

    async def run(self, store: Store) -> None:
        """Register, publish and keep the lease until cancelled; then revoke it."""
        reg = self.registration
        try:
            while True:
                if reg.phase in (Phase.FENCED, Phase.STANDBY):
                    reg.reregister()
                    self._phase_changed()
                await self._register(store)
                if reg.phase is Phase.ACTIVE:
                    await self._active(store)
                if reg.phase is Phase.FENCED:
                    await self._after_fence(store)
                elif reg.phase is Phase.STANDBY:
                    await self._standby(store)
        finally:
            lease = reg.lease_id
            was_active = reg.phase is Phase.ACTIVE
            reg.stop()
            self._phase_changed()
            if lease and was_active:
                # Graceful exit: our leased keys vanish now instead of after the TTL.
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await store.revoke_lease(lease)
                    except Exception as exc:  # shutdown is best effort
                        log.warning("could not revoke lease on exit: %s", exc)

    async def _call_backoff(self) -> None:
        delay = min(self._retry_max, 0.1 * 2 ** min(self.health.failures, 5))
        await trio.sleep(delay)

    async def _register(self, store: Store) -> None:
        reg = self.registration
        while reg.phase is Phase.REGISTERING:
            try:
                await self._try_claim(store)
                self.health.ok(trio.current_time())
            except StoreUnavailable as exc:
                self.health.failed(trio.current_time(), exc)
                if reg.phase is Phase.REGISTERING:
                    await self._call_backoff()
            except LeaseNotFound:
                # The fresh lease vanished before the claim finished (an etcd hiccup): retry.
                reg.lease_lost()
                self._phase_changed()
                reg.reregister()
        self._phase_changed()

    async def _try_claim(self, store: Store) -> None:
        reg = self.registration
        if not reg.lease_id:
            # etcd grants whole seconds; round up so the local deadline is never later.
            lease = await store.grant_lease(math.ceil(reg.ttl))
            reg.lease_granted(lease.id, trio.current_time())
        current = await store.get(self._cluster_key)
        claim = reg.decide_claim(
            _epoch_of(current),
            current.mod_revision if current else 0,
            current.lease if current else 0,
        )
        if isinstance(claim, ClaimWait):
            log.warning(
                "cluster %s is held by agent %s with a live lease; standing by "
                "(it is taken over when that lease expires, or start with --takeover)",
                self.cluster.name,
                claim.holder,
            )
            await self._revoke_quietly(store, reg.lease_id)
            reg.claim_lost(claim.holder)
            return
        desired = self._static[self._cluster_key]
        value = self._encode(desired.record)
        expected = claim.mod_revision if isinstance(claim, ClaimReplace) else 0
        sent = trio.current_time()
        result = await store.compare_and_swap(
            self._cluster_key, value, expected_mod_revision=expected, lease=reg.lease_id
        )
        if not result.succeeded:
            self.metrics.writes.labels("conflict").inc()
            await self._revoke_quietly(store, reg.lease_id)
            reg.claim_lost(_epoch_of(result.current) or "<gone>")
            return
        assert result.current is not None
        reg.claimed(result.current.mod_revision, sent)
        if reg.phase is not Phase.ACTIVE:
            return
        self.metrics.registrations.inc()
        self.metrics.writes.labels("ok").inc()
        log.info(
            "registered cluster %s as %s (lease %x)", self.cluster.name, reg.epoch, reg.lease_id
        )
        self._written = {
            self._cluster_key: (result.current.mod_revision, desired.record, reg.lease_id)
        }
        # Adopt what is under our prefixes now: those revisions are the CAS tokens
        # for the reconcile that follows.
        for prefix in own_prefixes(self.cluster.name):
            _, items = await store.get_prefix(prefix)
            for kv in items:
                try:
                    decoded = decode_store_value(kv.key, kv.value)
                    record = decoded if not isinstance(decoded, bytes) else None
                except (RecordError, ValueError):
                    record = None
                self._written[kv.key] = (kv.mod_revision, record, kv.lease)  # type: ignore[assignment]
        if isinstance(claim, ClaimReplace) and claim.old_lease and claim.old_lease != reg.lease_id:
            self._old_lease = claim.old_lease
        self._dirty.set()

    _old_lease: int = 0

    async def _active(self, store: Store) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive_loop, store, nursery.cancel_scope)
                nursery.start_soon(self._reconcile_loop, store, nursery.cancel_scope)
        finally:
            self._phase_changed()

    async def _keepalive_loop(self, store: Store, scope: trio.CancelScope) -> None:
        reg = self.registration
        while True:
            # Wake early enough to see the local deadline pass even if calls hang.
            with trio.move_on_at(reg.deadline):
                await trio.sleep(self.interval)
            now = trio.current_time()
            if reg.tick(now):
                log.error("no lease renewal for a whole TTL: fenced, not writing")
                self.metrics.fences.labels(FenceReason.LEASE_DEADLINE.value).inc()
                scope.cancel()
                return
            try:
                with trio.move_on_at(reg.deadline) as cs:
                    await store.keepalive(reg.lease_id)
                    current = await store.get(self._cluster_key)
                if cs.cancelled_caught:
                    continue
            except StoreUnavailable as exc:
                self.health.failed(trio.current_time(), exc)
                self.metrics.lease_failures.labels("unavailable").inc()
                continue
            except LeaseNotFound:
                self.metrics.lease_failures.labels("lease_lost").inc()
                self._fence_now(scope, FenceReason.LEASE_LOST)
                return
            self.health.ok(trio.current_time())
            reg.renewed(now)
            self.metrics.lease_renewals.inc()
            reg.record_seen(_epoch_of(current), current.mod_revision if current else 0)
            if reg.phase is not Phase.ACTIVE:
                reason = reg.last_fence.value if reg.last_fence else "unknown"
                self.metrics.fences.labels(reason).inc()
                log.error("cluster record changed behind us (%s): fenced", reg.last_fence)
                scope.cancel()
                return

    def _fence_now(self, scope: trio.CancelScope, reason: FenceReason) -> None:
        reg = self.registration
        if reason is FenceReason.LEASE_LOST:
            reg.lease_lost()
        else:
            reg.write_conflict()
        self.metrics.fences.labels(reason.value).inc()
        log.error("fenced (%s): not writing until re-registered", reason.value)
        scope.cancel()

    async def _reconcile_loop(self, store: Store, scope: trio.CancelScope) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            try:
                await self._reconcile(store)
                if self._old_lease:
                    await store.revoke_lease(self._old_lease)
                    self._old_lease = 0
                await self._publish_bundle(store)
                self.health.ok(trio.current_time())
            except StoreUnavailable as exc:
                self.health.failed(trio.current_time(), exc)
                await self._call_backoff()
                self._dirty.set()
            except LeaseNotFound:
                self._fence_now(scope, FenceReason.LEASE_LOST)
                return
            except _Fenced:
                self._fence_now(scope, FenceReason.WRITE_CONFLICT)
                return

    async def _reconcile(self, store: Store) -> None:
        reg = self.registration
        desired = self.desired()
        for key in sorted(desired):
            want = desired[key]
            lease = reg.lease_id if want.leased else 0
            held = self._written.get(key)
            if held is not None and held[1] == want.record and held[2] == lease:
                continue
            if not reg.may_write(trio.current_time()):
                raise _Fenced
            result = await store.compare_and_swap(
                key,
                self._encode(want.record),
                expected_mod_revision=held[0] if held else 0,
                lease=lease,
            )
            if not result.succeeded:
                self.metrics.writes.labels("conflict").inc()
                log.error("compare-and-swap on %s lost: another writer", key)
                raise _Fenced
            assert result.current is not None
            self.metrics.writes.labels("ok").inc()
            self._written[key] = (result.current.mod_revision, want.record, lease)
            if key == self._cluster_key:
                reg.record_rewritten(result.current.mod_revision)
        for key in sorted(set(self._written) - set(desired)):
            if not reg.may_write(trio.current_time()):
                raise _Fenced
            rev = self._written[key][0]
            deleted = await store.compare_and_delete(key, expected_mod_revision=rev)
            # Not deleted and still there: someone else rewrote it. Gone is fine (lease).
            if not deleted and await store.get(key) is not None:
                self.metrics.writes.labels("conflict").inc()
                raise _Fenced
            self.metrics.writes.labels("ok").inc()
            del self._written[key]

    async def _publish_bundle(self, store: Store) -> None:
        if self.bundle is None or self.bundle_published:
            return
        try:
            result = await publish_bundle(store, self.bundle)
        except PublishRefused as exc:
            # Not fatal: peers keep the last good bundle; an operator must look.
            self.last_bundle_error = str(exc)
            log.error("%s", exc)
            self.bundle_published = True
            return
        self.bundle_published = True
        self.last_bundle_error = ""
        log.info(
            "trust bundle %s sequence %d %s",
            self.bundle.trust_domain,
            self.bundle.sequence,
            "published" if result.written else "already in the store",
        )

    async def _after_fence(self, store: Store) -> None:
        reg = self.registration
        lease = reg.lease_id
        self._written = {}
        self.bundle_published = False
        if (
            reg.last_fence
            in (FenceReason.RECORD_TAKEN, FenceReason.RECORD_CHANGED, FenceReason.WRITE_CONFLICT)
            and lease
        ):
            # Someone else writes our keys now: our leased leftovers must not linger.
            await self._revoke_quietly(store, lease)
        # After LEASE_DEADLINE the lease may still be alive (etcd re-arms leases when it
        # restarts); re-registration adopts our own record and moves the keys to a new lease.

    async def _standby(self, store: Store) -> None:
        """Wait until the record of the epoch holding the cluster vanishes."""
        reg = self.registration
        while True:
            await trio.sleep(self.interval)
            try:
                current = await store.get(self._cluster_key)
                self.health.ok(trio.current_time())
            except StoreUnavailable as exc:
                self.health.failed(trio.current_time(), exc)
                continue
            holder = _epoch_of(current)
            if holder is None or holder == reg.epoch:
                return

    async def _revoke_quietly(self, store: Store, lease: int) -> None:
        try:
            with trio.move_on_after(self.interval):
                await store.revoke_lease(lease)
        except StoreUnavailable as exc:
            log.warning("could not revoke lease %x: %s", lease, exc)

    def _encode(self, record: Record) -> bytes:
        return replace(record, written_at=round(self._wall(), 6)).to_json()

    def _phase_changed(self) -> None:
        self.metrics.set_phase(self.registration.phase)
        self._push_local_view()

    def _push_local_view(self) -> None:
        if self._local_view is not None:
            self._local_view(self.local_records())
