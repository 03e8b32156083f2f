"""A tiny HTTP/1.1 GET client (h11) for admin endpoints: ``/ready``, ``/status``,
``/stats``, ``/metrics``. Every call has a deadline; failures are values, not
exceptions, because a dead component is normal in a live view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import h11
import trio

__all__ = ["Fetched", "fetch_all", "http_get"]

MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int | None
    """HTTP status, or None when nothing answered."""
    body: bytes = b""
    error: str = ""

    def json(self) -> Any:
        if self.status != 200:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


# A probe owns its deadline (ASYNC109): a dead component must cost a bounded wait, and
# failures are values for the view, so callers never wrap these in a cancel scope.
async def http_get(addr: str, path: str, *, timeout: float = 2.0) -> Fetched:  # noqa: ASYNC109
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, int(port))
        except OSError as exc:
            return Fetched(None, error=exc.strerror or str(exc))
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            req = h11.Request(
                method="GET", target=path, headers=[("host", addr), ("connection", "close")]
            )
            try:
                await stream.send_all(
                    (conn.send(req) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                )
                status, body = 0, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            return Fetched(None, error="answer too large")
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        return Fetched(status, bytes(body))
            except (trio.BrokenResourceError, OSError, h11.ProtocolError) as exc:
                return Fetched(None, error=str(exc) or type(exc).__name__)
    return Fetched(None, error=f"no answer within {timeout}s")


async def fetch_all(
    requests: dict[str, tuple[str, str]],
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 (see http_get)
) -> dict[str, Fetched]:
    """Fetch many ``key -> (addr, path)`` concurrently."""
    out: dict[str, Fetched] = {}

    async def one(key: str, addr: str, path: str) -> None:
        out[key] = await http_get(addr, path, timeout=timeout)

    async with trio.open_nursery() as nursery:
        for key, (addr, path) in requests.items():
            nursery.start_soon(one, key, addr, path)
    return out
