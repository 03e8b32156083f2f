"""Peer validation: BAD_INPUTS cases 1-5, 7-11 at the pure-function layer."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st
from trustkit import BOTH_EKU, NOW, der, make_ca, make_leaf

from trust.ca import CertificateAuthority
from trust.errors import ValidationError
from trust.revocation import Revocation, RevocationSet
from trust.spiffe import SpiffeId, TrustDomain, workload_id
from trust.svid import issue_svid, key_usage
from trust.validate import TrustBundleSet, validate_peer, verify_peer

TD_A, TD_B = TrustDomain("a.mesh"), TrustDomain("b.mesh")
ALICE = workload_id(TD_A, "shop", "alice")

CA_A, _ = CertificateAuthority.create(TD_A, NOW - dt.timedelta(days=1))
CA_B, _ = CertificateAuthority.create(TD_B, NOW - dt.timedelta(days=1))
CA_A_INT, _ = CertificateAuthority.create(TD_A, NOW - dt.timedelta(days=1), intermediate=True)
ROOT_A = make_ca("root a", TD_A, path_length=None)
BUNDLES = TrustBundleSet({TD_A: (CA_A.root, ROOT_A[1]), TD_B: (CA_B.root,)})
SVID = issue_svid(CA_A, ALICE, NOW)


def reason_of(chain, *, at=NOW, bundles=BUNDLES, **kw):
    with pytest.raises(ValidationError) as err:
        validate_peer([der(c) for c in chain], bundles, at, **kw)
    return err.value.reason


def test_fresh_svid_from_own_ca_is_accepted():
    assert validate_peer(SVID.chain_der(), BUNDLES, NOW) == ALICE


def test_intermediate_chain_is_accepted_and_ends_at_the_root():
    svid = issue_svid(CA_A_INT, ALICE, NOW)
    bundles = TrustBundleSet({TD_A: (CA_A_INT.root,)})
    peer = verify_peer(svid.chain_der(), bundles, NOW)
    assert peer.spiffe_id == ALICE
    assert len(peer.chain) == 3 and peer.chain[-1] == CA_A_INT.root


def test_expired_leaf_is_refused():
    assert reason_of([SVID.leaf], at=SVID.not_after + dt.timedelta(seconds=1)) == "expired"


def test_leaf_not_yet_valid_is_refused():
    _, leaf = make_leaf(ROOT_A, not_before=NOW + dt.timedelta(minutes=5))
    assert reason_of([leaf]) == "not_yet_valid"


def test_peer_30s_behind_accepts_fresh_svid_but_10_minutes_behind_refuses():
    assert validate_peer(SVID.chain_der(), BUNDLES, NOW - dt.timedelta(seconds=30)) == ALICE
    assert reason_of([SVID.leaf], at=NOW - dt.timedelta(minutes=10)) == "not_yet_valid"


def test_leaf_from_untrusted_root_is_refused():
    stranger = make_ca("stranger", TD_A)
    _, leaf = make_leaf(stranger)
    assert reason_of([leaf]) == "bad_chain"


def test_domain_b_ca_cannot_mint_domain_a_identity_even_though_both_are_trusted():
    b_root = make_ca("root b", TD_B)
    bundles = TrustBundleSet({TD_A: (CA_A.root,), TD_B: (b_root[1],)})
    _, forged = make_leaf(b_root, uris=(str(ALICE),))
    assert reason_of([forged], bundles=bundles) == "bad_chain"
    # The same certificate would pass if only B's roots were consulted: the check is per domain.
    _, honest_b = make_leaf(b_root, uris=("spiffe://b.mesh/ns/x/sa/y",))
    assert validate_peer([der(honest_b)], bundles, NOW) == SpiffeId.parse(
        "spiffe://b.mesh/ns/x/sa/y"
    )


def test_unknown_trust_domain_is_refused():
    _, leaf = make_leaf(ROOT_A, uris=("spiffe://c.mesh/ns/x/sa/y",))
    assert reason_of([leaf]) == "untrusted_domain"


@pytest.mark.parametrize(
    ("uris", "dns", "reason"),
    [
        (("spiffe://a.mesh/ns/x/sa/y", "spiffe://a.mesh/ns/x/sa/z"), (), "multiple_uri_sans"),
        ((), (), "not_spiffe"),
        ((), ("alice.a.mesh",), "not_spiffe"),
        (("https://a.mesh/ns/x/sa/y",), (), "not_spiffe"),
        (("spiffe://a.mesh",), (), "not_spiffe"),
        (("spiffe://a.mesh/ns/../x",), (), "not_spiffe"),
    ],
)
def test_san_rules(uris, dns, reason):
    _, leaf = make_leaf(ROOT_A, uris=uris, dns=dns)
    assert reason_of([leaf]) == reason


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"ca": True}, "leaf_is_ca"),
        ({"ku": key_usage(digital_signature=True, key_cert_sign=True)}, "bad_key_usage"),
        ({"ku": key_usage(digital_signature=True, crl_sign=True)}, "bad_key_usage"),
        ({"ku": None}, "bad_key_usage"),
        ({"ku_critical": False}, "bad_key_usage"),
        ({"ku": key_usage()}, "bad_key_usage"),
        ({"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)}, "bad_eku"),
        ({"eku": (ExtendedKeyUsageOID.CLIENT_AUTH,)}, "bad_eku"),
        ({"eku": None}, "bad_eku"),
    ],
)
def test_leaf_profile_rules(kw, reason):
    _, leaf = make_leaf(ROOT_A, **kw)
    assert reason_of([leaf]) == reason


def test_chain_breaking_path_len_is_refused():
    root = make_ca("root pl0", TD_A, path_length=0)
    inter = make_ca("inter", TD_A, issuer=root, path_length=0)
    _, leaf = make_leaf(inter)
    bundles = TrustBundleSet({TD_A: (root[1],)})
    assert reason_of([leaf, inter[1]], bundles=bundles) == "bad_chain"


def test_intermediate_without_ca_flag_is_refused():
    root = make_ca("root", TD_A, path_length=None)
    inter = make_ca("not a ca", TD_A, issuer=root, ca=False)
    _, leaf = make_leaf(inter)
    bundles = TrustBundleSet({TD_A: (root[1],)})
    assert reason_of([leaf, inter[1]], bundles=bundles) == "bad_chain"


def test_good_intermediate_built_by_hand_is_accepted():
    root = make_ca("root", TD_A, path_length=1)
    inter = make_ca("inter", TD_A, issuer=root, path_length=0)
    _, leaf = make_leaf(inter, eku=BOTH_EKU)
    bundles = TrustBundleSet({TD_A: (root[1],)})
    assert validate_peer([der(leaf), der(inter[1])], bundles, NOW) == SpiffeId.parse(
        "spiffe://a.mesh/ns/x/sa/y"
    )


def test_expired_intermediate_is_refused():
    root = make_ca("root", TD_A, path_length=1)
    inter = make_ca("old", TD_A, issuer=root, not_after=NOW - dt.timedelta(seconds=1))
    _, leaf = make_leaf(inter)
    assert reason_of([leaf, inter[1]], bundles=TrustBundleSet({TD_A: (root[1],)})) == "bad_chain"


def test_unexpected_identity_is_refused_and_expected_one_accepted():
    bob = workload_id(TD_A, "shop", "bob")
    assert reason_of([SVID.leaf], expected={bob}) == "unexpected_identity"
    assert validate_peer(SVID.chain_der(), BUNDLES, NOW, expected={bob, ALICE}) == ALICE


def test_revoked_serial_or_id_is_refused_but_not_across_domains():
    by_serial = RevocationSet.of([Revocation(TD_A, SVID.serial, None, "test", NOW)])
    by_id = RevocationSet.of([Revocation(TD_A, None, ALICE, "test", NOW)])
    other_domain = RevocationSet.of([Revocation(TD_B, SVID.serial, None, "test", NOW)])
    assert reason_of([SVID.leaf], revoked=by_serial) == "revoked"
    assert reason_of([SVID.leaf], revoked=by_id) == "revoked"
    assert validate_peer(SVID.chain_der(), BUNDLES, NOW, revoked=other_domain) == ALICE


def test_empty_chain_and_garbage_are_malformed():
    assert reason_of([]) == "malformed"
    with pytest.raises(ValidationError) as err:
        validate_peer([b"\x30\x03\x02\x01"], BUNDLES, NOW)
    assert err.value.reason == "malformed"


def test_truncated_der_is_malformed():
    data = der(SVID.leaf)
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ValidationError) as err:
            validate_peer([data[:cut]], BUNDLES, NOW)
        assert err.value.reason == "malformed"


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_random_bytes_only_ever_yield_malformed(chain):
    with pytest.raises(ValidationError) as err:
        validate_peer(chain, BUNDLES, NOW)
    assert err.value.reason == "malformed"


@settings(max_examples=100)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_flipped_byte_in_a_real_svid_never_escapes_validation_error(pos, value):
    data = bytearray(der(SVID.leaf))
    data[pos % len(data)] = value
    try:
        sid = validate_peer([bytes(data)], BUNDLES, NOW)
    except ValidationError:
        return
    # A flip in an unsigned-over byte that still verifies can only be a no-op flip.
    assert bytes(data) == der(SVID.leaf) and sid == ALICE


def test_naive_now_is_a_caller_error_not_a_peer_fault():
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_peer(SVID.chain_der(), BUNDLES, NOW.replace(tzinfo=None))
