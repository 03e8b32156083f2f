"""The sidecar process: its command line and start-up, shared by both entry points.

``python -m sidecar ...`` (what ``meshfed up``, the drill runner and the benchmark
launch) and ``meshfed sidecar run ...`` (the typer CLI, which forwards its arguments
here) parse the same :func:`parser` and run the same :func:`main`, so the two cannot
drift. This module and what it imports stay light: no typer/rich (the CLI's),
no etcd/grpc (the store's), no h2/h11 before a listener or the agent's catalog stream
needs them; ``tests/sidecar/test_entry_light.py`` holds that line (idle RSS,
docs/performance-notes.md).

Identity: ``--svid-dir D`` reads ``D/svid.crt`` (chain PEM, leaf first) and
``D/svid.key`` (0600), as ``meshfed trust issue --out D/svid`` writes them; or
``--join-token T`` asks the agent (``--agent HOST:PORT``, default from the config)
to sign a fresh key's CSR, then renews through the agent with the current SVID.
Trust anchors: every ``*.json`` SPIFFE bundle in ``--bundles DIR`` (default
``<svid-dir>/bundles``, else ``<state-dir>/bundles``), then whatever the catalog
carries. Catalog: ``--catalog FILE`` (a ``Catalog.to_json`` file, re-read when it
changes) or the agent's catalog stream, persisted in ``<state-dir>/catalog.json``.

Exit codes: 0 after a graceful drain (SIGTERM/SIGINT); 2 invalid input (usage, config,
workload, SVID, bundles, catalog file); 3 the agent is unavailable for the first SVID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

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

if TYPE_CHECKING:
    from federation.catalog_client import CatalogClient
    from trust.rotation import SvidRotator

__all__ = ["SUMMARY", "main", "parser"]

SUMMARY = "Run the sidecar of one workload instance until SIGTERM, then drain and exit 0."


class _Refused(Exception):
    """Start-up refused: ``code`` is the exit code, the message one line for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _replica(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_replica.__name__ = "non-negative integer"  # argparse names the type in its error


def parser(prog: str = "python -m sidecar") -> argparse.ArgumentParser:
    """The sidecar's command line (docs/sidecar.md); the one definition both entries use."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    add = p.add_argument
    add("--config", metavar="F", type=Path, required=True, help="Deployment config (YAML).")
    add("--workload", metavar="NAME", required=True, help="Workload name in the config.")
    add("--state-dir", metavar="S", type=Path, required=True, help="Writable state directory.")
    add("--replica", metavar="I", type=_replica, default=0, help="Instance index (default 0).")
    add("--cluster", metavar="C", help="The workload's cluster (names repeat across clusters).")
    add("--svid-dir", metavar="D", type=Path, help="Directory with svid.crt and svid.key.")
    add("--join-token", metavar="T", help="One-time token for the first SVID.")
    add("--agent", metavar="HOST:PORT", help="The agent (default: the config's).")
    add("--catalog", metavar="FILE", type=Path, help="Static catalog file instead of the agent.")
    add("--bundles", metavar="DIR", dest="bundles_dir", type=Path,
        help="Directory of SPIFFE bundle JSON files.")  # fmt: skip
    add("--drain", metavar="SECONDS", dest="drain_seconds", type=float, default=10.0,
        help="Drain deadline (default 10).")  # fmt: skip
    add("--inbound-rate", metavar="N", dest="rate", type=float, default=200.0,
        help="Inbound connections/s per caller (default 200).")  # fmt: skip
    add("--inbound-burst", metavar="N", dest="burst", type=float, default=400.0,
        help="Inbound burst per caller (default 400).")  # fmt: skip
    add("--log-level", metavar="LEVEL", default="INFO", help="Log level (default INFO).")
    return p


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_bundles(directory: Path) -> TrustBundleSet:
    bundles = []
    for path in sorted(directory.glob("*.json")):
        try:
            bundles.append(TrustBundle.from_json(TrustDomain(path.stem), path.read_bytes()))
        except (BundleError, ValueError) as exc:
            raise _Refused(2, f"{path}: refused bundle: {exc}") from None
    return TrustBundleSet.from_bundles(bundles)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m sidecar") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the sidecar until SIGTERM/SIGINT and
    its drain; the exit code. Usage errors exit 2 through argparse (``SystemExit``)."""
    args = parser(prog).parse_args(argv)
    try:
        _run(args)
    except _Refused as exc:
        _say(f"meshfed sidecar: {exc}")
        return exc.code
    _say(
        f"meshfed sidecar: {args.workload}/{args.replica} drained, exiting "
        f"({dt.datetime.now(dt.UTC).isoformat(timespec='seconds')})"
    )
    return 0


def _run(args: argparse.Namespace) -> None:
    config: Path = args.config
    workload: str = args.workload
    state_dir: Path = args.state_dir
    replica: int = args.replica
    cluster: str | None = args.cluster
    svid_dir: Path | None = args.svid_dir
    join_token: str | None = args.join_token
    catalog: Path | None = args.catalog
    bundles_dir: Path | None = args.bundles_dir

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    sidecar_log = logging.getLogger("meshfed.sidecar")
    sidecar_log.addHandler(handler)
    sidecar_log.setLevel(args.log_level.upper())
    sidecar_log.propagate = False
    if (svid_dir is None) == (join_token is None):
        raise _Refused(2, "give exactly one of --svid-dir and --join-token")
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        for issue in exc.issues:
            _say(str(issue))
        raise _Refused(2, f"{config}: invalid config") from None
    matches = [w for w in cfg.workloads if w.name == workload and cluster in (None, w.cluster)]
    if not matches:
        where = f" in cluster {cluster!r}" if cluster else ""
        raise _Refused(2, f"{config}: no workload named {workload!r}{where} (see `workloads:`)")
    if len(matches) > 1:
        clusters = ", ".join(w.cluster for w in matches)
        raise _Refused(2, f"{config}: workload {workload!r} is in {clusters}; add --cluster")
    wl = matches[0]
    qualified = f"{wl.cluster}/{wl.name}"
    if replica >= wl.replicas:
        raise _Refused(2, f"--replica {replica}: workload {workload} has {wl.replicas} replica(s)")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bdir = bundles_dir or ((svid_dir / "bundles") if svid_dir else (state_dir / "bundles"))
    bundles = _load_bundles(bdir) if bdir.is_dir() else TrustBundleSet.empty()
    source: StaticCatalog | None = None
    if catalog is not None:
        try:
            source = StaticCatalog.from_file(catalog)
        except (OSError, RecordError, ValueError) as exc:
            raise _Refused(2, f"{catalog}: {exc}") from None
        if not len(bundles):
            # A static catalog carries the bundles: seed the holder from them.
            assert source.catalog is not None
            docs = source.catalog.bundles
            try:
                bundles = TrustBundleSet.from_bundles(
                    TrustBundle.from_json(TrustDomain(td), raw) for td, raw in docs.items()
                )
            except (BundleError, ValueError) as exc:
                raise _Refused(2, f"{catalog}: refused bundle: {exc}") from None
    if not len(bundles):
        raise _Refused(2, f"no trust bundles: put SPIFFE bundle JSON files in {bdir}")
    home = cfg.cluster(wl.cluster)
    td = TrustDomain(home.trust_domain)
    my_id = workload_id(td, wl.namespace, wl.service_account)
    agent_host, agent_port = home.agent.address, home.agent.catalog_port
    if args.agent is not None:
        host, _, port_text = args.agent.rpartition(":")
        if not host or not port_text.isdigit():
            raise _Refused(2, f"--agent {args.agent!r}: write HOST:PORT")
        agent_host, agent_port = host.strip("[]"), int(port_text)
    options = SidecarOptions(
        replica=replica,
        drain_deadline=args.drain_seconds,
        rate_limit=RateLimitConfig(rate=args.rate, burst=args.burst),
    )

    async def run() -> None:
        svid: Svid
        if svid_dir is not None:
            try:
                svid = Svid.from_pem(
                    (svid_dir / "svid.crt").read_bytes(), (svid_dir / "svid.key").read_bytes()
                )
            except (OSError, TrustError) as exc:
                raise _Refused(2, f"{svid_dir}: {exc}") from None
            if svid.spiffe_id != my_id:
                raise _Refused(
                    2, f"{svid_dir}/svid.crt is {svid.spiffe_id}, workload needs {my_id}"
                )
        if join_token is not None:
            from federation.bootstrap import first_svid

            try:
                svid = await first_svid(
                    agent_host, agent_port, bundles, agent_id(td), my_id, join_token
                )
            except Exception as exc:  # AgentUnavailable or RequestRefused: both end the start
                msg = f"first SVID from the agent at {agent_host}:{agent_port}: {exc}"
                raise _Refused(3, msg) from None
        holder = TlsContextHolder(svid, bundles)
        client: CatalogClient | None = None
        feed: CatalogSource
        if source is not None:
            feed = source
        else:  # the catalog comes from the agent, over HTTP/2 (h2 loads only here)
            from federation.catalog_client import CatalogClient

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
                rotator = SvidRotator(holder, renew, rng=random.Random())
                sidecar.rotator = rotator
                nursery.start_soon(rotator.run)
                nursery.start_soon(renewal_signals, rotator)
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
                if sidecar.rotator is not None:
                    nursery.start_soon(identity_watch, sidecar, client, sidecar.rotator)
            # run() returns after the drain; then stop everything else.
            await sidecar_done(sidecar)
            nursery.cancel_scope.cancel()

    trio.run(run)


async def renewal_signals(rotator: SvidRotator) -> None:
    """SIGUSR1 freezes SVID renewal, SIGUSR2 resumes it (docs/drills.md, ``cert-expire``).

    An operator's knob to hold a workload's identity still (or to let it expire on
    purpose); ``/stats`` shows ``svid_renewal.frozen``. Nothing else changes: a frozen
    sidecar keeps its SVID until NotAfter, then every peer refuses it."""
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                rotator.freeze()
            else:
                rotator.thaw()
            state = "frozen" if rotator.statistics().frozen else "resumed"
            _say(f"meshfed sidecar: SVID renewal {state}")


async def identity_watch(
    sidecar: Sidecar, client: CatalogClient, rotator: SvidRotator, interval: float = 1.0
) -> None:
    """Withdraw this instance's endpoints while its SVID is lapsing (expired, or about to
    with renewal frozen or failing: :func:`trust.rotation.identity_lapsing`), so callers
    move away before their handshakes are refused; register them again once a renewal
    brought a fresh SVID. ``/stats`` shows ``withdrawn``."""
    from federation.catalog_client import CatalogClientError
    from trust.rotation import identity_lapsing

    while True:
        await trio.sleep(interval)
        svid = sidecar.holder.svid
        lapsing = identity_lapsing(
            rotator.statistics(), svid.not_before, svid.not_after, dt.datetime.now(dt.UTC)
        )
        if lapsing == sidecar.withdrawn:
            continue
        try:
            for record in sidecar.endpoint_records():
                if lapsing:
                    await client.deregister_endpoint(record.key())
                else:
                    await client.register_endpoint(record)
        except CatalogClientError as exc:  # retried on the next tick
            _say(f"meshfed sidecar: endpoint (de)registration failed: {exc}")
            continue
        sidecar.withdrawn = lapsing
        state = "withdrawn: SVID lapsing" if lapsing else "registered again: fresh SVID"
        _say(f"meshfed sidecar: endpoints {state}")


async def sidecar_done(sidecar: Sidecar) -> None:
    """Wait until ``sidecar.run`` has finished its drain."""
    await sidecar.finished.wait()
