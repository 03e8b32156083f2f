"""Strict loading of drill files: YAML -> :class:`~chaos.drill.Drill`, or every problem at once.

The same machinery as the deployment config (``federation.config``): the document is
composed into nodes, decoded by the type-hint driven ``Decoder`` (unknown keys, wrong types,
bad durations, unknown faults and malformed targets), then whole-drill rules are checked
here against the drill itself and the federation config it names (targets and localities
that exist, fault/target/parameter combinations, time order, phases). Problems are
:class:`~federation.config.ConfigIssue` values with file, line and dotted path; the
referenced config's own problems are passed through with their own file and line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from chaos.drill import (
    DISRUPTIVE,
    FAULT_PARAMS,
    FAULT_TARGETS,
    RESTORES,
    Drill,
    Target,
    failover_event,
    recovery_event,
)
from federation.config.decode import Decoder
from federation.config.durations import format_duration
from federation.config.errors import ConfigError, ConfigIssue
from federation.config.loader import compose_document, load_config, read_document
from federation.config.model import FederationConfig


@dataclass(frozen=True, slots=True)
class LoadedDrill:
    """A valid drill with the federation config it runs against."""

    drill: Drill
    """The drill."""
    config: FederationConfig
    """The federation config named by ``drill.config``."""
    path: str
    """The drill file as given."""
    config_path: str
    """The config file, resolved relative to the drill file."""

    @property
    def clouds(self) -> Mapping[str, str]:
        """Cluster name -> cloud, for matching ``cloud:`` localities."""
        return {c.name: c.cloud for c in self.config.clusters}


def load_drill(path: str | os.PathLike[str]) -> LoadedDrill:
    """Read a drill file and the config it names; raise ConfigError listing every problem."""
    text, name = read_document(path, what="meshfed drill")
    return parse_drill(text, name, base_dir=Path(path).parent)


def parse_drill(
    text: str,
    filename: str = "<string>",
    *,
    base_dir: str | os.PathLike[str] = ".",
    config: FederationConfig | None = None,
) -> LoadedDrill:
    """Parse drill ``text``. The config is loaded from ``base_dir / drill.config`` unless
    ``config`` is given (tests). Raise ConfigError with every problem found."""
    root = compose_document(text, filename, noun="drill", holds="one drill", docs="docs/drills.md")
    decoder = Decoder(filename)
    drill = decoder.decode(root, Drill, "")
    issues = list(decoder.issues)
    if not isinstance(drill, Drill):
        raise ConfigError(issues)
    config_path = os.path.normpath(os.path.join(os.fspath(base_dir), drill.config))
    if config is None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            count = len(exc.issues)
            issues.append(
                ConfigIssue(
                    filename,
                    decoder.lines.get("config", 0),
                    "config",
                    f"the federation config {config_path} is invalid ({count} problem"
                    f"{'s' if count != 1 else ''}, listed with their own file)",
                    f"run: meshfed config validate {config_path}",
                )
            )
            issues.extend(exc.issues)
            raise ConfigError(issues) from None
    for path, message, hint in check_drill(drill, config):
        issues.append(ConfigIssue(filename, _line_of(decoder.lines, path), path, message, hint))
    if issues:
        raise ConfigError(issues)
    return LoadedDrill(drill, config, filename, config_path)


Found = tuple[str, str, str]
"""A problem found by a whole-drill rule: (dotted path, message, hint)."""


def check_drill(drill: Drill, config: FederationConfig) -> Iterator[Found]:
    """Whole-drill rules; yields every problem (the drill is already well-typed)."""
    yield from _check_traffic(drill, config)
    yield from _check_timeline(drill, config)
    yield from _check_phases(drill)
    yield from _check_budgets(drill, config)


def _check_traffic(drill: Drill, config: FederationConfig) -> Iterator[Found]:
    services = {(s.name, s.namespace): s for s in config.services}
    for i, source in enumerate(drill.traffic):
        path = f"traffic[{i}]"
        workload = next(
            (
                w
                for w in config.workloads
                if w.name == source.workload and w.cluster == source.cluster
            ),
            None,
        )
        if workload is None:
            yield (
                f"{path}.workload",
                f"no workload '{source.workload}' in cluster '{source.cluster}'",
                "use a workload of the federation config",
            )
        service = services.get((source.service.name, source.service.namespace))
        if service is None:
            yield f"{path}.service", f"unknown service '{source.service}'", ""
            continue
        if workload is not None and not any(
            u.service == source.service for u in workload.upstreams
        ):
            yield (
                f"{path}.service",
                f"workload '{source.workload}' has no upstream for '{source.service}'",
                "add it to the workload's upstreams in the config, or call from another workload",
            )
        if source.port is None:
            if len(service.ports) != 1:
                yield (
                    f"{path}.port",
                    f"service '{source.service}' has {len(service.ports)} ports",
                    "name one with 'port:'",
                )
                continue
            port = service.ports[0]
        else:
            found = next((p for p in service.ports if p.name == source.port), None)
            if found is None:
                yield f"{path}.port", f"service '{source.service}' has no port '{source.port}'", ""
                continue
            port = found
        if port.protocol != source.protocol:
            yield (
                f"{path}.protocol",
                f"protocol {source.protocol} does not match port '{port.name}' ({port.protocol})",
                f"use protocol: {port.protocol}" if port.protocol in ("http", "tcp") else "",
            )


def target_problem(target: Target, config: FederationConfig) -> str:
    """Why ``target`` names nothing in ``config``, or '' if it resolves."""
    clusters = {c.name: c for c in config.clusters}

    def cluster(name: str) -> str:
        return "" if name in clusters else f"unknown cluster '{name}'"

    match target.kind:
        case "etcd":
            return ""
        case "cloud":
            clouds = sorted({c.cloud for c in config.clusters})
            return (
                ""
                if target.cloud in clouds
                else (f"unknown cloud '{target.cloud}' (known: {', '.join(clouds)})")
            )
        case "zone":
            if target.cluster not in clusters:
                return cluster(target.cluster)
            zones = clusters[target.cluster].zones
            return (
                ""
                if target.zone in zones
                else (
                    f"cluster '{target.cluster}' has no zone '{target.zone}' "
                    f"(it has {', '.join(zones)})"
                )
            )
        case "endpoint":
            if target.cluster not in clusters:
                return cluster(target.cluster)
            workload = next(
                (
                    w
                    for w in config.workloads
                    if w.cluster == target.cluster and w.name == target.workload
                ),
                None,
            )
            if workload is None:
                return f"no workload '{target.workload}' in cluster '{target.cluster}'"
            if target.replica is not None and target.replica >= workload.replicas:
                return (
                    f"workload '{target.workload}' has {workload.replicas} replica(s); "
                    f"replicas count from 0"
                )
            return ""
        case "link":
            problem = cluster(target.cluster)
            if not problem and target.peer != "etcd":
                problem = cluster(target.peer)
            return problem
        case _:
            return cluster(target.cluster)


def _check_timeline(drill: Drill, config: FederationConfig) -> Iterator[Found]:
    end = drill.traffic_end
    previous = 0.0
    # target -> disruptive faults currently in force on it, to check restoring faults
    active: dict[Target, list[str]] = {}
    for i, event in enumerate(drill.timeline):
        path = f"timeline[{i}]"
        if event.at < previous:
            yield (
                f"{path}.at",
                f"{format_duration(event.at)} is before the previous event "
                f"({format_duration(previous)})",
                "list the timeline in time order",
            )
        previous = max(previous, event.at)
        if event.at >= end:
            yield (
                f"{path}.at",
                f"{format_duration(event.at)} is after the traffic ends ({format_duration(end)})",
                "a fault nobody observes proves nothing; extend the traffic",
            )
        allowed = FAULT_TARGETS[event.fault]
        if event.target.kind not in allowed:
            yield (
                f"{path}.target",
                f"fault '{event.fault}' cannot target a {event.target.kind}",
                "use a target of kind " + ", ".join(sorted(allowed)),
            )
        problem = target_problem(event.target, config)
        if problem:
            yield f"{path}.target", problem, ""
        required, permitted = FAULT_PARAMS.get(event.fault, (frozenset(), frozenset()))
        given = event.params.given()
        for name in sorted(given - permitted):
            yield (
                f"{path}.params.{name}",
                f"fault '{event.fault}' takes no parameter '{name}'",
                ("it takes " + ", ".join(sorted(permitted))) if permitted else "remove params",
            )
        for name in sorted(required - given):
            yield f"{path}.params", f"fault '{event.fault}' needs '{name}'", f"add {name}:"
        if event.fault in RESTORES:
            undone = RESTORES[event.fault]
            in_force = active.get(event.target, [])
            match = next((f for f in reversed(in_force) if f in undone), None)
            if match is None:
                yield (
                    f"{path}.fault",
                    f"'{event.fault}' on {event.target} undoes nothing: no earlier "
                    + " or ".join(sorted(undone))
                    + " on that target",
                    "restore exactly the target that was broken",
                )
            else:
                in_force.remove(match)
        elif event.fault in DISRUPTIVE:
            active.setdefault(event.target, []).append(event.fault)


def _check_phases(drill: Drill) -> Iterator[Found]:
    seen: dict[str, int] = {}
    end = drill.traffic_end
    previous_end = 0.0
    for i, phase in enumerate(drill.phases):
        path = f"phases[{i}]"
        if phase.name in seen:
            yield (
                f"{path}.name",
                f"duplicate phase '{phase.name}' (also phases[{seen[phase.name]}])",
                "",
            )
        seen.setdefault(phase.name, i)
        if phase.end <= phase.start:
            yield f"{path}.end", "a phase must end after it starts", ""
        if phase.end > end:
            yield (
                f"{path}.end",
                f"phase ends after the traffic ({format_duration(end)})",
                "end it when the traffic ends at the latest",
            )
        if phase.start < previous_end:
            yield (
                f"{path}.start",
                f"phase overlaps the previous one (which ends at {format_duration(previous_end)})",
                "list phases in time order without overlap; a request belongs to one phase",
            )
        previous_end = max(previous_end, phase.end)


def _check_budgets(drill: Drill, config: FederationConfig) -> Iterator[Found]:
    budgets = drill.budgets
    names = {p.name for p in drill.phases}
    seen: set[str] = set()
    for i, budget in enumerate(budgets.phases):
        path = f"budgets.phases[{i}]"
        if budget.phase not in names:
            yield (
                f"{path}.phase",
                f"unknown phase '{budget.phase}'",
                ("use one of " + ", ".join(p.name for p in drill.phases)),
            )
        if budget.phase in seen:
            yield f"{path}.phase", f"phase '{budget.phase}' has two budgets", "merge them"
        seen.add(budget.phase)
        for j, locality in enumerate(budget.serving):
            problem = target_problem(locality, config)
            if problem:
                yield f"{path}.serving[{j}]", problem, ""
        for locality in budget.must_serve:
            problem = target_problem(locality, config)
            if problem:
                yield f"{path}.must_serve.{locality}", problem, ""
        if sum(budget.must_serve.values()) > 100:
            yield f"{path}.must_serve", "the required shares add up to more than 100%", ""
    start = failover_event(drill)
    if budgets.failover is not None:
        event = budgets.failover.event
        if event is not None and (
            event >= len(drill.timeline) or drill.timeline[event].fault not in DISRUPTIVE
        ):
            yield (
                "budgets.failover.event",
                f"timeline[{event}] is not a disruptive fault",
                "give the index of the fault that starts the failover clock",
            )
        elif start is None:
            yield (
                "budgets.failover",
                "a failover budget needs a disruptive fault in the timeline",
                "add one, or remove the budget",
            )
        for j, locality in enumerate(budgets.failover.to):
            problem = target_problem(locality, config)
            if problem:
                yield f"budgets.failover.to[{j}]", problem, ""
    if budgets.recovery is not None:
        event = budgets.recovery.event
        if event is not None and (
            event >= len(drill.timeline) or drill.timeline[event].fault not in RESTORES
        ):
            yield (
                "budgets.recovery.event",
                f"timeline[{event}] is not a restoring fault",
                "give the index of a heal, revive, resume, etcd-start or cert-renew",
            )
        elif recovery_event(drill) is None:
            yield (
                "budgets.recovery",
                "a recovery budget needs a restoring fault "
                "(heal, revive, resume, etcd-start, cert-renew) "
                "after the failover fault",
                "add one, or remove the budget",
            )
        for j, locality in enumerate(budgets.recovery.to):
            problem = target_problem(locality, config)
            if problem:
                yield f"budgets.recovery.to[{j}]", problem, ""


def _line_of(lines: Mapping[str, int], path: str) -> int:
    """Line of ``path``, or of its nearest recorded ancestor."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return lines.get("", 0)
