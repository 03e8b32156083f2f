"""Active probing of peer gateways, and the status the agent publishes for this gateway.

Pure part (no I/O, ``now`` and ``rng`` passed in):

* :class:`PeerProbe` is one peer gateway's state machine: ``failure_threshold``
  consecutive failures make it dead, one success makes it alive again (a gateway
  that answers a TLS handshake and a PING can carry tunnels); ``next_at`` spreads
  probes by ``jitter_percent`` of ``interval`` so probes from many gateways do not
  align. Before its first result a peer is ``None`` (unknown), which routes as
  alive: the catalog says it exists, and a failed dial fails fast anyway.
* :func:`gateway_status` computes what the agent publishes in this cluster's
  ``GatewayRecord``: healthy local endpoints per *exported* service, and peer
  liveness per remote cluster (alive if any of its gateways is).

Adapter: :func:`probe_gateway` is one probe (TCP connect, TLS 1.3 handshake
validating the peer's gateway SVID, HTTP/2 preface and a PING answered) within
``timeout``; :class:`Prober` runs one task per peer gateway from the catalog and
feeds the pool (dead peers fail fast) and the metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from federation.catalog import Catalog
from federation.config.model import GatewayProbeSettings
from gateway.metrics import GatewayMetrics
from gateway.tunnel import PeerKey, TunnelPool, peer_key
from gateway.tunnel_protocol import ConnectionClosed, PingAcked, TunnelProtocol
from trust.errors import HandshakeRefused
from trust.spiffe import TrustDomain, gateway_id
from trust.tls import TlsContextHolder, handshake_and_verify

__all__ = [
    "PeerProbe",
    "ProbeResult",
    "Prober",
    "gateway_status",
    "probe_gateway",
]

log = logging.getLogger("meshfed.gateway.probe")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe."""

    ok: bool
    """Handshake and PING succeeded within the timeout."""
    latency: float
    """Seconds the probe took (until success or failure)."""
    reason: str = ""
    """Why it failed: ``connect_failed``, ``timeout``, a handshake reason, ``closed``."""


@dataclass(slots=True)
class PeerProbe:
    """Liveness of one peer gateway as this gateway's probes see it."""

    settings: GatewayProbeSettings
    """Interval, timeout, failure threshold, jitter."""
    alive: bool | None = None
    """None until the first result, then the verdict."""
    failures: int = 0
    """Consecutive failed probes."""
    last: ProbeResult | None = None
    """The most recent result."""
    changed_at: float | None = field(default=None)
    """When ``alive`` last changed (adapter's clock)."""

    def record(self, result: ProbeResult, now: float) -> bool:
        """Apply one result; returns True when ``alive`` changed."""
        self.last = result
        before = self.alive
        if result.ok:
            self.failures = 0
            self.alive = True
        else:
            self.failures += 1
            if self.failures >= self.settings.failure_threshold:
                self.alive = False
        if self.alive != before:
            self.changed_at = now
            return True
        return False

    def next_at(self, now: float, rng: random.Random) -> float:
        """When to probe next: ``interval`` plus up to ``jitter_percent`` of it."""
        s = self.settings
        return now + s.interval * (1.0 + rng.uniform(0.0, s.jitter_percent / 100.0))

    def routable(self) -> bool:
        """Send new tunnels there? (unknown counts as yes)."""
        return self.alive is not False


def gateway_status(
    catalog: Catalog, cluster: str, probe_results: Mapping[str, bool | None]
) -> tuple[dict[str, int], dict[str, bool]]:
    """What ``cluster``'s gateway record should say: ``(healthy_endpoints, peer_alive)``.

    ``healthy_endpoints`` counts healthy endpoints of ``cluster`` per service that
    ``cluster`` exports to someone (``"<namespace>/<service>"``); unexported
    services are left out, so the count does not reveal them. ``probe_results``
    maps ``"<peer cluster>/<gateway id>"`` to the prober's verdict; a peer cluster is
    alive if any of its gateways is (unknown ones are left out until probed).
    The agent calls this and publishes the result; the gateway never writes to the store.
    """
    counts: dict[str, int] = {}
    for (ns, name), service in catalog.services.items():
        export = service.exports.get(cluster)
        if export is None or not export.exported_to:
            continue
        counts[f"{ns}/{name}"] = sum(
            1 for ep in service.endpoints if ep.cluster == cluster and ep.healthy
        )
    alive: dict[str, bool] = {}
    for key, verdict in probe_results.items():
        peer = key.split("/", 1)[0]
        if peer == cluster or verdict is None:
            continue
        alive[peer] = alive.get(peer, False) or verdict
    return dict(sorted(counts.items())), dict(sorted(alive.items()))


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def probe_gateway(
    tls: TlsContextHolder,
    host: str,
    port: int,
    trust_domain: str,
    *,
    deadline_s: float,
    now_fn: Callable[[], dt.datetime] = _utc_now,
) -> ProbeResult:
    """One probe: connect, mTLS handshake (peer must be that domain's gateway), PING."""
    start = trio.current_time()
    stream: trio.abc.Stream | None = None
    reason = "timeout"
    with trio.move_on_after(deadline_s):
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError:
            return ProbeResult(False, trio.current_time() - start, "connect_failed")
        ssl_stream = tls.wrap_client(tcp, "probe.gateway.meshfed")
        stream = ssl_stream
        try:
            await handshake_and_verify(
                ssl_stream,
                tls.bundles,
                now_fn,
                expected={gateway_id(TrustDomain(trust_domain))},
                handshake_timeout=deadline_s,
            )
            proto = TunnelProtocol("client")
            proto.ping(trio.current_time())
            await ssl_stream.send_all(proto.data_to_send())
            while True:
                data = await ssl_stream.receive_some(65536)
                if not data:
                    reason = "closed"
                    break
                events = proto.receive_data(data, trio.current_time())
                out = proto.data_to_send()
                if out:
                    await ssl_stream.send_all(out)
                if any(isinstance(e, PingAcked) for e in events):
                    proto.close("probe_done")
                    latency = trio.current_time() - start
                    with trio.move_on_after(0.1):
                        await ssl_stream.send_all(proto.data_to_send())
                    await trio.aclose_forcefully(ssl_stream)
                    return ProbeResult(True, latency)
                if any(isinstance(e, ConnectionClosed) for e in events):
                    reason = "closed"
                    break
        except HandshakeRefused as exc:
            reason = exc.reason
        except (trio.BrokenResourceError, OSError):
            reason = "closed"
    if stream is not None:
        await trio.aclose_forcefully(stream)
    return ProbeResult(False, trio.current_time() - start, reason)


class Prober:
    """Probe every peer gateway in the catalog; keep the pool and metrics current."""

    def __init__(
        self,
        tls: TlsContextHolder,
        settings: GatewayProbeSettings,
        catalog_fn: Callable[[], Catalog | None],
        *,
        pool: TunnelPool | None = None,
        metrics: GatewayMetrics | None = None,
        rng: random.Random | None = None,
        now_fn: Callable[[], dt.datetime] = _utc_now,
        rescan_interval: float = 1.0,
    ) -> None:
        self.tls = tls
        self.settings = settings
        self.catalog_fn = catalog_fn
        self.pool = pool
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.now_fn = now_fn
        self.rescan_interval = rescan_interval
        self.peers: dict[PeerKey, PeerProbe] = {}
        self._scopes: dict[PeerKey, trio.CancelScope] = {}

    def results(self) -> dict[str, bool | None]:
        """``"<cluster>/<gateway id>"`` -> alive (None until probed), for :func:`gateway_status`."""
        return {f"{k[0]}/{k[1]}": p.alive for k, p in sorted(self.peers.items())}

    def snapshot(self) -> list[dict[str, object]]:
        """Per peer gateway, for the admin endpoint."""
        out: list[dict[str, object]] = []
        for key, p in sorted(self.peers.items()):
            out.append(
                {
                    "cluster": key[0],
                    "gateway": key[1],
                    "address": f"{key[2]}:{key[3]}",
                    "alive": p.alive,
                    "consecutive_failures": p.failures,
                    "last_latency_s": p.last.latency if p.last else None,
                    "last_reason": p.last.reason if p.last else None,
                    "changed_at": p.changed_at,
                }
            )
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._sync(nursery)
                await trio.sleep(self.rescan_interval)

    def _sync(self, nursery: trio.Nursery) -> None:
        catalog = self.catalog_fn()
        if catalog is None:
            return
        wanted: dict[PeerKey, str] = {}
        for view in catalog.remote_clusters.values():
            if view.record is None:
                continue
            for gw in view.gateways:
                if "tunnel" in gw.modes and gw.tunnel_port:
                    wanted[peer_key(gw)] = view.record.trust_domain
        for key in list(self.peers):
            if key not in wanted:
                self._scopes.pop(key).cancel()
                del self.peers[key]
                if self.metrics is not None:
                    self.metrics.peer_alive.remove(key[0], key[1])
        for key, td in wanted.items():
            if key not in self.peers:
                self.peers[key] = PeerProbe(self.settings)
                scope = trio.CancelScope()
                self._scopes[key] = scope
                nursery.start_soon(self._probe_loop, key, td, scope)

    async def _probe_loop(self, key: PeerKey, td: str, scope: trio.CancelScope) -> None:
        with scope:
            state = self.peers[key]
            # First probe at a random point of one interval, so restarts do not align.
            await trio.sleep(self.rng.uniform(0.0, self.settings.interval))
            while True:
                result = await probe_gateway(
                    self.tls,
                    key[2],
                    key[3],
                    td,
                    deadline_s=self.settings.timeout,
                    now_fn=self.now_fn,
                )
                now = trio.current_time()
                changed = state.record(result, now)
                m = self.metrics
                if m is not None:
                    if result.ok:
                        m.probe_latency.labels(key[0], key[1]).observe(result.latency)
                    else:
                        m.probe_failures.labels(key[0], key[1], result.reason).inc()
                    if state.alive is not None:
                        m.peer_alive.labels(key[0], key[1]).set(1 if state.alive else 0)
                if changed:
                    log.warning(
                        "peer gateway %s",
                        "alive" if state.alive else "dead",
                        extra={
                            "event": "peer_liveness",
                            "peer_cluster": key[0],
                            "gateway": key[1],
                            "alive": state.alive,
                            "reason": result.reason,
                        },
                    )
                    if self.pool is not None and state.alive is not None:
                        self.pool.set_alive(key, state.alive)
                await trio.sleep_until(state.next_at(now, self.rng))
