"""The agent's registration and fencing state machine (sans-IO: no trio, no clock).

One agent per cluster may write that cluster's keys. Which one is decided by the
cluster record ``/meshfed/v1/clusters/<c>``: it is created with compare-and-swap
(expected ``mod_revision`` 0) under the agent's lease, and whoever's create won
holds the cluster until its lease ends. The machine::

    REGISTERING --claimed--> ACTIVE --lease lost / record taken / local deadline--> FENCED
        |  ^                                                                           |
        |  +-------------------------- re-register (new lease) -------------------------+
        +--held by another live epoch--> STANDBY --record gone--> REGISTERING

Rules (docs/agent.md "Fencing"):

* Nothing is written unless ``may_write(now)``: phase ACTIVE and the *local* lease
  deadline (last successful keepalive + TTL) not passed. A partitioned agent
  therefore stops writing on its own, before etcd expires the lease, and a
  stale agent can never overwrite a fresh one.
* FENCED when keepalive says the lease is gone, when the cluster record is
  found with another epoch or another ``mod_revision`` than this agent last
  wrote, when any compare-and-swap on one of the cluster's keys fails, or when
  the local deadline passes without a renewal.
* A record held by another epoch (its lease is live, or the key would be gone)
  is taken over only when ``takeover`` was asked for and only by an agent that
  was never fenced by another epoch: two ``--takeover`` agents cannot ping-pong.
  Otherwise the newcomer waits in STANDBY until the record vanishes.
* A record of this agent's own epoch (a lease it lost track of, e.g. after a
  long store outage that etcd survived with its leases re-armed) is adopted.

* ``speaks_for_cluster``: whether the agent's own catalog takes its cluster's
  records from what it publishes (docs/agent.md "Its own cluster's records").
  True from a successful claim until the store names another holder (a lost
  claim, STANDBY, or a record of another epoch): lease trouble keeps it, since a
  fenced agent still means to publish exactly what it did, and only re-claiming
  tells whether someone else took over.

The adapter (``publisher.py``) performs the I/O these methods ask for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Phase(enum.Enum):
    REGISTERING = "registering"
    """Getting a lease and claiming the cluster record."""
    STANDBY = "standby"
    """Another live epoch holds the cluster record; waiting for it to vanish."""
    ACTIVE = "active"
    """Holding the cluster record under a live lease; the only writer of the cluster's keys."""
    FENCED = "fenced"
    """Lost the right to write; nothing is written until re-registered."""
    STOPPED = "stopped"
    """Shut down; the lease was (or will be) revoked."""


class FenceReason(enum.Enum):
    LEASE_LOST = "lease_lost"
    """keepalive (or a write) said the lease is gone."""
    LEASE_DEADLINE = "lease_deadline"
    """No successful keepalive for a whole TTL: the lease may be gone; stop writing."""
    RECORD_TAKEN = "record_taken"
    """The cluster record holds another epoch (a takeover)."""
    RECORD_CHANGED = "record_changed"
    """The cluster record is gone or was rewritten behind this agent's back."""
    WRITE_CONFLICT = "write_conflict"
    """A compare-and-swap on one of the cluster's keys failed."""


class TransitionError(RuntimeError):
    """An input that is not allowed in the current phase (a bug in the adapter)."""


@dataclass(frozen=True, slots=True)
class ClaimCreate:
    """Create the cluster record: CAS with expected mod_revision 0."""


@dataclass(frozen=True, slots=True)
class ClaimReplace:
    """Overwrite the record found at ``mod_revision`` (own epoch, or ``--takeover``)."""

    mod_revision: int
    """The CAS token: the record's current mod_revision."""
    holder: str
    """Epoch found in the record (ours, or the one taken over)."""
    old_lease: int
    """The lease of the found record; revoke it once re-published (0: none)."""


@dataclass(frozen=True, slots=True)
class ClaimWait:
    """Another live epoch holds the record: go to STANDBY and retry later."""

    holder: str
    """The epoch holding the record."""


Claim = ClaimCreate | ClaimReplace | ClaimWait


@dataclass(frozen=True, slots=True)
class RegistrationStatus:
    """A read-only view of the machine, for ``/status`` and metrics."""

    phase: Phase
    epoch: str
    lease_id: int
    record_revision: int
    registrations: int
    fences: int
    last_fence: FenceReason | None
    holder: str | None


class Registration:
    """The fencing state machine of one agent process. Every input names its ``now``."""

    def __init__(self, epoch: str, ttl: float, *, takeover: bool = False) -> None:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.epoch = epoch
        self.ttl = ttl
        self._takeover = takeover
        self.phase = Phase.REGISTERING
        self.lease_id = 0
        self.record_revision = 0
        """mod_revision of the cluster record as this agent last wrote it (0: none)."""
        self._deadline = 0.0
        self.registrations = 0
        self.fences = 0
        self.last_fence: FenceReason | None = None
        self.holder: str | None = None
        """The other epoch holding the record while in STANDBY."""
        self.speaks_for_cluster = False
        """The agent's catalog shows its cluster as it publishes it (see the module doc)."""

    # -- queries --

    def may_write(self, now: float) -> bool:
        """True only while ACTIVE and within the local lease deadline."""
        return self.phase is Phase.ACTIVE and now < self._deadline

    @property
    def deadline(self) -> float:
        """When the lease may have expired if not renewed (meaningful while ACTIVE)."""
        return self._deadline

    def status(self) -> RegistrationStatus:
        return RegistrationStatus(
            self.phase,
            self.epoch,
            self.lease_id,
            self.record_revision,
            self.registrations,
            self.fences,
            self.last_fence,
            self.holder,
        )

    # -- registering --

    def lease_granted(self, lease_id: int, now: float) -> None:
        """A new lease for this registration attempt."""
        self._require(Phase.REGISTERING, Phase.STANDBY, Phase.FENCED)
        self.phase = Phase.REGISTERING
        self.lease_id = lease_id
        self.record_revision = 0
        # The lease runs from the grant; count from here so a slow claim cannot overrun it.
        self._deadline = now + self.ttl

    def decide_claim(self, found_epoch: str | None, mod_revision: int, lease: int) -> Claim:
        """What to do about the record currently in the store (``found_epoch`` None: absent).

        A record that does not decode is treated as another epoch's: it is leased
        (or not) like any other and never silently overwritten.
        """
        self._require(Phase.REGISTERING)
        if found_epoch is None:
            return ClaimCreate()
        if found_epoch == self.epoch:
            return ClaimReplace(mod_revision, found_epoch, lease)
        if self._takeover:
            return ClaimReplace(mod_revision, found_epoch, lease)
        return ClaimWait(found_epoch)

    def claimed(self, record_revision: int, now: float) -> None:
        """The CAS on the cluster record succeeded at ``record_revision``: ACTIVE."""
        self._require(Phase.REGISTERING)
        if now >= self._deadline:
            # The lease may have run out while we were claiming: do not trust it.
            self._fence(FenceReason.LEASE_DEADLINE)
            return
        self.phase = Phase.ACTIVE
        self.record_revision = record_revision
        self.registrations += 1
        self.holder = None
        self.speaks_for_cluster = True
        # Take over at most once: after holding the cluster, an agent that loses it
        # to another epoch must wait rather than snatch it back.
        self._takeover = False

    def claim_lost(self, holder: str) -> None:
        """The CAS lost, or another live epoch holds the record: STANDBY."""
        self._require(Phase.REGISTERING)
        self.phase = Phase.STANDBY
        self.holder = holder
        self.speaks_for_cluster = False

    # -- while active --

    def renewed(self, sent_at: float) -> None:
        """A keepalive sent at ``sent_at`` succeeded.

        The deadline counts from when the request was *sent*, not answered: etcd
        renewed the lease somewhere in between, so this never overestimates it.
        """
        if self.phase in (Phase.ACTIVE, Phase.REGISTERING):
            self._deadline = max(self._deadline, sent_at + self.ttl)

    def lease_lost(self) -> None:
        """keepalive or a leased write raised LeaseNotFound."""
        if self.phase in (Phase.ACTIVE, Phase.REGISTERING):
            self._fence(FenceReason.LEASE_LOST)

    def tick(self, now: float) -> bool:
        """Check the local deadline; True if this call fenced the agent."""
        if self.phase is Phase.ACTIVE and now >= self._deadline:
            self._fence(FenceReason.LEASE_DEADLINE)
            return True
        return False

    def record_seen(self, found_epoch: str | None, mod_revision: int) -> None:
        """The cluster record as read from the store while ACTIVE."""
        if self.phase is not Phase.ACTIVE:
            return
        if found_epoch is not None and found_epoch != self.epoch:
            self.holder = found_epoch
            self.speaks_for_cluster = False
            self._fence(FenceReason.RECORD_TAKEN)
        elif found_epoch is None or mod_revision != self.record_revision:
            self._fence(FenceReason.RECORD_CHANGED)

    def record_rewritten(self, record_revision: int) -> None:
        """This agent rewrote its own record (CAS succeeded): the new token."""
        self._require(Phase.ACTIVE)
        self.record_revision = record_revision

    def write_conflict(self) -> None:
        """A CAS on one of the cluster's keys failed: someone else writes them."""
        if self.phase is Phase.ACTIVE:
            self._fence(FenceReason.WRITE_CONFLICT)

    # -- leaving --

    def reregister(self) -> None:
        """From FENCED or STANDBY, start over (the adapter then grants a new lease)."""
        self._require(Phase.FENCED, Phase.STANDBY)
        self.phase = Phase.REGISTERING
        self.lease_id = 0
        self.record_revision = 0

    def stop(self) -> None:
        self.phase = Phase.STOPPED

    # -- internals --

    def _fence(self, reason: FenceReason) -> None:
        self.phase = Phase.FENCED
        self.fences += 1
        self.last_fence = reason
        self.record_revision = 0
        self._deadline = 0.0

    def _require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            allowed = ", ".join(p.value for p in phases)
            raise TransitionError(f"not allowed in phase {self.phase.value} (only in {allowed})")
