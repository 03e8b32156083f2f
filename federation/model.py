"""The mesh model shared by every part: localities and the records kept in the store.

Every record under ``/meshfed/v1/`` (DESIGN.md "The store") is one frozen
dataclass here, with strict JSON on both sides:

* ``to_json()`` writes compact, key-sorted, ASCII JSON with ``"schema": 1``;
* ``from_json()`` refuses anything that is not exactly a valid record and
  raises :class:`RecordError` naming the dotted field (``EndpointRecord.port``).
  Unknown fields are ignored, so a newer writer can add fields without breaking
  older readers; a record with another ``schema`` is refused, because a schema
  bump means an incompatible change.

Validation lives in ``__post_init__``, so a record built in code is exactly as
valid as one read from the store. ``written_at`` (the writer's clock, used for
sync-lag metrics) is excluded from equality: it says *when*, not *what*, so
re-writing unchanged content compares equal and does not bump catalog versions.

Bundles and revocations are owned by ``trust/``; the store holds them as JSON
documents that this module only checks for shape (see :func:`decode_store_value`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeAlias, TypeVar, get_args

from federation import keys
from federation.names import InvalidName, check_dns_label
from trust.spiffe import SpiffeId, TrustDomain

SCHEMA = 1
"""The record schema this code reads and writes."""
MAX_RECORD_BYTES = 1 << 20
"""Largest encoded record accepted (etcd's default request limit is 1.5 MiB)."""
MAX_DOC_BYTES = 1 << 20
"""Largest bundle or revocation document accepted."""
MAX_POLICY_BODY_BYTES = 256 << 10
"""Largest canonical policy body accepted."""
MAX_POLICY_HISTORY = 64
"""Most previous policy versions a record may carry; :meth:`PolicyRecord.revise` keeps fewer."""
DEFAULT_POLICY_HISTORY = 16
"""Previous versions kept by :meth:`PolicyRecord.revise` unless told otherwise."""
MAX_WEIGHT = 65535
"""Largest endpoint weight (Envoy-style; 1 is the least)."""

PortProtocol: TypeAlias = Literal["tcp", "http", "http2"]
GatewayMode: TypeAlias = Literal["tunnel", "passthrough"]
PROTOCOLS: tuple[str, ...] = get_args(PortProtocol)
GATEWAY_MODES: tuple[str, ...] = get_args(GatewayMode)
EXPORT_TO_ALL = "*"
"""``exported_to == ("*",)`` exports a service to every cluster."""

# Patterns are used with fullmatch: ``$`` would also accept a trailing newline.
_ID_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?")
_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
# An RFC 1123 label of at most 63 characters: a subset of what check_dns_label accepts
# (ASCII, no '/', no dot segment, no control characters), so a match needs no other check.
_LABEL_FAST_RE = _HOST_LABEL_RE
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Dotted-quad IPv4 without leading zeros: a subset of what ipaddress.ip_address accepts.
_IPV4_FAST_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_MEMO_MAX = 1 << 16
_labels_ok: set[str] = set()
"""Labels already validated (a bounded memo: 100k records share a few hundred names)."""
_spiffe_ok: dict[str, str] = {}
"""SPIFFE IDs already validated -> canonical text (a bounded memo: many endpoints share one)."""


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


class RecordError(ValueError):
    """A store record (or catalog entry) that is not exactly valid.

    ``field`` is the dotted path of the offending field, starting with the record
    type (``ExportRecord.ports[1].protocol``); ``reason`` says which rule it broke.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


# --- field checks -------------------------------------------------------------------------
# Each takes the value as found (possibly straight from JSON) and the dotted path to name.


def json_type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(where, f"must be a string, got {json_type_name(value)}")
    return value


def _label(value: object, where: str) -> str:
    # Fast paths for the common valid case; the full check below names what is wrong.
    if type(value) is str:
        if value in _labels_ok:
            return value
        if _LABEL_FAST_RE.fullmatch(value):
            if len(_labels_ok) >= _MEMO_MAX:
                _labels_ok.clear()
            _labels_ok.add(value)
            return value
    try:
        return check_dns_label(_str(value, where), where)
    except InvalidName as e:
        raise RecordError(where, e.reason + (f" ({e.hint})" if e.hint else "")) from None


def _ident(value: object, where: str) -> str:
    """Opaque ids (gateway, endpoint, incarnation): 1-128 of ``[A-Za-z0-9._-]``, alnum ends."""
    text = _str(value, where)
    if not _ID_RE.fullmatch(text):
        raise RecordError(where, "must be 1-128 characters of A-Z a-z 0-9 . _ - with alnum ends")
    return text


def _trust_domain(value: object, where: str) -> str:
    try:
        return TrustDomain(_str(value, where)).name
    except ValueError as e:
        raise RecordError(where, f"not a SPIFFE trust domain: {e}") from None


def _spiffe_id(value: object, where: str) -> str:
    if type(value) is str:
        known = _spiffe_ok.get(value)
        if known is not None:
            return known
    try:
        text = str(SpiffeId.parse(_str(value, where)))
    except ValueError as e:
        raise RecordError(where, f"not a SPIFFE ID: {e}") from None
    if type(value) is str:
        if len(_spiffe_ok) >= _MEMO_MAX:
            _spiffe_ok.clear()
        _spiffe_ok[value] = text
    return text


def _host(value: object, where: str) -> str:
    """An IP literal (v4 or v6, no brackets) or a lower-case DNS name."""
    text = _str(value, where)
    if _IPV4_FAST_RE.fullmatch(text):
        return text
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    labels = text.split(".")
    if len(text) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise RecordError(where, "must be an IP address or a lower-case DNS name")
    return text


def _int(value: object, where: str, lo: int, hi: int) -> int:
    # bool is an int in Python but never a valid count or port on the wire.
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordError(where, f"must be an integer, got {json_type_name(value)}")
    if not lo <= value <= hi:
        raise RecordError(where, f"must be between {lo} and {hi}, got {value}")
    return value


def _port(value: object, where: str) -> int:
    return _int(value, where, 1, 65535)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise RecordError(where, f"must be true or false, got {json_type_name(value)}")
    return value


def _time(value: object, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RecordError(where, f"must be a number of seconds, got {json_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise RecordError(where, "must be a finite, non-negative number of seconds")
    return float(value)


def _opt_time(value: object, where: str) -> float | None:
    return None if value is None else _time(value, where)


def _tuple(value: object, where: str) -> tuple[Any, ...]:
    if not isinstance(value, tuple):
        raise RecordError(where, f"must be a tuple, got {json_type_name(value)}")
    return value


def _unique(items: tuple[Any, ...], where: str) -> None:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise RecordError(where, f"lists {item!r} twice")
        seen.add(item)


class _Refused(Exception):
    """Raised by the strict decoder's hooks; strict_loads turns it into a RecordError."""


def _unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(items)
    if len(out) != len(items):
        seen: set[str] = set()
        for k, _ in items:
            if k in seen:
                raise _Refused(f"duplicate JSON key {k!r}")
            seen.add(k)
    return out


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON")


# One decoder for every call: json.loads with hooks would build a new one each time.
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_constant=_refuse_constant)


def strict_loads(data: bytes | str, where: str, limit: int) -> Any:
    """json.loads that refuses what JSON allows but meshfed must not guess about.

    Duplicate object keys (which value wins differs between parsers), NaN/Infinity,
    non-UTF-8 bytes (``json.loads`` would sniff UTF-16/32), and oversized input.
    """
    if len(data) > limit:
        raise RecordError(where, f"larger than {limit} bytes")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError(where, "not UTF-8") from None
    try:
        return _STRICT_DECODER.decode(data)
    except _Refused as e:
        raise RecordError(where, str(e)) from None
    except json.JSONDecodeError as e:
        raise RecordError(where, f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RecordError(where, "JSON nested too deeply") from None


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted, ASCII JSON; refuses NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


class _Fields:
    """Pulls fields out of a decoded JSON object; values are type-checked by the record."""

    def __init__(self, obj: object, record: str) -> None:
        self.record = record
        if not isinstance(obj, dict):
            raise RecordError(record, f"must be a JSON object, got {json_type_name(obj)}")
        self.obj: dict[str, Any] = obj
        schema = self.req("schema")
        if schema != SCHEMA or isinstance(schema, bool):
            raise RecordError(
                f"{record}.schema", f"unsupported schema {schema!r} (this code reads {SCHEMA})"
            )

    def req(self, name: str) -> Any:
        if name not in self.obj or self.obj[name] is None:
            raise RecordError(f"{self.record}.{name}", "is required")
        return self.obj[name]

    def opt(self, name: str) -> Any:
        return self.obj.get(name)

    def array(self, name: str) -> tuple[Any, ...]:
        value = self.req(name)
        if not isinstance(value, list):
            raise RecordError(
                f"{self.record}.{name}", f"must be an array, got {json_type_name(value)}"
            )
        return tuple(value)

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.req(name)
        if not isinstance(value, dict):
            raise RecordError(
                f"{self.record}.{name}", f"must be an object, got {json_type_name(value)}"
            )
        return value


_R = TypeVar("_R")


def _nested(where: str, own: str, build: Callable[..., _R], *args: Any) -> _R:
    """Run ``build(*args)``; re-root a RecordError from a nested type (``own``) at ``where``."""
    try:
        return build(*args)
    except RecordError as e:
        raise RecordError(where + e.field.removeprefix(own), e.reason) from None


def _with_meta(obj: dict[str, Any], written_at: float | None) -> dict[str, Any]:
    obj["schema"] = SCHEMA
    if written_at is not None:
        obj["written_at"] = written_at
    return obj


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterRecord:
    """``/meshfed/v1/clusters/<name>``: one cluster and its agent; leased by that agent."""

    name: str
    """Cluster name (RFC 1123 label)."""
    cloud: str
    """Cloud or site, e.g. ``aws``."""
    region: str
    """Region within the cloud."""
    zones: tuple[str, ...]
    """Zones the cluster spans; non-empty, no repeats."""
    network: str
    """Network name: endpoints on the same network are reached directly, others via gateways."""
    trust_domain: str
    """SPIFFE trust domain of the cluster's workloads."""
    agent_address: str
    """Host (IP literal or DNS name) where the agent serves the catalog stream and CSR signing."""
    agent_port: int
    """Port of ``agent_address``."""
    incarnation: str
    """Id of this agent run (new on every start); readers use it to tell a restart from a blip."""
    started_at: float
    """When this agent incarnation started (writer's clock, seconds since the epoch)."""
    written_at: float | None = field(default=None, compare=False)
    """When the record was written (writer's clock); for sync-lag metrics, not compared."""

    NAME: ClassVar[str] = "ClusterRecord"

    def __post_init__(self) -> None:
        n = self.NAME
        _label(self.name, f"{n}.name")
        _label(self.cloud, f"{n}.cloud")
        _label(self.region, f"{n}.region")
        zones = _tuple(self.zones, f"{n}.zones")
        if not zones:
            raise RecordError(f"{n}.zones", "must name at least one zone")
        for i, zone in enumerate(zones):
            _label(zone, f"{n}.zones[{i}]")
        _unique(zones, f"{n}.zones")
        _label(self.network, f"{n}.network")
        _trust_domain(self.trust_domain, f"{n}.trust_domain")
        _host(self.agent_address, f"{n}.agent_address")
        _port(self.agent_port, f"{n}.agent_port")
        _ident(self.incarnation, f"{n}.incarnation")
        _time(self.started_at, f"{n}.started_at")
        _opt_time(self.written_at, f"{n}.written_at")

    def key(self) -> str:
        """The store key this record lives under."""
        return f"{keys.ROOT}clusters/{self.name}"

    def to_obj(self) -> dict[str, Any]:
        return _with_meta(
            {
                "name": self.name,
                "cloud": self.cloud,
                "region": self.region,
                "zones": list(self.zones),
                "network": self.network,
                "trust_domain": self.trust_domain,
                "agent_address": self.agent_address,
                "agent_port": self.agent_port,
                "incarnation": self.incarnation,
                "started_at": self.started_at,
            },
            self.written_at,
        )

    def to_json(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_obj(cls, obj: object) -> ClusterRecord:
        f = _Fields(obj, cls.NAME)
        return cls(
            name=f.req("name"),
            cloud=f.req("cloud"),
            region=f.req("region"),
            zones=f.array("zones"),
            network=f.req("network"),
            trust_domain=f.req("trust_domain"),
            agent_address=f.req("agent_address"),
            agent_port=f.req("agent_port"),
            incarnation=f.req("incarnation"),
            started_at=f.req("started_at"),
            written_at=f.opt("written_at"),
        )

    @classmethod
    def from_json(cls, data: bytes) -> ClusterRecord:
        return cls.from_obj(strict_loads(data, cls.NAME, MAX_RECORD_BYTES))


def _service_ref(value: object, where: str) -> tuple[str, str]:
    """``"<namespace>/<service>"``, the key of per-service maps in gateway records."""
    namespace, slash, service = _str(value, where).partition("/")
    if not slash:
        raise RecordError(where, f"{value!r} must be '<namespace>/<service>'")
    return _label(namespace, f"{where} namespace"), _label(service, f"{where} service")


@dataclass(frozen=True)
class GatewayRecord:
    """``/meshfed/v1/gateways/<cluster>/<gateway_id>``: an east-west gateway; leased.

    ``healthy_endpoints`` and ``peer_alive`` are read-only mappings, sorted by key.
    """

    cluster: str
    """Cluster the gateway belongs to."""
    gateway_id: str
    """Id of the gateway within its cluster."""
    address: str
    """Host (IP literal or DNS name) other clusters' gateways connect to."""
    tunnel_port: int | None
    """Port of the HTTP/2 CONNECT tunnel listener; set exactly when ``"tunnel"`` is a mode."""
    passthrough_port: int | None
    """Port of the SNI passthrough listener; set exactly when ``"passthrough"`` is a mode."""
    modes: tuple[GatewayMode, ...]
    """Modes the gateway serves; non-empty, no repeats."""
    healthy_endpoints: Mapping[str, int]
    """Healthy endpoint count per exported service, keyed ``"<namespace>/<service>"``."""
    peer_alive: Mapping[str, bool]
    """Liveness of other clusters' gateways as this gateway's probes see them."""
    written_at: float | None = field(default=None, compare=False)
    """When the record was written (writer's clock); for sync-lag metrics, not compared."""

    NAME: ClassVar[str] = "GatewayRecord"

    def __post_init__(self) -> None:
        n = self.NAME
        _label(self.cluster, f"{n}.cluster")
        _ident(self.gateway_id, f"{n}.gateway_id")
        _host(self.address, f"{n}.address")
        modes = _tuple(self.modes, f"{n}.modes")
        if not modes:
            raise RecordError(f"{n}.modes", "must name at least one mode")
        for i, mode in enumerate(modes):
            if mode not in GATEWAY_MODES:
                raise RecordError(f"{n}.modes[{i}]", f"must be one of {', '.join(GATEWAY_MODES)}")
        _unique(modes, f"{n}.modes")
        for mode, port_field in (("tunnel", "tunnel_port"), ("passthrough", "passthrough_port")):
            port = getattr(self, port_field)
            if mode in modes:
                _port(port, f"{n}.{port_field}")
            elif port is not None:
                raise RecordError(f"{n}.{port_field}", f"must be null unless {mode!r} is a mode")
        counts = self.healthy_endpoints
        if not isinstance(counts, Mapping):
            raise RecordError(f"{n}.healthy_endpoints", "must be a mapping")
        for ref, count in counts.items():
            _service_ref(ref, f"{n}.healthy_endpoints")
            _int(count, f"{n}.healthy_endpoints[{ref!r}]", 0, 1 << 31)
        peers = self.peer_alive
        if not isinstance(peers, Mapping):
            raise RecordError(f"{n}.peer_alive", "must be a mapping")
        for peer, alive in peers.items():
            _label(peer, f"{n}.peer_alive")
            _bool(alive, f"{n}.peer_alive[{peer!r}]")
        _opt_time(self.written_at, f"{n}.written_at")
        # Sorted read-only copies: equal content compares and serialises identically, and
        # the caller's dict cannot change a record after the fact.
        sorted_counts = MappingProxyType(dict(sorted(counts.items())))
        object.__setattr__(self, "healthy_endpoints", sorted_counts)
        object.__setattr__(self, "peer_alive", MappingProxyType(dict(sorted(peers.items()))))

    def __hash__(self) -> int:
        return hash(
            (
                self.cluster,
                self.gateway_id,
                self.address,
                self.tunnel_port,
                self.passthrough_port,
                self.modes,
                tuple(self.healthy_endpoints.items()),
                tuple(self.peer_alive.items()),
            )
        )

    def healthy_count(self, namespace: str, service: str) -> int:
        """Healthy endpoints of ``namespace/service`` behind this gateway (0 if not listed)."""
        return self.healthy_endpoints.get(f"{namespace}/{service}", 0)

    def key(self) -> str:
        """The store key this record lives under."""
        return f"{keys.ROOT}gateways/{self.cluster}/{self.gateway_id}"

    def to_obj(self) -> dict[str, Any]:
        return _with_meta(
            {
                "cluster": self.cluster,
                "gateway_id": self.gateway_id,
                "address": self.address,
                "tunnel_port": self.tunnel_port,
                "passthrough_port": self.passthrough_port,
                "modes": list(self.modes),
                "healthy_endpoints": dict(self.healthy_endpoints),
                "peer_alive": dict(self.peer_alive),
            },
            self.written_at,
        )

    def to_json(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_obj(cls, obj: object) -> GatewayRecord:
        f = _Fields(obj, cls.NAME)
        return cls(
            cluster=f.req("cluster"),
            gateway_id=f.req("gateway_id"),
            address=f.req("address"),
            tunnel_port=f.opt("tunnel_port"),
            passthrough_port=f.opt("passthrough_port"),
            modes=f.array("modes"),
            healthy_endpoints=f.mapping("healthy_endpoints"),
            peer_alive=f.mapping("peer_alive"),
            written_at=f.opt("written_at"),
        )

    @classmethod
    def from_json(cls, data: bytes) -> GatewayRecord:
        return cls.from_obj(strict_loads(data, cls.NAME, MAX_RECORD_BYTES))


@dataclass(frozen=True)
class ServicePort:
    """One port of an exported service."""

    name: str
    """Port name (RFC 1123 label), used in SNI names."""
    port: int
    """Service port number."""
    protocol: PortProtocol
    """``tcp`` (opaque), ``http`` (HTTP/1.1) or ``http2``; HTTP gets per-request routing."""

    NAME: ClassVar[str] = "ServicePort"

    def __post_init__(self) -> None:
        _label(self.name, f"{self.NAME}.name")
        _port(self.port, f"{self.NAME}.port")
        if self.protocol not in PROTOCOLS:
            raise RecordError(f"{self.NAME}.protocol", f"must be one of {', '.join(PROTOCOLS)}")

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "protocol": self.protocol}

    @classmethod
    def from_obj(cls, obj: object) -> ServicePort:
        if not isinstance(obj, dict):
            raise RecordError(cls.NAME, f"must be a JSON object, got {json_type_name(obj)}")
        for name in ("name", "port", "protocol"):
            if obj.get(name) is None:
                raise RecordError(f"{cls.NAME}.{name}", "is required")
        return cls(name=obj["name"], port=obj["port"], protocol=obj["protocol"])


@dataclass(frozen=True)
class ExportRecord:
    """``/meshfed/v1/exports/<cluster>/<namespace>/<service>``: a service and who may import it.

    A cluster may also write an export with ``exported_to=()`` to publish the
    ports of a service to its own sidecars only.
    """

    cluster: str
    """Cluster that runs and exports the service."""
    namespace: str
    """Namespace of the service."""
    service: str
    """Service name."""
    ports: tuple[ServicePort, ...]
    """Ports of the service; non-empty, unique names and numbers."""
    exported_to: tuple[str, ...]
    """Clusters allowed to import the service, or ``("*",)`` for all; ``()`` for none."""
    written_at: float | None = field(default=None, compare=False)
    """When the record was written (writer's clock); for sync-lag metrics, not compared."""

    NAME: ClassVar[str] = "ExportRecord"

    def __post_init__(self) -> None:
        n = self.NAME
        _label(self.cluster, f"{n}.cluster")
        _label(self.namespace, f"{n}.namespace")
        _label(self.service, f"{n}.service")
        ports = _tuple(self.ports, f"{n}.ports")
        if not ports:
            raise RecordError(f"{n}.ports", "must list at least one port")
        for i, port in enumerate(ports):
            if not isinstance(port, ServicePort):
                raise RecordError(f"{n}.ports[{i}]", "must be a ServicePort")
        _unique(tuple(p.name for p in ports), f"{n}.ports names")
        _unique(tuple(p.port for p in ports), f"{n}.ports numbers")
        to = _tuple(self.exported_to, f"{n}.exported_to")
        if EXPORT_TO_ALL in to:
            if len(to) != 1:
                raise RecordError(f"{n}.exported_to", "'*' must be the only entry")
        else:
            for i, name in enumerate(to):
                _label(name, f"{n}.exported_to[{i}]")
            _unique(to, f"{n}.exported_to")
        _opt_time(self.written_at, f"{n}.written_at")

    def exports_to(self, cluster: str) -> bool:
        """True if ``cluster`` may import this service (the exporting cluster always may)."""
        return (
            cluster == self.cluster
            or EXPORT_TO_ALL in self.exported_to
            or (cluster in self.exported_to)
        )

    def key(self) -> str:
        """The store key this record lives under."""
        return f"{keys.ROOT}exports/{self.cluster}/{self.namespace}/{self.service}"

    def to_obj(self) -> dict[str, Any]:
        return _with_meta(
            {
                "cluster": self.cluster,
                "namespace": self.namespace,
                "service": self.service,
                "ports": [p.to_obj() for p in self.ports],
                "exported_to": list(self.exported_to),
            },
            self.written_at,
        )

    def to_json(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_obj(cls, obj: object) -> ExportRecord:
        f = _Fields(obj, cls.NAME)
        ports = tuple(
            _nested(f"{cls.NAME}.ports[{i}]", ServicePort.NAME, ServicePort.from_obj, p)
            for i, p in enumerate(f.array("ports"))
        )
        return cls(
            cluster=f.req("cluster"),
            namespace=f.req("namespace"),
            service=f.req("service"),
            ports=ports,
            exported_to=f.array("exported_to"),
            written_at=f.opt("written_at"),
        )

    @classmethod
    def from_json(cls, data: bytes) -> ExportRecord:
        return cls.from_obj(strict_loads(data, cls.NAME, MAX_RECORD_BYTES))


_LOCALITY_PATHS = tuple(
    (part, f"EndpointRecord.locality.{part}") for part in ("cloud", "region", "zone", "cluster")
)


@dataclass(frozen=True)
class EndpointRecord:
    """``/meshfed/v1/endpoints/<cluster>/<namespace>/<service>/<endpoint_id>``; leased."""

    cluster: str
    """Cluster the endpoint runs in; equals ``locality.cluster``."""
    namespace: str
    """Namespace of the service."""
    service: str
    """Service the endpoint serves."""
    endpoint_id: str
    """Id of the endpoint within its service."""
    address: str
    """Host (IP literal or DNS name) of the endpoint's sidecar."""
    port: int
    """The sidecar's inbound mTLS port."""
    locality: Locality
    """Where the endpoint runs (cloud/region/zone/cluster)."""
    weight: int
    """Load-balancing weight, 1..MAX_WEIGHT."""
    healthy: bool
    """Health as the owning cluster sees it (lease alive and checks passing)."""
    spiffe_id: str
    """SPIFFE ID the caller must require of this endpoint's certificate."""
    network: str
    """Network of the endpoint: same network as the caller means direct, else via gateways."""
    written_at: float | None = field(default=None, compare=False)
    """When the record was written (writer's clock); for sync-lag metrics, not compared."""

    NAME: ClassVar[str] = "EndpointRecord"

    def __post_init__(self) -> None:
        # Field paths are literals: this runs once per endpoint, 100k times on a full sync.
        _label(self.cluster, "EndpointRecord.cluster")
        _label(self.namespace, "EndpointRecord.namespace")
        _label(self.service, "EndpointRecord.service")
        _ident(self.endpoint_id, "EndpointRecord.endpoint_id")
        _host(self.address, "EndpointRecord.address")
        _port(self.port, "EndpointRecord.port")
        loc = self.locality
        if not isinstance(loc, Locality):
            raise RecordError("EndpointRecord.locality", "must be a Locality")
        _label(loc.cloud, "EndpointRecord.locality.cloud")
        _label(loc.region, "EndpointRecord.locality.region")
        _label(loc.zone, "EndpointRecord.locality.zone")
        _label(loc.cluster, "EndpointRecord.locality.cluster")
        if loc.cluster != self.cluster:
            raise RecordError(
                "EndpointRecord.locality.cluster", f"must equal cluster {self.cluster!r}"
            )
        _int(self.weight, "EndpointRecord.weight", 1, MAX_WEIGHT)
        _bool(self.healthy, "EndpointRecord.healthy")
        _spiffe_id(self.spiffe_id, "EndpointRecord.spiffe_id")
        _label(self.network, "EndpointRecord.network")
        if self.written_at is not None:
            _time(self.written_at, "EndpointRecord.written_at")

    def key(self) -> str:
        """The store key this record lives under."""
        # Every field is a validated label or id, a safe key segment: no re-check needed.
        service = f"{self.cluster}/{self.namespace}/{self.service}"
        return f"{keys.ROOT}endpoints/{service}/{self.endpoint_id}"

    def to_obj(self) -> dict[str, Any]:
        loc = self.locality
        return _with_meta(
            {
                "cluster": self.cluster,
                "namespace": self.namespace,
                "service": self.service,
                "endpoint_id": self.endpoint_id,
                "address": self.address,
                "port": self.port,
                "locality": {
                    "cloud": loc.cloud,
                    "region": loc.region,
                    "zone": loc.zone,
                    "cluster": loc.cluster,
                },
                "weight": self.weight,
                "healthy": self.healthy,
                "spiffe_id": self.spiffe_id,
                "network": self.network,
            },
            self.written_at,
        )

    def to_json(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_obj(cls, obj: object) -> EndpointRecord:
        f = _Fields(obj, cls.NAME)
        loc = f.mapping("locality")
        parts = []
        for part, where in _LOCALITY_PATHS:
            value = loc.get(part)
            if value is None:
                raise RecordError(where, "is required")
            parts.append(value)
        # The parts are checked (as labels, with these paths) by __post_init__.
        return cls(
            cluster=f.req("cluster"),
            namespace=f.req("namespace"),
            service=f.req("service"),
            endpoint_id=f.req("endpoint_id"),
            address=f.req("address"),
            port=f.req("port"),
            locality=Locality(*parts),
            weight=f.req("weight"),
            healthy=f.req("healthy"),
            spiffe_id=f.req("spiffe_id"),
            network=f.req("network"),
            written_at=f.opt("written_at"),
        )

    @classmethod
    def from_json(cls, data: bytes) -> EndpointRecord:
        return cls.from_obj(strict_loads(data, cls.NAME, MAX_RECORD_BYTES))


def canonical_body(body: object, where: str = "PolicyRecord.body") -> str:
    """Canonical JSON text (sorted keys, compact, ASCII) of a policy body, which must be an object.

    Accepts the body as a mapping or as JSON text; raises RecordError if it is not a
    JSON object, contains NaN/Infinity, or exceeds MAX_POLICY_BODY_BYTES.
    """
    if isinstance(body, str):
        body = strict_loads(body, where, MAX_POLICY_BODY_BYTES)
    if not isinstance(body, Mapping):
        raise RecordError(where, f"must be a JSON object, got {json_type_name(body)}")
    try:
        text = canonical_json(dict(body)).decode("ascii")
    except (TypeError, ValueError) as e:
        raise RecordError(where, f"not JSON-able: {e}") from None
    if len(text) > MAX_POLICY_BODY_BYTES:
        raise RecordError(where, f"larger than {MAX_POLICY_BODY_BYTES} bytes")
    return text


@dataclass(frozen=True)
class PolicyVersion:
    """A previous version of a policy, kept for rollback."""

    version: int
    """The version number it had when current."""
    body_json: str
    """Its body, canonical JSON text."""
    written_at: float | None = field(default=None, compare=False)
    """When it was written (writer's clock)."""

    NAME: ClassVar[str] = "PolicyVersion"

    def __post_init__(self) -> None:
        _int(self.version, f"{self.NAME}.version", 1, 1 << 62)
        body = canonical_body(_str(self.body_json, f"{self.NAME}.body"), f"{self.NAME}.body")
        object.__setattr__(self, "body_json", body)
        _opt_time(self.written_at, f"{self.NAME}.written_at")

    @classmethod
    def from_obj(cls, item: dict[str, Any]) -> PolicyVersion:
        for name in ("version", "body"):
            if item.get(name) is None:
                raise RecordError(f"{cls.NAME}.{name}", "is required")
        body = canonical_body(item["body"], f"{cls.NAME}.body")
        return cls(version=item["version"], body_json=body, written_at=item.get("written_at"))

    @property
    def body(self) -> dict[str, Any]:
        """A fresh, mutable copy of the body."""
        result: dict[str, Any] = json.loads(self.body_json)
        return result


class UnknownPolicyVersion(LookupError):
    """A rollback named a version the policy's history does not hold."""


@dataclass(frozen=True)
class PolicyRecord:
    """``/meshfed/v1/policies/<name>``: the current version of a policy plus its history.

    Versions only grow: a rollback writes a *new* version whose body is an old
    one's, so readers never see a version number go backwards and the rollback
    itself is in the history. Writers replace the key by compare-and-swap on its
    ``mod_revision`` so two concurrent edits cannot both win.
    """

    name: str
    """Policy name (RFC 1123 label)."""
    version: int
    """Current version, >= 1; greater than every version in ``history``."""
    body_json: str
    """Current body as canonical JSON text of an object (see :func:`canonical_body`)."""
    history: tuple[PolicyVersion, ...] = ()
    """Previous versions, newest first, versions strictly decreasing; at most MAX_POLICY_HISTORY."""
    written_at: float | None = field(default=None, compare=False)
    """When the record was written (writer's clock); for sync-lag metrics, not compared."""

    NAME: ClassVar[str] = "PolicyRecord"

    def __post_init__(self) -> None:
        n = self.NAME
        _label(self.name, f"{n}.name")
        _int(self.version, f"{n}.version", 1, 1 << 62)
        object.__setattr__(self, "body_json", canonical_body(_str(self.body_json, f"{n}.body")))
        history = _tuple(self.history, f"{n}.history")
        if len(history) > MAX_POLICY_HISTORY:
            raise RecordError(f"{n}.history", f"longer than {MAX_POLICY_HISTORY} versions")
        above = self.version
        for i, old in enumerate(history):
            if not isinstance(old, PolicyVersion):
                raise RecordError(f"{n}.history[{i}]", "must be a PolicyVersion")
            if old.version >= above:
                raise RecordError(
                    f"{n}.history[{i}].version",
                    f"must be below {above} (history is newest first, below the current version)",
                )
            above = old.version
        _opt_time(self.written_at, f"{n}.written_at")

    @classmethod
    def create(cls, name: str, body: Mapping[str, Any], *, now: float) -> PolicyRecord:
        """Version 1 of a new policy."""
        return cls(name=name, version=1, body_json=canonical_body(body), written_at=now)

    @property
    def body(self) -> dict[str, Any]:
        """A fresh, mutable copy of the current body."""
        result: dict[str, Any] = json.loads(self.body_json)
        return result

    def revise(
        self, body: Mapping[str, Any], *, now: float, keep: int = DEFAULT_POLICY_HISTORY
    ) -> PolicyRecord:
        """The next version with ``body``; the current one moves into history (``keep`` newest)."""
        if not 0 <= keep <= MAX_POLICY_HISTORY:
            raise ValueError(f"keep must be between 0 and {MAX_POLICY_HISTORY}")
        previous = PolicyVersion(self.version, self.body_json, self.written_at)
        return PolicyRecord(
            name=self.name,
            version=self.version + 1,
            body_json=canonical_body(body),
            history=((previous, *self.history))[:keep],
            written_at=now,
        )

    def rollback(
        self, to_version: int, *, now: float, keep: int = DEFAULT_POLICY_HISTORY
    ) -> PolicyRecord:
        """A new version whose body is that of ``to_version`` (which must be in the history)."""
        for old in self.history:
            if old.version == to_version:
                return self.revise(old.body, now=now, keep=keep)
        held = ", ".join(str(old.version) for old in self.history) or "none"
        raise UnknownPolicyVersion(
            f"policy {self.name!r} has no version {to_version} in its history (held: {held})"
        )

    def key(self) -> str:
        """The store key this record lives under."""
        return f"{keys.ROOT}policies/{self.name}"

    def to_obj(self) -> dict[str, Any]:
        history = []
        for old in self.history:
            item: dict[str, Any] = {"version": old.version, "body": old.body}
            if old.written_at is not None:
                item["written_at"] = old.written_at
            history.append(item)
        return _with_meta(
            {"name": self.name, "version": self.version, "body": self.body, "history": history},
            self.written_at,
        )

    def to_json(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_obj(cls, obj: object) -> PolicyRecord:
        f = _Fields(obj, cls.NAME)
        history = []
        raw_history = f.array("history") if f.opt("history") is not None else ()
        for i, item in enumerate(raw_history):
            where = f"{cls.NAME}.history[{i}]"
            if not isinstance(item, dict):
                raise RecordError(where, f"must be a JSON object, got {json_type_name(item)}")
            history.append(_nested(where, PolicyVersion.NAME, PolicyVersion.from_obj, item))
        return cls(
            name=f.req("name"),
            version=f.req("version"),
            body_json=canonical_body(f.req("body"), f"{cls.NAME}.body"),
            history=tuple(history),
            written_at=f.opt("written_at"),
        )

    @classmethod
    def from_json(cls, data: bytes) -> PolicyRecord:
        return cls.from_obj(strict_loads(data, cls.NAME, MAX_RECORD_BYTES))


Record: TypeAlias = ClusterRecord | GatewayRecord | ExportRecord | EndpointRecord | PolicyRecord
"""A record with a schema owned by this module."""

Entry: TypeAlias = Record | bytes
"""What one store key holds once decoded: a record, or a raw trust document (bundle/revocation)."""

RECORD_TYPES: dict[str, type[Record]] = {
    "clusters": ClusterRecord,
    "gateways": GatewayRecord,
    "exports": ExportRecord,
    "endpoints": EndpointRecord,
    "policies": PolicyRecord,
}
"""Key kind -> record type. ``bundles`` and ``revocations`` are raw documents."""

RAW_KINDS = ("bundles", "revocations")
"""Key kinds whose values are trust/ documents kept as raw bytes."""

CLUSTER_KINDS = ("clusters", "gateways", "exports", "endpoints")
"""Key kinds owned by one cluster (first key segment); the rest are mesh-wide."""


def check_document(data: bytes, where: str) -> bytes:
    """Return ``data`` if it is a UTF-8 JSON object within MAX_DOC_BYTES, else raise RecordError.

    Bundles and revocations are validated in depth by trust/; this only makes sure
    they can be carried as JSON text and handed over intact.
    """
    if not isinstance(data, bytes):
        raise RecordError(where, f"must be bytes, got {json_type_name(data)}")
    if not isinstance(strict_loads(data, where, MAX_DOC_BYTES), dict):
        raise RecordError(where, "must be a JSON object")
    return data


def decode_store_value(key: str | keys.ParsedKey, value: bytes) -> Entry:
    """Decode what the store holds under ``key`` and check it belongs there.

    Raises InvalidName for a key that is not a v1 key, RecordError for a value that
    is not a valid record of the key's kind or that describes another key (a
    record's identity fields must match its key, so no writer can place data
    under a key it does not name).
    """
    parsed = keys.parse(key) if isinstance(key, str) else key
    text_key = keys.ROOT + parsed.kind + "/" + "/".join(parsed.parts)
    if parsed.kind in RAW_KINDS:
        _trust_domain(parsed.parts[0], f"{parsed.kind} key trust domain")
        return check_document(value, f"{parsed.kind} document")
    record_type = RECORD_TYPES[parsed.kind]
    record = record_type.from_json(value)
    _check_key(record, text_key)
    return record


def _check_key(record: Record, key: str) -> None:
    own = record.key()
    if own != key:
        raise RecordError(record.NAME, f"describes {own} but is stored under {key}")


def entry_to_obj(entry: Entry) -> Any:
    """JSON-able form of an entry: a record's object, or a raw document's text."""
    if isinstance(entry, bytes):
        return entry.decode("utf-8")
    return entry.to_obj()


def entry_from_obj(key: str, obj: object) -> Entry:
    """Inverse of :func:`entry_to_obj` for the entry under ``key``; validates like the store."""
    try:
        parsed = keys.parse(key)
    except InvalidName as e:
        raise RecordError("entry key", str(e)) from None
    if parsed.kind in RAW_KINDS:
        _trust_domain(parsed.parts[0], f"{parsed.kind} key trust domain")
        if not isinstance(obj, str):
            raise RecordError(f"{parsed.kind} document", "must be a string holding the document")
        return check_document(obj.encode("utf-8"), f"{parsed.kind} document")
    record = RECORD_TYPES[parsed.kind].from_obj(obj)
    _check_key(record, key)
    return record


# Field checks shared with the catalog and the stream codec, so errors read the same everywhere.
check_label_field = _label
check_ident_field = _ident
check_int_field = _int
check_time_field = _time
