"""Typed errors of the trust layer.

Every error says which rule was broken. Errors that end up as metric labels
carry a stable ``reason`` string from a closed set (the ``*Reason`` literals
below); ``detail`` is free text for logs and is never used as a label.
"""

from __future__ import annotations

from typing import Literal, get_args

ValidationReason = Literal[
    "malformed",
    "not_spiffe",
    "multiple_uri_sans",
    "untrusted_domain",
    "expired",
    "not_yet_valid",
    "leaf_is_ca",
    "bad_key_usage",
    "bad_eku",
    "bad_chain",
    "revoked",
    "unexpected_identity",
]
"""Why a peer certificate chain was refused (the ``reason`` metric label)."""

HandshakeReason = Literal[
    ValidationReason,
    "handshake_failed",
    "handshake_timeout",
    "no_peer_certificate",
]
"""Why a TLS handshake was refused: a validation reason or a TLS-level one."""

BundleReason = Literal[
    "malformed",
    "rollback",
    "sequence_conflict",
    "foreign_root",
    "root_of_other_domain",
    "foreign_publisher",
]
"""Why a trust bundle was refused (``meshfed_trust_bundle_refusals_total`` label)."""

VALIDATION_REASONS: tuple[str, ...] = get_args(ValidationReason)
HANDSHAKE_REASONS: tuple[str, ...] = (
    *VALIDATION_REASONS,
    "handshake_failed",
    "handshake_timeout",
    "no_peer_certificate",
)
BUNDLE_REASONS: tuple[str, ...] = get_args(BundleReason)


class TrustError(Exception):
    """Base of every error raised by ``trust``."""


class InvalidSpiffeId(TrustError, ValueError):
    """A string (or trust domain) that is not a valid SPIFFE ID; ``reason`` names the rule."""

    def __init__(self, value: str, reason: str) -> None:
        self.value = value
        self.reason = reason
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"invalid SPIFFE ID {shown!r}: {reason}")


class CaKeyError(TrustError):
    """The CA's key or certificate on disk cannot be used; ``hint`` says how to fix it."""

    def __init__(self, path: str, problem: str, hint: str) -> None:
        self.path = path
        self.problem = problem
        self.hint = hint
        super().__init__(f"CA key {path}: {problem} ({hint})")


class CsrRefused(TrustError):
    """The CA refused to sign a CSR; ``reason`` names the rule the request broke."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"CSR refused: {reason}")


class IssuanceError(TrustError):
    """The CA built a certificate that its own validator refused (a bug; nothing was issued)."""


class ValidationError(TrustError):
    """A peer's X.509-SVID chain was refused.

    ``reason`` is one of :data:`ValidationReason` (stable, usable as a metric
    label); ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: ValidationReason, detail: str) -> None:
        self.reason: ValidationReason = reason
        self.detail = detail
        super().__init__(f"peer refused ({reason}): {detail}")


class HandshakeRefused(TrustError):
    """A TLS handshake failed or its peer was refused; the stream has been closed."""

    def __init__(self, reason: HandshakeReason, detail: str) -> None:
        self.reason: HandshakeReason = reason
        self.detail = detail
        super().__init__(f"handshake refused ({reason}): {detail}")


class BundleError(TrustError):
    """A trust bundle document is malformed; ``detail`` says which rule it broke."""

    reason: BundleReason = "malformed"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"malformed trust bundle: {detail}")


class RevocationError(TrustError):
    """A revocation record is malformed; ``detail`` says which rule it broke."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"malformed revocation: {detail}")


class TlsConfigError(TrustError):
    """A TLS context could not be built from the given SVID and bundles."""
