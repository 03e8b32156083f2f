"""SPIFFE ID parsing follows the spec exactly (BAD_INPUTS case 6)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trust.spiffe import (
    InvalidSpiffeId,
    SpiffeId,
    TrustDomain,
    agent_id,
    gateway_id,
    workload_id,
)

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEG_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

trust_domains = st.text(TD_CHARS, min_size=1, max_size=60)
segments = st.text(SEG_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))


def test_parse_splits_trust_domain_and_path():
    sid = SpiffeId.parse("spiffe://aws-use1.acme.mesh/ns/shop/sa/payments")
    assert sid.trust_domain == TrustDomain("aws-use1.acme.mesh")
    assert sid.path == "/ns/shop/sa/payments"
    assert str(sid) == "spiffe://aws-use1.acme.mesh/ns/shop/sa/payments"


def test_trust_domain_id_has_no_path():
    sid = SpiffeId.parse("spiffe://a.mesh")
    assert sid.path == ""
    assert TrustDomain.parse("spiffe://a.mesh") == TrustDomain("a.mesh")
    assert TrustDomain("a.mesh").id == sid


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("spiffe://a.mesh/ns/../sa/x", "'.' or '..'"),
        ("spiffe://a.mesh/ns/./x", "'.' or '..'"),
        ("spiffe://a.mesh/ns//x", "empty segment"),
        ("spiffe://a.mesh/ns/x/", "end with '/'"),
        ("spiffe://a.mesh/", "end with '/'"),
        ("spiffe://a.mesh/ns/%41", "percent-encoding"),
        ("spiffe://A.mesh/ns/x", "lower-case"),
        ("spiffe://a.mesh:8443/ns/x", "port"),
        ("spiffe://user@a.mesh/ns/x", "userinfo"),
        ("spiffe://a.mesh/ns/x?y=1", "query"),
        ("spiffe://a.mesh/ns/x#frag", "fragment"),
        ("spiffe://a.mesh/" + "x" * 2040, "2048 bytes"),
        ("SPIFFE://a.mesh/ns/x", "lower-case 'spiffe'"),
        ("https://a.mesh/ns/x", "scheme"),
        ("spiffe:/a.mesh/ns/x", "scheme"),
        ("spiffe:///ns/x", "trust domain is empty"),
        ("spiffe://a.mesh/ns/x y", "path segments may contain only"),
        ("spiffe://a.mesh/ns/\u00e9", "path segments may contain only"),
        ("spiffe://a!b/ns/x", "trust domain may contain only"),
        ("", "scheme"),
    ],
)
def test_parser_refuses_each_rule_and_names_it(value, rule):
    with pytest.raises(InvalidSpiffeId) as err:
        SpiffeId.parse(value)
    assert rule in err.value.reason


def test_exactly_2048_bytes_is_accepted():
    head = "spiffe://a.mesh/"
    sid = SpiffeId.parse(head + "x" * (2048 - len(head)))
    assert len(str(sid)) == 2048


def test_trust_domain_refuses_upper_case_instead_of_folding():
    with pytest.raises(InvalidSpiffeId, match="lower-case"):
        TrustDomain("Domain-A")


def test_helpers_build_the_documented_ids():
    td = TrustDomain("b.mesh")
    assert str(workload_id(td, "shop", "cart")) == "spiffe://b.mesh/ns/shop/sa/cart"
    assert str(gateway_id(td)) == "spiffe://b.mesh/ns/meshfed-system/sa/east-west-gateway"
    assert str(agent_id(td)) == "spiffe://b.mesh/ns/meshfed-system/sa/federation-agent"


@pytest.mark.parametrize(("ns", "sa"), [("a/b", "x"), ("..", "x"), ("", "x"), ("ok", "a b")])
def test_workload_id_refuses_names_that_escape_their_segment(ns, sa):
    with pytest.raises(InvalidSpiffeId):
        workload_id(TrustDomain("a.mesh"), ns, sa)


@given(trust_domains, paths)
def test_format_then_parse_round_trips(td, path):
    sid = SpiffeId(TrustDomain(td), path)
    assert SpiffeId.parse(str(sid)) == sid


@given(st.text(max_size=300))
def test_random_text_only_ever_raises_invalid_spiffe_id(text):
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(sid) == text


@given(st.text(SEG_CHARS + "/:@%?#", max_size=80))
def test_near_miss_ids_are_canonical_or_refused(tail):
    text = "spiffe://" + tail
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(sid) == text
    assert "//" not in sid.path and not sid.path.endswith("/")
