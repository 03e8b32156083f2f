"""Records round-trip through JSON exactly and refuse bad input naming the field."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given

from federation import keys
from federation.model import (
    ClusterRecord,
    EndpointRecord,
    ExportRecord,
    GatewayRecord,
    Locality,
    PolicyRecord,
    RecordError,
    UnknownPolicyVersion,
    decode_store_value,
)
from federation.names import InvalidName
from tests.catalog import strategies as s


@given(s.any_record)
def test_every_record_round_trips_through_json(record) -> None:
    again = type(record).from_json(record.to_json())
    assert again == record
    assert again.written_at == record.written_at
    assert again.to_json() == record.to_json()
    assert json.loads(record.to_json())["schema"] == 1


@given(s.any_record)
def test_decode_store_value_accepts_a_record_under_its_own_key(record) -> None:
    assert decode_store_value(record.key(), record.to_json()) == record


def test_written_at_is_not_part_of_equality() -> None:
    assert s.endpoint(written_at=1.0) == s.endpoint(written_at=2.0)
    assert s.endpoint(written_at=1.0) != s.endpoint(weight=2)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    obj = json.loads(s.endpoint().to_json())
    obj["added_in_v1_5"] = {"anything": [1, 2]}
    assert EndpointRecord.from_json(json.dumps(obj).encode()) == s.endpoint()


def _mutated(record, **changes) -> bytes:
    obj = json.loads(record.to_json())
    for path, value in changes.items():
        target = obj
        *parents, last = path.split("__")
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("record_type", "data", "field"),
    [
        (EndpointRecord, _mutated(s.endpoint(), port="15006"), "EndpointRecord.port"),
        (EndpointRecord, _mutated(s.endpoint(), port=True), "EndpointRecord.port"),
        (EndpointRecord, _mutated(s.endpoint(), port=0), "EndpointRecord.port"),
        (EndpointRecord, _mutated(s.endpoint(), weight=KeyError), "EndpointRecord.weight"),
        (EndpointRecord, _mutated(s.endpoint(), healthy=1), "EndpointRecord.healthy"),
        (EndpointRecord, _mutated(s.endpoint(), service="a/b"), "EndpointRecord.service"),
        (EndpointRecord, _mutated(s.endpoint(), service=".."), "EndpointRecord.service"),
        (EndpointRecord, _mutated(s.endpoint(), namespace=""), "EndpointRecord.namespace"),
        (EndpointRecord, _mutated(s.endpoint(), cluster="x" * 64), "EndpointRecord.cluster"),
        (EndpointRecord, _mutated(s.endpoint(), cluster="Up"), "EndpointRecord.cluster"),
        (EndpointRecord, _mutated(s.endpoint(), address="a b"), "EndpointRecord.address"),
        (
            EndpointRecord,
            _mutated(s.endpoint(), locality__cluster="c3"),
            "EndpointRecord.locality.cluster",
        ),
        (
            EndpointRecord,
            _mutated(s.endpoint(), locality__zone=KeyError),
            "EndpointRecord.locality.zone",
        ),
        (
            EndpointRecord,
            _mutated(s.endpoint(), spiffe_id="spiffe://c2/ns/../x"),
            "EndpointRecord.spiffe_id",
        ),
        (
            EndpointRecord,
            _mutated(s.endpoint(), spiffe_id="https://c2/x"),
            "EndpointRecord.spiffe_id",
        ),
        (EndpointRecord, _mutated(s.endpoint(), written_at=-1), "EndpointRecord.written_at"),
        (EndpointRecord, _mutated(s.endpoint(), schema=2), "EndpointRecord.schema"),
        (EndpointRecord, _mutated(s.endpoint(), schema=KeyError), "EndpointRecord.schema"),
        (EndpointRecord, b"[1, 2]", "EndpointRecord"),
        (EndpointRecord, b"{not json", "EndpointRecord"),
        (EndpointRecord, b'{"schema": 1, "schema": 1}', "EndpointRecord"),
        (EndpointRecord, b"\xff\xfe{}", "EndpointRecord"),
        (EndpointRecord, b'{"schema": NaN}', "EndpointRecord"),
        (
            ExportRecord,
            _mutated(s.export(), ports__0__protocol="udp"),
            "ExportRecord.ports[0].protocol",
        ),
        (ExportRecord, _mutated(s.export(), ports=[]), "ExportRecord.ports"),
        (ExportRecord, _mutated(s.export(), ports__1__port=8080), "ExportRecord.ports numbers"),
        (ExportRecord, _mutated(s.export(), exported_to=["*", "c1"]), "ExportRecord.exported_to"),
        (
            ExportRecord,
            _mutated(s.export(), exported_to=["c1", "c1"]),
            "ExportRecord.exported_to",
        ),
        (ExportRecord, _mutated(s.export(), exported_to="*"), "ExportRecord.exported_to"),
        (GatewayRecord, _mutated(s.gateway(), modes=[]), "GatewayRecord.modes"),
        (GatewayRecord, _mutated(s.gateway(), modes=["udp"]), "GatewayRecord.modes[0]"),
        (GatewayRecord, _mutated(s.gateway(), tunnel_port=None), "GatewayRecord.tunnel_port"),
        (
            GatewayRecord,
            _mutated(s.gateway(), modes=["tunnel"]),
            "GatewayRecord.passthrough_port",
        ),
        (
            GatewayRecord,
            _mutated(s.gateway(), healthy_endpoints={"a": 1}),
            "GatewayRecord.healthy_endpoints",
        ),
        (
            GatewayRecord,
            _mutated(s.gateway(), healthy_endpoints={"shop/a": -1}),
            "GatewayRecord.healthy_endpoints['shop/a']",
        ),
        (
            GatewayRecord,
            _mutated(s.gateway(), peer_alive={"c1": "yes"}),
            "GatewayRecord.peer_alive['c1']",
        ),
        (ClusterRecord, _mutated(s.cluster(), zones=[]), "ClusterRecord.zones"),
        (ClusterRecord, _mutated(s.cluster(), zones=["z", "z"]), "ClusterRecord.zones"),
        (
            ClusterRecord,
            _mutated(s.cluster(), trust_domain="Acme.Mesh"),
            "ClusterRecord.trust_domain",
        ),
        (ClusterRecord, _mutated(s.cluster(), agent_port=70000), "ClusterRecord.agent_port"),
        (
            ClusterRecord,
            s.cluster().to_json().replace(b'"started_at":1000.0', b'"started_at":1e999'),
            "ClusterRecord.started_at",
        ),
        (ClusterRecord, _mutated(s.cluster(), started_at=float("inf")), "ClusterRecord"),
        (PolicyRecord, _mutated(s.policy(), body=[1]), "PolicyRecord.body"),
        (PolicyRecord, _mutated(s.policy(), version=0), "PolicyRecord.version"),
        (
            PolicyRecord,
            _mutated(s.policy(), history=[{"version": 5, "body": {}}]),
            "PolicyRecord.history[0].version",
        ),
        (
            PolicyRecord,
            _mutated(s.policy(), history=[{"body": {}}]),
            "PolicyRecord.history[0].version",
        ),
    ],
)
def test_bad_records_are_refused_naming_the_field(record_type, data, field) -> None:
    with pytest.raises(RecordError) as info:
        record_type.from_json(data)
    assert info.value.field == field


def test_records_built_in_code_are_validated_too() -> None:
    with pytest.raises(RecordError, match=re.escape("EndpointRecord.weight")):
        s.endpoint(weight=0)
    with pytest.raises(RecordError, match=re.escape("EndpointRecord.locality.cluster")):
        s.endpoint(locality=Locality("aws", "r", "z", "elsewhere"))


def test_a_record_stored_under_another_key_is_refused() -> None:
    # A writer must not be able to place one cluster's endpoint under another's key.
    wrong = keys.endpoint("c3", s.NS, "a", "e1")
    with pytest.raises(RecordError, match="stored under"):
        decode_store_value(wrong, s.endpoint(cluster="c2").to_json())


def test_a_record_of_another_kind_is_refused() -> None:
    with pytest.raises(RecordError, match="ExportRecord"):
        decode_store_value(keys.export("c2", s.NS, "a"), s.endpoint().to_json())


def test_bundles_and_revocations_stay_raw_but_must_be_json_objects() -> None:
    doc = b'{"keys": [], "spiffe_sequence": 3}'
    assert decode_store_value(keys.bundle("c2.acme.mesh"), doc) is doc
    assert decode_store_value(keys.revocation("c2.acme.mesh", "0a1b"), doc) is doc
    for bad in (b"[]", b"not json", b'{"a": 1, "a": 2}'):
        with pytest.raises(RecordError, match="bundles document"):
            decode_store_value(keys.bundle("c2.acme.mesh"), bad)
    with pytest.raises(RecordError, match="trust domain"):
        decode_store_value(keys.bundle("UPPER.mesh"), doc)


def test_keys_that_escape_are_refused() -> None:
    with pytest.raises(InvalidName):
        decode_store_value("/meshfed/v1/endpoints/c2/shop/a", s.endpoint().to_json())


def test_gateway_maps_are_sorted_and_read_only() -> None:
    counts = {"shop/b": 1, "shop/a": 2}
    gw = s.gateway(healthy_endpoints=counts)
    counts["shop/c"] = 9
    assert list(gw.healthy_endpoints) == ["shop/a", "shop/b"]
    assert gw.healthy_count("shop", "a") == 2
    assert gw.healthy_count("shop", "zzz") == 0
    with pytest.raises(TypeError):
        gw.healthy_endpoints["shop/a"] = 3  # type: ignore[index]
    assert hash(gw) == hash(s.gateway(healthy_endpoints={"shop/a": 2, "shop/b": 1}))


def test_policy_history_revise_and_rollback() -> None:
    v1 = PolicyRecord.create("p", {"allow": ["c2"]}, now=1.0)
    v2 = v1.revise({"allow": []}, now=2.0)
    v3 = v2.rollback(1, now=3.0)
    assert (v3.version, v3.body) == (3, {"allow": ["c2"]})
    assert [h.version for h in v3.history] == [2, 1]
    assert PolicyRecord.from_json(v3.to_json()) == v3
    with pytest.raises(UnknownPolicyVersion, match="held: 2, 1"):
        v3.rollback(7, now=4.0)
    trimmed = v3.revise({}, now=5.0, keep=1)
    assert [h.version for h in trimmed.history] == [3]


def test_policy_body_is_canonical_so_key_order_does_not_matter() -> None:
    a = PolicyRecord.create("p", {"x": 1, "y": 2}, now=1.0)
    b = PolicyRecord.create("p", {"y": 2, "x": 1}, now=1.0)
    assert a == b and a.to_json() == b.to_json()
    with pytest.raises(RecordError, match=re.escape("PolicyRecord.body")):
        PolicyRecord.create("p", {"x": float("nan")}, now=1.0)
