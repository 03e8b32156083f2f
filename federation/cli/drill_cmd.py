"""``meshfed drill``: list, validate and judge chaos failover drills (docs/drills.md).

Exit codes follow docs/cli.md: 0 valid (or the drill passed), 1 the drill failed its
budgets, 2 invalid input (every problem printed, ``file:line: path: message (hint)``),
3 unavailable (``run``: the federation did not start, or ``--attach`` found no live run).
``run`` starts the drill's federation (``meshfed up``'s machinery) or attaches to one;
``judge`` works on a recorded JSONL file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chaos.drill_loader import LoadedDrill, load_drill
from chaos.judge import judge as judge_run
from chaos.plot import series
from chaos.record import read_records
from chaos.report import write_report
from federation.config.durations import format_duration
from federation.config.errors import ConfigError

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3
#: The drill library shipped with meshfed.
DRILLS_DIR = Path(__file__).resolve().parents[2] / "chaos" / "drills"

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _load(path: Path) -> LoadedDrill:
    try:
        return load_drill(path)
    except ConfigError as exc:
        for issue in exc.issues:
            typer.echo(str(issue), err=True)
        count = len(exc.issues)
        typer.echo(f"{path}: invalid, {count} problem{'s' if count != 1 else ''}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


@app.command("list")
def list_drills(
    directory: Annotated[Path, typer.Option("--dir", help="Folder of drill files.")] = DRILLS_DIR,
) -> None:
    """One line per drill: name, duration, faults and what it checks."""
    files = sorted(directory.glob("*.yaml"))
    if not files:
        typer.echo(f"{directory}: no drill files", err=True)
        raise typer.Exit(EXIT_INVALID)
    invalid = False
    for path in files:
        try:
            drill = load_drill(path).drill
        except ConfigError as exc:
            invalid = True
            typer.echo(f"{path.stem:<26} INVALID ({len(exc.issues)} problems; run validate)")
            continue
        faults = ",".join(dict.fromkeys(e.fault for e in drill.timeline)) or "none"
        typer.echo(
            f"{drill.name:<26} {format_duration(drill.traffic_end):>4}  "
            f"[{faults}]  {drill.description}"
        )
    if invalid:
        raise typer.Exit(EXIT_INVALID)


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="Drill file to check.")],
) -> None:
    """Check a drill strictly against its federation config; print every problem (exit 2)."""
    loaded = _load(file)
    drill = loaded.drill
    typer.echo(f"{file}: valid")
    typer.echo(f"  {drill.name}: {drill.description}")
    typer.echo(f"  config {loaded.config_path}, traffic {format_duration(drill.traffic_end)}")
    for event in drill.timeline:
        typer.echo(f"  {format_duration(event.at):>6}  {event.fault} {event.target}")
    phases = ", ".join(
        f"{p.name} {format_duration(p.start)}-{format_duration(p.end)}" for p in drill.phases
    )
    typer.echo(f"  phases: {phases}")


@app.command()
def judge(
    file: Annotated[Path, typer.Argument(help="The drill file that was run.")],
    records: Annotated[Path, typer.Argument(help="The run's JSONL record file.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the reports.")] = Path(
        "drill-report"
    ),
) -> None:
    """Judge a recorded run and write JSON, Markdown, SVG and HTML reports (exit 1 if failed)."""
    loaded = _load(file)
    try:
        log, faults = read_records(records)
    except (OSError, ValueError) as exc:
        typer.echo(f"{records}: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    verdict = judge_run(loaded.drill, log, faults, loaded.clouds)
    written = write_report(out, verdict, loaded.drill, series(log, loaded.drill.traffic_end))
    for v in verdict.verdicts:
        typer.echo(f"{'pass' if v.passed else 'FAIL'}  {v.budget}: {v.explanation}")
    typer.echo(
        f"{loaded.drill.name}: {'PASSED' if verdict.passed else 'FAILED'}; "
        f"report in {written['md']}"
    )
    if not verdict.passed:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Drill file to run.")],
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Folder for the reports (default drill-report/NAME)."),
    ] = None,
    attach: Annotated[
        Path | None,
        typer.Option("--attach", help="Run against the `meshfed up` in this run dir instead."),
    ] = None,
    short: Annotated[
        bool, typer.Option("--short", help="CI form: times x0.5, rates x0.5, same budgets.")
    ] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the run dir of the federation.")
    ] = False,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run dir for the federation it starts.")
    ] = None,
) -> None:
    """Run a drill against a live federation; verdicts + reports (exit 1 if a budget failed)."""
    import trio

    from chaos.launch import LaunchError
    from chaos.runner import DrillRefused, RunOptions, run_drill

    loaded = _load(file)
    out = report or Path("drill-report") / loaded.drill.name
    opts = RunOptions(report_dir=out, attach=attach, short=short, keep=keep, run_dir=run_dir)
    how = f"attaching to {attach}" if attach else "starting the federation"
    typer.echo(
        f"{loaded.drill.name}: {how}{' (short form)' if short else ''}",
        err=True,
    )
    try:
        outcome = trio.run(run_drill, loaded, opts)
    except DrillRefused as exc:
        typer.echo(f"meshfed: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except LaunchError as exc:
        typer.echo(f"meshfed: {exc}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    for notice in outcome.notices:
        typer.echo(f"notice: {notice}")
    for v in outcome.judgement.verdicts:
        typer.echo(f"{'pass' if v.passed else 'FAIL'}  {v.budget}: {v.explanation}")
    typer.echo(
        f"{outcome.drill.name}: {'PASSED' if outcome.passed else 'FAILED'}; "
        f"report in {outcome.files['md']}"
    )
    if not outcome.passed:
        raise typer.Exit(EXIT_FAILED)
