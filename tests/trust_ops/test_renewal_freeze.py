"""SvidRotator.freeze/thaw (the cert-expire drill's knob) and identity_lapsing (when a proxy
leaves rotation because its SVID is about to lapse)."""

from __future__ import annotations

import datetime as dt
import random

import trio

from trust.ca import CertificateAuthority
from trust.rotation import RotatorStatistics, SvidRotator, identity_lapsing
from trust.spiffe import TrustDomain, workload_id
from trust.svid import Svid, issue_svid
from trust.tls import TlsContextHolder

TD = TrustDomain("a.mesh")
WEB = workload_id(TD, "shop", "web")
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
S = dt.timedelta(seconds=1)


def healthy(**kw: object) -> RotatorStatistics:
    base = {
        "renewals": 3,
        "failures": 0,
        "consecutive_failures": 0,
        "next_attempt_at": None,
        "last_error": None,
        "frozen": False,
    }
    base.update(kw)
    return RotatorStatistics(**base)  # type: ignore[arg-type]


def test_lapsing_once_expired_whatever_the_rotator_says():
    nb, na = T0 - 60 * S, T0 + 90 * S
    assert identity_lapsing(healthy(), nb, na, na)
    assert identity_lapsing(healthy(), nb, na, na + S)


def test_lapsing_within_the_margin_only_when_renewal_is_stalled():
    nb, na = T0 - 60 * S, T0 + 90 * S  # lifetime 150s: margin 15s
    inside = na - 10 * S
    assert not identity_lapsing(healthy(), nb, na, inside)  # renewal will come
    assert identity_lapsing(healthy(frozen=True), nb, na, inside)
    assert identity_lapsing(healthy(consecutive_failures=2), nb, na, inside)
    outside = na - 20 * S
    assert not identity_lapsing(healthy(frozen=True), nb, na, outside)


def test_lapsing_margin_has_a_floor():
    nb, na = T0 - 5 * S, T0 + 5 * S  # 10% of 10s is 1s; the floor is 2s
    assert identity_lapsing(healthy(frozen=True), nb, na, na - 1.5 * S)
    assert not identity_lapsing(healthy(frozen=True), nb, na, na - 3 * S)


async def test_frozen_rotator_lets_the_svid_expire_and_renews_at_once_on_thaw(autojump_clock):
    real = dt.datetime.now(dt.UTC)
    ca, _ = CertificateAuthority.create(TD, real)
    start = trio.current_time()

    def now_fn() -> dt.datetime:
        return real + dt.timedelta(seconds=trio.current_time() - start)

    ttl = dt.timedelta(seconds=90)
    holder = TlsContextHolder(issue_svid(ca, WEB, real, ttl=ttl), ca.bundle_set)
    first = holder.svid
    attempts: list[float] = []

    async def renew() -> Svid:
        attempts.append(trio.current_time() - start)
        return issue_svid(ca, WEB, now_fn(), ttl=dt.timedelta(seconds=90))

    rotator = SvidRotator(holder, renew, rng=random.Random(1), now_fn=now_fn)
    rotator.freeze()
    async with trio.open_nursery() as nursery:
        await nursery.start(rotator.run)
        await trio.sleep(200)  # well past NotAfter (real + 90s)
        stats = rotator.statistics()
        assert attempts == [] and stats.frozen
        assert (stats.renewals, stats.failures) == (0, 0)  # waiting is not failing
        assert holder.svid is first and now_fn() > first.not_after
        rotator.thaw()
        await trio.sleep(0.001)
        assert attempts == [200.0]  # the overdue renewal, at once
        assert not rotator.statistics().frozen
        assert holder.svid is not first and holder.svid.not_after > now_fn()
        nursery.cancel_scope.cancel()
