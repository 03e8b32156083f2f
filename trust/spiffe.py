"""SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID spec says.

``spiffe://<trust-domain><path>`` where

* the scheme is ``spiffe``, lower-case;
* the trust domain is 1-255 characters of ``[a-z0-9._-]``: upper case is refused,
  not folded (folding would let ``Domain-A`` and ``domain-a`` alias), and there
  is no port and no userinfo;
* the path is empty or ``/segment(/segment)*`` with segments of
  ``[A-Za-z0-9._-]``, none empty, none ``.`` or ``..``, no trailing ``/``;
* there is no percent-encoding, query or fragment;
* the whole ID is at most 2048 bytes.

Nothing is normalised: a string is either already canonical or refused, so two
IDs are equal exactly when their strings are equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trust.errors import InvalidSpiffeId

__all__ = [
    "AGENT_SERVICE_ACCOUNT",
    "GATEWAY_SERVICE_ACCOUNT",
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_LEN",
    "SYSTEM_NAMESPACE",
    "InvalidSpiffeId",
    "SpiffeId",
    "TrustDomain",
    "agent_id",
    "gateway_id",
    "workload_id",
]

MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_LEN = 255
SCHEME_PREFIX = "spiffe://"
SYSTEM_NAMESPACE = "meshfed-system"
GATEWAY_SERVICE_ACCOUNT = "east-west-gateway"
AGENT_SERVICE_ACCOUNT = "federation-agent"

_TD_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def _check_trust_domain(value: str, whole: str) -> None:
    if value == "":
        raise InvalidSpiffeId(whole, "trust domain is empty")
    if "@" in value:
        raise InvalidSpiffeId(whole, "userinfo is not allowed in the trust domain")
    if ":" in value:
        raise InvalidSpiffeId(whole, "a port is not allowed in the trust domain")
    if len(value) > MAX_TRUST_DOMAIN_LEN:
        raise InvalidSpiffeId(whole, f"trust domain longer than {MAX_TRUST_DOMAIN_LEN} characters")
    if not _TD_RE.match(value):
        if value.lower() != value and _TD_RE.match(value.lower()):
            raise InvalidSpiffeId(whole, "trust domain must be lower-case (it is not folded)")
        raise InvalidSpiffeId(whole, "trust domain may contain only a-z, 0-9, '.', '-' and '_'")


def _check_segment(segment: str, whole: str) -> None:
    if segment == "":
        raise InvalidSpiffeId(whole, "path has an empty segment ('//')")
    if segment in (".", ".."):
        raise InvalidSpiffeId(whole, "path has a '.' or '..' segment")
    if not _SEGMENT_RE.match(segment):
        raise InvalidSpiffeId(
            whole, "path segments may contain only A-Z, a-z, 0-9, '.', '-' and '_'"
        )


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name, validated on construction."""

    name: str
    """The trust domain, e.g. ``aws-use1.acme.mesh``; lower-case ``[a-z0-9._-]``."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidSpiffeId(repr(self.name), "trust domain must be a string")
        _check_trust_domain(self.name, self.name)

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """A trust domain from its bare name or its path-less ``spiffe://<td>`` ID."""
        if value.startswith(SCHEME_PREFIX):
            sid = SpiffeId.parse(value)
            if sid.path:
                raise InvalidSpiffeId(value, "a trust domain ID has no path")
            return sid.trust_domain
        return cls(value)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<td>`` (carried by CA certificates)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A SPIFFE ID. Construct with :meth:`parse` or the helpers; both validate."""

    trust_domain: TrustDomain
    """The trust domain the ID belongs to; selects the bundle its SVID is checked against."""
    path: str
    """``""`` (the trust domain itself) or ``/seg(/seg)*``, canonical as described above."""

    def __post_init__(self) -> None:
        if self.path:
            if not self.path.startswith("/"):
                raise InvalidSpiffeId(self.path, "path must start with '/'")
            for segment in self.path[1:].split("/"):
                _check_segment(segment, str(self))
        if len(str(self).encode("utf-8")) > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeId(str(self), f"longer than {MAX_SPIFFE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``value`` strictly; raise :class:`InvalidSpiffeId` naming the broken rule."""
        if not isinstance(value, str):
            raise InvalidSpiffeId(repr(value), "must be a string")
        # Length first, so that huge inputs cost nothing more.
        if len(value.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeId(value, f"longer than {MAX_SPIFFE_ID_BYTES} bytes")
        if not value.startswith(SCHEME_PREFIX):
            if value[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
                raise InvalidSpiffeId(value, "scheme must be lower-case 'spiffe'")
            raise InvalidSpiffeId(value, "scheme must be 'spiffe://'")
        if "%" in value:
            raise InvalidSpiffeId(value, "percent-encoding is not allowed")
        if "?" in value:
            raise InvalidSpiffeId(value, "a query is not allowed")
        if "#" in value:
            raise InvalidSpiffeId(value, "a fragment is not allowed")
        rest = value[len(SCHEME_PREFIX) :]
        authority, slash, path = rest.partition("/")
        _check_trust_domain(authority, value)
        if slash:
            if path == "":
                raise InvalidSpiffeId(value, "path must not end with '/'")
            segments = path.split("/")
            if segments[-1] == "":
                raise InvalidSpiffeId(value, "path must not end with '/'")
            for segment in segments:
                _check_segment(segment, value)
        return cls(TrustDomain(authority), slash + path)

    def member_of(self, trust_domain: TrustDomain) -> bool:
        """True if this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"


def workload_id(trust_domain: TrustDomain, namespace: str, service_account: str) -> SpiffeId:
    """``spiffe://<td>/ns/<namespace>/sa/<service-account>``; both names must be path segments."""
    for what, segment in (("namespace", namespace), ("service account", service_account)):
        if not isinstance(segment, str) or "/" in segment:
            raise InvalidSpiffeId(repr(segment), f"{what} must be a single path segment")
    return SpiffeId(trust_domain, f"/ns/{namespace}/sa/{service_account}")


def gateway_id(trust_domain: TrustDomain) -> SpiffeId:
    """The east-west gateway's ID: ``spiffe://<td>/ns/meshfed-system/sa/east-west-gateway``."""
    return workload_id(trust_domain, SYSTEM_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)


def agent_id(trust_domain: TrustDomain) -> SpiffeId:
    """The federation agent's ID: ``spiffe://<td>/ns/meshfed-system/sa/federation-agent``."""
    return workload_id(trust_domain, SYSTEM_NAMESPACE, AGENT_SERVICE_ACCOUNT)
