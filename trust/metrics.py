"""Prometheus metrics of the trust layer (a thin adapter; the cores only return outcomes).

Names follow ``meshfed_<component>_<what>_<unit>``:

* ``meshfed_trust_bundle_refusals_total{trust_domain,reason}`` -- bundles refused
  by a keeper (rollback, sequence conflict, foreign root, malformed...). Alert on
  any increase: it is either a misconfigured publisher or an attack.
* ``meshfed_trust_bundle_sequence{trust_domain}`` -- ``spiffe_sequence`` in force.
* ``meshfed_trust_svid_expiry_seconds{spiffe_id}`` -- NotAfter of the SVID in use,
  as a Unix time (alert on ``meshfed_trust_svid_expiry_seconds - time() < 600``; a
  "seconds left" gauge would be stale between updates).
* ``meshfed_trust_svid_renewals_total{result}`` -- ``ok`` / ``error``.
* ``meshfed_trust_handshake_failures_total{reason}`` -- refused handshakes, by the
  stable reason of :class:`~trust.errors.HandshakeRefused`.
* ``meshfed_trust_revoked_connections_closed_total`` -- live connections closed
  because their peer was revoked.
* ``meshfed_trust_revocations{trust_domain}`` -- revocation records in force.

Every reason label value comes from a closed set (``trust.errors``), and every
handshake reason is pre-created at 0 so ``rate()`` works from the first failure.
"""

from __future__ import annotations

from collections import Counter as _Counter

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from trust.bundle import Refused, TrustBundle
from trust.errors import HANDSHAKE_REASONS, HandshakeRefused
from trust.revocation import RevocationSet
from trust.svid import Svid

__all__ = ["TrustMetrics"]


class TrustMetrics:
    """The trust layer's metrics, registered in ``registry`` (the default one if None).

    Tests pass a fresh ``CollectorRegistry`` so instances do not collide.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self.bundle_refusals = Counter(
            "meshfed_trust_bundle_refusals_total",
            "Trust bundles refused, by trust domain and reason.",
            ["trust_domain", "reason"],
            registry=reg,
        )
        self.bundle_sequence = Gauge(
            "meshfed_trust_bundle_sequence",
            "spiffe_sequence of the bundle in force.",
            ["trust_domain"],
            registry=reg,
        )
        self.svid_expiry = Gauge(
            "meshfed_trust_svid_expiry_seconds",
            "NotAfter of the SVID in use, as a Unix time.",
            ["spiffe_id"],
            registry=reg,
        )
        self.svid_renewals = Counter(
            "meshfed_trust_svid_renewals_total",
            "SVID renewal attempts by result (ok, error).",
            ["result"],
            registry=reg,
        )
        self.handshake_failures = Counter(
            "meshfed_trust_handshake_failures_total",
            "Refused TLS handshakes by reason.",
            ["reason"],
            registry=reg,
        )
        self.revoked_closed = Counter(
            "meshfed_trust_revoked_connections_closed_total",
            "Live connections closed because their peer was revoked.",
            registry=reg,
        )
        self.revocations = Gauge(
            "meshfed_trust_revocations",
            "Revocation records in force, by trust domain.",
            ["trust_domain"],
            registry=reg,
        )
        self._revocation_domains: set[str] = set()
        for reason in HANDSHAKE_REASONS:
            self.handshake_failures.labels(reason=reason)
        for result in ("ok", "error"):
            self.svid_renewals.labels(result=result)

    def bundle_refused(self, refused: Refused) -> None:
        """Count a keeper refusal (pass as ``BundleKeeper.on_refusal`` or a watch callback)."""
        self.bundle_refusals.labels(
            trust_domain=refused.trust_domain.name, reason=refused.reason
        ).inc()

    def bundle_accepted(self, bundle: TrustBundle) -> None:
        """Record the sequence now in force for the bundle's domain."""
        self.bundle_sequence.labels(trust_domain=bundle.trust_domain.name).set(bundle.sequence)

    def svid_in_use(self, svid: Svid) -> None:
        """Record the SVID now presented (call at start and on every renewal)."""
        self.svid_expiry.labels(spiffe_id=str(svid.spiffe_id)).set(svid.not_after.timestamp())

    def svid_renewed(self, svid: Svid) -> None:
        """A renewal succeeded (``SvidRotator(on_renewed=...)``)."""
        self.svid_renewals.labels(result="ok").inc()
        self.svid_in_use(svid)

    def svid_renewal_failed(self, _exc: BaseException) -> None:
        """A renewal attempt failed (``SvidRotator(on_failure=...)``)."""
        self.svid_renewals.labels(result="error").inc()

    def handshake_refused(self, exc: HandshakeRefused) -> None:
        """Count a refused handshake by its stable reason."""
        self.handshake_failures.labels(reason=exc.reason).inc()

    def connection_revoked(self, _peer: object) -> None:
        """A live connection was closed on revocation (``RevocationEnforcer(on_close=...)``)."""
        self.revoked_closed.inc()

    def revocations_in_force(self, revoked: RevocationSet) -> None:
        """Record how many revocations each domain has in force."""
        counts = _Counter(r.trust_domain.name for r in revoked.revocations)
        for td in self._revocation_domains - counts.keys():  # domains that dropped to zero
            self.revocations.labels(trust_domain=td).set(0)
        self._revocation_domains |= counts.keys()
        for td, n in counts.items():
            self.revocations.labels(trust_domain=td).set(n)
