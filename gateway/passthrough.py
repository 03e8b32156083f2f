"""The SNI listener (``passthrough_port``): read the ClientHello, route, splice or tunnel.

Per accepted connection:

1. :func:`read_client_hello` reads until the ClientHello is complete, under one
   deadline from accept (``hello_timeout``, default 5 s; a byte-trickling client
   does not extend it). Nothing is decrypted and nothing is answered.
2. The SNI is parsed strictly (:class:`sidecar.sni.MeshSni`) and routed by
   :func:`gateway.router.decide` with ``via="passthrough"``.
3. Inbound: connect to a local sidecar (locality-aware, next endpoint on a failed
   connect), replay the hello bytes and splice both sockets (``os.splice``, the
   payload never enters Python). Outbound: open a CONNECT stream through the pool,
   send the hello bytes, relay.
4. Refusals close the connection without a byte, count
   ``meshfed_gateway_refusals_total{listener="passthrough",reason}`` and log one
   JSON line. A refused caller's sidecar sees a connect-level failure and fails
   over to its next cluster (DESIGN.md "Locality and failover").
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from federation.catalog import Catalog
from federation.model import EndpointRecord
from gateway.clienthello import ClientHelloError, ClientHelloInfo, ClientHelloParser, NotTls
from gateway.metrics import GatewayMetrics
from gateway.router import Inbound, LocalBalancers, Outbound, RefusalReason, Refused, decide
from gateway.splice import detach_socket, splice_relay
from gateway.tunnel import TunnelError, TunnelPool
from sidecar.relay import RelayStats, relay
from sidecar.sni import BadSni, MeshSni

__all__ = [
    "HelloRefused",
    "PassthroughOptions",
    "connect_inbound",
    "handle_passthrough",
    "read_client_hello",
]

log = logging.getLogger("meshfed.gateway.passthrough")

HELLO_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class PassthroughOptions:
    """Limits of the SNI listener (seconds on trio's clock)."""

    hello_timeout: float = HELLO_TIMEOUT
    """From accept to a complete ClientHello; a stalled or trickling client is closed."""
    max_hello_bytes: int = 16384
    """Largest ClientHello accepted (the parser refuses bigger ones at once)."""
    connect_timeout: float = 1.0
    """TCP connect to one local sidecar."""
    connect_attempts: int = 3
    """Local endpoints tried for one inbound connection."""
    idle_timeout: float | None = 3600.0
    """Relay idle timeout (the service's ``timeouts.idle`` default)."""


class HelloRefused(Exception):
    """The connection did not start with a routable ClientHello; ``reason`` is stable."""

    def __init__(self, reason: RefusalReason, detail: str = "") -> None:
        self.reason: RefusalReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


async def read_client_hello(
    stream: trio.abc.ReceiveStream, *, deadline_s: float = HELLO_TIMEOUT, max_bytes: int = 16384
) -> tuple[ClientHelloInfo, MeshSni]:
    """Read and parse the ClientHello and its meshfed SNI within ``deadline_s`` of now."""
    parser = ClientHelloParser(max_bytes=max_bytes)
    result: ClientHelloInfo | None = None
    with trio.move_on_after(deadline_s):
        while True:
            data = await stream.receive_some(max_bytes)
            if not data:
                raise HelloRefused("bad_client_hello", "connection closed before the ClientHello")
            try:
                outcome = parser.feed(bytes(data))
            except NotTls as exc:
                raise HelloRefused("not_tls", exc.reason) from None
            except ClientHelloError as exc:
                reason: RefusalReason = "no_sni" if exc.reason == "no_sni" else "bad_client_hello"
                raise HelloRefused(reason, exc.reason) from None
            if isinstance(outcome, ClientHelloInfo):
                result = outcome
                break
    if result is None:
        raise HelloRefused("hello_timeout", f"no complete ClientHello within {deadline_s} s")
    try:
        sni = MeshSni.parse(result.require_sni())
    except ClientHelloError as exc:
        raise HelloRefused("no_sni", exc.reason) from None
    except BadSni as exc:
        raise HelloRefused("bad_sni", exc.reason) from None
    return result, sni


async def connect_inbound(
    route: Inbound,
    balancers: LocalBalancers,
    rng: random.Random,
    *,
    attempts: int,
    connect_timeout: float,
) -> tuple[trio.SocketStream, EndpointRecord]:
    """Connect to a local endpoint of ``route``, trying the next one on failure.

    Returns the stream and the endpoint (for ``on_finish``, already ``on_start``-ed); raises
    :class:`HelloRefused` ``upstream_connect_failed`` when every attempt failed.
    """
    last = "no endpoint to try"
    for pick in balancers.attempts(route, rng, attempts):
        ep = pick.endpoint
        try:
            with trio.fail_after(connect_timeout):
                upstream = await trio.open_tcp_stream(ep.address, ep.port)
        except (OSError, trio.TooSlowError) as exc:
            balancers.mark_failed(route, ep)
            last = f"{ep.address}:{ep.port}: {exc!r}"
            continue
        balancers.on_start(route, ep)
        return upstream, ep
    raise HelloRefused("upstream_connect_failed", last)


def _refuse(metrics: GatewayMetrics | None, listener: str, reason: str, detail: str) -> None:
    if metrics is not None:
        metrics.refuse(listener, reason)
    log.info(
        "connection refused",
        extra={"event": "refused", "listener": listener, "reason": reason, "detail": detail},
    )


async def handle_passthrough(
    client: trio.SocketStream,
    *,
    catalog_fn: Callable[[], Catalog | None],
    modes: tuple[str, ...],
    balancers: LocalBalancers,
    pool: TunnelPool,
    options: PassthroughOptions,
    metrics: GatewayMetrics | None,
    relay_stats: RelayStats | None,
    rng: random.Random,
) -> None:
    """Serve one connection accepted on the passthrough port (closes it in every case)."""
    try:
        try:
            info, sni = await read_client_hello(
                client, deadline_s=options.hello_timeout, max_bytes=options.max_hello_bytes
            )
        except HelloRefused as exc:
            _refuse(metrics, "passthrough", exc.reason, exc.detail)
            return
        catalog = catalog_fn()
        if catalog is None:
            _refuse(metrics, "passthrough", "unknown_cluster", "no catalog yet")
            return
        balancers.update(catalog)
        route = decide(catalog, sni, via="passthrough", modes=modes)
        if isinstance(route, Refused):
            _refuse(metrics, "passthrough", route.reason, route.detail)
            return
        service = f"{sni.namespace}/{sni.service}"
        if isinstance(route, Inbound):
            await _inbound(
                client, info, route, service, balancers, options, metrics, relay_stats, rng
            )
        else:
            await _outbound(client, info, route, service, pool, options, metrics, relay_stats)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info("passthrough connection broke", extra={"event": "broken", "detail": repr(exc)})
    finally:
        await trio.aclose_forcefully(client)


async def _inbound(
    client: trio.SocketStream,
    info: ClientHelloInfo,
    route: Inbound,
    service: str,
    balancers: LocalBalancers,
    options: PassthroughOptions,
    metrics: GatewayMetrics | None,
    relay_stats: RelayStats | None,
    rng: random.Random,
) -> None:
    sni = route.sni
    try:
        upstream, ep = await connect_inbound(
            route,
            balancers,
            rng,
            attempts=options.connect_attempts,
            connect_timeout=options.connect_timeout,
        )
    except HelloRefused as exc:
        _refuse(metrics, "passthrough", exc.reason, exc.detail)
        return
    if metrics is not None:
        metrics.connections.labels(
            "passthrough", "inbound", sni.source_cluster, sni.target_cluster, service
        ).inc()
        metrics.active.labels("passthrough", "inbound").inc()
    try:
        result = await splice_relay(
            detach_socket(client),
            detach_socket(upstream),
            initial_to_b=info.raw,
            idle_timeout=options.idle_timeout,
            stats=relay_stats,
        )
        if metrics is not None:
            metrics.bytes.labels("passthrough", "inbound", service, "to_destination").inc(
                result.bytes_a_to_b
            )
            metrics.bytes.labels("passthrough", "inbound", service, "from_destination").inc(
                result.bytes_b_to_a
            )
    finally:
        balancers.on_finish(route, ep)
        if metrics is not None:
            metrics.active.labels("passthrough", "inbound").dec()


async def _outbound(
    client: trio.SocketStream,
    info: ClientHelloInfo,
    route: Outbound,
    service: str,
    pool: TunnelPool,
    options: PassthroughOptions,
    metrics: GatewayMetrics | None,
    relay_stats: RelayStats | None,
) -> None:
    sni = route.sni
    try:
        stream = await pool.open_stream(route.gateways, route.trust_domain, sni.format())
    except TunnelError as exc:
        reason = exc.reason if exc.reason in _TUNNEL_REASONS else "tunnel_failed"
        _refuse(metrics, "passthrough", reason, exc.detail)
        return
    if metrics is not None:
        metrics.connections.labels(
            "tunnel", "outbound", sni.source_cluster, sni.target_cluster, service
        ).inc()
        metrics.active.labels("tunnel", "outbound").inc()
    try:
        await stream.send_all(info.raw)
        result = await relay(client, stream, idle_timeout=options.idle_timeout, stats=relay_stats)
        log.debug(
            "outbound relay ended", extra={"reason": result.reason.value, "detail": repr(result)}
        )
        if metrics is not None:
            metrics.bytes.labels("tunnel", "outbound", service, "to_destination").inc(
                result.bytes_a_to_b + len(info.raw)
            )
            metrics.bytes.labels("tunnel", "outbound", service, "from_destination").inc(
                result.bytes_b_to_a
            )
    finally:
        await stream.aclose()
        if metrics is not None:
            metrics.active.labels("tunnel", "outbound").dec()


_TUNNEL_REASONS: Final = frozenset(
    {
        "peer_down",
        "tunnel_failed",
        "draining",
        "not_exported",
        "unknown_service",
        "unknown_port",
        "no_endpoint",
        "source_mismatch",
        "transit",
        "upstream_connect_failed",
        "bad_sni",
    }
)
"""Peer refusal reasons passed through as our own label; anything else is tunnel_failed."""
