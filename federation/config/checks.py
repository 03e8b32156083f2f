"""Whole-config rules: uniqueness, cross references, value relations and port collisions.

Pure: takes a decoded config and returns problems as dotted paths; the loader
adds file and line. Items the decoder dropped for local errors are passed in
as ``SourceMap.dropped_*`` so that references to them are not reported a
second time as unknown.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from federation.config.model import Cluster, FederationConfig, Service, Workload
from federation.config.scalars import HostPort, ServiceRef, spiffe_trust_domain


@dataclass(frozen=True, slots=True)
class Problem:
    """A rule broken by a decoded config."""

    path: str
    """Dotted path of the offending value."""
    message: str
    """What is wrong."""
    hint: str = ""
    """How to fix it."""


@dataclass(frozen=True, slots=True)
class SourceMap:
    """What the decoder knows that the decoded config does not show."""

    kept: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """Partial list path -> original index of each item kept (items with errors are dropped)."""
    dropped_clusters: frozenset[str] = frozenset()
    """Names of clusters dropped for local errors."""
    dropped_services: frozenset[ServiceRef] = frozenset()
    """Services dropped for local errors."""
    incomplete: frozenset[str] = frozenset()
    """Partial list paths that lost at least one item."""


@dataclass(frozen=True, slots=True)
class Listener:
    """One port some component listens on, for collision checks."""

    host_key: tuple[str, str, str]
    """(machine network, machine address, listening host): see ``_host_key``."""
    port: int
    """The port."""
    path: str
    """Where it is declared."""


def check(config: FederationConfig, source: SourceMap | None = None) -> list[Problem]:
    """Every broken whole-config rule, in document order."""
    return _Checker(config, source or SourceMap()).run()


class _Checker:
    def __init__(self, config: FederationConfig, source: SourceMap) -> None:
        self.config = config
        self.source = source
        self.problems: list[Problem] = []
        self.clusters: dict[str, Cluster] = {}
        self.services: dict[ServiceRef, Service] = {}

    def add(self, path: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(path, message, hint))

    def index(self, section: str, position: int) -> str:
        """Path of the ``position``-th kept item of a partial list."""
        kept = self.source.kept.get(section)
        return f"{section}[{kept[position] if kept is not None else position}]"

    def cluster_known(self, name: str) -> bool:
        return name in self.clusters or name in self.source.dropped_clusters

    def service_known(self, ref: ServiceRef) -> bool:
        return ref in self.services or ref in self.source.dropped_services

    def unknown_cluster(self, path: str, name: str) -> None:
        self.add(
            path,
            f"unknown cluster '{name}'",
            "declared clusters: " + (", ".join(self.clusters) or "none"),
        )

    def run(self) -> list[Problem]:
        self.settings()
        self.cluster_rules()
        self.service_rules()
        self.workload_rules()
        self.authorization_rules()
        self.port_collisions()
        return self.problems

    # -- federation ----------------------------------------------------------------------

    def settings(self) -> None:
        s = self.config.federation.settings
        base = "federation.settings"
        if s.svid_backdate >= s.svid_ttl:
            self.add(f"{base}.svid_backdate", "must be shorter than svid_ttl")
        if s.remote_stale_after is not None and s.remote_stale_after < s.lease_ttl:
            self.add(
                f"{base}.remote_stale_after",
                "is shorter than lease_ttl, so healthy remote data would be dropped",
                "use at least lease_ttl, or null to keep remote data while the store is down",
            )
        if s.gateway_probe.timeout > s.gateway_probe.interval:
            self.add(f"{base}.gateway_probe.timeout", "must not exceed gateway_probe.interval")
        if s.store.backend == "etcd" and not s.store.endpoints:
            self.add(
                f"{base}.store.endpoints",
                "the etcd backend needs at least one endpoint",
                "list etcd client addresses, e.g. ['10.0.0.10:2379']",
            )
        if s.store.backend == "embedded" and s.store.endpoints:
            self.add(
                f"{base}.store.endpoints",
                "endpoints are only used by the etcd backend",
                "remove them or set backend: etcd",
            )

    # -- clusters ------------------------------------------------------------------------

    def cluster_rules(self) -> None:
        for i, c in enumerate(self.config.clusters):
            path = self.index("clusters", i)
            if c.name in self.clusters:
                self.add(
                    f"{path}.name",
                    f"duplicate cluster name '{c.name}'",
                    "cluster names must be unique",
                )
                continue
            self.clusters[c.name] = c
        for i, c in enumerate(self.config.clusters):
            path = self.index("clusters", i)
            for j, other in enumerate(c.failover):
                if other == c.name:
                    self.add(f"{path}.failover[{j}]", "a cluster cannot fail over to itself")
                elif not self.cluster_known(other):
                    self.unknown_cluster(f"{path}.failover[{j}]", other)

    # -- services ------------------------------------------------------------------------

    def service_rules(self) -> None:
        for i, s in enumerate(self.config.services):
            path = self.index("services", i)
            if s.ref in self.services:
                self.add(
                    f"{path}.name",
                    f"duplicate service '{s.ref}'",
                    "a name may be used once per namespace",
                )
                continue
            self.services[s.ref] = s
        for i, s in enumerate(self.config.services):
            self.service(self.index("services", i), s)

    def service(self, path: str, s: Service) -> None:
        names: dict[str, int] = {}
        numbers: dict[int, int] = {}
        for j, p in enumerate(s.ports):
            if p.name in names:
                self.add(
                    f"{path}.ports[{j}].name",
                    f"duplicate port name '{p.name}'",
                    f"already used by ports[{names[p.name]}]",
                )
            names.setdefault(p.name, j)
            if p.port in numbers:
                self.add(
                    f"{path}.ports[{j}].port",
                    f"duplicate port {p.port}",
                    f"already used by ports[{numbers[p.port]}]",
                )
            numbers.setdefault(p.port, j)
        for j, target in enumerate(s.exported_to):
            if target == "*":
                if len(s.exported_to) > 1:
                    self.add(
                        f"{path}.exported_to[{j}]",
                        "'*' must be the only entry",
                        "'*' already exports to every cluster",
                    )
            elif not self.cluster_known(target):
                self.unknown_cluster(f"{path}.exported_to[{j}]", target)
        for j, name in enumerate(s.failover.cluster_preference):
            if not self.cluster_known(name):
                self.unknown_cluster(f"{path}.failover.cluster_preference[{j}]", name)
        tp = s.traffic_policy
        r = tp.retries
        if r.backoff_base > r.backoff_max:
            self.add(
                f"{path}.traffic_policy.retries.backoff_base",
                "is greater than backoff_max",
                "raise backoff_max or lower backoff_base",
            )
        if r.per_try_timeout is not None and r.per_try_timeout > tp.timeouts.request:
            self.add(
                f"{path}.traffic_policy.retries.per_try_timeout",
                "is longer than timeouts.request, so no retry could ever start",
            )
        subsets: set[str] = set()
        for j, sub in enumerate(s.subsets):
            if sub.name in subsets:
                self.add(f"{path}.subsets[{j}].name", f"duplicate subset '{sub.name}'")
            subsets.add(sub.name)
            if not sub.labels:
                self.add(f"{path}.subsets[{j}].labels", "a subset needs at least one label")
        self.routes(path, s, subsets)

    def routes(self, path: str, s: Service, subsets: set[str]) -> None:
        if s.routes and not any(p.protocol in ("http", "http2") for p in s.ports):
            self.add(
                f"{path}.routes",
                "routes need an http or http2 port",
                "set protocol: http or http2 on a port, or remove the routes",
            )
        names: set[str] = set()
        for j, route in enumerate(s.routes):
            rpath = f"{path}.routes[{j}]"
            if route.name in names:
                self.add(f"{rpath}.name", f"duplicate route '{route.name}'")
            names.add(route.name)
            if route.match.prefix is not None and route.match.exact is not None:
                self.add(f"{rpath}.match", "set either prefix or exact, not both")
            for k, header in enumerate(route.match.headers):
                if header.exact is not None and header.prefix is not None:
                    self.add(f"{rpath}.match.headers[{k}]", "set either exact or prefix, not both")
            for k, dest in enumerate(route.split):
                if dest.subset not in subsets:
                    self.add(
                        f"{rpath}.split[{k}].subset",
                        f"unknown subset '{dest.subset}'",
                        "declared subsets: " + (", ".join(sorted(subsets)) or "none"),
                    )
            if route.split and sum(d.weight for d in route.split) == 0:
                self.add(f"{rpath}.split", "all weights are zero")
            if route.fault is not None and route.fault.delay is None and route.fault.abort is None:
                self.add(f"{rpath}.fault", "a fault needs delay or abort")

    # -- workloads -----------------------------------------------------------------------

    def workload_rules(self) -> None:
        seen: set[tuple[str, str, str]] = set()
        for i, w in enumerate(self.config.workloads):
            path = self.index("workloads", i)
            key = (w.cluster, w.namespace, w.name)
            if key in seen:
                self.add(
                    f"{path}.name",
                    f"duplicate workload '{w.name}' in namespace "
                    f"'{w.namespace}' of cluster '{w.cluster}'",
                )
            seen.add(key)
            self.workload(path, w)

    def workload(self, path: str, w: Workload) -> None:
        cluster = self.clusters.get(w.cluster)
        if cluster is None:
            if not self.cluster_known(w.cluster):
                self.unknown_cluster(f"{path}.cluster", w.cluster)
        elif w.zone not in cluster.zones:
            self.add(
                f"{path}.zone",
                f"cluster '{w.cluster}' has no zone '{w.zone}'",
                "zones of that cluster: " + ", ".join(cluster.zones),
            )
        for j, serve in enumerate(w.serves):
            ref = ServiceRef(serve.service, w.namespace)
            service = self.services.get(ref)
            if service is None:
                if not self.service_known(ref):
                    self.add(
                        f"{path}.serves[{j}].service",
                        f"unknown service '{ref}'",
                        "a workload serves services of its own namespace; declare it under "
                        "services",
                    )
            elif service.port(serve.port) is None:
                self.add(
                    f"{path}.serves[{j}].port",
                    f"service '{ref}' has no port '{serve.port}'",
                    "its ports: " + ", ".join(p.name for p in service.ports),
                )
        used: set[tuple[ServiceRef, str | None]] = set()
        for j, up in enumerate(w.upstreams):
            upath = f"{path}.upstreams[{j}]"
            if (up.service, up.port) in used:
                self.add(upath, f"upstream '{up.service}' is listed twice")
            used.add((up.service, up.port))
            service = self.services.get(up.service)
            if service is None:
                if not self.service_known(up.service):
                    self.add(
                        f"{upath}.service",
                        f"unknown service '{up.service}'",
                        "declare it under services",
                    )
                continue
            if up.port is None and len(service.ports) > 1:
                self.add(
                    f"{upath}.port",
                    f"service '{up.service}' has several ports",
                    "name one: " + ", ".join(p.name for p in service.ports),
                )
            elif up.port is not None and service.port(up.port) is None:
                self.add(
                    f"{upath}.port",
                    f"service '{up.service}' has no port '{up.port}'",
                    "its ports: " + ", ".join(p.name for p in service.ports),
                )
            if cluster is not None:
                self.reachable(upath, w, service)

    def reachable(self, path: str, w: Workload, service: Service) -> None:
        """An upstream needs endpoints in the caller's cluster or an export to it."""
        serving = self.config.clusters_serving(service.ref)
        if any(
            x.cluster not in self.clusters
            for x in self.config.workloads
            if x.namespace == service.namespace and any(s.service == service.name for s in x.serves)
        ):
            return  # a serving workload names an unknown cluster, reported on its own
        if w.cluster in serving or (serving and service.is_exported_to(w.cluster)):
            return
        if "workloads" in self.source.incomplete:
            return  # a workload dropped for local errors may be the one serving it
        if not serving:
            self.add(
                f"{path}.service",
                f"no workload serves '{service.ref}'",
                "add a workload whose serves lists it",
            )
            return
        self.add(
            f"{path}.service",
            f"'{service.ref}' is not reachable from cluster '{w.cluster}': it runs in "
            f"{', '.join(serving)} and is not exported to '{w.cluster}'",
            f"add '{w.cluster}' to its exported_to, or run it in '{w.cluster}'",
        )

    # -- authorization -------------------------------------------------------------------

    def authorization_rules(self) -> None:
        auth = self.config.authorization
        domains = {c.trust_domain for c in self.config.clusters}
        known_domains = ", ".join(sorted(domains))
        seen_defaults: set[ServiceRef] = set()
        for i, d in enumerate(auth.service_defaults):
            path = self.index("authorization.service_defaults", i)
            ref = ServiceRef(d.service, d.namespace)
            if not self.service_known(ref):
                self.add(f"{path}.service", f"unknown service '{ref}'")
            if ref in seen_defaults:
                self.add(path, f"second default for '{ref}'", "keep one entry per service")
            seen_defaults.add(ref)
        names: set[str] = set()
        for i, p in enumerate(auth.policies):
            path = self.index("authorization.policies", i)
            if p.name in names:
                self.add(f"{path}.name", f"duplicate policy name '{p.name}'")
            names.add(p.name)
            ref = ServiceRef(p.service, p.namespace)
            if not self.service_known(ref):
                self.add(
                    f"{path}.service",
                    f"unknown service '{ref}'",
                    "policies protect declared services; check name and namespace",
                )
            src = p.source
            if not (src.spiffe_ids or src.trust_domains or src.namespaces):
                self.add(
                    f"{path}.from",
                    "matches no caller",
                    "list spiffe_ids, trust_domains or namespaces",
                )
            if self.source.dropped_clusters:
                continue  # a dropped cluster's trust domain is unknown
            for j, td in enumerate(src.trust_domains):
                if td not in domains:
                    self.add(
                        f"{path}.from.trust_domains[{j}]",
                        f"trust domain '{td}' belongs to no cluster",
                        f"federated trust domains: {known_domains}",
                    )
            for j, sid in enumerate(src.spiffe_ids):
                td = spiffe_trust_domain(sid)
                if td not in domains:
                    self.add(
                        f"{path}.from.spiffe_ids[{j}]",
                        f"trust domain '{td}' belongs to no cluster",
                        f"federated trust domains: {known_domains}",
                    )

    # -- ports ---------------------------------------------------------------------------

    def port_collisions(self) -> None:
        owners: dict[tuple[tuple[str, str, str], int], str] = {}
        for listener in self.listeners():
            if listener.port > 65535:
                self.add(
                    listener.path,
                    f"port {listener.port} is above 65535",
                    "with replicas, instance i uses port + i; pick a lower port",
                )
                continue
            key = (listener.host_key, listener.port)
            first = owners.get(key)
            if first is None:
                owners[key] = listener.path
            elif first != listener.path:
                self.add(
                    listener.path,
                    f"port {listener.port} on {listener.host_key[2]} is already used by {first}",
                    "give every listener on one host its own port",
                )

    def listeners(self) -> Iterator[Listener]:
        for i, c in enumerate(self.config.clusters):
            path = self.index("clusters", i)
            gw = c.gateway
            ports = [("admin_port", gw.admin_port)]
            if "tunnel" in gw.modes:
                ports.append(("tunnel_port", gw.tunnel_port))
            if "passthrough" in gw.modes:
                ports.append(("passthrough_port", gw.passthrough_port))
            for name, port in ports:
                yield Listener(
                    _host_key(c.network, gw.address, gw.bind), port, f"{path}.gateway.{name}"
                )
            for name, port in (
                ("catalog_port", c.agent.catalog_port),
                ("admin_port", c.agent.admin_port),
            ):
                yield Listener(
                    _host_key(c.network, c.agent.address, c.agent.address),
                    port,
                    f"{path}.agent.{name}",
                )
        for i, w in enumerate(self.config.workloads):
            path = self.index("workloads", i)
            cluster = self.clusters.get(w.cluster)
            network = cluster.network if cluster is not None else w.cluster
            addresses: list[tuple[str, HostPort]] = [
                ("inbound_port", HostPort(w.address, w.inbound_port))
            ]
            if w.admin_port is not None:
                addresses.append(("admin_port", HostPort(w.address, w.admin_port)))
            apps: set[HostPort] = set()
            for j, serve in enumerate(w.serves):
                if serve.app not in apps:  # one app may serve several service ports
                    addresses.append((f"serves[{j}].app", serve.app))
                apps.add(serve.app)
            for j, up in enumerate(w.upstreams):
                addresses.append((f"upstreams[{j}].listen", up.listen))
            # Instances share one machine only when the workload lives on loopback; elsewhere
            # each instance has a host of its own and the same ports.
            instances = w.replicas if _is_loopback(w.address) else 1
            for replica in range(instances):
                for name, addr in addresses:
                    yield Listener(
                        _host_key(network, w.address, addr.host),
                        addr.port + replica,
                        f"{path}.{name}",
                    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_key(network: str, owner: str, host: str) -> tuple[str, str, str]:
    """Which socket namespace a listener on ``host`` lives in, for a component at ``owner``.

    A component on a loopback address runs on this machine (the local demo: every
    cluster's loopback is one machine, so 127.0.0.1 on two 'networks' collides). A
    component elsewhere has its own host per network address, and its loopback
    listeners (app, outbound) are private to that host.
    """
    machine = ("loopback", "") if _is_loopback(owner) else (network, owner)
    return (*machine, "127.0.0.1" if host == "localhost" else host)
