"""The ``meshfed`` entry point: one typer app, one sub-app per area.

Exit codes (docs/cli.md): 0 success; 1 a check or verdict failed; 2 bad usage
or invalid input (config, certificate, name), with one line naming the file,
line and fix; 3 a dependency is unavailable (store, agent, peer).
"""

from __future__ import annotations

import typer

from federation.cli import agent_cmd, config_cmd, federation_cmd, trust_cmd

app = typer.Typer(
    name="meshfed",
    help="Multi-cluster service-mesh federation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each area registers its sub-app here (one line each).
app.add_typer(config_cmd.app, name="config", help="Validate and inspect deployment configs.")
app.add_typer(trust_cmd.app, name="trust", help="Cluster CA, SVIDs, bundles, rotation, revocation.")
app.add_typer(agent_cmd.app, name="agent", help="Run a cluster's federation agent.")
app.add_typer(federation_cmd.app, name="federation", help="Inspect the federation in the store.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
