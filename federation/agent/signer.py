"""Signs workload CSRs with the cluster CA (implements ``SvidSigner``).

The CA key never leaves this cluster's disk: it is loaded from the CA directory
(``trust.rotation.CaDirectory``, which checks mode and owner) and every issued
NotAfter is recorded there, which is what makes the CA rotation's drop step safe.
Authenticating the caller (join token, current SVID) is the stream server's job;
this only signs what it is told to.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509

from trust.rotation import CaDirectory
from trust.spiffe import SpiffeId


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CaSigner:
    """An SvidSigner over a CA directory."""

    def __init__(
        self,
        ca_dir: CaDirectory,
        *,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._ca_dir = ca_dir
        self._ttl = ttl
        self._now = now
        self._trust_domain = ca_dir.trust_domain.name
        self.issued = 0

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def sign(self, csr_pem: bytes, spiffe_id: SpiffeId) -> tuple[x509.Certificate, ...]:
        """Leaf first, then intermediates; CsrRefused/IssuanceError/CaKeyError on refusal.

        The CA is loaded for every signature: it re-checks the key file's mode and
        follows a rotation's ``switch`` step without a restart.
        """
        ca = self._ca_dir.active()
        chain = ca.sign_csr(csr_pem, spiffe_id, self._now(), self._ttl)
        self._ca_dir.record_issued(chain[0].not_valid_after_utc)
        self.issued += 1
        return chain
