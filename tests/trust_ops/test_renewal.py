"""SVID renewal: the pure schedule, and the trio rotator over live in-memory TLS."""

from __future__ import annotations

import datetime as dt
import random

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from trust.ca import CertificateAuthority
from trust.errors import TrustError
from trust.metrics import TrustMetrics
from trust.rotation import RenewalSchedule, SvidRotator
from trust.spiffe import TrustDomain, workload_id
from trust.svid import Svid, issue_svid
from trust.tls import TlsContextHolder, handshake_and_verify

from .tlskit import exchange

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
TD = TrustDomain("a.mesh")
WEB = workload_id(TD, "shop", "web")
API = workload_id(TD, "shop", "api")


def test_renewal_is_at_half_life_within_jitter_and_seeded():
    sched = RenewalSchedule()
    rng = random.Random(7)
    times = [sched.renew_at(T0, T0 + HOUR, rng) for _ in range(2000)]
    shares = [(t - T0) / HOUR for t in times]
    assert min(shares) >= 0.4 and max(shares) <= 0.6
    assert max(shares) - min(shares) > 0.15  # jitter actually spreads renewals
    again = [sched.renew_at(T0, T0 + HOUR, random.Random(7)) for _ in range(1)]
    assert again[0] == times[0]


def test_renewal_never_planned_past_ninety_percent():
    sched = RenewalSchedule(fraction=0.85, jitter=0.1, latest=0.9)
    rng = random.Random(1)
    shares = [(sched.renew_at(T0, T0 + HOUR, rng) - T0) / HOUR for _ in range(2000)]
    assert max(shares) == pytest.approx(0.9)
    assert min(shares) >= 0.75


def test_retry_backs_off_exponentially_and_caps():
    sched = RenewalSchedule(
        retry_initial=dt.timedelta(seconds=1), retry_max=dt.timedelta(seconds=60)
    )
    far = T0 + dt.timedelta(days=1)

    class Top(random.Random):
        def random(self) -> float:
            return 1.0 - 1e-12

    delays = [(sched.retry_at(T0, n, far, Top()) - T0).total_seconds() for n in range(1, 10)]
    assert delays[:4] == pytest.approx([1, 2, 4, 8])
    assert delays[-1] == pytest.approx(60)
    low = sched.retry_at(T0, 3, far, random.Random(0)) - T0
    assert dt.timedelta(seconds=2) <= low <= dt.timedelta(seconds=4)  # equal jitter: [b/2, b]


def test_retry_never_sleeps_through_expiry():
    sched = RenewalSchedule(retry_max=dt.timedelta(minutes=10))
    expiry = T0 + dt.timedelta(seconds=40)
    at = sched.retry_at(T0, 12, expiry, random.Random(3))
    assert at - T0 <= dt.timedelta(seconds=20)  # at most half of what is left


def test_schedule_refuses_nonsense():
    with pytest.raises(ValueError):
        RenewalSchedule(fraction=0.95, latest=0.9)
    with pytest.raises(ValueError):
        RenewalSchedule(jitter=0.6)
    with pytest.raises(ValueError):
        RenewalSchedule().retry_at(T0, 0, T0 + HOUR, random.Random())


async def test_live_connection_survives_renewal_and_new_handshakes_get_new_serial(
    autojump_clock,
):
    real = dt.datetime.now(dt.UTC)
    ca, _ = CertificateAuthority.create(TD, real)
    bundles = ca.bundle_set
    start = trio.current_time()

    def now_fn() -> dt.datetime:  # wall clock driven by trio's (mock) clock
        return real + dt.timedelta(seconds=trio.current_time() - start)

    server = TlsContextHolder(issue_svid(ca, WEB, real), bundles)
    client = TlsContextHolder(issue_svid(ca, API, real), bundles)
    first_serial = server.svid.serial
    renewed_at: list[float] = []
    registry = CollectorRegistry()
    metrics = TrustMetrics(registry)
    metrics.svid_in_use(server.svid)

    async def renew() -> Svid:
        renewed_at.append(trio.current_time() - start)
        # OpenSSL checks real time, so mint at the real time, but long enough that
        # the next renewal falls after the end of the test's virtual hour.
        return issue_svid(ca, WEB, real, ttl=dt.timedelta(hours=4))

    seed = 42
    rotator = SvidRotator(
        server, renew, rng=random.Random(seed), now_fn=now_fn, on_renewed=metrics.svid_renewed
    )
    expected_at = RenewalSchedule().renew_at(
        server.svid.not_before, server.svid.not_after, random.Random(seed)
    )
    a, b = trio.testing.memory_stream_pair()
    srv, cli = server.wrap_server(a), client.wrap_client(b, "web.shop")
    echoed: list[bytes] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_and_verify, srv, bundles, now_fn)
        peer = await handshake_and_verify(cli, bundles, now_fn)
        assert peer.serial == first_serial
        await nursery.start(rotator.run)
        # Keep the live connection busy every 5 virtual minutes across the renewal.
        for i in range(12):
            await cli.send_all(b"tick%d" % i)
            echoed.append(await srv.receive_some(16))
            await trio.sleep(300)
        assert rotator.statistics().renewals == 1
        after = await exchange(server.server, server.bundles, client.client, client.bundles)
        nursery.cancel_scope.cancel()

    assert echoed == [b"tick%d" % i for i in range(12)]  # no byte lost across renewal
    assert renewed_at == [pytest.approx((expected_at - real).total_seconds(), abs=1e-6)]
    assert after.ok and after.client.serial == server.svid.serial != first_serial
    assert registry.get_sample_value(
        "meshfed_trust_svid_renewals_total", {"result": "ok"}
    ) == 1
    assert registry.get_sample_value(
        "meshfed_trust_svid_expiry_seconds", {"spiffe_id": str(WEB)}
    ) == server.svid.not_after.timestamp()


async def test_failed_renewals_retry_with_backoff_at_exact_times(autojump_clock):
    real = dt.datetime.now(dt.UTC)
    ca, _ = CertificateAuthority.create(TD, real)
    start = trio.current_time()

    def now_fn() -> dt.datetime:
        return real + dt.timedelta(seconds=trio.current_time() - start)

    holder = TlsContextHolder(issue_svid(ca, WEB, real), ca.bundle_set)
    attempts: list[float] = []

    async def renew() -> Svid:
        attempts.append(trio.current_time() - start)
        if len(attempts) == 1:
            raise OSError("agent unreachable")
        if len(attempts) == 2:
            return issue_svid(ca, API, real)  # wrong identity: refused, retried
        return issue_svid(ca, WEB, real)

    failures: list[BaseException] = []
    rotator = SvidRotator(
        holder, renew, rng=random.Random(5), now_fn=now_fn, on_failure=failures.append
    )
    # Replay the rng draws to know the exact planned times.
    twin, sched = random.Random(5), RenewalSchedule()
    svid = holder.svid
    first = sched.renew_at(svid.not_before, svid.not_after, twin)
    second = sched.retry_at(first, 1, svid.not_after, twin)
    third = sched.retry_at(second, 2, svid.not_after, twin)
    async with trio.open_nursery() as nursery:
        await nursery.start(rotator.run)
        while rotator.statistics().renewals == 0:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    expected = [(t - real).total_seconds() for t in (first, second, third)]
    assert attempts == pytest.approx(expected, abs=1e-6)
    assert [type(f) for f in failures] == [OSError, TrustError]
    stats = rotator.statistics()
    assert (stats.renewals, stats.failures, stats.consecutive_failures) == (1, 2, 0)
    assert holder.svid.spiffe_id == WEB and holder.generation == 2
