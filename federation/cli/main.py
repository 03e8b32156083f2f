"""The ``meshfed`` entry point: one typer app, one sub-app per area.

Exit codes (docs/cli.md): 0 success; 1 a check or verdict failed; 2 bad usage
or invalid input (config, certificate, name), with one line naming the file,
line and fix; 3 a dependency is unavailable (store, agent, peer).
"""

from __future__ import annotations

import importlib
import sys

import typer

from federation import parentwatch

# Each area's sub-app: (name, module, help), one line each. Modules are imported only
# when their area is used: `meshfed sidecar run` must not load the agent, the store's
# etcd backend (grpc) or the gateway (idle RSS, start-up time; docs/performance-notes.md).
_AREAS: tuple[tuple[str, str, str], ...] = (
    ("config", "federation.cli.config_cmd", "Validate and inspect deployment configs."),
    ("trust", "federation.cli.trust_cmd", "Cluster CA, SVIDs, bundles, rotation, revocation."),
    ("agent", "federation.cli.agent_cmd", "Run a cluster's federation agent."),
    ("federation", "federation.cli.federation_cmd", "Inspect the federation in the store."),
    ("drill", "federation.cli.drill_cmd", "Chaos failover drills: list, validate, judge."),
    ("sidecar", "federation.cli.sidecar_cmd", "Run a workload's L4 sidecar."),
    ("gateway", "federation.cli.gateway_cmd", "Run a cluster's east-west gateway."),
    ("bench", "federation.cli.bench_cmd", "Compare meshfed with Envoy and the bare network."),
)
_UP_MODULE = "federation.cli.up_cmd"  # registers up, status, call, kill, revive, logs, demo


def build_app(only: str | None = None) -> typer.Typer:
    """The ``meshfed`` app; with ``only`` (an area name), just that area's sub-app."""
    app = typer.Typer(
        name="meshfed",
        help="Multi-cluster service-mesh federation.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for name, module, help_text in _AREAS:
        if only is None or only == name:
            app.add_typer(importlib.import_module(module).app, name=name, help=help_text)
    if only is None:
        importlib.import_module(_UP_MODULE).register(app)
    return app


def __getattr__(name: str) -> typer.Typer:
    # `from federation.cli.main import app`: the whole CLI, built on first use.
    if name == "app":
        app = build_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    # The root app takes no options of its own, so the first argument names the area;
    # anything else (--help, up's top-level commands, a typo) gets the whole app.
    first = sys.argv[1] if len(sys.argv) > 1 else None
    only = first if any(first == name for name, _, _ in _AREAS) else None
    parentwatch.start_from_env()  # a child of `meshfed up` ends with it
    build_app(only)()


if __name__ == "__main__":
    main()
