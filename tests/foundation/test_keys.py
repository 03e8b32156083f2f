"""The key layout refuses every segment that could escape its key, and parse inverts build."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation import keys
from federation.names import InvalidName, check_dns_label, check_key_segment

ESCAPES = ["a/b", "..", ".", "", "x\x00y", "tab\tname", "new\nline", "sp ace", "del\x7f", "é" * 200]


@pytest.mark.parametrize("bad", ESCAPES)
def test_builders_refuse_segments_that_escape(bad: str) -> None:
    with pytest.raises(InvalidName):
        keys.endpoint("aws-use1", "shop", bad, "ep-1")
    with pytest.raises(InvalidName):
        keys.cluster(bad)


@pytest.mark.parametrize(
    ("built", "kind", "parts"),
    [
        (keys.cluster("aws-use1"), "clusters", ("aws-use1",)),
        (keys.gateway("aws-use1", "gw-0"), "gateways", ("aws-use1", "gw-0")),
        (keys.export("gcp", "shop", "payments"), "exports", ("gcp", "shop", "payments")),
        (
            keys.endpoint("gcp", "shop", "payments", "p-1"),
            "endpoints",
            ("gcp", "shop", "payments", "p-1"),
        ),
        (keys.bundle("aws-use1.acme.mesh"), "bundles", ("aws-use1.acme.mesh",)),
        (keys.revocation("a.mesh", "0x1f"), "revocations", ("a.mesh", "0x1f")),
        (keys.policy("allow-web"), "policies", ("allow-web",)),
    ],
)
def test_parse_inverts_every_builder(built: str, kind: str, parts: tuple[str, ...]) -> None:
    parsed = keys.parse(built)
    assert parsed.kind == kind
    assert parsed.parts == parts
    assert built.startswith(keys.prefix(kind))


def test_named_segment_access() -> None:
    parsed = keys.parse(keys.endpoint("gcp", "shop", "payments", "p-1"))
    assert parsed["service"] == "payments"
    assert parsed["endpoint_id"] == "p-1"


@pytest.mark.parametrize(
    "key",
    [
        "/meshfed/v2/clusters/a",
        "/meshfed/v1/unknown/a",
        "/meshfed/v1/clusters/a/b",
        "/meshfed/v1/clusters/",
        "/meshfed/v1/endpoints/a/b/../d",
        "/meshfed/v1/exports/a//c",
    ],
)
def test_parse_refuses_malformed_keys(key: str) -> None:
    with pytest.raises(InvalidName):
        keys.parse(key)


def test_prefix_must_leave_a_segment_open() -> None:
    assert keys.prefix("endpoints", "aws") == "/meshfed/v1/endpoints/aws/"
    with pytest.raises(TypeError):
        keys.prefix("clusters", "aws")


@given(st.text(min_size=1, max_size=80))
def test_accepted_segments_never_contain_separators(s: str) -> None:
    try:
        check_key_segment(s)
    except InvalidName:
        return
    assert "/" not in s and s not in (".", "..")
    parsed = keys.parse(keys.cluster(s))
    assert parsed.parts == (s,)


@pytest.mark.parametrize("bad", ["Upper", "-lead", "trail-", "under_score", "a" * 64, "dot.ted"])
def test_dns_labels_are_strict(bad: str) -> None:
    with pytest.raises(InvalidName) as err:
        check_dns_label(bad, "service name")
    assert "service name" in str(err.value)


def test_dns_label_accepts_normal_names() -> None:
    assert check_dns_label("payments-v2") == "payments-v2"
