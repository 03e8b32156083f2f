"""``run_agent``: one cluster's federation agent, every part started in one nursery.

Start-up order (each step refuses with :class:`AgentSetupError`, a one-line,
actionable message, before anything runs):

1. the cluster must be in the config; the CA directory must hold a CA of the
   cluster's trust domain (never created here: ``meshfed trust init``);
2. the persisted catalog is loaded from ``<state-dir>/catalog.json`` if present;
3. the admin server starts (``/ready`` is 503 until synced);
4. the store is opened, with backoff while it is unreachable (the persisted
   catalog is served meanwhile, not synced, degraded); then the import watch
   and the publisher run. ``task_status.started(agent)`` fires after step 3.

The catalog-stream server (``stream_server.py``) gets ``agent.source``,
``agent.registrar`` and ``agent.signer``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from federation.agent.admin import serve_admin
from federation.agent.gatewaywatch import watch_gateway
from federation.agent.health import StoreHealth
from federation.agent.importer import CatalogImporter, load_persisted
from federation.agent.metrics import AgentMetrics
from federation.agent.overview import fingerprints
from federation.agent.publisher import ClusterPublisher
from federation.agent.records import static_records
from federation.agent.registrar import EndpointRegistry
from federation.agent.registration import Phase, Registration
from federation.agent.signer import CaSigner
from federation.agent.stream_server import CatalogStreamServer, serve_catalog_stream
from federation.config.model import FederationConfig
from federation.jointoken import JoinTokenFile
from federation.model import EndpointRecord
from federation.store.api import Store, StoreUnavailable
from federation.store.etcd import EtcdConfig
from federation.store.open import open_store, parse_store_url
from trust.bundle import BundleKeeper
from trust.errors import CaKeyError, TrustError
from trust.rotation import CaDirectory, SvidRotator
from trust.spiffe import agent_id
from trust.svid import Svid
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

log = logging.getLogger(__name__)


class AgentSetupError(Exception):
    """The agent cannot start as asked; the message says what to do. CLI exit 2."""


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """Knobs beyond the config (flags, tests)."""

    takeover: bool = False
    """Take the cluster over from a live agent of another epoch (once, at start)."""
    admin_host: str | None = None
    """Bind the admin server here instead of ``clusters[].agent.address``."""
    admin_port: int | None = None
    """... and on this port (0: any) instead of ``clusters[].agent.admin_port``."""
    lease_ttl: float | None = None
    """Override ``settings.lease_ttl`` (tests)."""
    store_retry_max: float = 2.0
    """Cap of the backoff between attempts to open the store."""
    serve_admin: bool = True
    """Run the admin HTTP server (off in MockClock tests: no real sockets there)."""
    catalog_host: str | None = None
    """Bind the catalog stream here instead of ``clusters[].agent.address``."""
    catalog_port: int | None = None
    """... and on this port (0: any) instead of ``clusters[].agent.catalog_port``."""
    serve_catalog: bool = True
    """Serve the catalog stream (HTTP/2 + mTLS) to local sidecars and the gateway."""
    watch_gateway: bool = True
    """Poll the cluster gateway's admin ``/stats`` and publish its peer liveness."""
    assume_declared_healthy: bool = False
    """Publish config-declared endpoints healthy without a sidecar registration (for
    sidecars that run on a static catalog and never connect to the agent)."""
    wall: Callable[[], float] = time.time
    """Wall clock for ``written_at``, ``last_seen`` and sync lag."""
    file_io: Callable[[Callable[[], None]], Awaitable[None]] | None = None
    """Runs blocking disk writes (default: a trio worker thread)."""


JOIN_TOKEN_FILE = "join-tokens.json"  # noqa: S105 (a file name, not a secret)


def _stats_dict(stats: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, int | float)}
    return {}


def new_incarnation() -> str:
    """A fresh agent epoch: unique per process start."""
    return f"inc-{secrets.token_hex(6)}"


class Agent:
    """The parts of one running agent; also the admin server's view."""

    def __init__(
        self,
        config: FederationConfig,
        cluster: str,
        store_url: str,
        ca_dir: Path,
        state_dir: Path,
        options: AgentOptions | None = None,
    ) -> None:
        self.options = opts = options if options is not None else AgentOptions()
        try:
            self.cluster = config.cluster(cluster)
        except KeyError:
            names = ", ".join(c.name for c in config.clusters)
            raise AgentSetupError(
                f"no cluster {cluster!r} in the config (clusters: {names})"
            ) from None
        parse_store_url(store_url)  # InvalidStoreURL (a ValueError) before anything starts
        self.store_url = store_url
        self.config = config
        settings = config.federation.settings
        self.ca_dir = _open_ca(ca_dir, config, cluster)
        self.bundle = self.ca_dir.bundle()
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AgentSetupError(f"--state-dir {state_dir}: {exc.strerror}") from None
        self.state_dir = state_dir
        self.epoch = new_incarnation()
        self.started_at = opts.wall()
        self.ttl = opts.lease_ttl if opts.lease_ttl is not None else settings.lease_ttl
        self.sync_gate_timeout = settings.sync_gate_timeout
        self.sync_gate_expired = False
        self.metrics = AgentMetrics()
        self.health = StoreHealth()
        self.registration = Registration(self.epoch, self.ttl, takeover=opts.takeover)
        static = static_records(
            config,
            cluster,
            self.epoch,
            round(self.started_at, 6),
            declared_healthy=opts.assume_declared_healthy,
        )

        def declared(key: str) -> EndpointRecord | None:
            d = static.get(key)
            return d.record if d is not None and isinstance(d.record, EndpointRecord) else None

        self.registrar = EndpointRegistry(cluster, declared=declared)
        preloaded, self.persist_note = load_persisted(state_dir, cluster)
        self.source = CatalogImporter(
            cluster,
            self.epoch,
            health=self.health,
            metrics=self.metrics,
            keeper=BundleKeeper(),
            preloaded=preloaded,
            state_dir=state_dir,
            remote_stale_after=settings.remote_stale_after,
            wall=opts.wall,
            file_io=opts.file_io,
        )
        self.publisher = ClusterPublisher(
            self.cluster,
            static,
            self.registration,
            self.registrar,
            self.health,
            self.metrics,
            bundle=self.bundle,
            wall=opts.wall,
        )
        # The catalog shows this cluster as the agent publishes it, not as the store
        # last echoed it (docs/agent.md "Its own cluster's records").
        self.publisher.set_local_view(self.source.set_local_records)
        self.signer = CaSigner(self.ca_dir, ttl=dt.timedelta(seconds=settings.svid_ttl))
        self.svid_ttl = dt.timedelta(seconds=settings.svid_ttl)
        # The agent's own identity for the catalog stream; it holds the CA, so it
        # issues (and renews) its SVID locally. Subscribers must be of this domain.
        self.agent_id = agent_id(self.ca_dir.trust_domain)
        self.tls = TlsContextHolder(
            self._issue_own_svid(), TrustBundleSet.from_bundles([self.bundle])
        )
        self.join_tokens = JoinTokenFile(state_dir / JOIN_TOKEN_FILE)
        self.admin_port = 0
        self.catalog_port = 0
        self.stream: CatalogStreamServer | None = None

    def _issue_own_svid(self) -> Svid:
        return self.ca_dir.issue(self.agent_id, dt.datetime.now(dt.UTC), self.svid_ttl)

    async def _renew_own_svid(self) -> Svid:
        return self._issue_own_svid()

    # -- AdminView --

    def ready(self) -> bool:
        return self.source.synced

    def status(self) -> dict[str, Any]:
        reg = self.registration.status()
        src = self.source
        catalog = src.snapshot()
        now = self.options.wall()
        bundles = {
            td.name: {"sequence": b.sequence, "roots": fingerprints(b.roots)}
            for td, b in sorted(src.keeper.bundles().items(), key=lambda kv: kv[0].name)
        }
        return {
            "cluster": self.cluster.name,
            "epoch": self.epoch,
            "phase": reg.phase.value,
            "lease_id": f"{reg.lease_id:x}",
            "registrations": reg.registrations,
            "fences": reg.fences,
            "last_fence": reg.last_fence.value if reg.last_fence else None,
            "holder": reg.holder,
            "store": {
                "url": self.store_url,
                "up": self.health.up,
                "last_error": self.health.last_error,
            },
            "synced": src.synced,
            "degraded": src.degraded,
            "sync_gate_expired": self.sync_gate_expired,
            "catalog": {
                "epoch": catalog.epoch,
                "version": catalog.version,
                "entries": len(catalog.entries),
                "source": "store" if src.synced else ("persisted" if src.preloaded else "empty"),
                "local_records": "publisher" if src.local_from_publisher else "store",
            },
            "peers": {
                c: {"last_seen_age": round(max(0.0, now - t), 3)}
                for c, t in sorted(catalog.last_seen.items())
                if c != self.cluster.name
            },
            "catalog_stream": (
                {"port": self.catalog_port, **_stats_dict(self.stream.statistics())}
                if self.stream is not None
                else None
            ),
            "published_keys": len(self.publisher.written_keys()),
            "registered_endpoints": len(self.registrar.records()),
            "bundle": {
                "trust_domain": self.bundle.trust_domain.name,
                "sequence": self.bundle.sequence,
                "roots": fingerprints(self.bundle.roots),
                "published": self.publisher.bundle_published,
                "error": self.publisher.last_bundle_error or None,
            },
            "bundles": bundles,
            "bundle_refusals": {
                f"{td}/{reason}": n for (td, reason), n in src.keeper.refusal_counts().items()
            },
        }

    def catalog_json(self) -> bytes:
        return self.source.snapshot().to_json()

    def metrics_text(self) -> bytes:
        self.source.refresh_metrics()
        self.metrics.set_phase(self.registration.phase)
        return self.metrics.render()

    # -- running --

    async def run(
        self,
        *,
        store: Store | None = None,
        task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled. With ``store`` (an open one, e.g. ``meshfed up``'s embedded
        store) use it instead of opening ``store_url``."""
        host = self.options.admin_host or self.cluster.agent.address
        port = (
            self.options.admin_port
            if self.options.admin_port is not None
            else self.cluster.agent.admin_port
        )
        log.info("agent %s for cluster %s: %s", self.epoch, self.cluster.name, self.persist_note)
        async with trio.open_nursery() as nursery:
            if self.options.serve_admin:
                self.admin_port = await nursery.start(serve_admin, self, host, port)
            if self.options.serve_catalog:
                c_host = self.options.catalog_host or self.cluster.agent.address
                c_port = (
                    self.options.catalog_port
                    if self.options.catalog_port is not None
                    else self.cluster.agent.catalog_port
                )
                self.stream = await nursery.start(
                    partial(
                        serve_catalog_stream,
                        self.source,
                        self.registrar,
                        self.signer,
                        self.tls,
                        c_host,
                        c_port,
                        join_tokens=self.join_tokens,
                    )
                )
                self.catalog_port = self.stream.port or 0
                rotator = SvidRotator(self.tls, self._renew_own_svid, rng=random.Random())
                nursery.start_soon(rotator.run)
            nursery.start_soon(self.source.housekeeping)
            nursery.start_soon(self._sync_gate)
            if self.options.watch_gateway:
                gw = self.cluster.gateway
                nursery.start_soon(
                    partial(
                        watch_gateway,
                        gw.address,
                        gw.admin_port,
                        self.config.federation.settings.gateway_probe.interval,
                        self.publisher.set_peer_alive,
                    )
                )
            task_status.started(self)
            if store is None:
                await self._store_sessions()
            else:
                await self._session(store)

    async def _sync_gate(self) -> None:
        await trio.sleep(self.sync_gate_timeout)
        if not self.source.synced:
            self.sync_gate_expired = True
            log.warning(
                "not synced with the store %s after %.1fs; serving the %s catalog, "
                "/ready stays 503 until synced",
                self.store_url,
                self.sync_gate_timeout,
                "persisted" if self.source.preloaded else "empty",
            )

    async def _store_sessions(self) -> None:
        delay = 0.1
        # Calls must fail well within a TTL, or the local lease deadline could not be kept.
        call_timeout = max(0.5, min(5.0, self.ttl / 3))
        etcd_config = EtcdConfig(endpoints=("-",), call_timeout=call_timeout, connect_attempts=1)
        while True:
            try:
                async with open_store(self.store_url, etcd_config=etcd_config) as store:
                    delay = 0.1
                    self.health.ok(trio.current_time())
                    await self._session(store)
            except StoreUnavailable as exc:
                self.health.failed(trio.current_time(), exc)
                log.warning(
                    "store %s unavailable (%s); retrying in %.1fs", self.store_url, exc, delay
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self.options.store_retry_max)

    async def _session(self, store: Store) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.source.run, store)
            nursery.start_soon(self.publisher.run, store)

    @property
    def phase(self) -> Phase:
        return self.registration.phase


def _open_ca(ca_dir: Path, config: FederationConfig, cluster: str) -> CaDirectory:
    td = str(config.cluster(cluster).trust_domain)
    hint = f"create one with `meshfed trust init --dir {ca_dir} --trust-domain {td}`"
    if not ca_dir.is_dir() or not any(ca_dir.iterdir()):
        raise AgentSetupError(f"--ca-dir {ca_dir} holds no CA; {hint}")
    try:
        ca = CaDirectory.open(ca_dir)
        ca.active()  # checks the key: mode, owner, match with the certificate
        found = ca.trust_domain.name
    except (CaKeyError, TrustError) as exc:
        raise AgentSetupError(f"--ca-dir {ca_dir}: {exc}") from None
    if found != td:
        raise AgentSetupError(
            f"--ca-dir {ca_dir} is the CA of {found}, but cluster {cluster} is {td}; "
            f"point --ca-dir at {cluster}'s CA"
        )
    return ca


async def run_agent(
    config: FederationConfig,
    cluster: str,
    store_url: str,
    ca_dir: Path,
    state_dir: Path,
    options: AgentOptions | None = None,
    *,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one agent until cancelled; ``started(agent)`` once the admin server listens."""
    agent = Agent(config, cluster, store_url, ca_dir, state_dir, options)
    await agent.run(task_status=task_status)
