"""``meshfed sidecar run``: one workload instance's L4 sidecar (docs/sidecar.md).

Identity: ``--svid-dir D`` reads ``D/svid.crt`` (chain PEM, leaf first) and
``D/svid.key`` (0600), as ``meshfed trust issue --out D/svid`` writes them; or
``--join-token T`` asks the agent (``--agent HOST:PORT``, default from the config)
to sign a fresh key's CSR, then renews through the agent with the current SVID.
Trust anchors: every ``*.json`` SPIFFE bundle in ``--bundles DIR`` (default
``<svid-dir>/bundles``, else ``<state-dir>/bundles``), then whatever the catalog
carries. Catalog: ``--catalog FILE`` (a ``Catalog.to_json`` file, re-read when it
changes) or the agent's catalog stream, persisted in ``<state-dir>/catalog.json``.

Exit codes: 0 after a graceful drain (SIGTERM/SIGINT); 2 invalid input (config,
workload, SVID, bundles, catalog file); 3 the agent is unavailable for the first SVID.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import signal
import sys
from pathlib import Path
from typing import Annotated

import trio
import typer

from federation.config import ConfigError, load_config
from federation.model import RecordError
from sidecar.ratelimit import RateLimitConfig
from sidecar.runner import CatalogSource, Sidecar, SidecarOptions, StaticCatalog
from trust.bundle import TrustBundle
from trust.errors import BundleError, TrustError
from trust.spiffe import TrustDomain, agent_id, workload_id
from trust.svid import Svid
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

app = typer.Typer(no_args_is_help=True, add_completion=False)


def _fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"meshfed sidecar: {message}", err=True)
    return typer.Exit(code)


def _load_bundles(directory: Path) -> TrustBundleSet:
    bundles = []
    for path in sorted(directory.glob("*.json")):
        try:
            bundles.append(TrustBundle.from_json(TrustDomain(path.stem), path.read_bytes()))
        except (BundleError, ValueError) as exc:
            raise _fail(2, f"{path}: refused bundle: {exc}") from None
    return TrustBundleSet.from_bundles(bundles)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


@app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", help="Deployment config (YAML).")],
    workload: Annotated[str, typer.Option("--workload", help="Workload name in the config.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Writable state directory.")],
    replica: Annotated[int, typer.Option("--replica", min=0, help="Instance index.")] = 0,
    cluster: Annotated[
        str | None,
        typer.Option("--cluster", help="The workload's cluster (names repeat across clusters)."),
    ] = None,
    svid_dir: Annotated[
        Path | None, typer.Option("--svid-dir", help="Directory with svid.crt and svid.key.")
    ] = None,
    join_token: Annotated[
        str | None, typer.Option("--join-token", help="One-time token for the first SVID.")
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Agent HOST:PORT (default: the config's).")
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option("--catalog", help="Static catalog file instead of the agent.")
    ] = None,
    bundles_dir: Annotated[
        Path | None, typer.Option("--bundles", help="Directory of SPIFFE bundle JSON files.")
    ] = None,
    drain_seconds: Annotated[float, typer.Option("--drain", help="Drain deadline (s).")] = 10.0,
    rate: Annotated[float, typer.Option("--inbound-rate", help="Conns/s per caller.")] = 200.0,
    burst: Annotated[float, typer.Option("--inbound-burst", help="Burst per caller.")] = 400.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Run the sidecar of one workload instance until SIGTERM, then drain and exit 0."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    sidecar_log = logging.getLogger("meshfed.sidecar")
    sidecar_log.addHandler(handler)
    sidecar_log.setLevel(log_level.upper())
    sidecar_log.propagate = False
    if (svid_dir is None) == (join_token is None):
        raise _fail(2, "give exactly one of --svid-dir and --join-token")
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        for issue in exc.issues:
            typer.echo(str(issue), err=True)
        raise _fail(2, f"{config}: invalid config") from None
    matches = [
        w for w in cfg.workloads if w.name == workload and cluster in (None, w.cluster)
    ]
    if not matches:
        where = f" in cluster {cluster!r}" if cluster else ""
        raise _fail(2, f"{config}: no workload named {workload!r}{where} (see `workloads:`)")
    if len(matches) > 1:
        clusters = ", ".join(w.cluster for w in matches)
        raise _fail(2, f"{config}: workload {workload!r} is in {clusters}; add --cluster")
    wl = matches[0]
    qualified = f"{wl.cluster}/{wl.name}"
    if replica >= wl.replicas:
        raise _fail(2, f"--replica {replica}: workload {workload} has {wl.replicas} replica(s)")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bdir = bundles_dir or ((svid_dir / "bundles") if svid_dir else (state_dir / "bundles"))
    bundles = _load_bundles(bdir) if bdir.is_dir() else TrustBundleSet.empty()
    source: StaticCatalog | None = None
    if catalog is not None:
        try:
            source = StaticCatalog.from_file(catalog)
        except (OSError, RecordError, ValueError) as exc:
            raise _fail(2, f"{catalog}: {exc}") from None
        if not len(bundles):
            # A static catalog carries the bundles: seed the holder from them.
            assert source.catalog is not None
            docs = source.catalog.bundles
            try:
                bundles = TrustBundleSet.from_bundles(
                    TrustBundle.from_json(TrustDomain(td), raw) for td, raw in docs.items()
                )
            except (BundleError, ValueError) as exc:
                raise _fail(2, f"{catalog}: refused bundle: {exc}") from None
    if not len(bundles):
        raise _fail(2, f"no trust bundles: put SPIFFE bundle JSON files in {bdir}")
    home = cfg.cluster(wl.cluster)
    td = TrustDomain(home.trust_domain)
    my_id = workload_id(td, wl.namespace, wl.service_account)
    agent_host, agent_port = home.agent.address, home.agent.catalog_port
    if agent is not None:
        host, _, port_text = agent.rpartition(":")
        if not host or not port_text.isdigit():
            raise _fail(2, f"--agent {agent!r}: write HOST:PORT")
        agent_host, agent_port = host.strip("[]"), int(port_text)
    options = SidecarOptions(
        replica=replica,
        drain_deadline=drain_seconds,
        rate_limit=RateLimitConfig(rate=rate, burst=burst),
    )

    async def main() -> None:
        from federation.catalog_client import CatalogClient

        svid: Svid
        if svid_dir is not None:
            try:
                svid = Svid.from_pem(
                    (svid_dir / "svid.crt").read_bytes(), (svid_dir / "svid.key").read_bytes()
                )
            except (OSError, TrustError) as exc:
                raise _fail(2, f"{svid_dir}: {exc}") from None
            if svid.spiffe_id != my_id:
                raise _fail(2, f"{svid_dir}/svid.crt is {svid.spiffe_id}, workload needs {my_id}")
        if join_token is not None:
            from federation.bootstrap import first_svid

            try:
                svid = await first_svid(
                    agent_host, agent_port, bundles, agent_id(td), my_id, join_token
                )
            except Exception as exc:  # AgentUnavailable or RequestRefused: both end the start
                msg = f"first SVID from the agent at {agent_host}:{agent_port}: {exc}"
                raise _fail(3, msg) from None
        holder = TlsContextHolder(svid, bundles)
        client: CatalogClient | None = None
        feed: CatalogSource
        if source is not None:
            feed = source
        else:  # the catalog comes from the agent
            client = CatalogClient(
                agent_host,
                agent_port,
                holder,
                lambda: holder.bundles,
                agent_id(td),
                state_dir / f"catalog-{workload}-{replica}.json",
            )
            feed = client
        sidecar = Sidecar(cfg, qualified, holder, feed, options=options)

        async with trio.open_nursery() as nursery:
            if client is not None:
                await nursery.start(client.run)
                from federation.bootstrap import agent_renewer
                from trust.rotation import SvidRotator

                renew = agent_renewer(client, my_id)
                nursery.start_soon(SvidRotator(holder, renew, rng=random.Random()).run)
            elif catalog is not None and source is not None:
                nursery.start_soon(source.follow_file, catalog)

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        sidecar.stop()
                        return

            nursery.start_soon(on_signals)
            await nursery.start(sidecar.run)
            if client is not None:
                for record in sidecar.endpoint_records():
                    await client.register_endpoint(record)
            # run() returns after the drain; then stop everything else.
            await sidecar_done(sidecar)
            nursery.cancel_scope.cancel()

    trio.run(main)
    typer.echo(
        f"meshfed sidecar: {workload}/{replica} drained, exiting "
        f"({dt.datetime.now(dt.UTC).isoformat(timespec='seconds')})",
        err=True,
    )


async def sidecar_done(sidecar: Sidecar) -> None:
    """Wait until ``sidecar.run`` has finished its drain."""
    await sidecar.finished.wait()
