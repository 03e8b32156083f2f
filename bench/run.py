"""Compare meshfed with Envoy and the bare network on loopback: ``python -m bench.run``.

    python -m bench.run [SCENARIO...] [--rounds N] [--topologies NAME...] [--smoke]
                        [--duration S] [--out-dir DIR]

Starts every available topology once (direct, envoy-{pair,passthrough,tunnel},
meshfed-{pair,passthrough,tunnel}), then runs N rounds; in each round every
scenario runs once on every topology in the same order, so slow drift in a noisy
machine hits all of them alike. Writes ``comparison.md`` and ``comparison.json``
(``bench/results/`` by default; ``--smoke`` runs one short round into a temp
directory unless ``--out-dir`` is given). Exit status: 0 if every available
topology ran every scenario, 1 if some run failed (the report says which).

Data-plane scenarios (per topology): idle, bulk_1, bulk_16, rr_max, rr_pingpong,
rr_latency, connect, http_wrk. Control-plane scenarios (once per round, not per
topology; ``bench/agent_bench.py`` in a subprocess with its own etcd):
propagation_etcd, propagation_embedded, full_sync. ``--smoke`` shrinks them too
(50 changes, 10 x 10 x 10 records) to keep CI short.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.harness import report
from bench.harness.control import CONTROL
from bench.harness.loadgen import Backend
from bench.harness.pki import mint
from bench.harness.scenarios import FULL, SCENARIOS, SMOKE, quiesce, role_rss
from bench.harness.topology import (
    Driver,
    Running,
    StartContext,
    TopologyError,
    all_drivers,
    envoy_version,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"default: all of {list(SCENARIOS) + list(CONTROL)}",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5; smoke 1)")
    parser.add_argument(
        "--topologies",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"default: all of {[d.name for d in all_drivers()]}",
    )
    parser.add_argument("--smoke", action="store_true", help="one short round, to check it works")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per run")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: rewrite the .md (and .json) of a recorded comparison.json",
    )
    return parser


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(argv: Sequence[str]) -> int:
    """Parse ``argv``, run the benchmark, write the report; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.render is not None:
        recorded = report.from_json(json.loads(args.render.read_text()))
        md, js = report.write(recorded, args.out_dir or args.render.parent)
        _log(f"re-rendered {md} and {js} from {args.render}")
        return 0
    known = list(SCENARIOS) + list(CONTROL)
    unknown = [s for s in args.scenarios if s not in known]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {known}")
    chosen = list(args.scenarios) or known
    scenario_names = [n for n in chosen if n in SCENARIOS]
    control_names = [n for n in chosen if n in CONTROL]
    drivers: list[Driver] = all_drivers()
    if args.topologies:
        names = [d.name for d in drivers]
        bad = [n for n in args.topologies if n not in names]
        if bad:
            parser.error(f"unknown topolog(ies) {bad}; choose from {names}")
        drivers = [d for d in drivers if d.name in args.topologies]
    settings = SMOKE if args.smoke else FULL
    if args.duration is not None:
        settings = dataclasses.replace(settings, duration=args.duration)
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 5)
    out_dir = args.out_dir or (
        Path(tempfile.gettempdir()) / "meshfed-bench-smoke" if args.smoke else DEFAULT_OUT
    )
    comparison = report.Comparison(
        command="python -m bench.run " + shlex.join(argv),
        rounds=rounds,
        settings=settings,
        scenarios=scenario_names,
        control_scenarios=control_names,
        topologies=[
            report.TopologyRecord(d.name, d.system, str(d.shape), "unavailable") for d in drivers
        ],
        machine=report.machine_facts(envoy_version()),
        started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    for name in scenario_names:
        if why := SCENARIOS[name].unavailable():
            comparison.skipped_scenarios[name] = why
    for name in control_names:
        if why := CONTROL[name].unavailable():
            comparison.skipped_scenarios[name] = why
    if not scenario_names:
        drivers = []
        comparison.topologies = []
    active_control = [n for n in control_names if n not in comparison.skipped_scenarios]
    comparison.load.append(report.load_sample("start"))
    active = [n for n in scenario_names if n not in comparison.skipped_scenarios]
    records = {r.name: r for r in comparison.topologies}
    ok = True
    with tempfile.TemporaryDirectory(prefix="meshfed-bench-") as tmp:
        work = Path(tmp)
        pki = mint(work / "pki")
        backend = Backend(1 if args.smoke else settings.processes)
        started: list[tuple[Driver, Running]] = []
        try:
            for d in drivers:
                rec = records[d.name]
                if why := d.unavailable():
                    rec.note = why
                    _log(f"{d.name}: {why}")
                    continue
                wd = work / d.name
                wd.mkdir()
                try:
                    running = d.start(StartContext(wd, backend.port, pki))
                    started.append((d, running))
                    rec.status = "measured"
                    if settings.settle:
                        quiesce(running)
                    rec.start_rss = role_rss(running)
                except TopologyError as exc:
                    rec.status, rec.note, ok = "failed", f"failed to start: {exc}", False
                    _log(f"{d.name}: {rec.note}")
            for r in range(rounds):
                for name in active:
                    for d, running in started:
                        rec = records[d.name]
                        t0 = time.monotonic()
                        try:
                            values = SCENARIOS[name].run(running, settings, backend)
                        except (OSError, RuntimeError, TimeoutError) as exc:
                            rec.failures.append(f"round {r + 1} {name}: {exc}")
                            ok = False
                            _log(f"round {r + 1} {name:10} {d.name:20} FAILED: {exc}")
                            continue
                        values["drain_s"] = quiesce(running) if settings.settle else float("nan")
                        rec.add(name, values)
                        head = SCENARIOS[name].metrics[0]
                        _log(
                            f"round {r + 1}/{rounds} {name:10} {d.name:20} "
                            f"{values.get(head.key, float('nan')):12,.1f} {head.unit}"
                            f"  ({time.monotonic() - t0:.1f} s, drained {values['drain_s']:.1f} s)"
                        )
                for name in active_control:
                    t0 = time.monotonic()
                    try:
                        values = CONTROL[name].run(settings)
                    except (OSError, RuntimeError, ValueError) as exc:
                        comparison.control_failures.append(f"round {r + 1} {name}: {exc}")
                        ok = False
                        _log(f"round {r + 1} {name:20} FAILED: {exc}")
                        continue
                    per = comparison.control.setdefault(name, {})
                    for key, value in values.items():
                        per.setdefault(key, []).append(value)
                    head = CONTROL[name].metrics[0]
                    _log(
                        f"round {r + 1}/{rounds} {name:20} {head.title} "
                        f"{values.get(head.key, float('nan')):,.3f} {head.unit}"
                        f"  ({time.monotonic() - t0:.1f} s)"
                    )
                comparison.load.append(report.load_sample(f"after round {r + 1}"))
        finally:
            for d, running in started:
                records[d.name].path = running.path_evidence()
                running.stop()
            backend.stop()
    md, js = report.write(comparison, out_dir)
    _log(f"wrote {md} and {js}")
    return 0 if ok else 1


def _stop_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # A background job ignores SIGINT, and SIGTERM would skip cleanup: make both
    # unwind through run()'s finally, which stops every proxy it started.
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
