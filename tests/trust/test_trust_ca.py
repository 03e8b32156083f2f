"""The per-cluster CA: key files (BAD_INPUTS 30), CSR checks and the issued profile (case 7)."""

from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from trustkit import NOW

from trust.ca import CertificateAuthority
from trust.errors import CaKeyError, CsrRefused
from trust.spiffe import TrustDomain, workload_id
from trust.svid import SVID_BACKDATE, Svid, issue_svid, key_usage, make_csr
from trust.validate import validate_peer

TD = TrustDomain("a.mesh")
ALICE = workload_id(TD, "shop", "alice")
CA, _ = CertificateAuthority.create(TD, NOW - dt.timedelta(days=1))


def test_init_writes_key_0600_and_load_round_trips(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca", TD, NOW)
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == TD and loaded.chain == ca.chain


def test_init_with_intermediate_round_trips_and_issues(tmp_path):
    ca = CertificateAuthority.init(tmp_path, TD, NOW, intermediate=True)
    loaded = CertificateAuthority.load(tmp_path)
    assert len(loaded.chain) == 2 and loaded.root == ca.root
    assert stat.S_IMODE(os.stat(tmp_path / "root.key").st_mode) == 0o600
    svid = issue_svid(loaded, ALICE, NOW)
    assert validate_peer(svid.chain_der(), loaded.bundle_set, NOW) == ALICE


def test_init_refuses_to_overwrite(tmp_path):
    CertificateAuthority.init(tmp_path, TD, NOW)
    with pytest.raises(CaKeyError, match="already exists"):
        CertificateAuthority.init(tmp_path, TD, NOW)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_group_or_world_readable_key_and_says_chmod(tmp_path, mode):
    CertificateAuthority.init(tmp_path, TD, NOW)
    os.chmod(tmp_path / "ca.key", mode)
    with pytest.raises(CaKeyError) as err:
        CertificateAuthority.load(tmp_path)
    assert f"chmod 600 {tmp_path / 'ca.key'}" in str(err.value)


def test_load_refuses_missing_key(tmp_path):
    CertificateAuthority.init(tmp_path, TD, NOW)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CaKeyError, match="missing"):
        CertificateAuthority.load(tmp_path)


def test_load_refuses_key_not_matching_certificate(tmp_path):
    CertificateAuthority.init(tmp_path / "one", TD, NOW)
    CertificateAuthority.init(tmp_path / "two", TD, NOW)
    os.replace(tmp_path / "two" / "ca.key", tmp_path / "one" / "ca.key")
    with pytest.raises(CaKeyError, match="does not match"):
        CertificateAuthority.load(tmp_path / "one")


def test_load_refuses_symlinked_key(tmp_path):
    CertificateAuthority.init(tmp_path / "real", TD, NOW)
    (tmp_path / "link").mkdir()
    os.symlink(tmp_path / "real" / "ca.key", tmp_path / "link" / "ca.key")
    os.symlink(tmp_path / "real" / "ca.crt", tmp_path / "link" / "ca.crt")
    with pytest.raises(CaKeyError, match="symlink"):
        CertificateAuthority.load(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_refuses_unreadable_key(tmp_path):
    CertificateAuthority.init(tmp_path, TD, NOW)
    os.chmod(tmp_path / "ca.key", 0o000)
    with pytest.raises(CaKeyError, match="not readable"):
        CertificateAuthority.load(tmp_path)


def test_load_refuses_garbage_key(tmp_path):
    CertificateAuthority.init(tmp_path / "x", TD, NOW)
    key = tmp_path / "x" / "ca.key"
    key.unlink()
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(CaKeyError, match="not a PEM private key"):
        CertificateAuthority.load(tmp_path / "x")


def test_root_profile():
    root = CA.root
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://a.mesh"]


def test_issued_svid_follows_the_spiffe_profile():
    svid = issue_svid(CA, ALICE, NOW)
    leaf = svid.leaf
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(str(ALICE))]
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert svid.not_before == NOW - SVID_BACKDATE
    assert svid.not_after == NOW + dt.timedelta(hours=1)
    assert 0 < leaf.serial_number < 2**128
    assert svid.spiffe_id == ALICE


def test_serials_differ():
    assert issue_svid(CA, ALICE, NOW).serial != issue_svid(CA, ALICE, NOW).serial


def test_ttl_is_clipped_to_the_ca_lifetime():
    svid = issue_svid(CA, ALICE, NOW, ttl=dt.timedelta(days=3650))
    assert svid.not_after == CA.root.not_valid_after_utc


def test_svid_pem_round_trip():
    svid = issue_svid(CA, ALICE, NOW)
    again = Svid.from_pem(svid.chain_pem(), svid.key_pem())
    assert again.spiffe_id == ALICE and again.cert_chain == svid.cert_chain


def _csr(key, *, uris=(str(ALICE),), ca=False, ku=None):
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    if uris:
        names = [x509.UniformResourceIdentifier(u) for u in uris]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if ku is not None:
        b = b.add_extension(ku, critical=True)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(Encoding.PEM)


KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    ("csr", "sid", "rule"),
    [
        (make_csr(KEY, ALICE), workload_id(TrustDomain("b.mesh"), "shop", "alice"), "trust domain"),
        (_csr(KEY, uris=("spiffe://b.mesh/ns/x/sa/y",)), ALICE, "trust domain"),
        (_csr(KEY, uris=("spiffe://a.mesh/ns/x/sa/other",)), ALICE, "not the authorised"),
        (_csr(KEY, ca=True), ALICE, "CA powers"),
        (_csr(KEY, ku=key_usage(digital_signature=True, key_cert_sign=True)), ALICE, "CA powers"),
        (_csr(ed25519.Ed25519PrivateKey.generate()), ALICE, "not allowed"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
         ALICE, "not a PEM"),
        (make_csr(KEY, TD.id), TD.id, "needs a path"),
    ],
)
def test_ca_refuses_bad_csrs_naming_the_rule(csr, sid, rule):
    with pytest.raises(CsrRefused) as err:
        CA.sign_csr(csr, sid, NOW)
    assert rule in err.value.reason


def test_csr_without_san_gets_the_authorised_id():
    chain = CA.sign_csr(_csr(KEY, uris=()), ALICE, NOW)
    assert validate_peer([c.public_bytes(Encoding.DER) for c in chain], CA.bundle_set, NOW) == ALICE


def test_expired_ca_refuses_to_issue():
    from trust.errors import IssuanceError

    old, _ = CertificateAuthority.create(TD, NOW - dt.timedelta(days=10), ttl=dt.timedelta(days=1))
    with pytest.raises(IssuanceError):
        issue_svid(old, ALICE, NOW)
