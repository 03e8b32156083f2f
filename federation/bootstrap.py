"""Identity plumbing shared by every proxy that talks to its agent (sidecars, gateways).

* :func:`first_svid`: a fresh key, a CSR for the proxy's SPIFFE ID, sent to the agent
  with a one-time join token over a connection without a client certificate
  (``POST /v1/svid``, ``authorization: JoinToken <t>``); the agent signs for the
  identity the token was issued for, and only that.
* :func:`agent_renewer`: the ``renew`` callable of a
  :class:`~trust.rotation.SvidRotator` -- a new key and CSR per renewal, sent over a
  connection authenticated by the current SVID (the agent renews only the caller's own
  identity).
* :func:`catalog_bundle_update`: the catalog's bundle documents offered to a
  :class:`~trust.bundle.BundleKeeper` (rollback and foreign-root refusals), merged over
  the roots in force; returns the set to install, or None when nothing changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, cast

import trio
from cryptography.hazmat.primitives.asymmetric import ec

from trust.bundle import BundleKeeper, Refused
from trust.spiffe import SpiffeId, TrustDomain
from trust.svid import Svid, make_csr
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

if TYPE_CHECKING:  # the catalog client pulls in h2; load it only where it is used
    from federation.catalog_client import CatalogClient, ClientConfig

__all__ = ["agent_renewer", "catalog_bundle_update", "first_svid"]


async def first_svid(
    host: str,
    port: int,
    bundles: TrustBundleSet,
    expected_agent_id: SpiffeId,
    spiffe_id: SpiffeId,
    join_token: str,
    *,
    connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    config: ClientConfig | None = None,
) -> Svid:
    """The first SVID for ``spiffe_id``, signed by the agent at ``host:port`` for a join
    token. ``bundles`` must hold the agent's trust domain (its SVID is verified, and must
    be exactly ``expected_agent_id``). Raises AgentUnavailable or RequestRefused (its
    ``reason`` is the agent's: ``token_used``, ``identity_mismatch``, ...)."""
    from federation.catalog_client import CatalogClient

    key = ec.generate_private_key(ec.SECP256R1())
    # The bootstrap request uses no client certificate, so the holder is never read.
    boot = CatalogClient(
        host,
        port,
        cast(TlsContextHolder, None),
        lambda: bundles,
        expected_agent_id,
        None,
        config=config,
        connect=connect,
    )
    chain = await boot.request_svid(make_csr(key, spiffe_id), join_token)
    return Svid.from_certificates(chain, key)


def agent_renewer(client: CatalogClient, spiffe_id: SpiffeId) -> Callable[[], Awaitable[Svid]]:
    """``renew()`` for a :class:`~trust.rotation.SvidRotator`: a fresh key's CSR, signed by
    the agent over a connection authenticated by ``client``'s current SVID."""

    async def renew() -> Svid:
        key = ec.generate_private_key(ec.SECP256R1())
        chain = await client.request_svid(make_csr(key, spiffe_id))
        return Svid.from_certificates(chain, key)

    return renew


def catalog_bundle_update(
    keeper: BundleKeeper, current: TrustBundleSet, docs: Mapping[str, bytes]
) -> TrustBundleSet | None:
    """Offer the catalog's bundle documents (by trust domain name) to ``keeper``.

    Returns the roots to install -- ``current`` with every domain the keeper holds
    replaced by the keeper's bundle (domains the catalog does not carry keep the roots
    the proxy started with) -- or None when no bundle changed or the result equals
    ``current``. Refusals go to the keeper's ``on_refusal``; the last good bundle stays.
    """
    changed = False
    for td_name, raw in docs.items():
        try:
            td = TrustDomain(td_name)
        except ValueError:
            continue
        result = keeper.offer_json(td, raw)
        changed = changed or (not isinstance(result, Refused) and result.changed)
    if not changed:
        return None
    merged = dict(current.roots_by_domain)
    merged.update(keeper.bundle_set().roots_by_domain)
    new = TrustBundleSet(merged)
    return None if new == current else new
