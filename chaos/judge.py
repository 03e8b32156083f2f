"""The drill judge: a pure function from (drill, request records, fault records) to verdicts.

No clock, no I/O: every figure is computed from the recorded times (seconds from the drill's
start), so a judgement is reproducible from a JSONL file. docs/drills.md defines each figure;
the short form:

* a request belongs to the phase its ``t_start`` falls in (``start <= t_start < end``);
* latency percentiles are nearest-rank over the *successful* requests of a phase (failures
  are judged by count; a fast failure must not improve the latency figure);
* serving shares are over successful requests, by ``cluster/zone``;
* **failover time**: from the failover fault ``F`` (its recorded time) to the end of the
  last *bad* request in the failover window ``[F, R)``, where ``R`` is the next restoring
  fault (or the end of traffic). Bad means failed (any request still running at ``F``
  counts) or, for requests started at or after ``F``, served outside ``budgets.failover.to``.
  0 if there was none. Undefined (the budget fails) if no good request started after the
  last bad one inside the window: the traffic never settled;
* **recovery time**: from the restoring fault ``R``, windows ``[R + k*w, R + (k+1)*w)``
  up to the end of traffic; recovered at the end of the first window from which on *every*
  window has successful requests and at least ``min_share`` % of them served from
  ``budgets.recovery.to``. Undefined (fails) if that never happens;
* every timeline event needs a fault record, and every fault record must be verified, or
  the drill fails: a fault that did not happen proves nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from chaos.drill import RESTORES, Drill, Target, failover_event, locality_matches, recovery_event
from chaos.record import FaultRecord, RequestLog
from federation.config.durations import format_duration


@dataclass(frozen=True, slots=True)
class Verdict:
    """One budget held against one measured figure."""

    budget: str
    """What was judged, e.g. ``during: failed requests`` or ``failover time``."""
    limit: float
    """The budget's limit (an upper bound, or a lower bound for shares and traffic)."""
    measured: float | None
    """The measured figure; None when it could not be measured (which fails)."""
    passed: bool
    """Whether the figure is within the limit."""
    explanation: str
    """One or two sentences a person on call can act on."""
    unit: str = ""
    """``requests``, ``%``, ``s`` or ``faults``."""


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """The figures of one phase (or of the whole drill)."""

    name: str
    """Phase name; ``overall`` for the whole drill."""
    start: float
    """Window start (requests with ``t_start >= start``)."""
    end: float
    """Window end (exclusive)."""
    requests: int
    """Requests started in the window."""
    failures: int
    """Of which failed."""
    error_rate: float
    """Failures in percent of requests (0 without requests)."""
    latency_p50: float | None
    """Median latency of successful requests; None without any."""
    latency_p99: float | None
    """99th percentile latency of successful requests (nearest rank); None without any."""
    serving: Mapping[str, int]
    """Successful requests by serving ``cluster/zone``."""
    shares: Mapping[str, float]
    """``serving`` in percent of successful requests."""
    error_kinds: Mapping[str, int]
    """Failures by ``error_kind``."""


@dataclass(frozen=True, slots=True)
class AppliedFault:
    """A timeline event with what the runner recorded for it."""

    index: int
    """Index in the drill's timeline; -1 for a record no event asked for."""
    fault: str
    """The fault kind."""
    target: str
    """The target, canonical form."""
    planned_at: float | None
    """When the drill asked for it; None for an extra record."""
    t: float | None
    """When the runner applied it; None if it never recorded it."""
    verified: bool
    """Whether the runner confirmed that it took effect."""
    detail: str
    """The runner's explanation."""


@dataclass(frozen=True, slots=True)
class FailoverFigures:
    """Failover after the failover fault (definitions in the module docstring)."""

    t_fault: float
    """When the failover fault was applied."""
    window_end: float
    """End of the failover window: the next restoring fault or the end of traffic."""
    failover_time: float | None
    """Seconds until the traffic settled; None if it never did."""
    first_fallback: float | None
    """Seconds until the first successful request from an allowed locality ended."""
    failed: int
    """Failed requests in the window."""
    misrouted: int
    """Successful requests started after the fault but served outside the allowed set."""


@dataclass(frozen=True, slots=True)
class RecoveryFigures:
    """Recovery after the restoring fault (definitions in the module docstring)."""

    t_heal: float
    """When the restoring fault was applied."""
    window: float
    """Width of the share windows."""
    shares: tuple[float | None, ...]
    """Share (percent) of successful requests served by the preferred localities, per
    window; None for a window without a successful request."""
    recovery_time: float | None
    """Seconds until recovered; None if it never recovered."""


@dataclass(frozen=True, slots=True)
class Judgement:
    """Everything the judge concluded about one drill run."""

    drill: str
    """The drill's name."""
    passed: bool
    """True only if every verdict passed."""
    verdicts: tuple[Verdict, ...]
    """Every budget judged, in a stable order."""
    overall: PhaseStats
    """Figures over every request."""
    phases: tuple[PhaseStats, ...]
    """Figures per phase, in the drill's order."""
    faults: tuple[AppliedFault, ...]
    """The timeline events with their records, then records no event asked for."""
    failover: FailoverFigures | None
    """Failover figures, if the timeline has a disruptive fault."""
    recovery: RecoveryFigures | None
    """Recovery figures, if the drill has a recovery budget."""


def locality_key(cluster: str, zone: str) -> str:
    """How a serving locality is named in figures: ``cluster/zone`` (``?`` for unknown)."""
    return f"{cluster or '?'}/{zone or '?'}"


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1] of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def phase_stats(
    log: RequestLog, rows: Sequence[int], name: str, start: float, end: float
) -> PhaseStats:
    """The figures of the requests in ``rows`` that started in ``[start, end)``."""
    latencies: list[float] = []
    serving: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    requests = 0
    for row in rows:
        if not start <= log.t_start[row] < end:
            continue
        requests += 1
        if log.ok(row):
            latencies.append(log.latency[row])
            serving[
                locality_key(log.text("served_by_cluster", row), log.text("served_by_zone", row))
            ] += 1
        else:
            kinds[log.text("error_kind", row) or "unknown"] += 1
    latencies.sort()
    failures = requests - len(latencies)
    served = len(latencies)
    return PhaseStats(
        name=name,
        start=start,
        end=end,
        requests=requests,
        failures=failures,
        error_rate=100.0 * failures / requests if requests else 0.0,
        latency_p50=percentile(latencies, 0.5),
        latency_p99=percentile(latencies, 0.99),
        serving=MappingProxyType(dict(sorted(serving.items()))),
        shares=MappingProxyType(
            {key: 100.0 * count / served for key, count in sorted(serving.items())}
        ),
        error_kinds=MappingProxyType(dict(sorted(kinds.items()))),
    )


def match_faults(drill: Drill, faults: Sequence[FaultRecord]) -> tuple[AppliedFault, ...]:
    """Pair each timeline event with the first unused record of the same fault and target;
    records left over (e.g. the steps of a ``ca-rotate``) follow with index -1."""
    unused = list(faults)
    applied: list[AppliedFault] = []
    for index, event in enumerate(drill.timeline):
        target = str(event.target)
        found = next((r for r in unused if r.fault == event.fault and r.target == target), None)
        if found is None:
            applied.append(
                AppliedFault(index, event.fault, target, event.at, None, False, "no fault record")
            )
            continue
        unused.remove(found)
        applied.append(
            AppliedFault(
                index, event.fault, target, event.at, found.t, found.verified, found.detail
            )
        )
    applied.extend(
        AppliedFault(-1, r.fault, r.target, None, r.t, r.verified, r.detail) for r in unused
    )
    return tuple(applied)


def _allowed(
    localities: Sequence[Target], cluster: str, zone: str, clouds: Mapping[str, str]
) -> bool:
    return not localities or any(locality_matches(loc, cluster, zone, clouds) for loc in localities)


def failover_figures(
    drill: Drill,
    log: RequestLog,
    rows: Sequence[int],
    applied: Sequence[AppliedFault],
    clouds: Mapping[str, str],
) -> FailoverFigures | None:
    """Failover figures, or None if the timeline has no disruptive fault."""
    index = failover_event(drill)
    if index is None:
        return None
    t_fault = _when(applied[index])
    restore = next(
        (i for i, e in enumerate(drill.timeline) if i > index and e.fault in RESTORES),
        None,
    )
    window_end = _when(applied[restore]) if restore is not None else drill.traffic_end
    allowed = drill.budgets.failover.to if drill.budgets.failover else ()
    failed = misrouted = 0
    last_bad: float | None = None
    first_good: float | None = None
    for row in rows:
        t_start, t_end = log.t_start[row], log.t_end[row]
        if t_end < t_fault or t_start >= window_end:
            continue
        bad = False
        if not log.ok(row):
            failed += 1
            bad = True
        elif t_start >= t_fault:
            where = log.text("served_by_cluster", row), log.text("served_by_zone", row)
            if _allowed(allowed, *where, clouds):
                first_good = t_end if first_good is None else min(first_good, t_end)
            else:
                misrouted += 1
                bad = True
        if bad:
            last_bad = t_end if last_bad is None else max(last_bad, t_end)
    settle_from = t_fault if last_bad is None else last_bad
    settled = any(
        settle_from <= log.t_start[row] < window_end
        and log.ok(row)
        and _allowed(
            allowed,
            log.text("served_by_cluster", row),
            log.text("served_by_zone", row),
            clouds,
        )
        for row in rows
    )
    return FailoverFigures(
        t_fault=t_fault,
        window_end=window_end,
        failover_time=max(0.0, settle_from - t_fault) if settled else None,
        first_fallback=None if first_good is None else first_good - t_fault,
        failed=failed,
        misrouted=misrouted,
    )


def recovery_figures(
    drill: Drill,
    log: RequestLog,
    rows: Sequence[int],
    applied: Sequence[AppliedFault],
    clouds: Mapping[str, str],
) -> RecoveryFigures | None:
    """Recovery figures, or None without a recovery budget or restoring fault."""
    budget = drill.budgets.recovery
    index = recovery_event(drill)
    if budget is None or index is None:
        return None
    t_heal = _when(applied[index])
    # Only whole windows: a last, partial window of a few requests proves nothing.
    count = max(0, math.floor((drill.traffic_end - t_heal) / budget.window + 1e-9))
    totals = [0] * count
    preferred = [0] * count
    for row in rows:
        t_start = log.t_start[row]
        if t_start < t_heal or not log.ok(row):
            continue
        k = math.floor((t_start - t_heal) / budget.window)
        if k >= count:
            continue
        totals[k] += 1
        where = log.text("served_by_cluster", row), log.text("served_by_zone", row)
        if _allowed(budget.to, *where, clouds):
            preferred[k] += 1
    shares = tuple(100.0 * p / t if t else None for p, t in zip(preferred, totals, strict=True))
    recovered_from: int | None = None
    for k in range(count - 1, -1, -1):
        share = shares[k]
        if share is None or share < budget.min_share:
            break
        recovered_from = k
    return RecoveryFigures(
        t_heal=t_heal,
        window=budget.window,
        shares=shares,
        recovery_time=None if recovered_from is None else (recovered_from + 1) * budget.window,
    )


def _when(fault: AppliedFault) -> float:
    """When a fault took effect: as recorded, else as planned."""
    if fault.t is not None:
        return fault.t
    return fault.planned_at if fault.planned_at is not None else 0.0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _failures_text(stats: PhaseStats) -> str:
    kinds = ", ".join(f"{kind}: {n}" for kind, n in stats.error_kinds.items())
    return f"{stats.failures} of {stats.requests} requests failed" + (
        f" ({kinds})" if kinds else ""
    )


def _count_verdicts(
    label: str, stats: PhaseStats, max_failed: int | None, max_rate: float | None
) -> list[Verdict]:
    out: list[Verdict] = []
    if max_failed is not None:
        out.append(
            Verdict(
                f"{label}failed requests",
                max_failed,
                stats.failures,
                stats.failures <= max_failed,
                _failures_text(stats),
                "requests",
            )
        )
    if max_rate is not None:
        out.append(
            Verdict(
                f"{label}error rate",
                max_rate,
                stats.error_rate,
                stats.error_rate <= max_rate,
                _failures_text(stats),
                "%",
            )
        )
    return out


def judge(
    drill: Drill,
    log: RequestLog,
    faults: Sequence[FaultRecord],
    clouds: Mapping[str, str],
) -> Judgement:
    """Judge one drill run. ``clouds`` maps cluster -> cloud (for ``cloud:`` localities)."""
    rows = log.by_start()
    applied = match_faults(drill, faults)
    verdicts: list[Verdict] = []

    problems = [a for a in applied if not a.verified]
    if applied:
        listed = "; ".join(
            f"{a.fault} {a.target}"
            + (f" (planned {format_duration(a.planned_at)})" if a.planned_at is not None else "")
            + f": {a.detail or 'not verified'}"
            for a in problems
        )
        verdicts.append(
            Verdict(
                "faults applied and verified",
                0,
                len(problems),
                not problems,
                f"{len(applied)} fault(s), all verified"
                if not problems
                else f"{len(problems)} of {len(applied)} fault(s) not confirmed: {listed}; "
                "the run proves nothing about them",
                "faults",
            )
        )
    verdicts.append(
        Verdict(
            "traffic recorded",
            1,
            len(log),
            len(log) > 0,
            f"{len(log)} requests recorded" if len(log) else "no request was recorded",
            "requests",
        )
    )

    end = max(drill.traffic_end, max(log.t_end, default=0.0))
    overall = phase_stats(log, rows, "overall", 0.0, math.inf)
    overall = dataclasses.replace(overall, end=end)
    verdicts += _count_verdicts(
        "", overall, drill.budgets.max_failed_requests, drill.budgets.max_error_rate
    )

    failover = failover_figures(drill, log, rows, applied, clouds)
    if drill.budgets.failover is not None:
        limit = drill.budgets.failover.within
        if failover is None:
            verdicts.append(
                Verdict("failover time", limit, None, False, "no disruptive fault", "s")
            )
        else:
            to = ", ".join(map(str, drill.budgets.failover.to)) or "any locality"
            measured = failover.failover_time
            if measured is None:
                text = (
                    f"never settled: requests kept failing or being served outside {to} "
                    f"until {_seconds(failover.window_end)} ({failover.failed} failed, "
                    f"{failover.misrouted} misrouted)"
                )
            else:
                text = (
                    f"settled on {to} {_seconds(measured)} after the fault at "
                    f"{_seconds(failover.t_fault)} ({failover.failed} failed, "
                    f"{failover.misrouted} misrouted in the window); first request from "
                    f"{to} answered after {_seconds(failover.first_fallback)}"
                )
            verdicts.append(
                Verdict(
                    "failover time",
                    limit,
                    measured,
                    measured is not None and measured <= limit,
                    text,
                    "s",
                )
            )

    recovery = recovery_figures(drill, log, rows, applied, clouds)
    if drill.budgets.recovery is not None:
        budget = drill.budgets.recovery
        to = ", ".join(map(str, budget.to))
        if recovery is None:
            verdicts.append(
                Verdict("recovery time", budget.within, None, False, "no restoring fault", "s")
            )
        else:
            measured = recovery.recovery_time
            if measured is None:
                last = next((s for s in reversed(recovery.shares) if s is not None), None)
                text = (
                    f"never recovered: {to} did not keep {budget.min_share:g}% of the traffic "
                    f"to the end (last window: "
                    + ("no successful request" if last is None else f"{last:.1f}%")
                    + ")"
                )
            else:
                text = (
                    f"{to} carried at least {budget.min_share:g}% of the traffic from "
                    f"{_seconds(measured)} after the restore at {_seconds(recovery.t_heal)}"
                )
            verdicts.append(
                Verdict(
                    "recovery time",
                    budget.within,
                    measured,
                    measured is not None and measured <= budget.within,
                    text,
                    "s",
                )
            )

    phases = tuple(phase_stats(log, rows, p.name, p.start, p.end) for p in drill.phases)
    by_name = {p.name: p for p in phases}
    for phase_budget in drill.budgets.phases:
        stats = by_name[phase_budget.phase]
        label = f"{phase_budget.phase}: "
        verdicts += _count_verdicts(
            label, stats, phase_budget.max_failed_requests, phase_budget.max_error_rate
        )
        for name, bound, value in (
            ("latency p50", phase_budget.latency_p50, stats.latency_p50),
            ("latency p99", phase_budget.latency_p99, stats.latency_p99),
        ):
            if bound is None:
                continue
            verdicts.append(
                Verdict(
                    label + name,
                    bound,
                    value,
                    value is not None and value <= bound,
                    f"{name} {_seconds(value)} over {stats.requests - stats.failures} "
                    "successful requests"
                    if value is not None
                    else "no successful request in the phase",
                    "s",
                )
            )
        if phase_budget.serving:
            allowed = ", ".join(map(str, phase_budget.serving))
            outside: Counter[str] = Counter()
            for key, count in stats.serving.items():
                cluster, _, zone = key.partition("/")
                if not _allowed(phase_budget.serving, cluster, zone, clouds):
                    outside[key] = count
            total = sum(outside.values())
            verdicts.append(
                Verdict(
                    label + "served outside " + allowed,
                    0,
                    total,
                    total == 0 and bool(stats.serving),
                    "no successful request in the phase"
                    if not stats.serving
                    else (
                        f"all {sum(stats.serving.values())} successful requests from {allowed}"
                        if not total
                        else f"{total} successful requests from elsewhere: "
                        + ", ".join(f"{k} {n}" for k, n in sorted(outside.items()))
                    ),
                    "requests",
                )
            )
        for locality, minimum in phase_budget.must_serve.items():
            share = sum(
                s
                for key, s in stats.shares.items()
                if _allowed((locality,), *key.partition("/")[::2], clouds)
            )
            verdicts.append(
                Verdict(
                    f"{label}share of {locality}",
                    minimum,
                    share,
                    share >= minimum and bool(stats.serving),
                    f"{locality} served {share:.1f}% of the phase's successful requests"
                    + (
                        " (" + ", ".join(f"{k} {v:.1f}%" for k, v in stats.shares.items()) + ")"
                        if stats.shares
                        else ""
                    ),
                    "%",
                )
            )

    return Judgement(
        drill=drill.name,
        passed=all(v.passed for v in verdicts),
        verdicts=tuple(verdicts),
        overall=overall,
        phases=phases,
        faults=applied,
        failover=failover,
        recovery=recovery,
    )
