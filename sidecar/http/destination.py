"""The HTTP pipeline's view of an upstream's endpoints: picks per subset, pooled HTTP/2 streams.

:class:`PoolDestination` adapts one :class:`~sidecar.outbound.UpstreamPool` (catalog
candidates, health from catalog + active checks + outlier ejection, locality tiers)
to :class:`~sidecar.http.proxy.Destination`:

* ``pick(None)`` is the pool's own balancer (P2C least-request across tiers, with
  spillover). A split's subset gets a balancer of its own over the candidates in the
  subset (:func:`~sidecar.http.splits.in_subset` on the workload labels), rebuilt when
  the catalog changes and given the pool's effective health before each pick, so a
  canary's endpoints keep tiering and ejection without leaking into other subsets.
* ``open_stream(cand)`` takes a stream from that candidate's :class:`H2Pool`: one
  pool per candidate (its SNI and expected identity are the candidate's), dialled
  through ``UpstreamPool.dial`` (TCP + inner mTLS + SPIFFE check, outlier feedback),
  each connection inside the revocation enforcer's scope for its peer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from federation.config.model import Subset
from sidecar.balancer import Balancer, Pick
from sidecar.http.circuit import CircuitBreaker
from sidecar.http.h2io import H2Stream
from sidecar.http.headers import Header
from sidecar.http.keepalive import KeepaliveConfig
from sidecar.http.upstream import ConnectFailed, Dialed, H2Pool
from sidecar.outbound import DialFailed, UpstreamPool
from sidecar.routing import Candidate, RouteTable

__all__ = ["PoolDestination", "SubsetMembership"]

SubsetMembership = Callable[[Candidate, Subset], bool]
"""Whether a candidate belongs to a subset (from the config's workload labels)."""


class PoolDestination:
    """An :class:`UpstreamPool` as a :class:`~sidecar.http.proxy.Destination`."""

    def __init__(
        self,
        pool: UpstreamPool,
        subsets: dict[str, Subset],
        membership: SubsetMembership,
        breaker: CircuitBreaker,
        keepalive: KeepaliveConfig | None = None,
    ) -> None:
        self.pool = pool
        self.subsets = subsets
        self.membership = membership
        self.breaker = breaker
        self.keepalive = keepalive
        """PING/idle settings of the pooled connections (``traffic_policy.connection_pool``)."""
        self.nursery: trio.Nursery | None = None
        """Where pooled connections run (the sidecar's connection nursery)."""
        self.h2: dict[Candidate, H2Pool] = {}
        self._table: RouteTable | None = None
        self._subset_balancers: dict[str, Balancer[Candidate]] = {}

    # -- picks -------------------------------------------------------------------------

    def _sync(self) -> None:
        table = self.pool.table
        if table is self._table:
            return
        self._table = table
        live = set(table.candidates)
        for cand in [c for c in self.h2 if c not in live]:
            stale = self.h2.pop(cand)
            if self.nursery is not None:
                self.nursery.start_soon(stale.aclose)
        self._subset_balancers = {}
        for name, subset in self.subsets.items():
            members = [c for c in table.candidates if self.membership(c, subset)]
            b: Balancer[Candidate] = Balancer(self.pool.balancer.caller, self.pool.balancer.config)
            b.update(members)
            self._subset_balancers[name] = b

    def _balancer(self, subset: str | None) -> Balancer[Candidate]:
        self._sync()
        if subset is None:
            return self.pool.balancer
        b = self._subset_balancers[subset]
        main = self.pool.balancer
        for tier in b.tiers:
            for cand in tier.endpoints:
                b.set_healthy(cand, main.is_healthy(cand))
        return b

    def pick(
        self, subset: str | None, rng: random.Random, exclude: frozenset[Candidate]
    ) -> Pick[Candidate] | None:
        return self._balancer(subset).pick(rng, exclude)

    def on_start(self, cand: Candidate, subset: str | None) -> None:
        self.pool.balancer.on_start(cand)
        if subset is not None:
            self._subset_balancers[subset].on_start(cand)
        self.pool.active += 1

    def on_finish(self, cand: Candidate, subset: str | None) -> None:
        self.pool.balancer.on_finish(cand)
        if subset is not None and subset in self._subset_balancers:
            b = self._subset_balancers[subset]
            if b.active(cand) > 0:
                b.on_finish(cand)
        self.pool.active -= 1

    def report_response(self, cand: Candidate, status: int, grpc_status: int | None) -> None:
        self.pool.report_http(cand, status, grpc_status)

    # -- streams -----------------------------------------------------------------------

    async def open_stream(
        self, cand: Candidate, headers: list[Header], *, end_stream: bool
    ) -> H2Stream:
        pool = self.h2.get(cand)
        if pool is None:
            assert self.nursery is not None, "PoolDestination.nursery must be set before use"

            async def dial(cand: Candidate = cand) -> Dialed:
                try:
                    tls, peer = await self.pool.dial(cand)
                except DialFailed as exc:
                    raise ConnectFailed(exc.reason) from None
                return Dialed(tls, self.pool.enforcer.track(peer))

            pool = self.h2[cand] = H2Pool(
                cand.name, dial, self.nursery, breaker=self.breaker, keepalive=self.keepalive
            )
        return await pool.open_stream(headers, end_stream=end_stream)

    def statistics(self) -> dict[str, dict[str, int]]:
        """Per candidate: connections, dials (handshakes), dial failures, streams, and the
        connections lost to keepalive, closed idle, or draining after a GOAWAY."""
        out = {}
        for cand, pool in self.h2.items():
            st = pool.statistics()
            out[cand.name] = {
                "connections": st.connections,
                "dials": st.dials,
                "dial_failures": st.dial_failures,
                "streams": st.streams,
                "dead": st.dead,
                "idle_closed": st.idle_closed,
                "draining": st.draining,
            }
        return out
