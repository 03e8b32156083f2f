"""SPIFFE trust bundles (JWK Set) and the keeper that decides which bundle is current.

Format (SPIFFE Trust Domain and Bundle spec)::

    {"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256",
               "x": "<b64url>", "y": "<b64url>", "x5c": ["<b64 DER>"]}],
     "spiffe_sequence": 7, "spiffe_refresh_hint": 300}

Parsing rules: entries whose ``use`` is not ``x509-svid`` (``jwt-svid``,
unknown) or whose ``kty`` is not ``EC`` are ignored; an ``x509-svid`` EC entry
must have exactly one ``x5c`` certificate, a CA certificate whose public key is
the entry's ``x``/``y`` on ``crv``. Anything else -- not JSON, no ``keys``, a
bad entry, no usable root at all, no ``spiffe_sequence`` -- refuses the whole
bundle (meshfed needs the sequence for rollback protection).

The trust domain is not in the document: it comes from where the document was
found (the store key ``/meshfed/v1/bundles/<td>``). That is exactly how one
domain's roots could be published "under another domain's key" (BAD_INPUTS 15):
the keeper therefore refuses a root that names a different domain in its
``spiffe://<td>`` URI SAN, a root that has no such SAN (unless told to accept
them, for foreign CAs that do not name themselves), a root whose key is already
trusted for another domain, and -- when the caller knows who wrote the bundle --
a bundle written by another domain's publisher.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trust.errors import BundleError, BundleReason, InvalidSpiffeId
from trust.spiffe import SpiffeId, TrustDomain
from trust.validate import TrustBundleSet

__all__ = [
    "MAX_BUNDLE_BYTES",
    "Accepted",
    "BundleKeeper",
    "Refused",
    "TrustBundle",
]

MAX_BUNDLE_BYTES = 1 << 20
_CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
_CURVE_NAMES = {v: k for k, v in _CURVES.items()}
_COORD_LEN = {"P-256": 32, "P-384": 48}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: object, what: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise BundleError(f"{what} must be unpadded base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BundleError(f"{what} is not base64url") from None


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """A trust domain's roots with the bundle's sequence and refresh hint."""

    trust_domain: TrustDomain
    """The domain these roots anchor (from the store key, never from the document)."""
    roots: tuple[x509.Certificate, ...]
    """Root CA certificates; several during a CA rotation. Never empty."""
    sequence: int
    """``spiffe_sequence``: bumped on every change; lower or conflicting ones are refused."""
    refresh_hint: int | None = None
    """``spiffe_refresh_hint`` in seconds, if the publisher gave one."""

    def __post_init__(self) -> None:
        if not self.roots:
            raise BundleError("a bundle needs at least one root")
        if isinstance(self.sequence, bool) or self.sequence < 0:
            raise BundleError("spiffe_sequence must be a non-negative integer")
        if self.refresh_hint is not None and self.refresh_hint < 0:
            raise BundleError("spiffe_refresh_hint must be non-negative")
        for root in self.roots:
            if not _is_ca(root):
                raise BundleError(f"root {root.subject.rfc4514_string()!r} is not a CA")
            if not isinstance(root.public_key(), ec.EllipticCurvePublicKey):
                raise BundleError("only EC roots are supported")
        if len({_spki(r) for r in self.roots}) != len(self.roots):
            raise BundleError("duplicate root key")

    def content_digest(self) -> str:
        """SHA-256 over the roots and refresh hint: equal content, equal digest."""
        h = hashlib.sha256()
        for der in sorted(r.public_bytes(serialization.Encoding.DER) for r in self.roots):
            h.update(len(der).to_bytes(4, "big") + der)
        h.update(str(self.refresh_hint).encode())
        return h.hexdigest()

    def to_json(self) -> str:
        """The SPIFFE bundle document (sorted keys; roots in their order)."""
        keys = []
        for root in self.roots:
            pub = root.public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            crv = _CURVE_NAMES[type(pub.curve)]
            size = _COORD_LEN[crv]
            numbers = pub.public_numbers()
            keys.append(
                {
                    "use": "x509-svid",
                    "kty": "EC",
                    "crv": crv,
                    "x": _b64url(numbers.x.to_bytes(size, "big")),
                    "y": _b64url(numbers.y.to_bytes(size, "big")),
                    "x5c": [
                        base64.b64encode(root.public_bytes(serialization.Encoding.DER)).decode()
                    ],
                }
            )
        doc: dict[str, object] = {"keys": keys, "spiffe_sequence": self.sequence}
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, trust_domain: TrustDomain, text: str | bytes) -> TrustBundle:
        """Parse a bundle document for ``trust_domain``; raise :class:`BundleError` if malformed."""
        if len(text) > MAX_BUNDLE_BYTES:
            raise BundleError(f"larger than {MAX_BUNDLE_BYTES} bytes")
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise BundleError("top level must be a JSON object")
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise BundleError("no 'keys' array")
        sequence = doc.get("spiffe_sequence")
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
            raise BundleError("'spiffe_sequence' must be present, a non-negative integer")
        hint = doc.get("spiffe_refresh_hint")
        if hint is not None and (not isinstance(hint, int) or isinstance(hint, bool) or hint < 0):
            raise BundleError("'spiffe_refresh_hint' must be a non-negative integer")
        roots = [
            root for i, entry in enumerate(keys) if (root := _parse_entry(i, entry)) is not None
        ]
        if not roots:
            raise BundleError("no usable x509-svid root")
        return cls(trust_domain, tuple(roots), sequence, hint)


def _parse_entry(i: int, entry: object) -> x509.Certificate | None:
    """The root in one JWK, None for an entry that is not ours to use."""
    if not isinstance(entry, dict):
        raise BundleError(f"keys[{i}] is not an object")
    if entry.get("use") != "x509-svid" or entry.get("kty") != "EC":
        return None
    x5c = entry.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1:
        count = len(x5c) if isinstance(x5c, list) else 0
        raise BundleError(f"keys[{i}].x5c must hold exactly one certificate, not {count}")
    if not isinstance(x5c[0], str):
        raise BundleError(f"keys[{i}].x5c[0] must be base64 text")
    try:
        der = base64.b64decode(x5c[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"keys[{i}].x5c[0] is not a base64 DER certificate ({exc})") from None
    crv = entry.get("crv")
    if not isinstance(crv, str) or crv not in _CURVES:
        raise BundleError(f"keys[{i}].crv must be one of {sorted(_CURVES)}")
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, _CURVES[crv]):
        raise BundleError(f"keys[{i}]: x5c certificate key is not an EC {crv} key")
    size = _COORD_LEN[crv]
    x = _b64url_decode(entry.get("x"), f"keys[{i}].x")
    y = _b64url_decode(entry.get("y"), f"keys[{i}].y")
    numbers = pub.public_numbers()
    if x != numbers.x.to_bytes(size, "big") or y != numbers.y.to_bytes(size, "big"):
        raise BundleError(f"keys[{i}]: x/y do not match the x5c certificate's key")
    if not _is_ca(cert):
        raise BundleError(f"keys[{i}]: x5c certificate is not a CA (cA=true, keyCertSign)")
    return cert


@dataclass(frozen=True, slots=True)
class Accepted:
    """The offered bundle is now current for its domain."""

    bundle: TrustBundle
    """The bundle now in force."""
    changed: bool
    """False when it repeats the current bundle exactly (same sequence, same content)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The offered bundle was refused; the last good one (if any) stays in force."""

    trust_domain: TrustDomain
    """Domain the bundle was offered for."""
    reason: BundleReason
    """Stable reason code (a metric label)."""
    detail: str
    """What exactly was wrong, for the log line and alert."""


def _named_domains(root: x509.Certificate) -> list[TrustDomain | None]:
    """Trust domains named by the root's URI SANs (None for a URI that is not a SPIFFE ID)."""
    try:
        san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[TrustDomain | None] = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            out.append(SpiffeId.parse(uri).trust_domain)
        except InvalidSpiffeId:
            out.append(None)
    return out


@dataclass
class BundleKeeper:
    """Holds the last good bundle per trust domain and decides on every offered one.

    Pure state machine: no I/O, no clock. ``on_refusal`` is called for every
    refusal (wire it to a log line, an alert and a metric).
    """

    allow_unnamed_roots: bool = False
    """Accept roots without a ``spiffe://<td>`` URI SAN (foreign CAs not naming themselves)."""
    on_refusal: Callable[[Refused], None] | None = None
    """Called with every refusal, after it is counted."""
    _current: dict[TrustDomain, TrustBundle] = field(default_factory=dict, repr=False)
    _refusals: Counter[tuple[TrustDomain, BundleReason]] = field(
        default_factory=Counter, repr=False
    )

    def current(self, trust_domain: TrustDomain) -> TrustBundle | None:
        """The bundle in force for ``trust_domain``, if any."""
        return self._current.get(trust_domain)

    def bundles(self) -> Mapping[TrustDomain, TrustBundle]:
        """Every bundle in force (a copy)."""
        return dict(self._current)

    def bundle_set(self) -> TrustBundleSet:
        """The roots in force, as the validator and the TLS layer take them."""
        return TrustBundleSet.from_bundles(self._current.values())

    def refusal_counts(self) -> dict[tuple[str, str], int]:
        """Refusals so far by (trust domain, reason)."""
        return {(td.name, reason): n for (td, reason), n in self._refusals.items()}

    def forget(self, trust_domain: TrustDomain) -> None:
        """Stop trusting a domain (it left the federation); its next bundle starts afresh."""
        self._current.pop(trust_domain, None)

    def offer_json(
        self,
        trust_domain: TrustDomain,
        text: str | bytes,
        *,
        published_by: TrustDomain | None = None,
    ) -> Accepted | Refused:
        """Parse and offer a bundle document found for ``trust_domain``."""
        try:
            bundle = TrustBundle.from_json(trust_domain, text)
        except BundleError as exc:
            return self._refuse(trust_domain, "malformed", exc.detail)
        return self.offer(bundle, published_by=published_by)

    def offer(
        self, bundle: TrustBundle, *, published_by: TrustDomain | None = None
    ) -> Accepted | Refused:
        """Accept ``bundle`` as current for its domain, or refuse it and keep the last good one.

        ``published_by``: the domain whose publisher wrote it, when the caller knows.
        """
        td = bundle.trust_domain
        if published_by is not None and published_by != td:
            return self._refuse(
                td, "foreign_publisher", f"bundle for {td} written by {published_by}'s publisher"
            )
        problem = self._foreign_root(bundle)
        if problem is not None:
            return problem
        held = self._current.get(td)
        if held is not None:
            if bundle.sequence < held.sequence:
                return self._refuse(
                    td,
                    "rollback",
                    f"sequence {bundle.sequence} is lower than the current {held.sequence}",
                )
            if bundle.sequence == held.sequence:
                if bundle.content_digest() != held.content_digest():
                    return self._refuse(
                        td,
                        "sequence_conflict",
                        f"sequence {bundle.sequence} already holds other content",
                    )
                return Accepted(held, changed=False)
        self._current[td] = bundle
        return Accepted(bundle, changed=True)

    def _foreign_root(self, bundle: TrustBundle) -> Refused | None:
        td = bundle.trust_domain
        others = {
            _spki(root): other
            for other, held in self._current.items()
            if other != td
            for root in held.roots
        }
        for root in bundle.roots:
            subject = root.subject.rfc4514_string()
            named = _named_domains(root)
            if any(n != td for n in named):
                shown = ", ".join("<non-SPIFFE URI>" if n is None else n.name for n in named)
                return self._refuse(td, "foreign_root", f"root {subject!r} names {shown}, not {td}")
            if not named and not self.allow_unnamed_roots:
                return self._refuse(
                    td, "foreign_root", f"root {subject!r} does not name its trust domain"
                )
            owner = others.get(_spki(root))
            if owner is not None:
                return self._refuse(
                    td, "root_of_other_domain", f"root {subject!r} is already trusted for {owner}"
                )
        return None

    def _refuse(self, td: TrustDomain, reason: BundleReason, detail: str) -> Refused:
        self._refusals[(td, reason)] += 1
        refused = Refused(td, reason, detail)
        if self.on_refusal is not None:
            self.on_refusal(refused)
        return refused
