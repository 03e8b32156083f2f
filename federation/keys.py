"""The v1 store key layout (DESIGN.md "The store"), built and parsed in one place.

Every builder validates each segment with :func:`federation.names.check_key_segment`
so no caller can produce a key that escapes its prefix; :func:`parse` is the
inverse and refuses anything that is not a well-formed v1 key.

    /meshfed/v1/clusters/<cluster>
    /meshfed/v1/gateways/<cluster>/<gateway-id>
    /meshfed/v1/exports/<cluster>/<namespace>/<service>
    /meshfed/v1/endpoints/<cluster>/<namespace>/<service>/<id>
    /meshfed/v1/bundles/<trust-domain>
    /meshfed/v1/revocations/<trust-domain>/<serial>
    /meshfed/v1/policies/<name>
"""

from __future__ import annotations

from dataclasses import dataclass

from federation.names import InvalidName, check_key_segment

ROOT = "/meshfed/v1/"

#: kind -> names of its segments, in order
LAYOUT: dict[str, tuple[str, ...]] = {
    "clusters": ("cluster",),
    "gateways": ("cluster", "gateway_id"),
    "exports": ("cluster", "namespace", "service"),
    "endpoints": ("cluster", "namespace", "service", "endpoint_id"),
    "bundles": ("trust_domain",),
    "revocations": ("trust_domain", "serial"),
    "policies": ("name",),
}


@dataclass(frozen=True)
class ParsedKey:
    """A v1 key split into its kind and named segments."""

    kind: str
    """One of the keys of ``LAYOUT``."""
    parts: tuple[str, ...]
    """The segments after the kind, in ``LAYOUT`` order."""

    def __getitem__(self, name: str) -> str:
        return self.parts[LAYOUT[self.kind].index(name)]


def _build(kind: str, *segments: str) -> str:
    names = LAYOUT[kind]
    if len(segments) != len(names):
        raise TypeError(f"{kind} keys take {len(names)} segments")
    for name, seg in zip(names, segments, strict=True):
        check_key_segment(seg, name.replace("_", " "))
    return ROOT + kind + "/" + "/".join(segments)


def prefix(kind: str, *segments: str) -> str:
    """A prefix for watching/listing ``kind``, narrowed by leading segments; ends with '/'."""
    if kind not in LAYOUT:
        raise KeyError(kind)
    if len(segments) >= len(LAYOUT[kind]):
        raise TypeError("a prefix must leave at least one segment open")
    for seg in segments:
        check_key_segment(seg)
    return ROOT + kind + "/" + "".join(s + "/" for s in segments)


def cluster(name: str) -> str:
    return _build("clusters", name)


def gateway(cluster_name: str, gateway_id: str) -> str:
    return _build("gateways", cluster_name, gateway_id)


def export(cluster_name: str, namespace: str, service: str) -> str:
    return _build("exports", cluster_name, namespace, service)


def endpoint(cluster_name: str, namespace: str, service: str, endpoint_id: str) -> str:
    return _build("endpoints", cluster_name, namespace, service, endpoint_id)


def bundle(trust_domain: str) -> str:
    return _build("bundles", trust_domain)


def revocation(trust_domain: str, serial: str) -> str:
    return _build("revocations", trust_domain, serial)


def policy(name: str) -> str:
    return _build("policies", name)


def parse(key: str) -> ParsedKey:
    """Split a v1 key; raise InvalidName if it is not exactly one of the layout's shapes."""
    if not key.startswith(ROOT):
        raise InvalidName("key", key, f"does not start with {ROOT}")
    kind, _, rest = key[len(ROOT) :].partition("/")
    if kind not in LAYOUT:
        raise InvalidName("key", key, f"unknown kind {kind!r}")
    parts = tuple(rest.split("/"))
    if len(parts) != len(LAYOUT[kind]):
        raise InvalidName("key", key, f"{kind} keys have {len(LAYOUT[kind])} segments")
    for name, seg in zip(LAYOUT[kind], parts, strict=True):
        check_key_segment(seg, name.replace("_", " "))
    return ParsedKey(kind, parts)
