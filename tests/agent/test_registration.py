"""The fencing state machine, as plain calls with exact times."""

from __future__ import annotations

import pytest

from federation.agent.registration import (
    ClaimCreate,
    ClaimReplace,
    ClaimWait,
    FenceReason,
    Phase,
    Registration,
    TransitionError,
)

TTL = 3.0


def active(epoch: str = "inc-a", now: float = 0.0, **kw: bool) -> Registration:
    reg = Registration(epoch, TTL, **kw)
    reg.lease_granted(7, now)
    assert isinstance(reg.decide_claim(None, 0, 0), ClaimCreate)
    reg.claimed(10, now)
    return reg


@pytest.mark.parametrize(
    ("found", "takeover", "expected"),
    [
        (None, False, ClaimCreate()),
        ("inc-a", False, ClaimReplace(5, "inc-a", 99)),  # own epoch: adopt
        ("inc-b", False, ClaimWait("inc-b")),  # another live epoch: wait
        ("inc-b", True, ClaimReplace(5, "inc-b", 99)),  # --takeover
        ("<undecodable>", False, ClaimWait("<undecodable>")),  # never silently overwritten
    ],
)
def test_claim_decision_table(found, takeover, expected):
    reg = Registration("inc-a", TTL, takeover=takeover)
    reg.lease_granted(1, 0.0)
    assert reg.decide_claim(found, 5, 99) == expected


def test_claim_makes_active_and_allows_writes_until_the_local_deadline():
    reg = active(now=100.0)
    assert reg.phase is Phase.ACTIVE
    assert reg.record_revision == 10
    assert reg.may_write(102.9)
    assert not reg.may_write(103.0)  # lease granted at 100 with TTL 3


def test_renewal_extends_from_the_send_time():
    reg = active(now=0.0)
    reg.renewed(2.0)
    assert reg.deadline == 5.0
    reg.renewed(1.0)  # a late answer to an older keepalive never shortens it
    assert reg.deadline == 5.0


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (lambda r: r.lease_lost(), FenceReason.LEASE_LOST),
        (lambda r: r.tick(3.0), FenceReason.LEASE_DEADLINE),
        (lambda r: r.record_seen("inc-b", 10), FenceReason.RECORD_TAKEN),
        (lambda r: r.record_seen(None, 0), FenceReason.RECORD_CHANGED),
        (lambda r: r.record_seen("inc-a", 11), FenceReason.RECORD_CHANGED),
        (lambda r: r.write_conflict(), FenceReason.WRITE_CONFLICT),
    ],
)
def test_every_fence_stops_all_writes(event, reason):
    reg = active()
    event(reg)
    assert reg.phase is Phase.FENCED
    assert reg.last_fence is reason
    assert reg.fences == 1
    assert not reg.may_write(0.5)


def test_record_seen_unchanged_keeps_active_and_tick_before_deadline_does_not_fence():
    reg = active()
    reg.record_seen("inc-a", 10)
    assert not reg.tick(2.9)
    assert reg.phase is Phase.ACTIVE


def test_fenced_reregisters_with_a_new_lease():
    reg = active()
    reg.lease_lost()
    reg.reregister()
    assert reg.phase is Phase.REGISTERING and reg.lease_id == 0
    reg.lease_granted(8, 10.0)
    reg.claimed(20, 10.0)
    assert reg.phase is Phase.ACTIVE and reg.registrations == 2 and reg.lease_id == 8


def test_claim_after_the_lease_could_have_expired_fences_instead():
    reg = Registration("inc-a", TTL)
    reg.lease_granted(1, 0.0)
    reg.claimed(5, 3.5)  # the claim answer came back after the TTL
    assert reg.phase is Phase.FENCED and reg.last_fence is FenceReason.LEASE_DEADLINE


def test_takeover_happens_at_most_once():
    reg = active(takeover=True)
    reg.record_seen("inc-b", 12)  # someone took it back
    reg.reregister()
    reg.lease_granted(9, 5.0)
    assert reg.decide_claim("inc-b", 12, 3) == ClaimWait("inc-b")


def test_standby_until_the_holder_is_gone():
    reg = Registration("inc-a", TTL)
    reg.lease_granted(1, 0.0)
    reg.claim_lost("inc-b")
    assert reg.phase is Phase.STANDBY and reg.holder == "inc-b"
    assert not reg.may_write(0.0)
    reg.reregister()
    reg.lease_granted(2, 1.0)
    assert reg.decide_claim(None, 0, 0) == ClaimCreate()


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.claimed(1, 0.0),
        lambda r: r.decide_claim(None, 0, 0),
        lambda r: r.claim_lost("x"),
        lambda r: r.record_rewritten(3),
    ],
)
def test_inputs_outside_their_phase_are_errors(call):
    reg = active()
    reg.lease_lost()
    with pytest.raises(TransitionError):
        call(reg)


def test_ttl_must_be_positive():
    with pytest.raises(ValueError):
        Registration("inc-a", 0)


def test_speaks_for_cluster_from_the_first_claim_only():
    reg = Registration("inc-a", TTL)
    assert not reg.speaks_for_cluster  # not yet known to be the cluster's writer
    reg.lease_granted(1, 0.0)
    assert not reg.speaks_for_cluster
    reg.decide_claim(None, 0, 0)
    reg.claimed(10, 0.0)
    assert reg.speaks_for_cluster


@pytest.mark.parametrize("trouble", ["deadline", "lease_lost"])
def test_lease_trouble_keeps_speaking_for_the_cluster_through_reregistration(trouble):
    # Cut off from the store: the agent still means to publish what it did, so its
    # catalog keeps its own records while it is fenced and re-registering.
    reg = active(now=0.0)
    if trouble == "deadline":
        assert reg.tick(TTL)
    else:
        reg.lease_lost()
    assert reg.phase is Phase.FENCED and reg.speaks_for_cluster
    reg.reregister()
    reg.lease_granted(8, 10.0)
    assert reg.phase is Phase.REGISTERING and reg.speaks_for_cluster
    reg.decide_claim("inc-a", 4, 7)
    reg.claimed(20, 10.0)
    assert reg.speaks_for_cluster


def test_another_holder_ends_speaking_for_the_cluster():
    reg = active(now=0.0)
    reg.record_seen("inc-b", 11)  # taken over
    assert reg.last_fence is FenceReason.RECORD_TAKEN and not reg.speaks_for_cluster
    reg.reregister()
    reg.lease_granted(8, 1.0)
    assert isinstance(reg.decide_claim("inc-b", 11, 9), ClaimWait)
    reg.claim_lost("inc-b")
    assert reg.phase is Phase.STANDBY and not reg.speaks_for_cluster
    reg.reregister()  # the holder went: claiming again makes it speak again
    reg.lease_granted(9, 2.0)
    reg.decide_claim(None, 0, 0)
    reg.claimed(30, 2.0)
    assert reg.speaks_for_cluster


def test_a_lost_claim_race_after_lease_trouble_stops_speaking():
    reg = active(now=0.0)
    reg.lease_lost()
    reg.reregister()
    reg.lease_granted(8, 1.0)
    reg.decide_claim(None, 0, 0)
    reg.claim_lost("inc-c")  # the create CAS lost: someone else holds the record now
    assert reg.phase is Phase.STANDBY and not reg.speaks_for_cluster
