"""``meshfed bench run``: the comparison benchmark (meshfed vs Envoy vs the bare network).

The harness lives in the source checkout (``bench/``), which the installed package
does not include. This command finds it next to the ``federation`` package (an
editable install or a checkout on ``sys.path``) or in the current directory, and
runs ``bench.run`` there; elsewhere it says so and exits 3 (a dependency is
unavailable). Same options as ``python -m bench.run`` (docs/performance.md).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

EXIT_UNAVAILABLE = 3


def find_checkout() -> Path | None:
    """The repository root holding ``bench/run.py``: beside ``federation/`` or the cwd."""
    candidates = [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in candidates:
        if (root / "bench" / "run.py").is_file() and (root / "bench" / "harness").is_dir():
            return root
    return None


@app.command("run")
def run(
    scenarios: Annotated[
        list[str] | None,
        typer.Argument(help="idle bulk_1 bulk_16 rr_max rr_pingpong rr_latency connect http_wrk"),
    ] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", min=1, help="Rounds (5).")] = None,
    topology: Annotated[
        list[str] | None,
        typer.Option("--topology", help="Only this topology (repeatable), e.g. envoy-pair."),
    ] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="One short round, to check.")] = False,
    duration: Annotated[
        float | None, typer.Option("--duration", min=0.1, help="Seconds of load per run.")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Where comparison.md/.json go.")
    ] = None,
) -> None:
    """Run the interleaved comparison and write bench/results/comparison.md and .json."""
    root = find_checkout()
    if root is None:
        typer.echo(
            "meshfed bench: the benchmark harness (bench/) is only in a source checkout, "
            "not in the installed package; run this from the repository root "
            "(or `python -m bench.run` there)",
            err=True,
        )
        raise typer.Exit(EXIT_UNAVAILABLE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    bench_run = importlib.import_module("bench.run")
    argv: list[str] = list(scenarios or [])
    if rounds is not None:
        argv += ["--rounds", str(rounds)]
    if topology:
        argv += ["--topologies", *topology]
    if smoke:
        argv.append("--smoke")
    if duration is not None:
        argv += ["--duration", str(duration)]
    if out_dir is not None:
        argv += ["--out-dir", str(out_dir)]
    code: int = bench_run.run(argv)
    raise typer.Exit(code)
