"""``meshfed sidecar run``: one workload instance's L4 sidecar (docs/sidecar.md).

The command line and the start-up live in :mod:`sidecar.entry`, which ``python -m
sidecar`` runs too (without typer, for a smaller process; ``meshfed up``, the drill
runner and the benchmark launch sidecars that way). This command forwards its
arguments there unparsed, so both entries take exactly the same options and answer
``--help`` with the same text.

Exit codes: 0 after a graceful drain (SIGTERM/SIGINT); 2 invalid input (usage, config,
workload, SVID, bundles, catalog file); 3 the agent is unavailable for the first SVID.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)

_SUMMARY = "Run the sidecar of one workload instance until SIGTERM, then drain and exit 0."


@app.command(
    "run",
    help=_SUMMARY + " Options: `meshfed sidecar run --help` (the same as `python -m sidecar`).",
    add_help_option=False,  # --help goes to the shared parser with the other arguments
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(ctx: typer.Context) -> None:
    from sidecar.entry import main

    raise typer.Exit(main(ctx.args, prog="meshfed sidecar run"))
