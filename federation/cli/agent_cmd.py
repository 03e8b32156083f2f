"""``meshfed agent run``: the federation agent of one cluster (docs/agent.md).

Exit codes (docs/cli.md): 2 invalid input (config, cluster, CA directory, store
URL), each one line saying what to do; 0 after SIGTERM/SIGINT (the lease is
revoked so the cluster's leased keys vanish at once).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import trio
import typer

from federation import logs
from federation.agent.runner import JOIN_TOKEN_FILE, Agent, AgentOptions, AgentSetupError
from federation.config.errors import ConfigError
from federation.config.loader import load_config
from federation.store.open import InvalidStoreURL

EXIT_INVALID = 2

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str, code: int = EXIT_INVALID) -> None:
    typer.echo(f"meshfed agent: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", help="Deployment config (YAML).")],
    cluster: Annotated[str, typer.Option("--cluster", help="This agent's cluster.")],
    store: Annotated[str, typer.Option("--store", help="etcd://host:port or memory://")],
    ca_dir: Annotated[Path, typer.Option("--ca-dir", help="The cluster CA (meshfed trust init).")],
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Where catalog.json is persisted.")
    ],
    takeover: Annotated[
        bool,
        typer.Option("--takeover", help="Take over from a live agent of another epoch."),
    ] = False,
    admin_port: Annotated[
        int | None, typer.Option("--admin-port", help="Override clusters[].agent.admin_port.")
    ] = None,
    admin_host: Annotated[
        str | None, typer.Option("--admin-host", help="Override clusters[].agent.address.")
    ] = None,
    lease_ttl: Annotated[
        float | None, typer.Option("--lease-ttl", help="Override settings.lease_ttl (seconds).")
    ] = None,
    catalog_port: Annotated[
        int | None,
        typer.Option("--catalog-port", help="Override clusters[].agent.catalog_port (0: any)."),
    ] = None,
    catalog_host: Annotated[
        str | None, typer.Option("--catalog-host", help="Override clusters[].agent.address.")
    ] = None,
    assume_declared_healthy: Annotated[
        bool,
        typer.Option(
            "--assume-declared-healthy",
            help="Publish config-declared endpoints healthy without a sidecar registration "
            "(for sidecars on a static catalog).",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Register the cluster, publish its services, import the others, serve /ready /status."""
    try:
        logs.configure(log_level, component="agent", cluster=cluster)
    except ValueError as exc:
        _fail(str(exc))
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(f"{exc.issues[0]} (run `meshfed config validate {config}`)")
    except OSError as exc:
        _fail(f"{config}: {exc.strerror}")
    options = AgentOptions(
        takeover=takeover,
        admin_host=admin_host,
        admin_port=admin_port,
        lease_ttl=lease_ttl,
        catalog_host=catalog_host,
        catalog_port=catalog_port,
        assume_declared_healthy=assume_declared_healthy,
    )

    try:
        # Everything that can be refused is checked before trio starts: one clear line.
        agent = Agent(cfg, cluster, store, ca_dir, state_dir, options)
    except (AgentSetupError, InvalidStoreURL) as exc:
        _fail(str(exc))
    bind_error: list[OSError] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(agent.run)
            except OSError as exc:
                bind_error.append(exc)
                return
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    if bind_error:
        err = bind_error[0]
        spec = agent.cluster.agent
        admin = admin_port if admin_port is not None else spec.admin_port
        stream = catalog_port if catalog_port is not None else spec.catalog_port
        _fail(
            f"cannot listen on the admin port {admin} or the catalog port {stream}: "
            f"{err.strerror or err} (use --admin-port / --catalog-port)"
        )


@app.command("token")
def token(
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="The agent's --state-dir (holds the token file).")
    ],
    spiffe_id: Annotated[str, typer.Option("--spiffe-id", help="Identity the token may claim.")],
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token is valid.")] = "10m",
) -> None:
    """Issue a one-time join token for a workload's first SVID (printed on stdout).

    The running agent reads the same file, so the token works at once; it is
    burned on first use and stored only as a hash.
    """
    import time

    from federation.config.durations import parse_duration
    from federation.jointoken import JoinTokenError, JoinTokenFile, JoinTokenFileError
    from trust.spiffe import InvalidSpiffeId, SpiffeId

    try:
        sid = SpiffeId.parse(spiffe_id)
        seconds = parse_duration(ttl)
        state_dir.mkdir(parents=True, exist_ok=True)
        typer.echo(JoinTokenFile(state_dir / JOIN_TOKEN_FILE).issue(sid, seconds, time.time()))
    except (InvalidSpiffeId, ValueError, JoinTokenError, JoinTokenFileError) as exc:
        _fail(str(exc))
