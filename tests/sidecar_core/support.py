"""A minimal endpoint record satisfying ``sidecar.locality.Routable``."""

from __future__ import annotations

from dataclasses import dataclass

from federation.model import Locality

CALLER = Locality(cloud="aws", region="us-east-1", zone="us-east-1a", cluster="c1")


@dataclass(frozen=True, slots=True)
class Ep:
    """Test endpoint: a name, a locality and a weight."""

    name: str
    """Unique name, e.g. ``"a1"``."""
    locality: Locality
    """Where it runs."""
    weight: int = 1
    """Relative weight."""


def loc(
    cloud: str = "aws", region: str = "us-east-1", zone: str = "us-east-1a", cluster: str = "c1"
) -> Locality:
    """A locality defaulting to the caller's, so tests name only what differs."""
    return Locality(cloud=cloud, region=region, zone=zone, cluster=cluster)


def ep(name: str, weight: int = 1, **where: str) -> Ep:
    """An endpoint at ``loc(**where)``."""
    return Ep(name=name, locality=loc(**where), weight=weight)
