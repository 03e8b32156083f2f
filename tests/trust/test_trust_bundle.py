"""Bundles and the keeper: BAD_INPUTS cases 13-15; revocation records."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from trustkit import NOW, der, make_ca

from trust.bundle import Accepted, BundleKeeper, Refused, TrustBundle
from trust.ca import CertificateAuthority
from trust.errors import BundleError, RevocationError
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import TrustDomain, workload_id

TD_A, TD_B = TrustDomain("a.mesh"), TrustDomain("b.mesh")
CA_A, _ = CertificateAuthority.create(TD_A, NOW)
CA_A2, _ = CertificateAuthority.create(TD_A, NOW)
CA_B, _ = CertificateAuthority.create(TD_B, NOW)


def doc(bundle: TrustBundle) -> dict:
    return json.loads(bundle.to_json())


def test_json_round_trip_with_two_roots():
    bundle = TrustBundle(TD_A, (CA_A.root, CA_A2.root), 3, 300)
    again = TrustBundle.from_json(TD_A, bundle.to_json())
    assert again == bundle
    d = doc(bundle)
    assert d["spiffe_sequence"] == 3 and d["spiffe_refresh_hint"] == 300
    assert {k["use"] for k in d["keys"]} == {"x509-svid"} and d["keys"][0]["crv"] == "P-256"


def test_unknown_use_and_kty_entries_are_ignored():
    d = doc(CA_A.trust_bundle(1))
    d["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k"})
    d["keys"].append({"use": "x509-svid", "kty": "OKP", "x5c": []})
    d["keys"].append({"use": "something-new", "kty": "EC"})
    assert TrustBundle.from_json(TD_A, json.dumps(d)).roots == (CA_A.root,)


def _mutate(fn):
    d = doc(CA_A.trust_bundle(1))
    fn(d)
    return json.dumps(d)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("not json", "not JSON"),
        ("[]", "object"),
        ('{"spiffe_sequence": 1}', "no 'keys'"),
        (_mutate(lambda d: d["keys"][0].__setitem__("x5c", [])), "exactly one"),
        (_mutate(lambda d: d["keys"][0]["x5c"].append(d["keys"][0]["x5c"][0])), "exactly one"),
        (_mutate(lambda d: d["keys"][0].__setitem__("x5c", ["!!!"])), "base64 DER"),
        (_mutate(lambda d: d["keys"][0].__setitem__("x", d["keys"][0]["y"])), "do not match"),
        (_mutate(lambda d: d.pop("spiffe_sequence")), "spiffe_sequence"),
        (_mutate(lambda d: d.__setitem__("spiffe_sequence", -1)), "spiffe_sequence"),
        (_mutate(lambda d: d.__setitem__("keys", [])), "no usable"),
        (_mutate(lambda d: d["keys"].__setitem__(0, "x")), "not an object"),
    ],
)
def test_malformed_bundles_are_refused_naming_the_rule(text, rule):
    with pytest.raises(BundleError) as err:
        TrustBundle.from_json(TD_A, text)
    assert rule in err.value.detail


def test_a_non_ca_root_is_refused():
    _, not_ca = make_ca("leafish", TD_A, ca=False)
    d = doc(CA_A.trust_bundle(1))
    d["keys"][0]["x5c"] = [base64.b64encode(der(not_ca)).decode()]
    pub = not_ca.public_key().public_numbers()
    enc = lambda n: base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()  # noqa: E731
    d["keys"][0]["x"], d["keys"][0]["y"] = enc(pub.x), enc(pub.y)
    with pytest.raises(BundleError, match="not a CA"):
        TrustBundle.from_json(TD_A, json.dumps(d))


def test_keeper_accepts_higher_sequences_and_repeats():
    keeper = BundleKeeper()
    first = keeper.offer(CA_A.trust_bundle(1))
    assert isinstance(first, Accepted) and first.changed
    again = keeper.offer(CA_A.trust_bundle(1))
    assert isinstance(again, Accepted) and not again.changed
    rotated = TrustBundle(TD_A, (CA_A.root, CA_A2.root), 2)
    assert isinstance(keeper.offer(rotated), Accepted)
    assert keeper.bundle_set()[TD_A] == (CA_A.root, CA_A2.root)


def test_keeper_refuses_rollback_and_conflict_and_keeps_last_good():
    seen: list[Refused] = []
    keeper = BundleKeeper(on_refusal=seen.append)
    keeper.offer(TrustBundle(TD_A, (CA_A.root, CA_A2.root), 5))
    lower = keeper.offer(CA_A.trust_bundle(4))
    conflict = keeper.offer(CA_A2.trust_bundle(5))
    assert isinstance(lower, Refused) and lower.reason == "rollback"
    assert isinstance(conflict, Refused) and conflict.reason == "sequence_conflict"
    current = keeper.current(TD_A)
    assert current is not None and current.sequence == 5 and len(current.roots) == 2
    counts = keeper.refusal_counts()
    assert counts == {("a.mesh", "rollback"): 1, ("a.mesh", "sequence_conflict"): 1}
    assert [r.reason for r in seen] == ["rollback", "sequence_conflict"]


def test_keeper_refuses_malformed_text_and_keeps_last_good():
    keeper = BundleKeeper()
    keeper.offer(CA_A.trust_bundle(1))
    refused = keeper.offer_json(TD_A, '{"keys": [], "spiffe_sequence": 9}')
    assert isinstance(refused, Refused) and refused.reason == "malformed"
    assert keeper.current(TD_A) == CA_A.trust_bundle(1)


def test_domain_b_roots_published_under_domain_a_key_are_refused():
    keeper = BundleKeeper()
    # The attacker writes B's root into /meshfed/v1/bundles/a.mesh.
    forged = keeper.offer_json(TD_A, CA_B.trust_bundle(1).to_json())
    assert isinstance(forged, Refused) and forged.reason == "foreign_root"
    assert keeper.current(TD_A) is None


def test_root_already_trusted_for_another_domain_is_refused_even_if_unnamed():
    keeper = BundleKeeper(allow_unnamed_roots=True)
    unnamed = make_ca("unnamed", None)[1]
    assert isinstance(keeper.offer(TrustBundle(TD_B, (unnamed,), 1)), Accepted)
    moved = keeper.offer(TrustBundle(TD_A, (unnamed,), 1))
    assert isinstance(moved, Refused) and moved.reason == "root_of_other_domain"


def test_unnamed_roots_are_refused_by_default():
    unnamed = make_ca("unnamed", None)[1]
    refused = BundleKeeper().offer(TrustBundle(TD_A, (unnamed,), 1))
    assert isinstance(refused, Refused) and refused.reason == "foreign_root"


def test_bundle_written_by_another_domains_publisher_is_refused():
    refused = BundleKeeper().offer(CA_A.trust_bundle(1), published_by=TD_B)
    assert isinstance(refused, Refused) and refused.reason == "foreign_publisher"


def test_revocation_json_round_trip_and_lookup():
    alice = workload_id(TD_A, "shop", "alice")
    r1 = Revocation(TD_A, 0xABC, None, "key leaked", NOW)
    r2 = Revocation(TD_A, None, alice, "decommissioned", NOW)
    for r in (r1, r2):
        assert Revocation.from_json(r.to_json()) == r
    assert r1.store_segment() == "s-abc" and r2.store_segment().startswith("id-")
    rs = RevocationSet.of([r1, r2])
    assert rs.is_revoked(TD_A, 0xABC, workload_id(TD_A, "x", "y"))
    assert rs.is_revoked(TD_A, 1, alice)
    assert not rs.is_revoked(TD_B, 0xABC, workload_id(TD_B, "x", "y"))


@pytest.mark.parametrize(
    "text",
    [
        "nope",
        '{"trust_domain": "a.mesh", "at": "2026-01-01T00:00:00+00:00"}',
        '{"trust_domain": "A", "serial": "1", "at": "2026-01-01T00:00:00+00:00"}',
        '{"trust_domain": "a.mesh", "serial": "xyz", "at": "2026-01-01T00:00:00+00:00"}',
        '{"trust_domain": "a.mesh", "serial": "1", "at": "yesterday"}',
        '{"trust_domain": "a.mesh", "serial": "1", "at": "2026-01-01T00:00:00"}',
        '{"trust_domain": "a.mesh", "spiffe_id": "spiffe://b.mesh/x", '
        '"at": "2026-01-01T00:00:00+00:00"}',
        '{"trust_domain": "a.mesh", "serial": "1", "at": "2026-01-01T00:00:00+00:00", "x": 1}',
    ],
)
def test_malformed_revocations_are_refused(text):
    with pytest.raises(RevocationError):
        Revocation.from_json(text)


def test_revocation_times_are_utc_in_json():
    r = Revocation(TD_A, 7, None, "", NOW.astimezone(dt.timezone(dt.timedelta(hours=2))))
    assert json.loads(r.to_json())["at"] == NOW.isoformat()
