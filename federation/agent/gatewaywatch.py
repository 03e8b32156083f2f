"""Peer-gateway liveness, as the cluster's own gateway sees it, for the GatewayRecord.

The gateway probes its peers (TLS handshake + HTTP/2 PING on their tunnel ports)
but never writes to the store: the agent is the only writer of its cluster's
keys. So the agent asks its gateway's admin endpoint (``/stats``, field
``peer_alive``) every probe interval and publishes the answer in the cluster's
GatewayRecord; sidecars of this cluster then take a cluster their gateway cannot
reach out of rotation (sidecar/routing.py) within about one probe period plus
the catalog propagation, instead of discovering it connection by connection.

If the gateway does not answer, the last published liveness is *withdrawn*
(empty): a stale "alive" would be a lie, and "dead" would be a guess.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

import h11
import trio

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20


class AdminFetchError(Exception):
    """The admin endpoint could not be read; the message says why."""


async def fetch_json(host: str, port: int, path: str) -> object:
    """GET ``http://host:port/path`` and decode its JSON body (bounded size; the caller
    bounds the time with a cancel scope)."""
    conn = h11.Connection(h11.CLIENT)
    try:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            request = h11.Request(
                method="GET", target=path, headers=[("host", host), ("connection", "close")]
            )
            await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            status = 0
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise AdminFetchError(f"{host}:{port}{path}: body over {MAX_BODY}")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    except (OSError, h11.ProtocolError) as exc:
        raise AdminFetchError(f"{host}:{port}{path}: {exc}") from None
    if status != 200:
        raise AdminFetchError(f"{host}:{port}{path}: HTTP {status}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise AdminFetchError(f"{host}:{port}{path}: not JSON ({exc})") from None


def parse_peer_alive(stats: object) -> dict[str, bool]:
    """The ``peer_alive`` map of a gateway's ``/stats``; refuses anything malformed."""
    if not isinstance(stats, Mapping):
        raise AdminFetchError("gateway /stats is not a JSON object")
    alive = stats.get("peer_alive")
    if not isinstance(alive, Mapping) or not all(
        isinstance(k, str) and isinstance(v, bool) for k, v in alive.items()
    ):
        raise AdminFetchError("gateway /stats has no valid peer_alive map")
    return dict(sorted(alive.items()))


async def watch_gateway(
    host: str,
    port: int,
    interval: float,
    publish: Callable[[dict[str, bool]], None],
    *,
    answer_within: float | None = None,
) -> None:
    """Poll the gateway's ``/stats`` forever; ``publish`` the liveness map when it changes."""
    last: dict[str, bool] | None = None
    while True:
        limit = answer_within if answer_within else max(interval, 1.0)
        try:
            with trio.fail_after(limit):
                stats = await fetch_json(host, port, "/stats")
            alive = parse_peer_alive(stats)
        except trio.TooSlowError:
            if last:
                log.warning("gateway liveness withdrawn: no answer within %.1fs", limit)
            alive = {}
        except AdminFetchError as exc:
            if last:
                log.warning("gateway liveness withdrawn: %s", exc)
            alive = {}
        if alive != last:
            publish(alive)
            last = alive
        await trio.sleep(interval)
