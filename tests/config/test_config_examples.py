"""The shipped configs parse, match the schema, and the schema is generated from the model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import federation.config as public
from federation.config import (
    FederationConfig,
    HostPort,
    ServiceRef,
    build_schema,
    load_config,
    parse_config,
    render_schema,
)
from federation.config.decode import fields_of, unwrap
from federation.config.model import DERIVED
from federation.config.schema import field_docs, validate_instance

from .helpers import CONFIGS, DEMO, EXAMPLES, demo_text, mutate


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_validates_against_the_schema(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, FederationConfig)
    assert validate_instance(yaml.safe_load(path.read_text()), build_schema()) == []


def test_committed_schema_is_the_generated_one() -> None:
    committed = (CONFIGS / "meshfed.schema.json").read_text()
    assert committed == render_schema(), "run: meshfed config schema > configs/meshfed.schema.json"
    assert json.loads(committed)["$defs"]["Cluster"]["additionalProperties"] is False


def test_schema_refuses_what_the_parser_refuses_structurally() -> None:
    data = yaml.safe_load(mutate(demo_text(), "protocol: tcp}]", "protocol: udp}]"))
    data["clusters"][0]["gateway"]["tunnel_port"] = 0
    data["clusters"][0]["colour"] = "blue"
    data["federation"]["settings"]["lease_ttl"] = "10"
    problems = validate_instance(data, build_schema())
    assert any("tunnel_port: 0 is below 1" in p for p in problems)
    assert any("unexpected property 'colour'" in p for p in problems)
    assert any("lease_ttl: '10' does not match" in p for p in problems)
    assert any("protocol: 'udp' is not one of" in p for p in problems)


def _model_classes() -> list[type]:
    seen: list[type] = []
    stack: list[type] = [FederationConfig]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in fields_of(cls):
            for tp in _leaf_types(f.type):
                if (
                    isinstance(tp, type)
                    and dataclasses.is_dataclass(tp)
                    and tp not in (HostPort, ServiceRef)
                ):
                    stack.append(tp)
    return seen


def _leaf_types(tp: Any) -> list[Any]:
    base, _ = unwrap(tp)
    args = getattr(base, "__args__", ())
    return [base, *(leaf for a in args for leaf in _leaf_types(a))]


@pytest.mark.parametrize("cls", _model_classes(), ids=lambda c: c.__name__)
def test_every_model_class_and_field_is_documented(cls: type) -> None:
    assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(")
    docs = field_docs(cls)
    assert [f.name for f in fields_of(cls) if not docs.get(f.name)] == []


def test_every_model_class_is_exported_from_the_package() -> None:
    assert {c.__name__ for c in _model_classes()} <= set(public.__all__)


def test_derived_defaults_are_filled_in() -> None:
    config = load_config(DEMO)
    aws = config.cluster("aws-use1")
    assert aws.trust_domain == "aws-use1.demo.mesh"
    assert aws.network == "aws-use1"
    assert aws.gateway.bind == "127.0.0.2"
    assert config.workloads[0].service_account == "frontend"
    assert config.workloads[1].service_account == "whoami"
    derived = [f.name for c in _model_classes() for f in fields_of(c)
               if DERIVED in f.field.metadata]
    assert sorted(derived) == ["bind", "network", "service_account", "trust_domain"]


def test_demo_topology_matches_its_promises() -> None:
    config = load_config(DEMO)
    assert {c.cloud for c in config.clusters} == {"aws", "gcp", "onprem"}
    assert len({c.network for c in config.clusters}) == 3
    assert len({c.trust_domain for c in config.clusters}) == 3
    protocols = {p.protocol for s in config.services for p in s.ports}
    assert protocols == {"tcp", "http", "http2"}
    assert any(not s.exported_to for s in config.services)
    assert config.clusters_serving(ServiceRef("whoami", "demo")) == (
        "aws-use1", "gcp-euw1", "onprem-dc1")
    assert config.clusters_serving(ServiceRef("greeter", "demo")) == ("gcp-euw1",)
    assert config.authorization_default(ServiceRef("whoami", "demo")) == "allow"
    assert config.authorization_default(ServiceRef("ledger", "finance")) == "deny"


def test_defaults_apply_when_keys_are_omitted() -> None:
    config = parse_config(
        "version: 1\nfederation: {name: tiny}\nclusters:\n"
        "  - {name: c1, cloud: aws, region: r1, zones: [z1], gateway: {address: 10.0.0.1},"
        " agent: {address: 10.0.0.2}}\n"
    )
    settings = config.federation.settings
    assert (settings.lease_ttl, settings.svid_ttl, settings.remote_stale_after) == (
        10.0, 3600.0, None)
    assert config.clusters[0].gateway.modes == ("tunnel", "passthrough")
    assert config.authorization.default_action == "deny"
    assert config.clusters[0].trust_domain == "c1.tiny.mesh"


def test_docs_reference_is_the_generated_one() -> None:
    from federation.config.reference import BEGIN, END, render_reference

    docs = (CONFIGS.parent / "docs" / "config.md").read_text()
    start, end = docs.index(BEGIN), docs.index(END) + len(END) + 1
    assert docs[start:end] == render_reference(), "regenerate the reference in docs/config.md"
