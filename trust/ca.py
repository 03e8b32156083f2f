"""The per-cluster certificate authority.

One CA per trust domain: an EC P-256 self-signed root, optionally with one
intermediate that does the signing. On disk (``init`` writes, ``load`` reads)::

    <dir>/ca.key    signing key (the intermediate's if there is one), PKCS#8 PEM, mode 0600
    <dir>/ca.crt    signing chain, PEM: signing certificate first, root last
    <dir>/root.key  root key, mode 0600, only with an intermediate (needed to
                    re-issue the intermediate; may be moved offline)

Private files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600,
so they are never, even briefly, readable by others and never overwrite or
follow anything. ``load`` opens the key with ``O_NOFOLLOW`` and checks the mode
on the open descriptor, so the check and the read concern the same file.

Root profile: basicConstraints ``cA=true`` with pathLen (0, or 1 with an
intermediate), critical; key usage keyCertSign + cRLSign, critical; SKI/AKI;
one URI SAN ``spiffe://<trust-domain>`` naming the domain the root serves
(SPIFFE's recommendation for signing certificates, and what lets a bundle
keeper refuse a root published under another domain's key).

No name constraints: a URI constraint (``spiffe://<td>``) would be the natural
defence, but ``cryptography``'s verifier refuses every chain that contains one
("unsupported name constraint"). The same defence comes from choosing the
bundle by the SVID's trust domain before verifying (``validate.py``).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trust.bundle import TrustBundle
from trust.errors import CaKeyError, CsrRefused, IssuanceError, ValidationError
from trust.spiffe import InvalidSpiffeId, SpiffeId, TrustDomain
from trust.svid import (
    ALLOWED_CURVES,
    DEFAULT_SVID_TTL,
    build_svid_certificate,
    key_usage,
    random_serial,
)
from trust.validate import TrustBundleSet, verify_peer

__all__ = [
    "CA_BACKDATE",
    "CERT_FILE",
    "DEFAULT_CA_TTL",
    "DEFAULT_INTERMEDIATE_TTL",
    "KEY_FILE",
    "ROOT_KEY_FILE",
    "CertificateAuthority",
]

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
ROOT_KEY_FILE = "root.key"
DEFAULT_CA_TTL = dt.timedelta(days=365)
DEFAULT_INTERMEDIATE_TTL = dt.timedelta(days=90)
CA_BACKDATE = dt.timedelta(minutes=5)
"""CA certificates are backdated more than leaves: they must be valid before any leaf is."""


def _name(trust_domain: TrustDomain, what: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshfed {what} {trust_domain.name}"[:64]),
        ]
    )


def _ca_cert(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    trust_domain: TrustDomain,
    path_length: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _spki(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte on; never overwrite or follow a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise CaKeyError(
            str(path), "already exists", "refusing to overwrite a CA; use an empty directory"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_private(path: Path) -> bytes:
    """Read a private key file, refusing anything but a regular file of mode 0600 or stricter."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CaKeyError(
            str(path),
            "missing",
            "run `meshfed trust init` for a new CA, or restore the key from its backup",
        ) from None
    except PermissionError:
        raise CaKeyError(
            str(path),
            "not readable by this user",
            f"chown the file to the user running meshfed (uid {os.geteuid()}) and chmod 600 it",
        ) from None
    except OSError as exc:
        raise CaKeyError(
            str(path), f"cannot be opened ({exc.strerror})", "use a regular file, not a symlink"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CaKeyError(str(path), "is not a regular file", "replace it with the key file")
        if st.st_mode & 0o077:
            raise CaKeyError(
                str(path),
                f"mode {stat.S_IMODE(st.st_mode):04o} lets group or others read it",
                f"chmod 600 {path}",
            )
        if st.st_uid != os.geteuid():
            raise CaKeyError(
                str(path),
                f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})",
                f"chown {os.geteuid()} {path}",
            )
        return f.read()


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read_private(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CaKeyError(
            str(path), "is encrypted", "store it unencrypted; file mode 0600 protects it"
        ) from None
    except ValueError:
        raise CaKeyError(
            str(path), "is not a PEM private key", "restore the key written by `meshfed trust init`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ALLOWED_CURVES):
        raise CaKeyError(str(path), "is not an EC P-256/P-384 key", "re-create the CA")
    return key


@dataclass(frozen=True)
class CertificateAuthority:
    """A trust domain's CA: signs X.509-SVIDs, checking each one before handing it out."""

    trust_domain: TrustDomain
    """The domain this CA signs for; it refuses to sign IDs of any other."""
    signing_key: ec.EllipticCurvePrivateKey
    """Key of ``chain[0]``; never leaves this cluster's disk."""
    chain: tuple[x509.Certificate, ...]
    """Signing certificate first, root last (length 1 for a root-only CA)."""

    def __post_init__(self) -> None:
        if not self.chain:
            raise CaKeyError("<memory>", "CA has no certificate", "build it with init/create")

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate whose key signs leaves."""
        return self.chain[0]

    @property
    def root(self) -> x509.Certificate:
        """The trust anchor that goes into this domain's bundle."""
        return self.chain[-1]

    @property
    def bundle_set(self) -> TrustBundleSet:
        """A bundle set trusting only this CA's root (what it validates its own output with)."""
        return TrustBundleSet({self.trust_domain: (self.root,)})

    @classmethod
    def create(
        cls,
        trust_domain: TrustDomain,
        now: dt.datetime,
        *,
        ttl: dt.timedelta = DEFAULT_CA_TTL,
        intermediate: bool = False,
        intermediate_ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
    ) -> tuple[CertificateAuthority, ec.EllipticCurvePrivateKey | None]:
        """A new CA in memory; returns it and, with an intermediate, the root key (else None)."""
        root_key = ec.generate_private_key(ec.SECP256R1())
        not_before = now - CA_BACKDATE
        root = _ca_cert(
            subject=_name(trust_domain, "root"),
            public_key=root_key.public_key(),
            issuer=_name(trust_domain, "root"),
            issuer_key=root_key,
            trust_domain=trust_domain,
            path_length=1 if intermediate else 0,
            not_before=not_before,
            not_after=now + ttl,
        )
        if not intermediate:
            return cls(trust_domain, root_key, (root,)), None
        int_key = ec.generate_private_key(ec.SECP256R1())
        inter = _ca_cert(
            subject=_name(trust_domain, "intermediate"),
            public_key=int_key.public_key(),
            issuer=root.subject,
            issuer_key=root_key,
            trust_domain=trust_domain,
            path_length=0,
            not_before=not_before,
            not_after=min(now + intermediate_ttl, root.not_valid_after_utc),
        )
        return cls(trust_domain, int_key, (inter, root)), root_key

    @classmethod
    def init(
        cls,
        directory: Path,
        trust_domain: TrustDomain,
        now: dt.datetime,
        *,
        ttl: dt.timedelta = DEFAULT_CA_TTL,
        intermediate: bool = False,
        intermediate_ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
    ) -> CertificateAuthority:
        """Create a CA and write it to ``directory`` (made 0700 if absent; files must not exist)."""
        ca, root_key = cls.create(
            trust_domain, now, ttl=ttl, intermediate=intermediate, intermediate_ttl=intermediate_ttl
        )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in (KEY_FILE, CERT_FILE, ROOT_KEY_FILE):
            if (directory / name).exists() or (directory / name).is_symlink():
                raise CaKeyError(
                    str(directory / name),
                    "already exists",
                    "refusing to overwrite a CA; use an empty directory",
                )
        if root_key is not None:
            _write_new(directory / ROOT_KEY_FILE, _key_pem(root_key), 0o600)
        _write_new(directory / KEY_FILE, _key_pem(ca.signing_key), 0o600)
        _write_new(directory / CERT_FILE, ca.chain_pem(), 0o644)
        return ca

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Load a CA written by :meth:`init`; raise :class:`CaKeyError` saying how to fix it."""
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        key = _load_key(key_path)
        try:
            pem = cert_path.read_bytes()
        except FileNotFoundError:
            raise CaKeyError(
                str(cert_path), "missing", "restore ca.crt from its backup or the store's bundle"
            ) from None
        except OSError as exc:
            raise CaKeyError(str(cert_path), f"unreadable ({exc.strerror})", "check it") from None
        try:
            chain = tuple(x509.load_pem_x509_certificates(pem))
        except ValueError:
            raise CaKeyError(
                str(cert_path), "is not PEM certificates", "restore ca.crt from its backup"
            ) from None
        if _spki(chain[0].public_key()) != _spki(key.public_key()):
            raise CaKeyError(
                str(key_path),
                f"does not match the certificate in {cert_path}",
                "restore the key that belongs to ca.crt, or init a new CA in an empty directory",
            )
        for child, parent in itertools.pairwise(chain):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise CaKeyError(
                    str(cert_path), f"chain is broken: {exc!r}", "restore ca.crt from its backup"
                ) from None
        return cls(_domain_of(chain[-1], cert_path), key, chain)

    def trust_bundle(self, sequence: int, refresh_hint: int | None = None) -> TrustBundle:
        """This CA's root as a bundle (rotation publishes several roots; see ``TrustBundle``)."""
        return TrustBundle(self.trust_domain, (self.root,), sequence, refresh_hint)

    def chain_pem(self) -> bytes:
        """``ca.crt``'s content: the signing chain as PEM, signing certificate first."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def sign_csr(
        self,
        csr_pem: bytes,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
    ) -> tuple[x509.Certificate, ...]:
        """Issue an X.509-SVID for ``spiffe_id`` to the key in ``csr_pem``.

        Returns the chain to present in TLS: leaf first, then any intermediate
        (never the root). Only the CSR's key is used; its subject and extensions
        are checked (a CSR asking for CA powers or another identity is refused)
        but never copied. Raises :class:`CsrRefused` or :class:`IssuanceError`.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrRefused(f"not a PEM certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise CsrRefused("CSR signature does not verify (no proof of key possession)")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ALLOWED_CURVES
        ):
            raise CsrRefused(f"key type {type(public_key).__name__} not allowed; use EC P-256")
        if spiffe_id.trust_domain != self.trust_domain:
            raise CsrRefused(
                f"asks for trust domain {spiffe_id.trust_domain}; this CA signs only "
                f"{self.trust_domain}"
            )
        if not spiffe_id.path:
            raise CsrRefused("a workload SPIFFE ID needs a path")
        self._check_csr_extensions(csr, spiffe_id)
        if ttl <= dt.timedelta(0):
            raise CsrRefused("ttl must be positive")
        for cert in self.chain:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise IssuanceError(
                    f"CA certificate {cert.subject.rfc4514_string()!r} is not valid at "
                    f"{now.isoformat()} (valid {cert.not_valid_before_utc.isoformat()} to "
                    f"{cert.not_valid_after_utc.isoformat()}); rotate the CA"
                )
        leaf = build_svid_certificate(
            issuer_key=self.signing_key,
            issuer_cert=self.certificate,
            public_key=public_key,
            spiffe_id=spiffe_id,
            now=now,
            ttl=ttl,
        )
        issued = (leaf, *self.chain[:-1])
        # The CA checks its own output with the validator every peer uses: a
        # certificate it would refuse from others is never handed out.
        try:
            verify_peer(
                [c.public_bytes(serialization.Encoding.DER) for c in issued],
                self.bundle_set,
                now,
                expected={spiffe_id},
            )
        except ValidationError as exc:
            raise IssuanceError(
                f"refusing to issue a certificate failing validation: {exc}"
            ) from exc
        return issued

    def _check_csr_extensions(self, csr: x509.CertificateSigningRequest, sid: SpiffeId) -> None:
        try:
            extensions = list(csr.extensions)
        except (ValueError, x509.DuplicateExtension) as exc:
            raise CsrRefused(f"unreadable CSR extensions ({exc})") from None
        for ext in extensions:
            value = ext.value
            if isinstance(value, x509.BasicConstraints) and value.ca:
                raise CsrRefused("asks for CA powers (basicConstraints cA=true)")
            if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
                raise CsrRefused("asks for CA powers (keyCertSign/cRLSign key usage)")
            if isinstance(value, x509.SubjectAlternativeName):
                uris = value.get_values_for_type(x509.UniformResourceIdentifier)
                for uri in uris:
                    try:
                        asked = SpiffeId.parse(uri)
                    except InvalidSpiffeId as exc:
                        raise CsrRefused(f"names a non-SPIFFE URI: {exc.reason}") from None
                    if asked.trust_domain != self.trust_domain:
                        raise CsrRefused(
                            f"asks for trust domain {asked.trust_domain}; this CA signs only "
                            f"{self.trust_domain}"
                        )
                    if asked != sid:
                        raise CsrRefused(f"names {asked}, not the authorised {sid}")


def _domain_of(root: x509.Certificate, path: Path) -> TrustDomain:
    """The trust domain a meshfed root names in its ``spiffe://<td>`` URI SAN."""
    try:
        san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise ValueError("root must carry exactly one spiffe://<td> URI SAN")
        return TrustDomain.parse(uris[0])
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise CaKeyError(
            str(path), f"root does not name its trust domain ({exc})", "re-create the CA"
        ) from None
