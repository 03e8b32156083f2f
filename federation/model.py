"""The mesh model shared by every part: localities and the records kept in the store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Locality:
    """Where an endpoint (or a caller) runs. Compared field by field, widest first."""

    cloud: str
    """Cloud or site, e.g. ``aws``, ``gcp``, ``onprem``."""
    region: str
    """Region within the cloud, e.g. ``us-east-1``."""
    zone: str
    """Zone within the region, e.g. ``us-east-1a``."""
    cluster: str
    """meshfed cluster name (one trust domain and one agent each)."""

    def __str__(self) -> str:
        return f"{self.cloud}/{self.region}/{self.zone}@{self.cluster}"
