"""X.509-SVIDs: building leaf certificates to the SPIFFE profile, CSRs, and the ``Svid`` bundle.

Profile of every leaf the CA issues (checked again by ``validate.py`` before it
is handed out):

* exactly one URI SAN, the SPIFFE ID (non-empty path, the CA's trust domain);
* basicConstraints ``cA=false`` (critical);
* key usage digitalSignature only, critical (keyEncipherment is an RSA-only
  usage and these are EC keys);
* EKU serverAuth + clientAuth (a workload is both a TLS client and server);
* NotBefore = ``now - SVID_BACKDATE`` (60 s): a peer whose clock is up to a
  minute behind the CA still accepts a fresh SVID. 30 s of skew passes, ten
  minutes does not (BAD_INPUTS case 2); a larger backdate would widen the
  window in which a certificate is valid before it existed;
* NotAfter = ``now + ttl``, clipped to the issuing CA's NotAfter;
* a random positive 128-bit serial (from the OS CSPRNG, not the caller's
  ``random.Random``: serials must be unpredictable), SKI and AKI.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trust.errors import TrustError, ValidationError
from trust.spiffe import SpiffeId
from trust.validate import spiffe_id_of

if TYPE_CHECKING:
    from trust.ca import CertificateAuthority

__all__ = [
    "ALLOWED_CURVES",
    "DEFAULT_SVID_TTL",
    "SVID_BACKDATE",
    "Svid",
    "build_svid_certificate",
    "issue_svid",
    "key_usage",
    "make_csr",
    "random_serial",
]

DEFAULT_SVID_TTL = dt.timedelta(hours=1)
SVID_BACKDATE = dt.timedelta(seconds=60)
ALLOWED_CURVES: tuple[type[ec.EllipticCurve], ...] = (ec.SECP256R1, ec.SECP384R1)


def key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """A KeyUsage value with only the named bits set."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def random_serial() -> int:
    """A uniformly random, non-zero, 128-bit certificate serial."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def build_svid_certificate(
    *,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    spiffe_id: SpiffeId,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    """Sign a leaf X.509-SVID with the SPIFFE profile above. No policy checks here."""
    not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshfed")]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - SVID_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def make_csr(private_key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId) -> bytes:
    """A PEM CSR for ``spiffe_id`` (URI SAN only), as a workload sends it to its agent."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshfed")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Svid:
    """An X.509-SVID with its private key: what a sidecar or gateway presents in TLS."""

    cert_chain: tuple[x509.Certificate, ...]
    """Leaf first, then any intermediates up to (not including) the root."""
    private_key: ec.EllipticCurvePrivateKey
    """The leaf's private key; never leaves the process that generated it."""
    spiffe_id: SpiffeId
    """The leaf's SPIFFE ID (its one URI SAN)."""
    not_before: dt.datetime
    """Leaf NotBefore (UTC, already backdated)."""
    not_after: dt.datetime
    """Leaf NotAfter (UTC); rotation renews at half of the lifetime."""

    @property
    def leaf(self) -> x509.Certificate:
        """The leaf certificate."""
        return self.cert_chain[0]

    @property
    def serial(self) -> int:
        """The leaf's serial number (what a serial revocation names)."""
        return self.cert_chain[0].serial_number

    def chain_der(self) -> list[bytes]:
        """The chain as DER, leaf first (what a peer receives in TLS)."""
        return [c.public_bytes(serialization.Encoding.DER) for c in self.cert_chain]

    def chain_pem(self) -> bytes:
        """The chain as concatenated PEM, leaf first."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM; write it only to a 0600 file."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_certificates(
        cls, chain: Sequence[x509.Certificate], private_key: ec.EllipticCurvePrivateKey
    ) -> Svid:
        """An Svid from a chain and its key; checks the key matches and the SPIFFE ID parses."""
        if not chain:
            raise TrustError("an SVID needs at least its leaf certificate")
        leaf = chain[0]
        if _spki(leaf.public_key()) != _spki(private_key.public_key()):
            raise TrustError("the private key does not match the SVID leaf certificate")
        try:
            sid = spiffe_id_of(leaf)
        except ValidationError as exc:
            raise TrustError(f"not an X.509-SVID: {exc.detail}") from None
        return cls(
            tuple(chain), private_key, sid, leaf.not_valid_before_utc, leaf.not_valid_after_utc
        )

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> Svid:
        """An Svid from PEM text (as written by :meth:`chain_pem` and :meth:`key_pem`)."""
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TrustError(f"unreadable SVID PEM: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TrustError("SVID keys must be EC keys")
        return cls.from_certificates(chain, key)


def _spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issue_svid(
    ca: CertificateAuthority,
    spiffe_id: SpiffeId,
    now: dt.datetime,
    ttl: dt.timedelta = DEFAULT_SVID_TTL,
) -> Svid:
    """Generate a P-256 key here and have ``ca`` sign it (through the same CSR checks)."""
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign_csr(make_csr(key, spiffe_id), spiffe_id, now, ttl)
    return Svid.from_certificates(chain, key)
