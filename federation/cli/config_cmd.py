"""``meshfed config``: validate deployment configs and print their JSON Schema.

Exit codes follow docs/cli.md: 0 valid, 2 invalid input (every problem is
printed, one line each, ``file:line: path: message (hint)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from federation.config.errors import ConfigError
from federation.config.loader import load_config
from federation.config.schema import render_schema
from federation.config.summary import summarize

EXIT_INVALID = 2

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Config files to check.")],
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing for valid files.")
    ] = False,
) -> None:
    """Check configs strictly; print every problem (exit 2) or a topology summary (exit 0)."""
    failed = False
    for number, path in enumerate(files):
        try:
            config = load_config(path)
        except ConfigError as exc:
            failed = True
            for issue in exc.issues:
                typer.echo(str(issue), err=True)
            count = len(exc.issues)
            typer.echo(f"{path}: invalid, {count} problem{'s' if count != 1 else ''}", err=True)
            continue
        if not quiet:
            if number:
                typer.echo("")
            typer.echo(f"{path}: valid")
            typer.echo(summarize(config), nl=False)
    if failed:
        raise typer.Exit(EXIT_INVALID)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the config format (configs/meshfed.schema.json)."""
    typer.echo(render_schema(), nl=False)
