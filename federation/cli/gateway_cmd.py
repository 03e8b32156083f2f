"""``meshfed gateway run``: the east-west gateway of one cluster (docs/gateway.md).

Identity, one of:

* ``--join-token T``: the gateway generates its key and asks its cluster's agent
  (``--agent HOST:PORT``, default from the config) to sign a CSR for
  ``spiffe://<td>/ns/meshfed-system/sa/east-west-gateway`` (issue the token with
  ``meshfed agent token --spiffe-id <that ID>``); it then renews through the agent,
  authenticated by its current SVID, at half its lifetime, draining the tunnel
  connections made with the old certificate.
* ``--svid-dir D``: ``D/svid.crt`` (chain), ``D/svid.key`` (0600, as written by
  ``meshfed trust issue``); never renewed (a restart with a new file is).

Trust anchors: every ``<trust-domain>.json`` SPIFFE bundle in ``--bundles DIR``
(default ``<svid-dir>/bundles``, else ``<state-dir>/bundles``), seeded from the
static catalog's bundles if there are none; then every catalog's bundles, live.

Catalog: the agent's catalog stream (persisted under ``--state-dir``), or ``--catalog
FILE`` (a ``Catalog.to_json`` document, re-read when it changes).

Exit codes (docs/cli.md): 2 invalid input, one line saying what to do; 3 the agent is
unavailable or refused the first SVID; 0 after SIGTERM/SIGINT once live connections
drained (``drain_timeout``).
"""

from __future__ import annotations

import random
import signal
import stat
from pathlib import Path
from typing import Annotated, Any, NoReturn

import trio
import typer

from federation import logs
from federation.bootstrap import agent_renewer, first_svid
from federation.catalog import Catalog
from federation.config.errors import ConfigError
from federation.config.loader import load_config
from federation.model import RecordError
from gateway.runner import Gateway, GatewayOptions
from sidecar.runner import CatalogSource, StaticCatalog
from trust.bundle import TrustBundle
from trust.errors import BundleError, TrustError
from trust.spiffe import TrustDomain, agent_id, gateway_id
from trust.svid import Svid
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

EXIT_INVALID = 2
EXIT_AGENT = 3

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

def _fail(message: str) -> NoReturn:
    typer.echo(f"meshfed gateway: {message}", err=True)
    raise typer.Exit(EXIT_INVALID)


def load_svid(svid_dir: Path, trust_domain: str) -> Svid:
    """The gateway SVID from ``svid_dir`` (see the module doc); must be the gateway ID."""
    crt, key = svid_dir / "svid.crt", svid_dir / "svid.key"
    try:
        mode = key.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            _fail(f"{key}: readable by group or others; chmod 600 {key}")
        svid = Svid.from_pem(crt.read_bytes(), key.read_bytes())
    except OSError as exc:
        _fail(f"{exc.filename}: {exc.strerror} (issue one with `meshfed trust issue`)")
    except TrustError as exc:
        _fail(f"{crt}: {exc}")
    expected = gateway_id(TrustDomain(trust_domain))
    if svid.spiffe_id != expected:
        _fail(f"{crt}: SVID is {svid.spiffe_id}, the gateway must be {expected}")
    return svid


def load_bundles(directory: Path) -> TrustBundleSet:
    """Every ``<trust-domain>.json`` SPIFFE bundle in ``directory`` (none if it is absent)."""
    bundles: dict[TrustDomain, tuple[Any, ...]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            td = TrustDomain(path.stem)
            bundle = TrustBundle.from_json(td, path.read_bytes())
        except (BundleError, ValueError, OSError) as exc:
            _fail(f"{path}: refused bundle: {exc}")
        bundles[td] = bundle.roots
    return TrustBundleSet(bundles)


def catalog_bundles(catalog: Catalog, path: Path) -> TrustBundleSet:
    """The bundles a static catalog carries (to seed the trust anchors)."""
    try:
        return TrustBundleSet.from_bundles(
            TrustBundle.from_json(TrustDomain(td), raw) for td, raw in catalog.bundles.items()
        )
    except (BundleError, ValueError) as exc:
        _fail(f"{path}: refused bundle: {exc}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", help="Deployment config (YAML).")],
    cluster: Annotated[str, typer.Option("--cluster", help="This gateway's cluster.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where the catalog is persisted.")],
    svid_dir: Annotated[
        Path | None, typer.Option("--svid-dir", help="svid.crt, svid.key (and bundles/).")
    ] = None,
    join_token: Annotated[
        str | None, typer.Option("--join-token", help="One-time token for the first SVID.")
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option("--agent", help="HOST:PORT of the cluster's agent (default: the config's)."),
    ] = None,
    catalog: Annotated[
        Path | None,
        typer.Option("--catalog", help="A static catalog JSON file (followed for changes)."),
    ] = None,
    bundles_dir: Annotated[
        Path | None, typer.Option("--bundles", help="Directory of SPIFFE bundle JSON files.")
    ] = None,
    passthrough_port: Annotated[int | None, typer.Option("--passthrough-port")] = None,
    tunnel_port: Annotated[int | None, typer.Option("--tunnel-port")] = None,
    admin_port: Annotated[int | None, typer.Option("--admin-port")] = None,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout")] = 10.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Serve SNI passthrough and HTTP/2 CONNECT tunnels for CLUSTER; probe peer gateways."""
    try:
        logs.configure(log_level, component="gateway", cluster=cluster)
    except ValueError as exc:
        _fail(str(exc))
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(f"{exc.issues[0]} (run `meshfed config validate {config}`)")
    except OSError as exc:
        _fail(f"{config}: {exc.strerror}")
    try:
        c = cfg.cluster(cluster)
    except KeyError:
        _fail(
            f"{config}: no cluster {cluster!r} (one of {', '.join(x.name for x in cfg.clusters)})"
        )
    if (svid_dir is None) == (join_token is None):
        _fail("give exactly one of --svid-dir and --join-token")
    if agent is not None and catalog is not None and join_token is None:
        _fail("--agent and --catalog: the catalog comes from one of them (drop one)")
    td = TrustDomain(c.trust_domain)
    my_id = gateway_id(td)
    agent_host, agent_port = c.agent.address, c.agent.catalog_port
    if agent is not None:
        host, _, port_text = agent.rpartition(":")
        if not host or not port_text.isdigit():
            _fail(f"--agent {agent}: want HOST:PORT")
        agent_host, agent_port = host.strip("[]"), int(port_text)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    static: StaticCatalog | None = None
    if catalog is not None:
        try:
            static = StaticCatalog.from_file(catalog)
        except OSError as exc:
            _fail(f"{catalog}: {exc.strerror}")
        except (RecordError, ValueError) as exc:
            _fail(f"{catalog}: {exc}")
        assert static.catalog is not None
        if static.catalog.local_cluster != cluster:
            _fail(f"{catalog}: is the catalog of {static.catalog.local_cluster}, not {cluster}")

    bdir = bundles_dir or ((svid_dir / "bundles") if svid_dir else (state_dir / "bundles"))
    bundles = load_bundles(bdir) if bdir.is_dir() else TrustBundleSet.empty()
    if not len(bundles) and static is not None:
        assert static.catalog is not None and catalog is not None
        bundles = catalog_bundles(static.catalog, catalog)
    if not len(bundles):
        _fail(
            f"{bdir}: no <trust-domain>.json bundle "
            "(meshfed trust bundle import, or a --catalog that carries bundles)"
        )
    svid: Svid | None = load_svid(svid_dir, c.trust_domain) if svid_dir is not None else None

    options = GatewayOptions(
        passthrough_port=passthrough_port,
        tunnel_port=tunnel_port,
        admin_port=admin_port,
        drain_timeout=drain_timeout,
    )

    async def main() -> None:
        from federation.catalog_client import CatalogClient

        first = svid
        if join_token is not None:
            try:
                first = await first_svid(
                    agent_host, agent_port, bundles, agent_id(td), my_id, join_token
                )
            except Exception as exc:  # AgentUnavailable or RequestRefused: both end the start
                typer.echo(
                    f"meshfed gateway: first SVID from the agent at {agent_host}:{agent_port}: "
                    f"{exc} (issue a fresh token: meshfed agent token --spiffe-id {my_id})",
                    err=True,
                )
                raise SystemExit(EXIT_AGENT) from None
        assert first is not None
        tls = TlsContextHolder(first, bundles)
        client = CatalogClient(
            agent_host,
            agent_port,
            tls,
            lambda: tls.bundles,
            agent_id(td),
            state_dir / "catalog.json",
        )
        source: CatalogSource = static if static is not None else client
        gateway = Gateway(
            c,
            cfg.federation.settings.gateway_probe,
            tls,
            lambda: source.catalog,
            options=options,
            source=source,
            renew=agent_renewer(client, my_id) if join_token is not None else None,
            rng=random.Random(),
            trust_domains={x.name: x.trust_domain for x in cfg.clusters},
        )
        async with trio.open_nursery() as nursery:
            if static is not None:
                assert catalog is not None
                nursery.start_soon(static.follow_file, catalog)
            else:
                await nursery.start(client.run)
            async with trio.open_nursery() as serving:
                try:
                    await serving.start(gateway.run)
                except OSError as exc:
                    typer.echo(f"meshfed gateway: cannot listen: {exc.strerror or exc}", err=True)
                    raise SystemExit(EXIT_INVALID) from None
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        gateway.stop()  # gateway.run returns once drained
                        break
            nursery.cancel_scope.cancel()

    trio.run(main)
