"""The gateway's routing decision: one meshfed SNI in, a route or a refusal out (pure).

Every connection the gateway carries goes through :func:`decide`, on both of its
listeners:

* **passthrough** (``via="passthrough"``): the SNI was read from a ClientHello the
  gateway did not decrypt; its ``source_cluster`` is a *claim*.
* **tunnel** (``via="tunnel"``): the SNI is the ``:authority`` of a CONNECT stream
  from a peer gateway that authenticated with its SVID; ``authenticated_source`` is
  the peer's cluster and the SNI's source must equal it.

The decision table (docs/gateway.md has it with examples):

===========================  =====================  ==========================================
target / source              listener               outcome
===========================  =====================  ==========================================
target == local              passthrough            inbound, if the local export lists the
                                                    source (or source == local) and, for a
                                                    remote source, ``passthrough`` is a mode
target == local              tunnel                 inbound, if source == authenticated peer
                                                    and the local export lists it
target != local,             passthrough            outbound: tunnel to a gateway of the
source == local                                     target, if the target exports to us
anything else                either                 refused (``transit``/``source_mismatch``)
===========================  =====================  ==========================================

Fail closed: an unknown service, an unknown port, a service not exported to the
caller, no healthy endpoint, no reachable gateway are refusals with a stable
reason, never a default route (CVE-2021-31921). The gateway's check is the early,
cheap filter; the destination sidecar re-checks the caller's SVID against the
SNI's source cluster (docs/sni.md), so a lying SNI gains nothing.

:class:`LocalBalancers` picks the local endpoint of an inbound route with the
sidecar's locality-aware balancer, the gateway's own zone as the caller.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal, get_args

from federation.catalog import Catalog
from federation.model import EndpointRecord, ExportRecord, GatewayRecord, Locality
from sidecar.balancer import Balancer, BalancerConfig, Pick, connect_attempts
from sidecar.sni import MeshSni

__all__ = [
    "REFUSAL_REASONS",
    "Inbound",
    "LocalBalancers",
    "Outbound",
    "RefusalReason",
    "Refused",
    "Route",
    "Via",
    "decide",
]

Via = Literal["passthrough", "tunnel"]

RefusalReason = Literal[
    # Before routing: what the listener could not read (ClientHello / SNI / CONNECT).
    "hello_timeout",
    "not_tls",
    "bad_client_hello",
    "no_sni",
    "bad_sni",
    "bad_connect",
    # Routing.
    "transit",
    "source_mismatch",
    "passthrough_disabled",
    "unknown_cluster",
    "unknown_service",
    "not_exported",
    "unknown_port",
    "no_endpoint",
    "no_gateway",
    # After routing: what failed while carrying it out.
    "upstream_connect_failed",
    "peer_down",
    "tunnel_failed",
    "draining",
]
"""Why the gateway refused a connection or stream: the ``reason`` metric label and log field."""

REFUSAL_REASONS: Final[tuple[str, ...]] = get_args(RefusalReason)


@dataclass(frozen=True, slots=True)
class Inbound:
    """Deliver to a sidecar of this cluster: splice (passthrough) or relay (tunnel)."""

    sni: MeshSni
    """The destination."""
    endpoints: tuple[EndpointRecord, ...]
    """Healthy local endpoints of the service (non-empty), in catalog order."""


@dataclass(frozen=True, slots=True)
class Outbound:
    """Carry to another cluster over a gateway-to-gateway tunnel."""

    sni: MeshSni
    """The destination; sent as the CONNECT ``:authority``."""
    trust_domain: str
    """The target cluster's trust domain: its gateways must present its gateway SVID."""
    gateways: tuple[GatewayRecord, ...]
    """The target cluster's gateways with a tunnel port (non-empty), sorted by id."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Not routed; the connection is closed (or the stream refused)."""

    reason: RefusalReason
    """Stable reason (metric label)."""
    detail: str = ""
    """Free text for logs; never a label."""


Route = Inbound | Outbound | Refused


def _export_checks(export: ExportRecord | None, sni: MeshSni, source: str) -> Refused | None:
    if export is None:
        return Refused(
            "unknown_service", f"{sni.namespace}/{sni.service} not in {sni.target_cluster}"
        )
    if not export.exports_to(source):
        return Refused(
            "not_exported",
            f"{sni.namespace}/{sni.service} in {sni.target_cluster} is not exported to {source}",
        )
    if all(p.port != sni.port for p in export.ports):
        return Refused("unknown_port", f"{sni.namespace}/{sni.service} has no port {sni.port}")
    return None


def _export(catalog: Catalog, cluster: str, sni: MeshSni) -> ExportRecord | None:
    service = catalog.services.get((sni.namespace, sni.service))
    return service.exports.get(cluster) if service is not None else None


def _inbound(catalog: Catalog, local: str, sni: MeshSni, source: str) -> Route:
    refused = _export_checks(_export(catalog, local, sni), sni, source)
    if refused is not None:
        return refused
    endpoints = tuple(
        ep
        for ep in catalog.endpoints(sni.namespace, sni.service)
        if ep.cluster == local and ep.healthy
    )
    if not endpoints:
        return Refused("no_endpoint", f"no healthy endpoint of {sni.namespace}/{sni.service}")
    return Inbound(sni, endpoints)


def decide(
    catalog: Catalog,
    sni: MeshSni,
    *,
    via: Via,
    modes: tuple[str, ...],
    authenticated_source: str | None = None,
) -> Route:
    """Route one connection named by ``sni`` in the local cluster ``catalog.local_cluster``.

    ``modes`` are this gateway's modes. For ``via="tunnel"``, ``authenticated_source``
    is the peer gateway's cluster (from its verified SVID) and is required.
    """
    local = catalog.local_cluster
    if via == "tunnel":
        if authenticated_source is None:
            raise ValueError("a tunnel decision needs the authenticated peer cluster")
        if sni.source_cluster != authenticated_source:
            return Refused(
                "source_mismatch",
                f"SNI claims {sni.source_cluster}, peer gateway is {authenticated_source}",
            )
        if sni.target_cluster != local:
            # Gateways never relay for a third cluster: every hop must end here.
            return Refused("transit", f"target {sni.target_cluster} is not {local}")
        return _inbound(catalog, local, sni, authenticated_source)

    if sni.target_cluster == local:
        if sni.source_cluster != local and "passthrough" not in modes:
            return Refused("passthrough_disabled", f"{local}'s gateway does not serve passthrough")
        return _inbound(catalog, local, sni, sni.source_cluster)
    if sni.source_cluster != local:
        return Refused(
            "transit", f"{sni.source_cluster} -> {sni.target_cluster} does not involve {local}"
        )
    # Outbound: a local sidecar asks us to carry it to the target cluster.
    view = catalog.clusters.get(sni.target_cluster)
    if view is None or view.record is None:
        return Refused("unknown_cluster", f"no cluster record for {sni.target_cluster}")
    # The catalog's import rule already hides remote exports not listing us; the check
    # is repeated so the decision does not depend on how the catalog was built.
    refused = _export_checks(_export(catalog, sni.target_cluster, sni), sni, local)
    if refused is not None:
        return refused
    gateways = tuple(gw for gw in view.gateways if "tunnel" in gw.modes and gw.tunnel_port)
    if not gateways:
        return Refused("no_gateway", f"{sni.target_cluster} has no gateway with a tunnel port")
    return Outbound(sni, view.record.trust_domain, gateways)


class LocalBalancers:
    """One locality-aware balancer per local service, the gateway being the caller.

    ``update(catalog)`` on every catalog change (a full reset per service, so health
    and in-flight counts of surviving endpoints are kept); :meth:`attempts` yields
    endpoints to try for one connection, nearest healthy first, each at most once.
    Call :meth:`on_start`/:meth:`on_finish` around each relayed connection so the
    least-request choice sees the gateway's own load.
    """

    def __init__(self, caller: Locality, config: BalancerConfig | None = None) -> None:
        self._caller = caller
        self._config = config
        self._balancers: dict[tuple[str, str], Balancer[EndpointRecord]] = {}
        self._version: tuple[str, int] | None = None

    def update(self, catalog: Catalog) -> None:
        """Sync with ``catalog`` (cheap when its epoch and version are unchanged)."""
        version = (catalog.epoch, catalog.version)
        if version == self._version:
            return
        self._version = version
        wanted: dict[tuple[str, str], list[EndpointRecord]] = {}
        for ref, service in catalog.services.items():
            local = [ep for ep in service.endpoints if ep.cluster == self._caller.cluster]
            if local:
                wanted[ref] = local
        for ref in list(self._balancers):
            if ref not in wanted:
                del self._balancers[ref]
        for ref, endpoints in wanted.items():
            bal = self._balancers.get(ref)
            if bal is None:
                bal = self._balancers[ref] = Balancer(self._caller, self._config)
            bal.update(endpoints, {ep: ep.healthy for ep in endpoints})

    def attempts(
        self, route: Inbound, rng: random.Random, budget: int = 3
    ) -> Iterator[Pick[EndpointRecord]]:
        """Endpoints to try for ``route``, at most ``budget`` (nothing if the service is gone)."""
        bal = self._balancers.get((route.sni.namespace, route.sni.service))
        if bal is None:
            return iter(())
        return connect_attempts(bal, rng, budget)

    def mark_failed(self, route: Inbound, endpoint: EndpointRecord) -> None:
        """A connect to ``endpoint`` failed: treat it as unhealthy until the next catalog."""
        bal = self._balancers.get((route.sni.namespace, route.sni.service))
        if bal is not None:
            bal.set_healthy(endpoint, False)
            self._version = None  # the next update restores catalog health

    def on_start(self, route: Inbound, endpoint: EndpointRecord) -> None:
        bal = self._balancers.get((route.sni.namespace, route.sni.service))
        if bal is not None:
            bal.on_start(endpoint)

    def on_finish(self, route: Inbound, endpoint: EndpointRecord) -> None:
        bal = self._balancers.get((route.sni.namespace, route.sni.service))
        if bal is not None:
            bal.on_finish(endpoint)
