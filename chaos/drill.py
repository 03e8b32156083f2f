"""The chaos drill model: one YAML document describing one failover drill, as frozen dataclasses.

A drill names a federation config, the traffic to run against it, a timeline of faults,
named phases (time windows) and the budgets the judge holds the result to. Like the
deployment config (``federation.config.model``), this module is the single source of truth
for the format: the strict loader (``chaos.drill_loader``) decodes YAML into these classes
with the same decoder, driven by the type hints and ``Annotated`` markers below.

Times in a drill are offsets from the drill's start (t=0 is when traffic starts), written as
config durations (``5s``, ``1500ms``) and held as float seconds.

Invariants of a loaded drill (``chaos.drill_loader`` never returns one that breaks them):
every target and locality names something in the federation config, every fault is applied
to a kind of target it supports with exactly the parameters it allows, the timeline is in
time order inside the traffic window, every restoring fault (``heal``, ``revive``, ...)
follows the disruptive fault it undoes on the same target, and phases do not overlap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Final, Literal, get_args

from federation.config.scalars import (
    BadValue,
    Duration,
    Items,
    Name,
    ParseSpec,
    Percent,
    PositiveDuration,
    Range,
    ServiceName,
    check_name,
)

FaultKind = Literal[
    "kill",
    "pause",
    "resume",
    "revive",
    "latency",
    "blackhole",
    "reset",
    "bandwidth",
    "partition",
    "heal",
    "etcd-stop",
    "etcd-start",
    "etcd-compact",
    "ca-rotate",
    "cert-expire",
    "cert-renew",
    "bundle-rollback",
    "rolling-restart",
]
TargetKind = Literal["zone", "cluster", "cloud", "gateway", "agent", "endpoint", "etcd", "link"]
TrafficProtocol = Literal["http", "tcp"]

FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)
TARGET_KINDS: Final[tuple[TargetKind, ...]] = get_args(TargetKind)

#: Which kinds of target each fault can be applied to.
FAULT_TARGETS: Final[Mapping[FaultKind, frozenset[TargetKind]]] = MappingProxyType(
    {
        "kill": frozenset({"zone", "cluster", "cloud", "gateway", "agent", "endpoint"}),
        "pause": frozenset({"zone", "cluster", "cloud", "gateway", "agent", "endpoint"}),
        "resume": frozenset({"zone", "cluster", "cloud", "gateway", "agent", "endpoint"}),
        "revive": frozenset({"zone", "cluster", "cloud", "gateway", "agent", "endpoint"}),
        # Network faults live on a link (a fault proxy or a veth pair); a gateway target means
        # every link into that gateway.
        "latency": frozenset({"link", "gateway"}),
        "blackhole": frozenset({"link", "gateway"}),
        "reset": frozenset({"link", "gateway"}),
        "bandwidth": frozenset({"link", "gateway"}),
        "partition": frozenset({"link", "cluster"}),
        "heal": frozenset({"link", "cluster", "gateway"}),
        "etcd-stop": frozenset({"etcd"}),
        "etcd-start": frozenset({"etcd"}),
        "etcd-compact": frozenset({"etcd"}),
        "ca-rotate": frozenset({"cluster"}),
        "bundle-rollback": frozenset({"cluster"}),
        "cert-expire": frozenset({"endpoint", "gateway", "agent"}),
        "cert-renew": frozenset({"endpoint", "gateway", "agent"}),
        "rolling-restart": frozenset({"zone", "cluster", "gateway", "endpoint"}),
    }
)

#: Restoring faults and the disruptive faults each one undoes (on the same target).
RESTORES: Final[Mapping[FaultKind, frozenset[FaultKind]]] = MappingProxyType(
    {
        "resume": frozenset({"pause"}),
        "revive": frozenset({"kill"}),
        "heal": frozenset({"partition", "latency", "blackhole", "reset", "bandwidth"}),
        "etcd-start": frozenset({"etcd-stop"}),
        "cert-renew": frozenset({"cert-expire"}),
    }
)
#: Faults that break or degrade something; the first one starts the failover clock.
DISRUPTIVE: Final[frozenset[FaultKind]] = frozenset(FAULT_KINDS) - frozenset(RESTORES)

ParamName = Literal[
    "delay", "jitter", "bytes_per_second", "burst", "interval", "batch", "max_wait"
]

#: Parameters each fault requires and allows; anything else is an error.
FAULT_PARAMS: Final[Mapping[FaultKind, tuple[frozenset[ParamName], frozenset[ParamName]]]] = (
    MappingProxyType(
        {
            "latency": (frozenset({"delay"}), frozenset({"delay", "jitter"})),
            "bandwidth": (
                frozenset({"bytes_per_second"}),
                frozenset({"bytes_per_second", "burst"}),
            ),
            "rolling-restart": (frozenset(), frozenset({"interval", "batch"})),
            "ca-rotate": (frozenset(), frozenset({"interval", "max_wait"})),
            "cert-expire": (frozenset(), frozenset({"max_wait"})),
            "cert-renew": (frozenset(), frozenset({"max_wait"})),
        }
    )
)


# -- targets and localities ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Target:
    """What a fault hits, or (zone/cluster/cloud kinds only) a locality in a budget.

    Written ``<kind>:<ref>``; ``str()`` gives back the canonical form.
    """

    kind: TargetKind
    """Which kind of thing is hit."""
    cluster: str = ""
    """The cluster (zone, cluster, gateway, agent, endpoint; a link's source)."""
    zone: str = ""
    """The zone (``zone`` targets)."""
    cloud: str = ""
    """The cloud (``cloud`` targets)."""
    workload: str = ""
    """The workload (``endpoint`` targets)."""
    replica: int | None = None
    """One replica of the workload (0-based), or None for all of them."""
    peer: str = ""
    """A link's destination: a cluster name, or ``etcd`` for the path to the store."""

    def __str__(self) -> str:
        match self.kind:
            case "etcd":
                return "etcd"
            case "zone":
                return f"zone:{self.cluster}/{self.zone}"
            case "cloud":
                return f"cloud:{self.cloud}"
            case "endpoint":
                tail = "" if self.replica is None else f"/{self.replica}"
                return f"endpoint:{self.cluster}/{self.workload}{tail}"
            case "link":
                return f"link:{self.cluster}->{self.peer}"
            case _:
                return f"{self.kind}:{self.cluster}"


TARGET_PATTERN: Final = (
    r"^(etcd|(zone|endpoint):[a-z0-9-]+/[a-z0-9-]+(/[0-9]+)?|(cluster|cloud|gateway|agent):"
    r"[a-z0-9-]+|link:[a-z0-9-]+->[a-z0-9-]+)$"
)
LOCALITY_PATTERN: Final = r"^(zone:[a-z0-9-]+/[a-z0-9-]+|(cluster|cloud):[a-z0-9-]+)$"
_TARGET_HINT: Final = (
    "use zone:<cluster>/<zone>, cluster:<c>, cloud:<cloud>, gateway:<c>, agent:<c>, "
    "endpoint:<c>/<workload>[/<replica>], etcd or link:<c>-><c|etcd>"
)
_REPLICA_RE: Final = re.compile(r"^(0|[1-9][0-9]{0,2})$")


def _names(text: str, parts: list[str], hint: str) -> None:
    for part in parts:
        try:
            check_name(part)
        except BadValue as exc:
            raise BadValue(f"target {text!r}: {exc.message}", hint) from None


def parse_target(text: str) -> Target:
    """Parse a fault target such as ``zone:aws-use1/us-east-1a``; raise BadValue."""
    if text == "etcd":
        return Target("etcd")
    kind, sep, ref = text.partition(":")
    if not sep or kind not in TARGET_KINDS or kind == "etcd":
        raise BadValue(f"unknown target {text!r}", _TARGET_HINT)
    if kind == "link":
        source, arrow, peer = ref.partition("->")
        if not arrow:
            raise BadValue(f"target {text!r}: a link is written <cluster>-><cluster>", _TARGET_HINT)
        _names(text, [source, peer], _TARGET_HINT)
        if source == peer:
            raise BadValue(f"target {text!r}: a link joins two different ends", _TARGET_HINT)
        return Target("link", cluster=source, peer=peer)
    parts = ref.split("/")
    if kind in ("zone", "endpoint"):
        replica: int | None = None
        if kind == "endpoint" and len(parts) == 3:
            if not _REPLICA_RE.match(parts[2]):
                raise BadValue(f"target {text!r}: bad replica {parts[2]!r}", _TARGET_HINT)
            replica = int(parts.pop())
        if len(parts) != 2:
            raise BadValue(f"target {text!r}: expected {kind}:<cluster>/<name>", _TARGET_HINT)
        _names(text, parts, _TARGET_HINT)
        if kind == "zone":
            return Target("zone", cluster=parts[0], zone=parts[1])
        return Target("endpoint", cluster=parts[0], workload=parts[1], replica=replica)
    if len(parts) != 1:
        raise BadValue(f"target {text!r}: expected {kind}:<name>", _TARGET_HINT)
    _names(text, parts, _TARGET_HINT)
    if kind == "cloud":
        return Target("cloud", cloud=ref)
    return Target(kind, cluster=ref)


def parse_locality(text: str) -> Target:
    """Parse a locality for budgets: ``zone:<cluster>/<zone>``, ``cluster:<c>`` or ``cloud:<x>``."""
    hint = "use zone:<cluster>/<zone>, cluster:<cluster> or cloud:<cloud>"
    if text.partition(":")[0] not in ("zone", "cluster", "cloud"):
        raise BadValue(f"unknown locality {text!r}", hint)
    try:
        return parse_target(text)
    except BadValue as exc:
        raise BadValue(exc.message.replace("target", "locality", 1), hint) from None


def locality_matches(locality: Target, cluster: str, zone: str, clouds: Mapping[str, str]) -> bool:
    """Whether a request served in ``cluster``/``zone`` was served from ``locality``.

    ``clouds`` maps cluster names to their cloud (from the federation config).
    """
    match locality.kind:
        case "zone":
            return cluster == locality.cluster and zone == locality.zone
        case "cluster":
            return cluster == locality.cluster
        case "cloud":
            return clouds.get(cluster) == locality.cloud
        case _:
            raise ValueError(f"{locality} is not a locality")


FaultTarget = Annotated[Target, ParseSpec(parse_target, TARGET_PATTERN, "fault target")]
Locality = Annotated[Target, ParseSpec(parse_locality, LOCALITY_PATTERN, "locality")]
ByteRate = Annotated[int, Range(1, 10**12)]


# -- the drill -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrafficSource:
    """One load generator: a workload calling a service through its sidecar."""

    workload: Name
    """The calling workload (it must list the service in its ``upstreams``)."""
    cluster: Name
    """The workload's cluster (workload names repeat across clusters)."""
    service: ServiceName
    """The called service, ``<service>.<namespace>``."""
    rate: Annotated[float, Range(0.1, 100_000)]
    """Requests (tcp: connections, each one exchange) started per second."""
    duration: PositiveDuration
    """How long this source runs, from ``start``."""
    protocol: TrafficProtocol = "http"
    """``http`` (one GET per request) or ``tcp`` (connect, one exchange, close); must match
    the service port's protocol."""
    port: Name | None = None
    """The service port by name; may be left out when the service has one port."""
    concurrency: Annotated[int, Range(1, 10_000)] = 16
    """Requests in flight at most; a request that would exceed it is started late, and the
    runner records the lateness rather than dropping it (no coordinated omission)."""
    start: Duration = 0.0
    """When this source starts."""
    timeout: PositiveDuration = 2.0
    """A request not finished within this time is recorded as a ``timeout`` failure."""


@dataclass(frozen=True, slots=True)
class FaultParams:
    """Parameters of a fault; which ones are required or allowed depends on the fault."""

    delay: PositiveDuration | None = None
    """``latency``: added delay per chunk in each direction."""
    jitter: Duration | None = None
    """``latency``: extra uniformly random delay, 0 to ``jitter``."""
    bytes_per_second: ByteRate | None = None
    """``bandwidth``: cap per direction."""
    burst: ByteRate | None = None
    """``bandwidth``: token bucket size; defaults to one second of ``bytes_per_second``."""
    interval: PositiveDuration | None = None
    """``rolling-restart``: pause between batches; ``ca-rotate``: time between steps."""
    batch: Annotated[int, Range(1, 100)] | None = None
    """``rolling-restart``: endpoints restarted at once (default 1)."""
    max_wait: PositiveDuration | None = None
    """``ca-rotate``: longest wait for the drop step to be allowed after the switch (default
    the federation's ``svid_ttl`` + 30 s); ``cert-expire``: for the frozen SVID to expire
    (default ``svid_ttl`` + 30 s); ``cert-renew``: for a fresh SVID (default 30 s)."""

    def given(self) -> frozenset[ParamName]:
        """The names of the parameters that are set."""
        return frozenset(
            name
            for name in get_args(ParamName)
            if getattr(self, name) is not None  # names are the fields, by construction
        )


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One fault, applied at one time."""

    at: Duration
    """When the fault is applied."""
    fault: FaultKind
    """What is done (docs/drills.md lists each fault's meaning)."""
    target: FaultTarget
    """What it is done to, e.g. ``zone:aws-use1/us-east-1a`` or ``link:aws-use1->gcp-euw1``."""
    params: FaultParams = FaultParams()
    """Fault parameters (latency, bandwidth, rolling-restart, ca-rotate, cert-expire/renew)."""


@dataclass(frozen=True, slots=True)
class Phase:
    """A named window of the drill, judged on its own (requests are assigned by start time)."""

    name: Name
    """Phase name, unique in the drill, e.g. ``before``, ``during``, ``after``."""
    start: Duration
    """Start of the window (inclusive)."""
    end: PositiveDuration
    """End of the window (exclusive); after ``start``."""


@dataclass(frozen=True, slots=True)
class PhaseBudget:
    """Limits for one phase; unset limits are not judged."""

    phase: Name
    """The phase these limits apply to."""
    max_failed_requests: Annotated[int, Range(0, 10**9)] | None = None
    """Failed requests allowed in the phase."""
    max_error_rate: Percent | None = None
    """Failed requests allowed, as a percentage of the phase's requests."""
    latency_p50: PositiveDuration | None = None
    """Median latency of successful requests, at most."""
    latency_p99: PositiveDuration | None = None
    """99th percentile latency of successful requests, at most."""
    serving: Annotated[tuple[Locality, ...], Items(unique=True)] = ()
    """Only these localities may serve successful requests in the phase (empty: any)."""
    must_serve: Mapping[Locality, Percent] = field(default_factory=lambda: MappingProxyType({}))
    """Each locality must serve at least this percentage of the phase's successful
    requests, e.g. ``{"zone:aws-use1/us-east-1a": 40}`` after recovery."""


@dataclass(frozen=True, slots=True)
class FailoverBudget:
    """How fast traffic must settle after the first disruptive fault."""

    within: PositiveDuration
    """Failover time limit (see docs/drills.md for the exact definition)."""
    to: Annotated[tuple[Locality, ...], Items(unique=True)] = ()
    """Localities allowed to serve after the fault; empty: any that still answers."""
    event: Annotated[int, Range(0, 10_000)] | None = None
    """Index in the timeline of the fault that starts the clock; default: the first
    disruptive fault."""


@dataclass(frozen=True, slots=True)
class RecoveryBudget:
    """How fast traffic must come back to the preferred locality after the restoring fault."""

    within: PositiveDuration
    """Recovery time limit (see docs/drills.md for the exact definition)."""
    to: Annotated[tuple[Locality, ...], Items(min_items=1, unique=True)]
    """The preferred localities that must carry the traffic again."""
    min_share: Annotated[float, Range(1, 100)] = 50.0
    """Share (percent of successful requests per window) that counts as recovered."""
    window: PositiveDuration = 1.0
    """Width of the windows the share is measured over."""
    event: Annotated[int, Range(0, 10_000)] | None = None
    """Index in the timeline of the restoring fault that starts the clock; default: the
    first restoring fault after the failover fault."""


@dataclass(frozen=True, slots=True)
class Budgets:
    """What the drill must achieve; the drill passes only if every set limit holds."""

    max_failed_requests: Annotated[int, Range(0, 10**9)] | None = None
    """Failed requests allowed over the whole drill."""
    max_error_rate: Percent | None = None
    """Failed requests allowed over the whole drill, in percent."""
    failover: FailoverBudget | None = None
    """Failover time limit (needs a disruptive fault in the timeline)."""
    recovery: RecoveryBudget | None = None
    """Recovery time limit (needs a restoring fault after the first disruptive one)."""
    phases: tuple[PhaseBudget, ...] = ()
    """Per-phase limits."""


@dataclass(frozen=True, slots=True)
class Drill:
    """One YAML document: one failover drill."""

    name: Name
    """Drill name, e.g. ``zone-outage``; names the report files."""
    description: str
    """One line saying what is broken and what must happen."""
    config: str
    """Path of the federation config, relative to the drill file."""
    traffic: Annotated[tuple[TrafficSource, ...], Items(min_items=1)]
    """The load generators."""
    phases: Annotated[tuple[Phase, ...], Items(min_items=1)]
    """Named windows, in time order, not overlapping."""
    timeline: tuple[TimelineEvent, ...] = ()
    """The faults, in time order."""
    budgets: Budgets = Budgets()
    """The limits the judge holds the drill to."""
    notes: tuple[str, ...] = ()
    """Where retries cannot hide the fault and why; shown in the report."""
    caller_failover: Literal["on", "off"] = "on"
    """``off``: the runner starts the federation with each traffic source's service pinned
    to the caller's own zone (its only route goes to a subset of that zone's workloads), so
    the caller's locality failover cannot move traffic away. Only the negative control uses
    it; a run that cannot pin (``--attach``) refuses the drill."""

    @property
    def traffic_end(self) -> float:
        """When the last traffic source stops."""
        return max(source.start + source.duration for source in self.traffic)

    def phase(self, name: str) -> Phase:
        """The phase called ``name``; KeyError if there is none."""
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise KeyError(name)


def failover_event(drill: Drill) -> int | None:
    """Index of the fault that starts the failover clock, or None if there is none."""
    chosen = drill.budgets.failover.event if drill.budgets.failover else None
    if chosen is not None:
        return chosen if chosen < len(drill.timeline) else None
    return next((i for i, e in enumerate(drill.timeline) if e.fault in DISRUPTIVE), None)


def recovery_event(drill: Drill) -> int | None:
    """Index of the restoring fault that starts the recovery clock, or None."""
    chosen = drill.budgets.recovery.event if drill.budgets.recovery else None
    if chosen is not None:
        return chosen if chosen < len(drill.timeline) else None
    start = failover_event(drill)
    if start is None:
        return None
    return next(
        (i for i, e in enumerate(drill.timeline) if i > start and e.fault in RESTORES), None
    )
