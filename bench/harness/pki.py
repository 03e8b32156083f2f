"""SPIFFE SVIDs for the benchmark topologies, minted by the project's own CA (``trust/``).

Two trust domains, as in a federation: the calling side (``bench-a.mesh``) and the
serving side (``bench-b.mesh``). Every proxy trusts the union of both roots (what
``trust.tls`` does with a bundle set) and pins its peer by SPIFFE URI SAN.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization

from sidecar.sni import MeshSni
from trust.ca import CertificateAuthority
from trust.spiffe import SpiffeId, TrustDomain, gateway_id, workload_id
from trust.svid import issue_svid

CLIENT_DOMAIN: Final = TrustDomain.parse("bench-a.mesh")
SERVER_DOMAIN: Final = TrustDomain.parse("bench-b.mesh")
SERVICE_PORT: Final = 8443
SNI: Final = MeshSni("echo", "bench", SERVICE_PORT, "bench-b", "bench-a").format()
"""The meshfed SNI naming the benchmark's one service (``docs/sni.md``)."""

ROLES: Final = ("client-sidecar", "server-sidecar", "client-gateway", "server-gateway")


@dataclass(frozen=True)
class SvidFiles:
    """One role's SVID on disk."""

    spiffe_id: SpiffeId
    """The identity in the leaf's URI SAN (what peers pin)."""
    chain: Path
    """Leaf first, PEM."""
    key: Path
    """PKCS#8 PEM, mode 0600."""


@dataclass(frozen=True)
class Pki:
    """Everything a topology needs for mTLS: one SVID per role and the trusted roots."""

    roots: Path
    """Both domains' roots, concatenated PEM (the bundle union)."""
    svids: dict[str, SvidFiles]
    """By role: ``client-sidecar``, ``server-sidecar``, ``client-gateway``, ``server-gateway``."""
    sni: str
    """The SNI the calling sidecar sends."""
    bundles: dict[str, bytes]
    """SPIFFE bundle JSON by trust domain name (what meshfed's catalog carries)."""


def mint(directory: Path, now: dt.datetime | None = None) -> Pki:
    """Create both CAs in memory and write four SVIDs (1 day) and the roots to ``directory``."""
    now = now or dt.datetime.now(dt.UTC)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cas = {d: CertificateAuthority.create(d, now)[0] for d in (CLIENT_DOMAIN, SERVER_DOMAIN)}
    ids = {
        "client-sidecar": workload_id(CLIENT_DOMAIN, "bench", "client"),
        "server-sidecar": workload_id(SERVER_DOMAIN, "bench", "echo"),
        "client-gateway": gateway_id(CLIENT_DOMAIN),
        "server-gateway": gateway_id(SERVER_DOMAIN),
    }
    svids: dict[str, SvidFiles] = {}
    for role, sid in ids.items():
        ca = cas[CLIENT_DOMAIN if sid.member_of(CLIENT_DOMAIN) else SERVER_DOMAIN]
        svid = issue_svid(ca, sid, now, ttl=dt.timedelta(days=1))
        chain, key = directory / f"{role}.crt", directory / f"{role}.key"
        chain.write_bytes(svid.chain_pem())
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(svid.key_pem())
        svids[role] = SvidFiles(sid, chain, key)
    roots = directory / "roots.pem"
    roots.write_bytes(
        b"".join(ca.root.public_bytes(serialization.Encoding.PEM) for ca in cas.values())
    )
    bundles = {str(d): ca.trust_bundle(1).to_json().encode() for d, ca in cas.items()}
    return Pki(roots, svids, SNI, bundles)
