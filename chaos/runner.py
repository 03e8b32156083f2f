"""The drill runner: federation up (or attached), traffic, timeline, verdicts, reports.

``meshfed drill run FILE`` calls :func:`run_drill`. The decisions are pure and tested on
their own (:func:`launch_options`: which store, which fault proxies, which pins;
:func:`shorten`: the CI form of a drill); the rest is a thin trio adapter:

1. start the federation from the drill's config through ``meshfed up``'s machinery
   (``chaos.launch``), or attach to a running ``meshfed up``;
2. warm up: each source's path answers three times in a row (not recorded);
3. ``t0 = trio.current_time()``; every source sends on its schedule (``chaos.traffic``)
   while the timeline applies and verifies each fault (``chaos.injectors``); every record
   goes to a :class:`~chaos.record.Recorder` (JSONL + memory), times ``current_time() - t0``;
4. after the traffic window, undo whatever fault is still in force (so an attached
   federation is left as found), stop what this run started;
5. judge (``chaos.judge``) and write the reports (``chaos.report``) plus the record file and
   ``<drill>.run.json`` (machine facts, notices, what was restored).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from chaos.drill import RESTORES, Drill, Phase, TimelineEvent, TrafficSource
from chaos.drill_loader import LoadedDrill
from chaos.injectors import Injector
from chaos.judge import Judgement, judge
from chaos.launch import (
    Federation,
    LaunchOptions,
    Pin,
    attach_federation,
    launch_federation,
    machine_facts,
)
from chaos.netns import netns_supported
from chaos.plot import series
from chaos.record import Recorder
from chaos.report import write_report
from chaos.traffic import run_source, source_listener
from federation.cli.up.traffic import call_once

__all__ = ["RunOptions", "RunOutcome", "launch_options", "run_drill", "shorten"]

#: Multi-step faults run beside the timeline instead of holding it up.
BACKGROUND_FAULTS = frozenset({"ca-rotate", "rolling-restart"})
WARMUP_STREAK = 3


@dataclass(frozen=True, slots=True)
class RunOptions:
    report_dir: Path
    attach: Path | None = None
    short: bool = False
    short_factor: float = 0.5
    keep: bool = False
    run_dir: Path | None = None
    warmup_timeout: float = 60.0


@dataclass(slots=True)
class RunOutcome:
    judgement: Judgement
    drill: Drill
    files: dict[str, Path]
    notices: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.judgement.passed


# -- pure decisions -----------------------------------------------------------------------------


def _needs_etcd(event: TimelineEvent) -> bool:
    return event.fault.startswith("etcd-") or (
        event.target.kind == "link" and event.target.peer == "etcd"
    )


_LINK_FAULTS = frozenset({"latency", "blackhole", "reset", "bandwidth", "partition", "heal"})


def launch_options(
    drill: Drill, *, run_dir: Path | None = None, keep: bool = False
) -> LaunchOptions:
    """Which store, which fault proxies and which pins the drill needs (docs/drills.md)."""
    etcd = any(_needs_etcd(e) for e in drill.timeline)
    gateways: set[str] = set()
    etcd_links: set[str] = set()
    for e in drill.timeline:
        if e.fault not in _LINK_FAULTS:
            continue
        t = e.target
        if t.kind == "link":
            (etcd_links if t.peer == "etcd" else gateways).add(
                t.cluster if t.peer == "etcd" else t.peer
            )
        elif t.kind == "gateway":
            gateways.add(t.cluster)
        elif t.kind == "cluster":
            gateways.add(t.cluster)
            if etcd:
                etcd_links.add(t.cluster)
    pins = (
        tuple(Pin(s.cluster, s.workload, str(s.service)) for s in drill.traffic)
        if drill.caller_failover == "off"
        else ()
    )
    return LaunchOptions(
        store="etcd" if etcd else "embedded",
        gateway_proxies=frozenset(gateways),
        etcd_proxies=frozenset(etcd_links),
        pins=pins,
        run_dir=run_dir,
        keep=keep,
    )


def shorten(drill: Drill, factor: float = 0.5, rate_factor: float = 0.5) -> Drill:
    """The short (CI) form: times of the timeline, phases and traffic times ``factor``,
    rates times ``rate_factor`` (at least 5/s). Budgets are unchanged: the short form is
    held to the same limits, on less evidence.

    Times after the drill's last restoring fault (revive, heal, resume, etcd-start) keep
    their full-form distance from it: what follows a restore (processes starting, probes,
    ejections ending) takes as long in either form, and the recovery budget and the
    "after" phases are laid out against that real time. Halving the gap too would judge
    an "after" phase 4s after a revive against a recovery budget of 8s.
    """
    restores = [e.at for e in drill.timeline if e.fault in RESTORES]
    cut = max(restores) if restores else None

    def t(at: float) -> float:
        if cut is None or at <= cut:
            return at * factor
        return cut * factor + (at - cut)

    def src(s: TrafficSource) -> TrafficSource:
        start = t(s.start)
        return replace(
            s,
            start=start,
            duration=t(s.start + s.duration) - start,
            rate=max(min(5.0, s.rate), s.rate * rate_factor),
        )

    def ev(e: TimelineEvent) -> TimelineEvent:
        p = e.params
        if p.interval is not None:
            p = replace(p, interval=p.interval * factor)
        return replace(e, at=t(e.at), params=p)

    def ph(p: Phase) -> Phase:
        return replace(p, start=t(p.start), end=t(p.end))

    return replace(
        drill,
        traffic=tuple(src(s) for s in drill.traffic),
        timeline=tuple(ev(e) for e in drill.timeline),
        phases=tuple(ph(p) for p in drill.phases),
    )


# -- the trio adapter ------------------------------------------------------------------------


class DrillRefused(ValueError):
    """The drill cannot run in the requested way (one line, says why)."""


@contextlib.asynccontextmanager
async def _federation(
    loaded: LoadedDrill, drill: Drill, opts: RunOptions
) -> AsyncIterator[Federation]:
    if opts.attach is not None:
        if drill.caller_failover == "off":
            raise DrillRefused(
                f"{drill.name}: caller_failover off needs the runner to start the federation "
                "(it pins the caller's service before start); drop --attach"
            )
        async with attach_federation(opts.attach) as fed:
            yield fed
        return
    lo = launch_options(drill, run_dir=opts.run_dir, keep=opts.keep)
    async with launch_federation(loaded.config_path, lo) as fed:
        if lo.etcd_proxies or any(e.fault == "partition" for e in drill.timeline):
            ok, why = await trio.to_thread.run_sync(netns_supported)
            fed.notices.append(
                "partitions are fault-proxy blackholes (connections accepted and held, "
                "nothing forwarded) on the link's proxy: "
                + (
                    "network namespaces work here, but `meshfed up` cannot start a component "
                    "inside one yet"
                    if ok
                    else f"network namespaces are not available ({why})"
                )
            )
        for name, proxy in sorted(fed.links.items()):
            if name.startswith("gateway:"):
                fed.notices.append(
                    f"fault proxy {name}: {', '.join(proxy.listens)} -> "
                    f"{', '.join(proxy.upstreams)}; it carries every peer's connections into "
                    f"that gateway, so link:X->{name.split(':')[1]} faults hit all peers"
                )
            else:
                fed.notices.append(
                    f"fault proxy {name}: the agent's store link "
                    f"{proxy.listens[0]} -> {proxy.upstreams[0]}"
                )
        if lo.pins:
            fed.notices.append(
                "caller failover off: "
                + ", ".join(f"{p.cluster}/{p.workload}->{p.service}" for p in lo.pins)
                + " pinned to the caller's zone (its other-zone workloads left out, not exported)"
            )
        yield fed


async def _warm_up(fed: Federation, drill: Drill, timeout: float) -> None:  # noqa: ASYNC109
    """Each source's path answers WARMUP_STREAK times in a row, or LaunchError."""
    from chaos.launch import LaunchError

    for s in drill.traffic:
        target = source_listener(s, fed.cfg)
        streak, last = 0, ""
        with trio.move_on_after(timeout):
            while streak < WARMUP_STREAK:
                r = await call_once(s.protocol, target, str(s.service), timeout=s.timeout)
                streak = streak + 1 if r.ok else 0
                last = r.code if not r.ok else last
                if not r.ok:
                    await trio.sleep(0.2)
        if streak < WARMUP_STREAK:
            raise LaunchError(
                f"{s.cluster}/{s.workload}->{s.service} via {target} did not answer "
                f"{WARMUP_STREAK} times in a row within {timeout:.0f}s (last: {last})"
            )


async def _execute(fed: Federation, drill: Drill, recorder: Recorder) -> list[str]:
    t0 = trio.current_time()
    injector = Injector(fed, recorder, lambda: trio.current_time() - t0)
    targets = [source_listener(s, fed.cfg) for s in drill.traffic]

    async def timeline(nursery: trio.Nursery) -> None:
        for event in drill.timeline:
            await trio.sleep_until(t0 + event.at)
            if event.fault in BACKGROUND_FAULTS:
                nursery.start_soon(injector.apply, event)
            else:
                await injector.apply(event)

    async with trio.open_nursery() as faults:
        faults.start_soon(timeline, faults)
        async with trio.open_nursery() as traffic:
            for s, target in zip(drill.traffic, targets, strict=True):
                traffic.start_soon(run_source, s, target, t0, recorder.request)
        recorder.flush()
        # Multi-step faults still running get a bounded grace, then are cancelled.
        faults.cancel_scope.deadline = trio.current_time() + 30.0
    return await injector.restore_all()


async def run_drill(loaded: LoadedDrill, opts: RunOptions) -> RunOutcome:
    """Run one drill end to end; raises LaunchError / DrillRefused before any traffic."""
    drill = shorten(loaded.drill, opts.short_factor) if opts.short else loaded.drill
    out = opts.report_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    facts = machine_facts()
    async with _federation(loaded, drill, opts) as fed:
        await _warm_up(fed, drill, opts.warmup_timeout)
        with Recorder(out / f"{drill.name}.jsonl") as recorder:
            restored = await _execute(fed, drill, recorder)
        notices = list(fed.notices)
        run_facts = dict(fed.facts)
    judgement = judge(drill, recorder.requests, recorder.faults, loaded.clouds)
    files = write_report(out, judgement, drill, series(recorder.requests, drill.traffic_end))
    files["records"] = out / f"{drill.name}.jsonl"
    run: dict[str, Any] = {
        "drill": drill.name,
        "file": loaded.path,
        "short": opts.short,
        "passed": judgement.passed,
        "started_at_unix": round(started, 3),
        "wall_seconds": round(time.time() - started, 1),
        "machine": facts,
        "federation": run_facts,
        "attached": opts.attach is not None,
        "requests": len(recorder.requests),
        "faults_recorded": len(recorder.faults),
        "notices": notices,
        "restored_after_traffic": restored,
    }
    files["run"] = out / f"{drill.name}.run.json"
    files["run"].write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    with files["md"].open("a", encoding="utf-8") as md:
        md.write("\n## Run\n\n")
        md.write(
            f"* machine: {facts.get('cpus')} CPUs ({facts.get('cpu', '?')}), "
            f"{facts.get('memory', '?')}, {facts.get('kernel')}, Python {facts.get('python')}, "
            f"load {facts.get('loadavg')}\n"
        )
        how = f"attached to {opts.attach}" if opts.attach else "federation started by the runner"
        md.write(
            f"* {'short form' if opts.short else 'full form'}, {how}"
            f", store {run_facts.get('store')}; {len(recorder.requests)} requests, "
            f"{len(recorder.faults)} fault records, {run['wall_seconds']} s wall\n"
        )
        for n in notices:
            md.write(f"* notice: {n}\n")
        if restored:
            md.write(f"* restored after the traffic window: {', '.join(restored)}\n")
    return RunOutcome(judgement, drill, files, notices)
