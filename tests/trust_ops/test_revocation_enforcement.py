"""Revocation (BAD_INPUTS 10): refused on new handshakes, live connections closed."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from federation.store import open_store
from trust.ca import CertificateAuthority
from trust.enforcement import LiveConnectionRegistry, RevocationEnforcer
from trust.errors import HandshakeRefused
from trust.metrics import TrustMetrics
from trust.publish import publish_revocation, watch_revocations, withdraw_revocation
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import TrustDomain, workload_id
from trust.svid import issue_svid
from trust.tls import TlsContextHolder, handshake_and_verify
from trust.validate import VerifiedPeer

from .tlskit import exchange, real_now

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
TD, TD_B = TrustDomain("a.mesh"), TrustDomain("b.mesh")
WEB, API = workload_id(TD, "shop", "web"), workload_id(TD, "shop", "api")


def _peer(sid, serial: int, not_after=T0 + dt.timedelta(hours=1)) -> VerifiedPeer:
    return VerifiedPeer(spiffe_id=sid, serial=serial, not_after=not_after, chain=())


def test_registry_names_connections_of_revoked_serials_and_ids():
    reg = LiveConnectionRegistry()
    reg.add(1, _peer(WEB, 10))
    reg.add(2, _peer(WEB, 11))
    reg.add(3, _peer(API, 12))
    reg.add(4, _peer(workload_id(TD_B, "shop", "web"), 10))  # same serial, other domain
    by_serial = RevocationSet.of([Revocation(TD, 10, None, "", T0)])
    assert reg.revoked(by_serial) == [1]
    by_id = RevocationSet.of([Revocation(TD, None, WEB, "", T0)])
    assert reg.revoked(by_id) == [1, 2]
    reg.remove(1)
    assert reg.revoked(by_id) == [2] and len(reg) == 3
    assert reg.revoked(RevocationSet()) == []


def test_registry_reports_expired_peers():
    reg = LiveConnectionRegistry()
    reg.add(1, _peer(WEB, 1, not_after=T0))
    reg.add(2, _peer(API, 2, not_after=T0 + dt.timedelta(hours=1)))
    assert reg.expired(T0 + dt.timedelta(seconds=1)) == [1]


async def test_enforcer_cancels_a_peer_revoked_before_it_is_tracked():
    enforcer = RevocationEnforcer(RevocationSet.of([Revocation(TD, 10, None, "", T0)]))
    with enforcer.track(_peer(WEB, 10)) as scope:
        await trio.sleep_forever()
    assert scope.cancelled_caught and enforcer.statistics().closed == 1
    assert enforcer.statistics().live == 0


async def test_revocation_published_in_the_store_closes_live_connection_and_refuses_new():
    real = real_now()
    ca, _ = CertificateAuthority.create(TD, real)
    bundles = ca.bundle_set
    server = TlsContextHolder(issue_svid(ca, WEB, real), bundles)
    bad, good = issue_svid(ca, API, real), issue_svid(ca, API, real)
    bad_client = TlsContextHolder(bad, bundles)
    good_client = TlsContextHolder(good, bundles)
    registry = CollectorRegistry()
    metrics = TrustMetrics(registry)
    enforcer = RevocationEnforcer(on_close=metrics.connection_revoked)
    updates: list[RevocationSet] = []
    changed = trio.Event()

    def on_change(revoked: RevocationSet) -> None:
        enforcer.update(revoked)
        metrics.revocations_in_force(revoked)
        updates.append(revoked)
        changed.set()

    closed: dict[str, bool] = {}

    async def serve(name: str, stream, task_status=trio.TASK_STATUS_IGNORED) -> None:
        peer = await handshake_and_verify(stream, bundles, real_now, revoked=enforcer.revoked)
        task_status.started()
        with enforcer.track(peer) as scope:
            while data := await stream.receive_some(64):
                await stream.send_all(data)
        closed[name] = scope.cancelled_caught
        await trio.aclose_forcefully(stream)

    async def connect(nursery, holder, name):
        a, b = trio.testing.memory_stream_pair()
        cli = holder.wrap_client(b, "web.shop")
        async with trio.open_nursery() as inner:
            inner.start_soon(handshake_and_verify, cli, bundles, real_now)
            await nursery.start(serve, name, server.wrap_server(a))
        await cli.send_all(b"hello")
        assert await cli.receive_some(64) == b"hello"
        return cli

    async with open_store("memory://") as store, trio.open_nursery() as nursery:
        await nursery.start(watch_revocations, store, on_change)
        assert updates == [RevocationSet()]
        bad_cli = await connect(nursery, bad_client, "bad")
        good_cli = await connect(nursery, good_client, "good")
        assert enforcer.statistics().live == 2

        changed = trio.Event()
        record = Revocation(TD, bad.serial, None, "key compromise", real)
        await publish_revocation(store, record)
        with trio.fail_after(5):
            await changed.wait()
        # The revoked peer's connection ends; the other one carries on.
        with trio.fail_after(5):
            while "bad" not in closed:
                await trio.sleep(0.01)
        assert closed["bad"] is True
        with pytest.raises(trio.BrokenResourceError):  # closed forcefully, no close_notify
            await bad_cli.receive_some(64)
        await good_cli.send_all(b"still here")
        assert await good_cli.receive_some(64) == b"still here"

        # A new handshake with the revoked SVID is refused by the server.
        again = await exchange(
            server.server, bundles, bad_client.client, bundles, revoked=enforcer.revoked
        )
        assert isinstance(again.server, HandshakeRefused) and again.server.reason == "revoked"

        # Withdrawing re-admits it.
        changed = trio.Event()
        assert await withdraw_revocation(store, record)
        with trio.fail_after(5):
            await changed.wait()
        readmitted = await exchange(
            server.server, bundles, bad_client.client, bundles, revoked=enforcer.revoked
        )
        assert readmitted.ok
        nursery.cancel_scope.cancel()

    assert registry.get_sample_value("meshfed_trust_revoked_connections_closed_total") == 1
    assert registry.get_sample_value("meshfed_trust_revocations", {"trust_domain": "a.mesh"}) == 0
    assert "good" not in closed or closed["good"] is False
