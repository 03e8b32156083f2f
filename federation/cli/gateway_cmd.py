"""``meshfed gateway run``: the east-west gateway of one cluster (docs/gateway.md).

Identity: ``--svid-dir D`` holds ``D/svid.crt`` (chain), ``D/svid.key`` (0600, as
written by ``meshfed trust issue``) and ``D/bundles/<trust-domain>.json`` (SPIFFE
bundles, as written by ``meshfed trust bundle import --into D/bundles``). The SVID
must be this cluster's gateway ID. Catalog: ``--agent HOST:PORT`` (the catalog
stream, persisted under ``--state-dir``) or ``--catalog FILE`` (a static
``Catalog.to_json`` document, for tests and air-gapped setups).

Exit codes (docs/cli.md): 2 invalid input, one line saying what to do; 0 after
SIGTERM/SIGINT once live connections drained (``drain_timeout``).
"""

from __future__ import annotations

import json
import logging
import signal
import stat
from pathlib import Path
from typing import Annotated, Any, NoReturn

import trio
import typer

from federation.catalog import Catalog
from federation.config.errors import ConfigError
from federation.config.loader import load_config
from federation.model import RecordError
from gateway.runner import Gateway, GatewayOptions
from trust.bundle import TrustBundle
from trust.errors import BundleError, TrustError
from trust.spiffe import TrustDomain, agent_id, gateway_id
from trust.svid import Svid
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

EXIT_INVALID = 2

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, cluster, message and any ``extra``."""

    def __init__(self, cluster: str) -> None:
        super().__init__()
        self.cluster = cluster

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "t": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "cluster": self.cluster,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _fail(message: str) -> NoReturn:
    typer.echo(f"meshfed gateway: {message}", err=True)
    raise typer.Exit(EXIT_INVALID)


def load_identity(svid_dir: Path, trust_domain: str) -> tuple[Svid, TrustBundleSet]:
    """The gateway SVID and the federated bundles from ``svid_dir`` (see the module doc)."""
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
    bundles: dict[TrustDomain, tuple[Any, ...]] = {}
    for path in sorted((svid_dir / "bundles").glob("*.json")):
        td = TrustDomain(path.stem)
        try:
            bundle = TrustBundle.from_json(td, path.read_bytes())
        except BundleError as exc:
            _fail(f"{path}: {exc}")
        bundles[td] = bundle.roots
    if not bundles:
        _fail(
            f"{svid_dir / 'bundles'}: no <trust-domain>.json bundle (meshfed trust bundle import)"
        )
    return svid, TrustBundleSet(bundles)


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", help="Deployment config (YAML).")],
    cluster: Annotated[str, typer.Option("--cluster", help="This gateway's cluster.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where the catalog is persisted.")],
    svid_dir: Annotated[
        Path | None, typer.Option("--svid-dir", help="svid.crt, svid.key, bundles/*.json.")
    ] = None,
    join_token: Annotated[
        str | None, typer.Option("--join-token", help="Bootstrap the SVID from the agent.")
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="HOST:PORT of the cluster's agent.")
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option("--catalog", help="A static catalog JSON file.")
    ] = None,
    passthrough_port: Annotated[int | None, typer.Option("--passthrough-port")] = None,
    tunnel_port: Annotated[int | None, typer.Option("--tunnel-port")] = None,
    admin_port: Annotated[int | None, typer.Option("--admin-port")] = None,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout")] = 10.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Serve SNI passthrough and HTTP/2 CONNECT tunnels for CLUSTER; probe peer gateways."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(cluster))
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), handlers=[handler])
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
    if (agent is None) == (catalog is None):
        _fail("give exactly one of --agent and --catalog")
    if join_token is not None:
        _fail(
            "--join-token is not supported yet: issue the gateway SVID with "
            "`meshfed trust issue --spiffe-id "
            f"{gateway_id(TrustDomain(c.trust_domain))}` and pass --svid-dir"
        )
    assert svid_dir is not None
    svid, bundles = load_identity(svid_dir, c.trust_domain)
    tls = TlsContextHolder(svid, bundles)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    static: Catalog | None = None
    if catalog is not None:
        try:
            static = Catalog.from_json(catalog.read_bytes())
        except OSError as exc:
            _fail(f"{catalog}: {exc.strerror}")
        except RecordError as exc:
            _fail(f"{catalog}: {exc}")
        if static.local_cluster != cluster:
            _fail(f"{catalog}: is the catalog of {static.local_cluster}, not {cluster}")

    options = GatewayOptions(
        passthrough_port=passthrough_port,
        tunnel_port=tunnel_port,
        admin_port=admin_port,
        drain_timeout=drain_timeout,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if static is not None:
                snapshot = static

                def catalog_fn() -> Catalog | None:
                    return snapshot

            else:
                from federation.catalog_client import CatalogClient

                assert agent is not None
                host, _, port = agent.rpartition(":")
                client = CatalogClient(
                    host,
                    int(port) if port.isdigit() else _fail(f"--agent {agent}: want HOST:PORT"),
                    tls,
                    lambda: tls.bundles,
                    agent_id(TrustDomain(c.trust_domain)),
                    state_dir / "catalog.json",
                )
                await nursery.start(client.run)

                def catalog_fn() -> Catalog | None:
                    return client.catalog

            gateway = Gateway(
                c, cfg.federation.settings.gateway_probe, tls, catalog_fn, options=options
            )
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
