"""CA rotation: the pure state machine, the directory layout, and zero failed handshakes."""

from __future__ import annotations

import datetime as dt
import stat
from collections import Counter
from pathlib import Path

import pytest
import trio

from trust.bundle import BundleKeeper, TrustBundle
from trust.ca import CertificateAuthority
from trust.errors import CaKeyError, HandshakeRefused
from trust.rotation import CaDirectory, CaRotation, RotationRefused
from trust.spiffe import TrustDomain, workload_id
from trust.tls import TlsContextHolder

from .tlskit import exchange, real_now

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
TD = TrustDomain("a.mesh")
WEB, API = workload_id(TD, "shop", "web"), workload_id(TD, "shop", "api")


# -- the pure state machine -------------------------------------------------------------------


def test_three_steps_move_phase_and_sequence():
    s = CaRotation().record_issued(T0 + dt.timedelta(hours=1))
    p = s.publish()
    assert (p.phase, p.sequence) == ("published", 2)
    w = p.switch()
    assert (w.phase, w.sequence, w.previous_issued_until) == (
        "switched",
        2,
        T0 + dt.timedelta(hours=1),
    )
    assert w.active_issued_until is None
    d = w.drop(T0 + dt.timedelta(hours=2))
    assert (d.phase, d.sequence, d.previous_issued_until) == ("steady", 3, None)


@pytest.mark.parametrize(
    ("state", "step"),
    [
        (CaRotation(), "switch"),
        (CaRotation(), "drop"),
        (CaRotation(phase="published"), "publish"),
        (CaRotation(phase="published"), "drop"),
        (CaRotation(phase="switched"), "publish"),
    ],
)
def test_steps_out_of_order_are_refused_naming_the_next_step(state, step):
    with pytest.raises(RotationRefused) as err:
        if step == "drop":
            state.drop(T0)
        else:
            getattr(state, step)()
    assert err.value.reason == "out_of_order"
    assert repr(state.next_step) in str(err.value)


def test_drop_waits_for_the_old_cas_last_svid():
    s = CaRotation().record_issued(T0 + dt.timedelta(minutes=30))
    s = s.record_issued(T0 + dt.timedelta(minutes=50)).record_issued(T0)
    switched = s.publish().switch().record_issued(T0 + dt.timedelta(hours=5))
    assert switched.drop_allowed_at() == T0 + dt.timedelta(minutes=50)
    with pytest.raises(RotationRefused) as err:
        switched.drop(T0 + dt.timedelta(minutes=49))
    assert err.value.reason == "old_svids_live" and "1m00s from now" in str(err.value)
    assert switched.drop(T0 + dt.timedelta(minutes=50)).phase == "steady"


def test_state_round_trips_and_strict_json():
    s = CaRotation().record_issued(T0).publish().switch()
    assert CaRotation.from_json(s.to_json()) == s
    with pytest.raises(ValueError):
        CaRotation.from_json('{"phase": "steady", "sequence": 1, "extra": 1}')
    with pytest.raises(ValueError):
        CaRotation.from_json('{"phase": "sideways", "sequence": 1}')


# -- the directory ------------------------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("intermediate", [False, True])
def test_directory_layout_through_a_rotation(tmp_path, intermediate):
    d = CaDirectory.init(tmp_path / "ca", TD, T0, intermediate=intermediate)
    old_root = d.active().root
    d.issue(WEB, T0)
    bundle = d.rotate("publish", T0)
    assert bundle.sequence == 2 and bundle.roots[0] == old_root
    new_root = bundle.roots[1]
    assert d.active().root == old_root  # still signing with the old CA
    keys = [p for p in (tmp_path / "ca").rglob("*.key")]
    assert keys and all(_mode(p) == 0o600 for p in keys)
    d.rotate("switch", T0)
    assert d.active().root == new_root and d.bundle().roots == (old_root, new_root)
    assert not (tmp_path / "ca" / "next").exists()
    assert _mode(tmp_path / "ca" / "previous" / "ca.key") == 0o600
    assert CertificateAuthority.load(tmp_path / "ca").root == new_root  # other readers follow
    reopened = CaDirectory.open(tmp_path / "ca")
    assert reopened.state == d.state
    with pytest.raises(RotationRefused):
        reopened.rotate("drop", T0)
    final = reopened.rotate("drop", T0 + dt.timedelta(hours=2))
    assert final.roots == (new_root,) and final.sequence == 3
    assert not (tmp_path / "ca" / "previous").exists()
    assert (tmp_path / "ca" / "root.key").exists() == intermediate


def test_interrupted_publish_reuses_the_new_ca(tmp_path):
    d = CaDirectory.init(tmp_path / "ca", TD, T0)
    CertificateAuthority.init(tmp_path / "ca" / "next", TD, T0)  # crash after writing next/
    made = CertificateAuthority.load(tmp_path / "ca" / "next").root
    assert d.rotate("publish", T0).roots[1] == made


def test_loose_key_mode_stops_rotation(tmp_path):
    d = CaDirectory.init(tmp_path / "ca", TD, T0)
    (tmp_path / "ca" / "ca.key").chmod(0o644)
    with pytest.raises(CaKeyError, match="chmod 600"):
        d.rotate("publish", T0)
    assert CaDirectory.open(tmp_path / "ca").state.phase == "steady"


# -- under load ---------------------------------------------------------------------------------


class Side:
    """One workload: its SVID and its own view of the bundles (as its agent delivers them)."""

    def __init__(self, ca_dir: CaDirectory, sid, bundle: TrustBundle) -> None:
        self.ca_dir, self.sid = ca_dir, sid
        self.keeper = BundleKeeper()
        assert self.keeper.offer(bundle).changed
        self.holder = TlsContextHolder(ca_dir.issue(sid, real_now()), self.keeper.bundle_set())

    def deliver(self, bundle: TrustBundle) -> None:
        assert self.keeper.offer(bundle).changed
        self.holder.update(bundles=self.keeper.bundle_set())

    def renew(self) -> None:
        self.holder.update(svid=self.ca_dir.issue(self.sid, real_now()))


class Load:
    """Workers doing handshakes back to back with whatever contexts are current."""

    def __init__(self, server: Side, client: Side) -> None:
        self.server, self.client = server, client
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    async def worker(self) -> None:
        while True:
            s, c = self.server.holder, self.client.holder
            result = await exchange(s.server, s.bundles, c.client, c.bundles)
            self.outcomes["ok" if result.ok else "failed"] += 1
            for side in (result.server, result.client):
                if isinstance(side, HandshakeRefused):
                    self.reasons[side.reason] += 1

    async def more(self, n: int) -> None:
        target = self.total + n
        while self.total < target:
            await trio.sleep(0.001)


async def _rotation_under_load(tmp_path: Path, per_phase: int, *, skip_publish: bool) -> Load:
    ca_dir = CaDirectory.init(tmp_path / "ca", TD, real_now())
    first = ca_dir.bundle()
    server, client = Side(ca_dir, WEB, first), Side(ca_dir, API, first)
    load = Load(server, client)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(load.worker)
        await load.more(per_phase)
        combined = ca_dir.rotate("publish", real_now())
        if not skip_publish:
            # Step 1 reaches peers one at a time, under load, before anyone switches.
            server.deliver(combined)
            await load.more(per_phase // 2)
            client.deliver(combined)
        await load.more(per_phase)
        ca_dir.rotate("switch", real_now())
        server.renew()  # new SVIDs chain to the new root
        await load.more(per_phase // 2)
        client.renew()
        await load.more(per_phase)
        if not skip_publish:
            # Every old-CA SVID has been renewed above; drop is allowed once the
            # old CA's last NotAfter has passed, which the pure core is told here.
            later = ca_dir.state.drop_allowed_at()
            assert later is not None
            final = ca_dir.rotate("drop", later + dt.timedelta(seconds=1))
            assert final.roots == (ca_dir.active().root,)
            client.deliver(final)
            await load.more(per_phase // 2)
            server.deliver(final)
            await load.more(per_phase)
        nursery.cancel_scope.cancel()
    return load


async def test_three_step_rotation_under_load_has_zero_failed_handshakes(tmp_path):
    load = await _rotation_under_load(tmp_path, 100, skip_publish=False)
    assert load.outcomes["failed"] == 0, load.reasons
    assert load.outcomes["ok"] >= 550  # 100 per phase, 50 between half-steps


@pytest.mark.slow
async def test_three_step_rotation_under_heavy_load(tmp_path):
    load = await _rotation_under_load(tmp_path, 400, skip_publish=False)
    assert load.outcomes["failed"] == 0, load.reasons
    assert load.outcomes["ok"] >= 2200


async def test_control_switching_before_peers_have_the_new_root_fails_handshakes(tmp_path):
    load = await _rotation_under_load(tmp_path, 40, skip_publish=True)
    assert load.outcomes["failed"] > 0
    assert load.reasons["bad_chain"] + load.reasons["handshake_failed"] > 0


def test_a_signer_in_another_process_never_undoes_a_rotation_step(tmp_path):
    # The agent holds one CaDirectory for its lifetime and records every SVID it
    # signs; the operator rotates with another handle (another process). Neither may
    # write back a stale copy of the other's state.
    path = tmp_path / "ca"
    agent = CaDirectory.init(path, TD, T0)
    operator = CaDirectory.open(path)
    operator.rotate("publish", T0)
    agent.record_issued(T0 + dt.timedelta(hours=1))  # stale handle: still thinks "steady"
    assert CaDirectory.open(path).state.phase == "published"
    operator.rotate("switch", T0)  # refused before the fix: the phase was back to steady
    agent.record_issued(T0 + dt.timedelta(hours=2))
    state = CaDirectory.open(path).state
    assert state.phase == "switched"
    assert agent.state == state  # the agent's handle follows the disk
