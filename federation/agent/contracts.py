"""The seams between the agent's parts.

The agent core (registration, import, catalog) and the catalog-stream server are
built separately; they meet only through these protocols, so either side can be
tested with a small fake of the other.
"""

from __future__ import annotations

from typing import Protocol

from cryptography import x509

from federation.catalog import Catalog, Delta
from federation.model import EndpointRecord
from trust.spiffe import SpiffeId


class CatalogSource(Protocol):
    """What the stream server needs from the agent: the current catalog and its changes."""

    @property
    def epoch(self) -> str:
        """The agent incarnation; versions of different epochs are unrelated."""
        ...

    @property
    def version(self) -> int:
        """Current catalog version."""
        ...

    @property
    def synced(self) -> bool:
        """True once the first full sync with the store is done (the start-up sync gate)."""
        ...

    @property
    def degraded(self) -> bool:
        """True while the store is unreachable and the catalog may be stale."""
        ...

    def snapshot(self) -> Catalog:
        """The whole current catalog."""
        ...

    def changes_since(self, version: int, epoch: str | None = None) -> Delta | None:
        """Changes after ``version``, or None if a snapshot must be sent instead."""
        ...

    async def wait_changed(self, version: int, synced: bool, degraded: bool) -> None:
        """Return as soon as version, synced or degraded differ from the given values."""
        ...


class EndpointRegistrar(Protocol):
    """Endpoints that local sidecars register at run time; the agent publishes them leased."""

    async def register(self, record: EndpointRecord, owner: str) -> None:
        """Add or update ``record`` on behalf of ``owner`` (a connection or sidecar id)."""
        ...

    async def deregister(self, record_key: str, owner: str) -> None:
        """Withdraw one endpoint registered by ``owner``."""
        ...

    async def drop_owner(self, owner: str) -> None:
        """Withdraw everything ``owner`` registered (its connection went away)."""
        ...


class SvidSigner(Protocol):
    """Signs workload CSRs with the cluster CA (the key never leaves the agent's disk)."""

    @property
    def trust_domain(self) -> str: ...

    def sign(self, csr_pem: bytes, spiffe_id: SpiffeId) -> tuple[x509.Certificate, ...]:
        """Leaf first, then any intermediates; raises on a CSR the CA refuses."""
        ...
