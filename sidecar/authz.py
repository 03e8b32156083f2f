"""Inbound admission: who may open a connection to which service of this workload.

Pure: the inbound adapter hands over what the TLS handshake established (the
caller's verified SPIFFE ID and the SNI it sent) and gets back :class:`Admit`
or :class:`Refuse` with a stable ``reason`` (a metric label and the ``reason``
field of the JSON log line). Checks, in order, each failing closed:

1. the SNI is present and a strict :class:`~sidecar.sni.MeshSni`
   (``no_sni``, ``bad_sni``);
2. it names this cluster and a service port this workload serves
   (``wrong_cluster``, ``unknown_service``);
3. the caller's trust domain is the trust domain of the SNI's source cluster,
   so a caller cannot claim to come from a cluster it does not belong to
   (``unknown_source_cluster``, ``source_cluster_mismatch``);
4. authorization policies (``denied``): deny rules first, then allow rules,
   then the service's default (``FederationConfig.authorization_default``).

Rate limiting and connection limits are separate cores (``ratelimit.py``) applied
after admission, so that a refused caller never spends a token.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Final, Literal

from federation.config.model import Action, Authorization, Policy, PolicySource
from sidecar.sni import BadSni, MeshSni
from trust.spiffe import SpiffeId

__all__ = [
    "ADMISSION_REASONS",
    "AdmissionReason",
    "Admit",
    "InboundPolicy",
    "Refuse",
    "ServedPort",
    "authorize",
    "caller_namespace",
]

AdmissionReason = Literal[
    "no_sni",
    "bad_sni",
    "wrong_cluster",
    "unknown_service",
    "unknown_source_cluster",
    "source_cluster_mismatch",
    "denied",
]
ADMISSION_REASONS: Final[tuple[AdmissionReason, ...]] = (
    "no_sni",
    "bad_sni",
    "wrong_cluster",
    "unknown_service",
    "unknown_source_cluster",
    "source_cluster_mismatch",
    "denied",
)


@dataclass(frozen=True, slots=True)
class ServedPort:
    """A service port this workload serves, and where its app listens."""

    namespace: str
    """Namespace of the service."""
    service: str
    """Service name."""
    port: int
    """Service port number (as in the SNI)."""
    app_host: str
    """Host of the local plain-text app."""
    app_port: int
    """Port of the local plain-text app."""


@dataclass(frozen=True, slots=True)
class Admit:
    """The connection may go on to the app."""

    served: ServedPort
    """The service port it was admitted to."""
    sni: MeshSni
    """The parsed SNI."""
    rule: str
    """Why: ``policy:<name>`` or ``default:allow``."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """The connection must be closed."""

    reason: AdmissionReason
    """Stable reason code."""
    detail: str
    """Human detail for the log line (never a metric label)."""


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    """What :func:`authorize` decided."""

    allowed: bool
    """Whether the caller may connect."""
    rule: str
    """``policy:<name>`` for a matching rule, ``default:<action>`` otherwise."""


def caller_namespace(caller: SpiffeId) -> str | None:
    """The namespace of a workload ID ``/ns/<ns>/sa/<sa>``, else None."""
    parts = caller.path.split("/")
    if len(parts) == 5 and parts[0] == "" and parts[1] == "ns" and parts[3] == "sa":
        return parts[2]
    return None


def _matches(source: PolicySource, caller: SpiffeId, federation_domains: Set[str]) -> bool:
    caller_td = caller.trust_domain.name
    if str(caller) in source.spiffe_ids:
        return True
    if caller_td in source.trust_domains:
        return True
    # "Any caller in these namespaces, in any trust domain of the federation":
    # a namespace named by a stranger's domain must not match.
    ns = caller_namespace(caller)
    return ns is not None and ns in source.namespaces and caller_td in federation_domains


def authorize(
    policies: tuple[Policy, ...],
    default: Action,
    namespace: str,
    service: str,
    caller: SpiffeId,
    federation_domains: Set[str],
) -> AuthzDecision:
    """Deny rules win, then allow rules, then ``default``; first matching rule by name order."""
    relevant = sorted(
        (p for p in policies if p.namespace == namespace and p.service == service),
        key=lambda p: p.name,
    )
    for action in ("deny", "allow"):
        for p in relevant:
            if p.action == action and _matches(p.source, caller, federation_domains):
                return AuthzDecision(allowed=action == "allow", rule=f"policy:{p.name}")
    return AuthzDecision(allowed=default == "allow", rule=f"default:{default}")


@dataclass(frozen=True)
class InboundPolicy:
    """Everything inbound admission needs; rebuilt (cheaply) when the catalog changes."""

    local_cluster: str
    """This workload's cluster: the SNI's target must be it."""
    served: tuple[ServedPort, ...]
    """The service ports this workload serves."""
    cluster_trust_domains: Mapping[str, str]
    """Cluster name -> trust domain (catalog records, config as fallback)."""
    authorization: Authorization
    """Config policies and defaults."""

    def default_for(self, namespace: str, service: str) -> Action:
        """Same rule as ``FederationConfig.authorization_default``."""
        for d in self.authorization.service_defaults:
            if d.namespace == namespace and d.service == service:
                return d.action
        return self.authorization.default_action

    def admit(self, sni: str | None, caller: SpiffeId) -> Admit | Refuse:
        """Decide one connection (see the module docstring for the order of checks)."""
        if not sni:
            return Refuse("no_sni", "the caller sent no SNI")
        try:
            parsed = MeshSni.parse(sni)
        except BadSni as exc:
            return Refuse("bad_sni", f"{exc.reason}: {exc.value!r}")
        if parsed.target_cluster != self.local_cluster:
            return Refuse(
                "wrong_cluster",
                f"SNI targets {parsed.target_cluster}, this is {self.local_cluster}",
            )
        served = next(
            (
                s
                for s in self.served
                if (s.namespace, s.service, s.port)
                == (parsed.namespace, parsed.service, parsed.port)
            ),
            None,
        )
        if served is None:
            return Refuse(
                "unknown_service",
                f"{parsed.service}.{parsed.namespace}:{parsed.port} is not served here",
            )
        source_td = self.cluster_trust_domains.get(parsed.source_cluster)
        if source_td is None:
            return Refuse(
                "unknown_source_cluster", f"no trust domain known for {parsed.source_cluster}"
            )
        if caller.trust_domain.name != source_td:
            return Refuse(
                "source_cluster_mismatch",
                f"caller {caller} is not in {source_td}, the domain of {parsed.source_cluster}",
            )
        decision = authorize(
            self.authorization.policies,
            self.default_for(parsed.namespace, parsed.service),
            parsed.namespace,
            parsed.service,
            caller,
            frozenset(self.cluster_trust_domains.values()),
        )
        if not decision.allowed:
            return Refuse("denied", f"{caller} denied by {decision.rule}")
        return Admit(served, parsed, decision.rule)
