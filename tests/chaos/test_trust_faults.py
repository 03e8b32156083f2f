"""ca-rotate's drop wait and cert-expire/cert-renew evidence: the pure cores, the injector's
ca-rotate against a real CA directory and store (no processes), and the judge's verdict when
the drop is refused."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from chaos.drill import FaultParams, TimelineEvent, parse_target
from chaos.injectors import (
    ComponentInfo,
    Injector,
    check_fresh_svid,
    check_issuers,
    check_svid_expired,
    drop_wait,
)
from chaos.judge import judge
from chaos.record import FaultRecord, Recorder, RequestLog, RequestRecord
from federation import keys
from federation.config import load_config
from federation.config.model import FederationConfig
from federation.store.embedded import EmbeddedStore
from trust.bundle import TrustBundle
from trust.rotation import CaDirectory
from trust.spiffe import TrustDomain

from .support import DRILLS, drill

T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)
S = dt.timedelta(seconds=1)


# -- drop_wait -----------------------------------------------------------------------------


def test_drop_runs_now_when_nothing_of_the_old_ca_can_be_live():
    assert drop_wait(None, T0, T0 + 100 * S) == 0.0
    assert drop_wait(T0 - S, T0, T0 + 100 * S) == 0.0
    assert drop_wait(T0, T0, T0 + 100 * S) == 0.0


def test_drop_waits_for_the_last_old_svid_within_the_deadline():
    assert drop_wait(T0 + 30 * S, T0, T0 + 100 * S) == 30.0
    assert drop_wait(T0 + 100 * S, T0, T0 + 100 * S) == 100.0


def test_drop_past_the_deadline_is_not_planned():
    assert drop_wait(T0 + 101 * S, T0, T0 + 100 * S) is None


@given(
    allowed=st.one_of(st.none(), st.integers(-1000, 1000)),
    deadline=st.integers(0, 1000),
)
def test_drop_wait_never_plans_past_allowed_or_deadline(allowed: int | None, deadline: int):
    at = None if allowed is None else T0 + allowed * S
    wait = drop_wait(at, T0, T0 + deadline * S)
    if wait is None:
        assert at is not None and at > T0 + deadline * S
    else:
        assert 0.0 <= wait <= deadline
        assert T0 + wait * S >= (at or T0)  # never before the drop is allowed


# -- sidecar /stats evidence -------------------------------------------------------------


def stats(
    not_after: dt.datetime, *, frozen: bool, serial: str = "a1", issuer: str = "k1"
) -> dict[str, Any]:
    return {
        "spiffe_id": "spiffe://aws-use1.demo.mesh/ns/demo/sa/whoami",
        "svid_not_after": not_after.isoformat(),
        "svid_serial": serial,
        "svid_issuer_key_id": issuer,
        "svid_renewal": {"frozen": frozen, "renewals": 3, "failures": 0},
    }


def test_expired_only_past_not_after_with_renewal_frozen():
    assert check_svid_expired(stats(T0 - S, frozen=True), T0)[0]
    assert check_svid_expired(stats(T0, frozen=True), T0)[0]
    ok, why = check_svid_expired(stats(T0 + 5 * S, frozen=True), T0)
    assert not ok and "5.0s left" in why
    ok, why = check_svid_expired(stats(T0 - S, frozen=False), T0)
    assert not ok and "not frozen" in why
    assert not check_svid_expired(None, T0)[0]
    assert not check_svid_expired({"svid_not_after": "soon"}, T0)[0]


def test_fresh_svid_needs_a_new_valid_serial_for_the_same_identity():
    old = stats(T0 - S, frozen=True, serial="a1")
    assert check_fresh_svid(old, stats(T0 + 90 * S, frozen=False, serial="b2"), T0)[0]
    same = check_fresh_svid(old, stats(T0 + 90 * S, frozen=False, serial="a1"), T0)
    assert not same[0] and "same SVID serial" in same[1]
    assert not check_fresh_svid(old, stats(T0 - S, frozen=False, serial="b2"), T0)[0]
    assert not check_fresh_svid(old, stats(T0 + 90 * S, frozen=True, serial="b2"), T0)[0]
    other = dict(stats(T0 + 90 * S, frozen=False, serial="b2"), spiffe_id="spiffe://x/y")
    assert not check_fresh_svid(old, other, T0)[0]
    assert not check_fresh_svid(old, None, T0)[0]


def test_issuers_every_sidecar_on_the_new_ca():
    new = {"a": stats(T0, frozen=False, issuer="k2"), "b": stats(T0, frozen=False, issuer="k2")}
    assert check_issuers(new, "k2")[0]
    mixed = dict(new, c=stats(T0, frozen=False, issuer="k1"))
    ok, why = check_issuers(mixed, "k2")
    assert not ok and "1 on another CA (c)" in why
    ok, why = check_issuers(dict(new, d=None), "k2")
    assert not ok and "did not answer (d)" in why
    assert not check_issuers({}, "k2")[0]


# -- the ca-rotate injector against a real CA directory ----------------------------------


@dataclass
class Layout:
    root: Path

    def ca_dir(self, trust_domain: str) -> Path:
        return self.root / "ca" / trust_domain


class NoProcesses:
    """A run with no agents or sidecars: bundle checks cannot pass, rotation steps still run."""

    def resolve(self, target: str) -> list[ComponentInfo]:
        return []

    async def kill(self, target: str) -> list[str]:
        return []

    async def revive(self, target: str) -> list[str]:
        return []


@dataclass
class Fed:
    cfg: FederationConfig
    layout: Layout
    store: EmbeddedStore
    store_url: str = "embedded"
    control: NoProcesses = field(default_factory=NoProcesses)
    links: dict[str, Any] = field(default_factory=dict)
    attached: bool = False
    notices: list[str] = field(default_factory=list)


def rotate_event() -> TimelineEvent:
    return TimelineEvent(
        10.0, "ca-rotate", parse_target("cluster:gcp-euw1"), FaultParams(interval=1.0, max_wait=5.0)
    )


async def test_drop_refused_after_max_wait_is_recorded_unverified(tmp_path, autojump_clock):
    live_until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    cfg = load_config(DRILLS / "configs" / "short-svid.yaml")
    td = cfg.cluster("gcp-euw1").trust_domain
    fed = Fed(cfg, Layout(tmp_path), EmbeddedStore())
    ca = CaDirectory.init(fed.layout.ca_dir(td), TrustDomain(td), dt.datetime.now(dt.UTC))
    ca.record_issued(live_until)
    recorder = Recorder()
    await Injector(fed, recorder, lambda: 0.0).apply(rotate_event())  # type: ignore[arg-type]
    steps = {f.params["step"]: f for f in recorder.faults}
    assert list(steps) == ["publish", "switch", "drop"]
    drop = steps["drop"]
    assert not drop.verified
    assert "drop refused" in drop.detail and "old CA may be valid until" in drop.detail
    # The refusal left the rotation where it was: switched, the old root still published.
    assert CaDirectory.open(fed.layout.ca_dir(td)).state.phase == "switched"


async def test_drop_runs_once_the_old_cas_svids_have_expired(tmp_path, autojump_clock):
    cfg = load_config(DRILLS / "configs" / "short-svid.yaml")
    td = cfg.cluster("gcp-euw1").trust_domain
    fed = Fed(cfg, Layout(tmp_path), EmbeddedStore())
    ca = CaDirectory.init(fed.layout.ca_dir(td), TrustDomain(td), dt.datetime.now(dt.UTC))
    ca.record_issued(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    recorder = Recorder()
    await Injector(fed, recorder, lambda: 0.0).apply(rotate_event())  # type: ignore[arg-type]
    drop = [f for f in recorder.faults if f.params["step"] == "drop"]
    assert len(drop) == 1 and drop[0].detail.startswith("drop: ")
    state = CaDirectory.open(fed.layout.ca_dir(td)).state
    assert (state.phase, state.sequence) == ("steady", 3)
    kv = await fed.store.get(keys.bundle(td))
    assert kv is not None
    published = TrustBundle.from_json(TrustDomain(td), kv.value)
    assert published.sequence == 3 and len(published.roots) == 1  # the old root is gone
    # No agent or sidecar answered, so no step can claim it reached them.
    assert not any(f.verified for f in recorder.faults)


# -- the judge: a refused drop fails the drill -------------------------------------------


def rotation_requests(end: float = 135.0, rate: float = 20.0) -> RequestLog:
    log = RequestLog()
    for i in range(int(end * rate)):
        t = i / rate
        log.append(
            RequestRecord(
                t_start=t,
                t_end=t + 0.01,
                source="aws-use1/frontend",
                service="whoami.demo",
                outcome="ok",
                error_kind="",
                latency=0.01,
                served_by_cluster="gcp-euw1",
                served_by_zone="europe-west1-b",
                served_by_workload="whoami",
            )
        )
    return log


def rotation_faults(drop_verified: bool) -> list[FaultRecord]:
    return [
        FaultRecord(1.0, "kill", "endpoint:aws-use1/whoami-a", {}, True, "gone"),
        FaultRecord(1.0, "kill", "endpoint:aws-use1/whoami-b", {}, True, "gone"),
        FaultRecord(10.0, "ca-rotate", "cluster:gcp-euw1", {"step": "publish"}, True, "held"),
        FaultRecord(16.0, "ca-rotate", "cluster:gcp-euw1", {"step": "switch"}, True, "switched"),
        FaultRecord(
            110.0,
            "ca-rotate",
            "cluster:gcp-euw1",
            {"step": "drop"},
            drop_verified,
            "drop: ok" if drop_verified else "drop refused: old SVIDs live",
        ),
    ]


def test_refused_drop_fails_the_drill_on_faults_verified():
    d = drill("ca-rotation")
    bad = judge(d.drill, rotation_requests(), rotation_faults(False), d.clouds)
    assert not bad.passed
    faults = next(v for v in bad.verdicts if v.budget == "faults applied and verified")
    assert not faults.passed
    # Every other budget held: the refused drop alone fails the drill.
    assert all(v.passed for v in bad.verdicts if v is not faults)
    good = judge(d.drill, rotation_requests(), rotation_faults(True), d.clouds)
    assert good.passed
