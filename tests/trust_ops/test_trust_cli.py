"""``meshfed trust`` through typer's CliRunner: outputs and exit codes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federation.cli.trust_cmd import app
from trust.bundle import TrustBundle
from trust.spiffe import TrustDomain

REPO = Path(__file__).resolve().parents[2]
NOW = "2026-03-01T12:00:00+00:00"
LATER = "2026-03-01T14:00:00+00:00"


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def ca(tmp_path) -> Path:
    d = tmp_path / "ca"
    r = run("init", "--dir", str(d), "--trust-domain", "a.mesh", "--now", NOW)
    assert r.exit_code == 0, r.output
    assert "created CA for a.mesh" in r.output
    return d


def test_init_from_deployment_config(tmp_path):
    d = tmp_path / "ca"
    r = run("init", "--dir", str(d), "--config", str(REPO / "configs/demo.yaml"),
            "--cluster", "gcp-euw1")
    assert r.exit_code == 0, r.output
    assert "gcp-euw1.demo.mesh" in r.output
    r = run("init", "--dir", str(tmp_path / "x"), "--config", str(REPO / "configs/demo.yaml"),
            "--cluster", "nope")
    assert r.exit_code == 2 and "no cluster 'nope'" in r.output and "aws-use1" in r.output


def test_init_refuses_bad_domain_and_existing_ca(ca, tmp_path):
    r = run("init", "--dir", str(tmp_path / "y"), "--trust-domain", "A.Mesh")
    assert r.exit_code == 2 and "--trust-domain" in r.output
    r = run("init", "--dir", str(ca), "--trust-domain", "a.mesh")
    assert r.exit_code == 2 and "already exists" in r.output


def test_issue_writes_chain_and_0600_key_and_show_reads_it(ca, tmp_path):
    out = tmp_path / "web"
    r = run("issue", "--dir", str(ca), "--spiffe-id", "spiffe://a.mesh/ns/shop/sa/web",
            "--out", str(out), "--ttl", "30m")
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "web.key").stat().st_mode) == 0o600
    serial = r.output.split("serial ")[1].split()[0]
    r = run("show", str(tmp_path / "web.crt"))
    assert r.exit_code == 0
    assert "identity  spiffe://a.mesh/ns/shop/sa/web" in r.output
    assert f"serial    {serial}" in r.output and "expires in 29m" in r.output
    assert "issuer    CN=meshfed root a.mesh" in r.output
    r = run("issue", "--dir", str(ca), "--spiffe-id", "spiffe://a.mesh/ns/shop/sa/web",
            "--out", str(out))
    assert r.exit_code == 2 and "refusing to overwrite" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--spiffe-id", "spiffe://a.mesh/ns/../x", "--ttl", "1h"), "--spiffe-id"),
        (("--spiffe-id", "spiffe://a.mesh/ns/x/sa/y", "--ttl", "10"), "--ttl"),
        (("--spiffe-id", "spiffe://b.mesh/ns/x/sa/y", "--ttl", "1h"), "trust domain"),
    ],
)
def test_issue_refuses_bad_input_with_exit_2(ca, tmp_path, args, message):
    r = run("issue", "--dir", str(ca), "--out", str(tmp_path / "o"), *args)
    assert r.exit_code == 2 and message in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_world_readable_ca_key_is_refused_naming_file_and_fix(ca, tmp_path):
    (ca / "ca.key").chmod(0o644)
    r = run("issue", "--dir", str(ca), "--spiffe-id", "spiffe://a.mesh/ns/x/sa/y",
            "--out", str(tmp_path / "o"))
    assert r.exit_code == 2
    assert str(ca / "ca.key") in r.output and f"chmod 600 {ca / 'ca.key'}" in r.output
    assert not (tmp_path / "o.key").exists()


def test_show_ca_dir_and_a_non_certificate(ca, tmp_path):
    r = run("show", str(ca), "--now", NOW)
    assert r.exit_code == 0
    assert "trust domain a.mesh" in r.output and "phase steady, next step 'publish'" in r.output
    (tmp_path / "junk.pem").write_text("hello")
    r = run("show", str(tmp_path / "junk.pem"))
    assert r.exit_code == 2 and "no PEM certificates" in r.output


def test_bundle_export_and_import_refuses_rollback(ca, tmp_path):
    r = run("bundle", "export", "--dir", str(ca), "--sequence", "5")
    assert r.exit_code == 0
    (tmp_path / "b5.json").write_text(r.output)
    assert TrustBundle.from_json(TrustDomain("a.mesh"), r.output).sequence == 5
    (tmp_path / "b4.json").write_text(run("bundle", "export", "--dir", str(ca),
                                          "--sequence", "4").output)
    into = tmp_path / "bundles"
    r = run("bundle", "import", str(tmp_path / "b5.json"), "--trust-domain", "a.mesh",
            "--into", str(into))
    assert r.exit_code == 0 and "imported a.mesh sequence 5" in r.output
    r = run("bundle", "import", str(tmp_path / "b5.json"), "--trust-domain", "a.mesh",
            "--into", str(into))
    assert r.exit_code == 0 and "unchanged" in r.output
    r = run("bundle", "import", str(tmp_path / "b4.json"), "--trust-domain", "a.mesh",
            "--into", str(into))
    assert r.exit_code == 2
    assert "refused (rollback)" in r.output and "keeping" in r.output and "sequence 5" in r.output
    assert json.loads((into / "a.mesh.json").read_text())["spiffe_sequence"] == 5
    r = run("bundle", "import", str(tmp_path / "b5.json"), "--trust-domain", "b.mesh",
            "--into", str(into))
    assert r.exit_code == 2 and "foreign_root" in r.output


def test_rotate_steps_in_order_and_drop_waits(ca, tmp_path):
    r = run("rotate", "--dir", str(ca), "--step", "switch")
    assert r.exit_code == 2 and "next step is 'publish'" in r.output
    assert run("issue", "--dir", str(ca), "--spiffe-id", "spiffe://a.mesh/ns/x/sa/y",
               "--out", str(tmp_path / "o"), "--now", NOW).exit_code == 0
    r = run("rotate", "--dir", str(ca), "--step", "publish", "--now", NOW)
    assert r.exit_code == 0 and "bundle sequence 2" in r.output
    r = run("rotate", "--dir", str(ca), "--step", "switch", "--now", NOW)
    assert r.exit_code == 0 and "phase switched" in r.output
    r = run("rotate", "--dir", str(ca), "--step", "drop", "--now", NOW)
    assert r.exit_code == 1 and "old CA may be valid until 2026-03-01T13:00:00" in r.output
    r = run("show", str(ca), "--now", NOW)
    assert "drop allowed in 1h00m" in r.output
    r = run("rotate", "--dir", str(ca), "--step", "drop", "--now", LATER)
    assert r.exit_code == 0 and "bundle sequence 3" in r.output
    r = run("rotate", "--dir", str(ca), "--step", "sideways")
    assert r.exit_code == 2


def test_revoke_without_store_prints_the_record(ca):
    r = run("revoke", "--dir", str(ca), "--serial", "0xAB:CD", "--reason", "lost")
    assert r.exit_code == 0
    doc = json.loads(r.output.splitlines()[0])
    assert doc["serial"] == "abcd" and doc["trust_domain"] == "a.mesh"
    assert run("revoke", "--dir", str(ca)).exit_code == 2
    assert run("revoke", "--dir", str(ca), "--serial", "xyz").exit_code == 2
    r = run("revoke", "--dir", str(ca), "--spiffe-id", "spiffe://b.mesh/ns/x/sa/y")
    assert r.exit_code == 2 and "not in trust domain a.mesh" in r.output


def test_check_with_unreachable_store_exits_3():
    r = run("check", "--store", "etcd://127.0.0.1:1")
    assert r.exit_code == 3 and "unavailable" in r.output
    assert run("check", "--store", "nosuch://x").exit_code == 2


@pytest.mark.etcd
def test_rotation_published_to_etcd_and_checked(ca, tmp_path, etcd_server):
    url = etcd_server.url
    r = run("check", "--store", url, "--dir", str(ca))
    assert r.exit_code == 1 and "a.mesh: no bundle published" in r.output
    exported = tmp_path / "a.json"
    exported.write_text(run("bundle", "export", "--dir", str(ca)).output)
    r = run("rotate", "--dir", str(ca), "--step", "publish", "--store", url, "--now", NOW)
    assert r.exit_code == 0 and "published: a.mesh sequence 2" in r.output
    r = run("check", "--store", url, "--dir", str(ca), "--now", NOW)
    assert r.exit_code == 0, r.output
    assert "sequence 2, 2 root(s) (rotation in progress)" in r.output
    assert "a.mesh: matches" in r.output and "OK: 1 trust domain(s)" in r.output
    # Switching without --store publishing is fine (same bundle); drop without it
    # leaves the store behind the CA dir, which check reports.
    assert run("rotate", "--dir", str(ca), "--step", "switch", "--store", url).exit_code == 0
    assert run("rotate", "--dir", str(ca), "--step", "drop", "--now", LATER).exit_code == 0
    r = run("check", "--store", url, "--dir", str(ca), "--now", NOW)
    assert r.exit_code == 1 and "store has sequence 2, the CA dir 3" in r.output
    r = run("revoke", "--dir", str(ca), "--serial", "abc", "--store", url)
    assert r.exit_code == 0 and "/meshfed/v1/revocations/a.mesh/s-abc" in r.output
