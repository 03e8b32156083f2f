"""The meshfed SNI form: format, strict parse, round trip, junk."""

from __future__ import annotations

import typing

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sidecar.sni import MAX_NAME_LEN, BadSni, MeshSni, SniReason

labels = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535)

GOOD = "payments.shop.8443.aws-use1.gcp-euw1.meshfed"


def test_format_names_every_piece_in_order() -> None:
    sni = MeshSni("payments", "shop", 8443, "aws-use1", "gcp-euw1")
    assert sni.format() == GOOD
    assert str(sni) == GOOD


def test_parse_returns_the_pieces() -> None:
    assert MeshSni.parse(GOOD) == MeshSni("payments", "shop", 8443, "aws-use1", "gcp-euw1")


@given(labels, labels, ports, labels, labels)
def test_round_trip(service: str, namespace: str, port: int, target: str, source: str) -> None:
    name = ".".join((service, namespace, str(port), target, source, "meshfed"))
    assume(len(name) <= MAX_NAME_LEN)
    sni = MeshSni(service, namespace, port, target, source)
    assert sni.format() == name
    assert MeshSni.parse(sni.format()) == sni


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("Payments.shop.8443.aws-use1.gcp-euw1.meshfed", "not_lowercase"),
        ("payments.shop.8443.aws-use1.gcp-euw1.MESHFED", "not_lowercase"),
        (GOOD + ".", "trailing_dot"),
        ("shop.8443.aws-use1.gcp-euw1.meshfed", "wrong_label_count"),
        ("v.payments.shop.8443.aws-use1.gcp-euw1.meshfed", "wrong_label_count"),
        ("payments.shop.8443.aws-use1.gcp-euw1.mesh", "wrong_suffix"),
        ("payments.shop.8443.aws-use1.gcp-euw1.svc", "wrong_suffix"),
        ("payments.shop.0.aws-use1.gcp-euw1.meshfed", "bad_port"),
        ("payments.shop.65536.aws-use1.gcp-euw1.meshfed", "bad_port"),
        ("payments.shop.08443.aws-use1.gcp-euw1.meshfed", "bad_port"),
        ("payments.shop.+8443.aws-use1.gcp-euw1.meshfed", "bad_port"),
        ("payments.shop.8443\n.aws-use1.gcp-euw1.meshfed", "bad_port"),
        ("payments.shop.http.aws-use1.gcp-euw1.meshfed", "bad_port"),
        ("payments.shop.100000.aws-use1.gcp-euw1.meshfed", "bad_port"),
        ("-payments.shop.8443.aws-use1.gcp-euw1.meshfed", "bad_service"),
        ("pay_ments.shop.8443.aws-use1.gcp-euw1.meshfed", "bad_service"),
        (".shop.8443.aws-use1.gcp-euw1.meshfed", "bad_service"),
        ("payments.shop-.8443.aws-use1.gcp-euw1.meshfed", "bad_namespace"),
        ("payments.shop.8443..gcp-euw1.meshfed", "bad_target_cluster"),
        ("payments.shop.8443.aws-use1.gcp*euw1.meshfed", "bad_source_cluster"),
        ("payments.shop.8443.aws-use1.gcp euw1.meshfed", "bad_source_cluster"),
        ("paymënts.shop.8443.aws-use1.gcp-euw1.meshfed", "not_ascii"),
        ("a" * 254, "too_long"),
        ("*.shop.8443.aws-use1.gcp-euw1.meshfed", "bad_service"),
    ],
)
def test_parse_refuses_with_reason(value: str, reason: str) -> None:
    with pytest.raises(BadSni) as info:
        MeshSni.parse(value)
    assert info.value.reason == reason


def test_parse_refuses_non_strings() -> None:
    with pytest.raises(BadSni) as info:
        MeshSni.parse(GOOD.encode())
    assert info.value.reason == "not_a_string"


def test_label_of_64_characters_is_refused() -> None:
    with pytest.raises(BadSni) as info:
        MeshSni.parse(f"{'a' * 64}.shop.8443.aws-use1.gcp-euw1.meshfed")
    assert info.value.reason == "bad_service"


def test_constructor_refuses_what_parse_would_refuse() -> None:
    with pytest.raises(BadSni) as info:
        MeshSni("payments", "shop", 0, "aws-use1", "gcp-euw1")
    assert info.value.reason == "bad_port"
    with pytest.raises(BadSni) as info:
        MeshSni("payments", "shop", True, "aws-use1", "gcp-euw1")
    assert info.value.reason == "bad_port"
    with pytest.raises(BadSni) as info:
        MeshSni("Payments", "shop", 1, "aws-use1", "gcp-euw1")
    assert info.value.reason == "bad_service"


def test_names_longer_than_253_bytes_cannot_be_built() -> None:
    long = "a" * 63
    with pytest.raises(BadSni) as info:
        MeshSni(long, long, 65535, long, long)
    assert info.value.reason == "too_long"


def test_longest_valid_name_is_exactly_253_bytes() -> None:
    # 4 x 63 + 5 (port) would be 269 with dots and suffix; trim the source cluster.
    sni = MeshSni("a" * 63, "b" * 63, 65535, "c" * 63, "d" * 47)
    assert len(sni.format()) == MAX_NAME_LEN
    assert MeshSni.parse(sni.format()) == sni


@given(st.text(max_size=300))
def test_junk_text_is_either_a_valid_sni_or_refused(junk: str) -> None:
    try:
        sni = MeshSni.parse(junk)
    except BadSni as e:
        assert e.reason in typing.get_args(SniReason)
    else:
        assert sni.format() == junk


@given(st.lists(st.sampled_from(["a", "0", "-", ".", "A", "9", "meshfed", "."]), max_size=60))
def test_near_miss_names_round_trip_or_are_refused(parts: list[str]) -> None:
    s = "".join(parts)
    try:
        sni = MeshSni.parse(s)
    except BadSni as e:
        assert e.reason in typing.get_args(SniReason)
    else:
        assert sni.format() == s
