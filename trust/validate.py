"""Validation of a peer's X.509-SVID chain: a pure function of (chain, bundles, now).

Order of checks (the first failure wins, and its reason is the metric label):

1. every certificate parses (``malformed``);
2. the leaf has exactly one URI SAN (``not_spiffe`` / ``multiple_uri_sans``)
   holding a valid SPIFFE ID with a non-empty path (``not_spiffe``);
3. the bundle is chosen by that ID's trust domain (``untrusted_domain`` if we
   have none) -- BEFORE any signature is looked at, so a chain can only ever be
   checked against the roots of the domain it claims;
4. the leaf's own validity window (``expired`` / ``not_yet_valid``) and SPIFFE
   leaf rules: ``cA=false`` (``leaf_is_ca``), key usage present, critical, with
   digitalSignature and without keyCertSign/cRLSign (``bad_key_usage``), EKU
   with both serverAuth and clientAuth (``bad_eku``);
5. the chain, verified by ``cryptography``'s RFC 5280 / CABF path builder
   against a store holding ONLY that domain's roots (``bad_chain``): signatures,
   validity of every certificate, ``cA`` and keyCertSign on every issuer,
   pathLen, name constraints;
6. revocation of the leaf's serial or SPIFFE ID in that domain (``revoked``);
7. the expected identity, if the caller has one (``unexpected_identity``).

Step 4 duplicates part of what step 5 enforces; it runs first so that the
reason is precise (``expired`` rather than ``bad_chain``).
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from trust.errors import InvalidSpiffeId, ValidationError
from trust.spiffe import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from trust.bundle import TrustBundle
    from trust.revocation import RevocationSet

__all__ = [
    "MAX_CHAIN_CERTS",
    "TrustBundleSet",
    "ValidationError",
    "VerifiedPeer",
    "check_leaf_profile",
    "fingerprint",
    "spiffe_id_of",
    "validate_peer",
    "verify_peer",
]

MAX_CHAIN_CERTS = 8
"""Longest chain accepted from a peer (leaf included); longer is ``bad_chain``."""


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER: its identity for deduplication and comparison."""
    return cert.fingerprint(hashes.SHA256())


@dataclass(frozen=True)
class TrustBundleSet(Mapping[TrustDomain, tuple[x509.Certificate, ...]]):
    """The roots trusted per trust domain; immutable, so it is safe to share across tasks.

    One ``cryptography`` verifier store is built per domain, once, at construction.
    """

    roots_by_domain: Mapping[TrustDomain, tuple[x509.Certificate, ...]]
    """Trust domain -> its root certificates (several during a CA rotation)."""
    _stores: dict[TrustDomain, Store] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        frozen = {td: tuple(roots) for td, roots in self.roots_by_domain.items() if roots}
        object.__setattr__(self, "roots_by_domain", frozen)
        object.__setattr__(self, "_stores", {td: Store(list(r)) for td, r in frozen.items()})

    @classmethod
    def from_bundles(cls, bundles: Iterable[TrustBundle]) -> TrustBundleSet:
        """One entry per bundle's trust domain (later bundles for the same domain win)."""
        return cls({b.trust_domain: b.roots for b in bundles})

    @classmethod
    def empty(cls) -> TrustBundleSet:
        """A set that trusts nothing."""
        return cls({})

    def __getitem__(self, td: TrustDomain) -> tuple[x509.Certificate, ...]:
        return self.roots_by_domain[td]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self.roots_by_domain)

    def __len__(self) -> int:
        return len(self.roots_by_domain)

    def __hash__(self) -> int:
        return hash(
            frozenset(
                (td, frozenset(fingerprint(r) for r in roots))
                for td, roots in self.roots_by_domain.items()
            )
        )

    def store_for(self, td: TrustDomain) -> Store | None:
        """The verifier store holding only ``td``'s roots, or None if ``td`` is not trusted."""
        return self._stores.get(td)

    def all_roots(self) -> list[x509.Certificate]:
        """Every root of every domain, deduplicated (what OpenSSL gets as its CA list)."""
        seen: dict[bytes, x509.Certificate] = {}
        for roots in self.roots_by_domain.values():
            for root in roots:
                seen.setdefault(fingerprint(root), root)
        return list(seen.values())


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """What a successful validation established about a peer."""

    spiffe_id: SpiffeId
    """The peer's SPIFFE ID (its trust domain's roots anchored the chain)."""
    serial: int
    """The leaf's serial number, for later revocation checks on live connections."""
    not_after: dt.datetime
    """When the leaf expires (UTC); live connections should not outlive it."""
    chain: tuple[x509.Certificate, ...]
    """The verified chain, leaf first, ending with the trusted root."""


def _uris(cert: x509.Certificate) -> tuple[list[str], bool]:
    """The leaf's URI SANs, and whether it has a SAN extension at all."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], False
    return san.get_values_for_type(x509.UniformResourceIdentifier), True


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID leaf, checking the one-URI-SAN rule.

    Raises ``ValidationError`` (``not_spiffe``, ``multiple_uri_sans`` or ``malformed``).
    """
    try:
        uris, has_san = _uris(cert)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise ValidationError("malformed", f"unreadable extensions: {exc}") from None
    if not uris:
        what = "only non-URI SANs" if has_san else "no subjectAltName"
        raise ValidationError("not_spiffe", f"leaf has {what}; an SVID has exactly one URI SAN")
    if len(uris) > 1:
        raise ValidationError("multiple_uri_sans", f"leaf has {len(uris)} URI SANs, not one")
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise ValidationError("not_spiffe", f"URI SAN is not a SPIFFE ID: {exc.reason}") from None
    if not sid.path:
        raise ValidationError("not_spiffe", "a leaf SVID's SPIFFE ID must have a path")
    return sid


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return value.astimezone(dt.UTC)


def check_leaf_profile(leaf: x509.Certificate, now: dt.datetime) -> None:
    """SPIFFE leaf rules and the leaf's validity window; raises ``ValidationError``."""
    now = _utc(now)
    if now < leaf.not_valid_before_utc:
        raise ValidationError(
            "not_yet_valid", f"leaf valid from {leaf.not_valid_before_utc.isoformat()}"
        )
    if now > leaf.not_valid_after_utc:
        raise ValidationError("expired", f"leaf expired at {leaf.not_valid_after_utc.isoformat()}")
    try:
        exts = leaf.extensions
        bc = (
            exts.get_extension_for_class(x509.BasicConstraints).value
            if _has(exts, x509.BasicConstraints)
            else None
        )
        ku_ext = exts.get_extension_for_class(x509.KeyUsage) if _has(exts, x509.KeyUsage) else None
        eku = (
            exts.get_extension_for_class(x509.ExtendedKeyUsage).value
            if _has(exts, x509.ExtendedKeyUsage)
            else None
        )
    except (ValueError, x509.DuplicateExtension) as exc:
        raise ValidationError("malformed", f"unreadable extensions: {exc}") from None
    if bc is not None and bc.ca:
        raise ValidationError("leaf_is_ca", "leaf has basicConstraints cA=true")
    if ku_ext is None:
        raise ValidationError("bad_key_usage", "leaf has no key usage extension")
    if not ku_ext.critical:
        raise ValidationError("bad_key_usage", "leaf key usage is not critical")
    ku = ku_ext.value
    if not ku.digital_signature:
        raise ValidationError("bad_key_usage", "leaf key usage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise ValidationError("bad_key_usage", "leaf key usage has keyCertSign or cRLSign")
    if eku is None:
        raise ValidationError("bad_eku", "leaf has no extended key usage")
    missing = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} - set(eku)
    if missing:
        names = ", ".join(sorted(_EKU_NAMES[oid] for oid in missing))
        raise ValidationError("bad_eku", f"leaf extended key usage lacks {names}")


_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


def _has(exts: x509.Extensions, kind: type[x509.ExtensionType]) -> bool:
    try:
        exts.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return False
    return True


def _parse_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    if not chain_der:
        raise ValidationError("malformed", "peer sent no certificate")
    if len(chain_der) > MAX_CHAIN_CERTS:
        raise ValidationError("bad_chain", f"chain longer than {MAX_CHAIN_CERTS} certificates")
    certs = []
    for i, der in enumerate(chain_der):
        try:
            with warnings.catch_warnings():
                # Non-positive serials only warn today; they are refused below instead.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                cert = x509.load_der_x509_certificate(bytes(der))
        except (ValueError, TypeError) as exc:
            raise ValidationError("malformed", f"certificate {i} is not DER X.509: {exc}") from None
        if cert.serial_number <= 0:
            raise ValidationError("malformed", f"certificate {i} has a non-positive serial")
        certs.append(cert)
    return certs


def verify_peer(
    chain_der: Sequence[bytes],
    bundles: TrustBundleSet,
    now: dt.datetime,
    expected: Set[SpiffeId] | None = None,
    revoked: RevocationSet | None = None,
) -> VerifiedPeer:
    """Validate a peer chain (leaf first, DER) and say who the peer is.

    ``expected``: if given, the peer's ID must be one of these. ``revoked``: the
    published revocations. Raises :class:`ValidationError`; never anything else
    for any byte input.
    """
    now = _utc(now)  # a naive `now` is the caller's bug, not the peer's: raise ValueError
    try:
        return _verify(chain_der, bundles, now, expected, revoked)
    except ValidationError:
        raise
    except Exception as exc:  # hostile bytes must only ever yield `malformed`
        raise ValidationError("malformed", f"{type(exc).__name__}: {exc}") from None


def _verify(
    chain_der: Sequence[bytes],
    bundles: TrustBundleSet,
    now: dt.datetime,
    expected: Set[SpiffeId] | None,
    revoked: RevocationSet | None,
) -> VerifiedPeer:
    certs = _parse_chain(chain_der)
    leaf = certs[0]
    sid = spiffe_id_of(leaf)
    store = bundles.store_for(sid.trust_domain)
    if store is None:
        raise ValidationError(
            "untrusted_domain", f"no trust bundle for domain {sid.trust_domain.name!r}"
        )
    check_leaf_profile(leaf, now)
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(now)
        .max_chain_depth(MAX_CHAIN_CERTS)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, certs[1:])
    except VerificationError as exc:
        raise ValidationError(
            "bad_chain", f"no valid path to a root of {sid.trust_domain.name!r}: {exc}"
        ) from None
    if revoked is not None and revoked.is_revoked(sid.trust_domain, leaf.serial_number, sid):
        raise ValidationError("revoked", f"{sid} (serial {leaf.serial_number:x}) is revoked")
    if expected is not None and sid not in expected:
        shown = ", ".join(sorted(str(e) for e in expected)) or "nobody"
        raise ValidationError("unexpected_identity", f"peer is {sid}, expected {shown}")
    return VerifiedPeer(
        spiffe_id=sid,
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
        chain=tuple(verified.chain),
    )


def validate_peer(
    chain_der: Sequence[bytes],
    bundles: TrustBundleSet,
    now: dt.datetime,
    expected: Set[SpiffeId] | None = None,
    revoked: RevocationSet | None = None,
) -> SpiffeId:
    """:func:`verify_peer`, returning only the peer's SPIFFE ID."""
    return verify_peer(chain_der, bundles, now, expected, revoked).spiffe_id
