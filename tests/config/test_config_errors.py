"""Each kind of mistake, made in the demo config, is reported at the right file:line and path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from federation.config import ConfigError, load_config, parse_config

from .helpers import DEMO_NAME, demo_text, issues_of, line_of, mutate


@dataclass(frozen=True)
class Case:
    id: str
    old: str
    new: str
    path: str
    message: str
    line_marker: str = ""  # defaults to the first line of ``new``
    after: str = ""  # the marker is looked for below the line containing this

    def marker(self) -> str:
        return self.line_marker or self.new.strip().splitlines()[0].strip()


CASES = [
    Case("unknown-enum", 'protocol: http}]\n    exported_to: ["*"]',
         'protocol: htp}]\n    exported_to: ["*"]',
         "services[0].ports[0].protocol", "unknown protocol 'htp'"),
    Case("duration-without-unit", "lease_ttl: 5s", "lease_ttl: 10",
         "federation.settings.lease_ttl", "expected a duration such as '2s'"),
    Case("duration-with-words", "sync_gate_timeout: 5s", "sync_gate_timeout: 2 secs",
         "federation.settings.sync_gate_timeout", "contains spaces"),
    Case("negative-duration", "connect: 500ms, request: 3s", "connect: -1s, request: 3s",
         "services[0].traffic_policy.timeouts.connect", "negative duration '-1s'"),
    Case("zero-positive-duration", "base_ejection_time: 5s", "base_ejection_time: 0s",
         "services[0].traffic_policy.outlier_detection.base_ejection_time",
         "must be greater than zero"),
    Case("unknown-key", "        attempts: 2\n", "        attempts: 2\n        atempts: 3\n",
         "services[0].traffic_policy.retries.atempts", "unknown key 'atempts'", "atempts: 3"),
    Case("wrong-type", "attempts: 2", "attempts: two",
         "services[0].traffic_policy.retries.attempts", "expected an integer, got a string"),
    Case("out-of-range", "attempts: 2", "attempts: 11",
         "services[0].traffic_policy.retries.attempts", "11 is out of range"),
    Case("duplicate-key", "    cloud: gcp\n", "    cloud: gcp\n    cloud:  gcp\n",
         "clusters[1].cloud", "duplicate key 'cloud' (first at line", "cloud:  gcp"),
    Case("name-with-slash", "  - name: ledger\n", "  - name: led/ger\n",
         "services[3].name", "invalid name 'led/ger': must not contain '/'"),
    Case("name-upper-case", "name: whoami-a", "name: WhoAmI-a",
         "workloads[1].name", "not an RFC 1123 label"),
    Case("name-dot-dot", "namespace: finance\n    ports: [{name: pg",
         "namespace: ..\n    ports: [{name: pg", "services[3].namespace", "dot segment"),
    Case("name-over-long", "  - name: audit\n    namespace: finance\n    ports",
         "  - name: " + "a" * 64 + "\n    namespace: finance\n    ports",
         "services[4].name", "longer than 63"),
    Case("name-control-char", "  - name: audit\n    namespace: finance\n    ports",
         '  - name: "aud\\tit"\n    namespace: finance\n    ports',
         "services[4].name", "whitespace or control characters"),
    Case("name-empty", "  - name: audit\n    namespace: finance\n    ports",
         '  - name: ""\n    namespace: finance\n    ports',
         "services[4].name", "must not be empty"),
    Case("yaml-boolean-as-name", "cloud: onprem", "cloud: no",
         "clusters[2].cloud", "got a boolean ('no')"),
    Case("trust-domain-with-port", "    zones: [us-east-1a, us-east-1b]\n",
         "    zones: [us-east-1a, us-east-1b]\n    trust_domain: aws.demo.mesh:8443\n",
         "clusters[0].trust_domain", "contains a port", "trust_domain:"),
    Case("trust-domain-upper-case", "    zones: [us-east-1a, us-east-1b]\n",
         "    zones: [us-east-1a, us-east-1b]\n    trust_domain: AWS.demo.mesh\n",
         "clusters[0].trust_domain", "upper-case", "trust_domain:"),
    Case("export-to-unknown-cluster", "exported_to: [aws-use1]", "exported_to: [aws-use9]",
         "services[3].exported_to[0]", "unknown cluster 'aws-use9'"),
    Case("workload-unknown-cluster",
         "cluster: gcp-euw1\n    zone: europe-west1-b\n    namespace: demo\n"
         "    address: 127.0.0.3\n    inbound_port: 17110",
         "cluster: gcp-euw2\n    zone: europe-west1-b\n    namespace: demo\n"
         "    address: 127.0.0.3\n    inbound_port: 17110",
         "workloads[4].cluster", "unknown cluster 'gcp-euw2'"),
    Case("workload-unknown-zone", "zone: us-east-1a", "zone: us-east-1z",
         "workloads[0].zone", "cluster 'aws-use1' has no zone 'us-east-1z'"),
    Case("failover-unknown-cluster", "failover: [gcp-euw1, onprem-dc1]",
         "failover: [gcp-euw1, onprem-dc2]", "clusters[0].failover[1]",
         "unknown cluster 'onprem-dc2'"),
    Case("bad-port", "inbound_port: 17100", "inbound_port: 70000",
         "workloads[0].inbound_port", "70000 is out of range"),
    Case("port-collision", "    inbound_port: 17121", "    inbound_port: 17120",
         "workloads[7].inbound_port", "port 17120 on 127.0.0.4 is already used by "
         "workloads[6].inbound_port", "inbound_port: 17120", "service: ledger, port: pg"),
    Case("replica-port-collision", "    inbound_port: 17101", "    inbound_port: 17103",
         "workloads[2].inbound_port", "port 17103 on 127.0.0.2 is already used by "
         "workloads[1].inbound_port", "inbound_port: 17102"),
    Case("address-without-port", '"127.0.0.2:17300"', '"127.0.0.2"',
         "workloads[0].upstreams[0].listen", "address '127.0.0.2' has no port"),
    Case("upstream-unknown-service", "whoami.demo, listen", "whoami.dmeo, listen",
         "workloads[0].upstreams[0].service", "unknown service 'whoami.dmeo'"),
    Case("upstream-not-exported", "exported_to: [aws-use1]", "exported_to: [onprem-dc1]",
         "workloads[0].upstreams[2].service",
         "'ledger.finance' is not reachable from cluster 'aws-use1'",
         "ledger.finance, listen"),
    Case("serves-unknown-port", "{service: greeter, port: grpc,", "{service: greeter, port: grcp,",
         "workloads[4].serves[0].port", "service 'greeter.demo' has no port 'grcp'"),
    Case("policy-unknown-service", "service: greeter\n      action: allow",
         "service: greetr\n      action: allow",
         "authorization.policies[0].service", "unknown service 'greetr.demo'"),
    Case("policy-bad-spiffe-id", "spiffe://aws-use1.demo.mesh/ns/demo/sa/frontend]",
         "spiffe://aws-use1.demo.mesh/ns/../sa/frontend]",
         "authorization.policies[0].from.spiffe_ids[0]", "invalid path segment '..'"),
    Case("policy-unknown-trust-domain", "trust_domains: [gcp-euw1.demo.mesh]",
         "trust_domains: [gcp-euw9.demo.mesh]",
         "authorization.policies[3].from.trust_domains[0]",
         "trust domain 'gcp-euw9.demo.mesh' belongs to no cluster"),
    Case("route-unknown-subset", "split: [{subset: v2, weight: 1}]",
         "split: [{subset: v3, weight: 1}]",
         "services[0].routes[0].split[0].subset", "unknown subset 'v3'"),
    Case("missing-required-key", "    region: dc1\n", "", "clusters[2].region",
         "required key is missing", "- name: onprem-dc1"),
    Case("list-expected", "zones: [dc1-a]", "zones: dc1-a", "clusters[2].zones",
         "expected a list, got a string ('dc1-a')"),
    Case("duplicate-list-entry", "zones: [us-east-1a, us-east-1b]",
         "zones: [us-east-1a, us-east-1a]", "clusters[0].zones[1]",
         "duplicate entry 'us-east-1a'"),
    Case("backoff-relation", "per_try_timeout: 1s", "per_try_timeout: 4s",
         "services[0].traffic_policy.retries.per_try_timeout", "longer than timeouts.request"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mistake_is_reported_at_its_line_and_path(case: Case) -> None:
    text = mutate(demo_text(), case.old, case.new)
    issues = issues_of(text)
    matching = [i for i in issues if i.path == case.path]
    assert matching, f"no issue at {case.path}; got:\n" + "\n".join(map(str, issues))
    issue = matching[0]
    assert case.message in issue.message + " " + issue.hint
    assert issue.file == DEMO_NAME
    assert issue.line == line_of(text, case.marker(), case.after)
    assert str(issue).startswith(f"{DEMO_NAME}:{issue.line}: {case.path}: ")


def test_local_mistakes_do_not_cascade_into_reference_errors() -> None:
    # The cluster is dropped for its bad port, but workloads naming it must not be reported.
    text = mutate(demo_text(), "gateway: {address: 127.0.0.3, tunnel_port: 17001",
                  "gateway: {address: 127.0.0.3, tunnel_port: 0")
    assert [i.path for i in issues_of(text)] == ["clusters[1].gateway.tunnel_port"]


def test_error_format_matches_the_documented_form() -> None:
    text = mutate(demo_text(), 'protocol: http}]\n    exported_to: ["*"]',
                  'protocol: htp}]\n    exported_to: ["*"]')
    (issue,) = issues_of(text)
    line = line_of(text, "protocol: htp")
    assert str(issue) == (
        f"configs/demo.yaml:{line}: services[0].ports[0].protocol: unknown protocol 'htp' "
        "(use one of tcp, http, http2)"
    )


def test_all_errors_are_collected_in_one_pass() -> None:
    text = demo_text()
    for old, new in [
        ("lease_ttl: 5s", "lease_ttl: 5"),
        ("attempts: 2", "attempts: 2\n        atempts: 3"),
        ("cloud: onprem", "cloud: On-Prem"),
        ("exported_to: [aws-use1]", "exported_to: [aws-use9]"),
        ("zone: us-east-1a", "zone: us-east-1z"),
        ("    inbound_port: 17121", "    inbound_port: 17120"),
        ("service: audit\n      action: allow", "service: audt\n      action: allow"),
        ("spiffe_ids: [spiffe://aws-use1.demo.mesh/ns/demo/sa/frontend]\n    - name: frontend-to-l",
         "spiffe_ids: [spiffe://Aws/ns/demo/sa/frontend]\n    - name: frontend-to-l"),
    ]:
        text = mutate(text, old, new)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, DEMO_NAME)
    paths = [i.path for i in caught.value.issues]
    assert sorted(paths) == sorted([
        "federation.settings.lease_ttl",
        "services[0].traffic_policy.retries.atempts",
        "clusters[2].cloud",
        "services[3].exported_to[0]",
        "workloads[0].zone",
        "workloads[7].inbound_port",
        "authorization.policies[0].from.spiffe_ids[0]",
        "authorization.policies[2].service",
    ])
    lines = [i.line for i in caught.value.issues]
    assert lines == sorted(lines), "issues are reported in document order"
    assert str(caught.value).startswith("8 problems in config:\n")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("version: 1\nfederation:\n  name: [demo\n", 4, "malformed YAML"),
        ("version: 1\nfederation:\n\tname: x\n", 3, "malformed YAML"),
        ("version: 1\n---\nversion: 1\n", 2, "more than one YAML document"),
        ("", 1, "empty config"),
        ("- version: 1\n", 1, "expected a mapping at the top level, got a list"),
        ("version: 1\nfederation: {name: x}\nclusters: []\n", 3, "needs at least 1 entry"),
        ("version: 2\nfederation: {name: x}\nclusters: []\n", 1, "unknown version 2"),
        ("version: 1\n<<: {a: 1}\n", 2, "merge keys"),
        ("version: 1\n? [a]\n: 1\n", 2, "keys must be strings"),
    ],
)
def test_malformed_documents_are_reported_with_their_line(
    text: str, line: int, message: str
) -> None:
    issues = issues_of(text, "x.yaml")
    assert any(i.line == line and message in i.message for i in issues), "\n".join(
        map(str, issues)
    )


def test_unreadable_and_non_utf8_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nfederation: {name: caf\xe9}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert caught.value.issues[0].line == 2
    assert "not valid UTF-8" in caught.value.issues[0].message
