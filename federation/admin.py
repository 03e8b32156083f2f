"""The admin endpoint every meshfed process serves: a tiny, strict HTTP/1.1 server.

GET/HEAD only, one request per connection, request head at most 8 KiB read
within 5 s; anything else gets 400/404/405 and the connection is closed. It
binds the component's ``admin_port``, meant for the cluster's operators,
probes and Prometheus, never the internet. Each component (agent, sidecar,
gateway) passes its own table of routes; the server itself knows no paths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Final

import trio

log = logging.getLogger(__name__)

MAX_HEAD: Final = 8192
READ_TIMEOUT: Final = 5.0
PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4"

#: An answer: (status code, body, content type).
Answer = tuple[int, bytes, str]
#: Routes: path -> a function computing the answer when that path is requested.
Routes = Mapping[str, Callable[[], Answer]]

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def json_answer(obj: object) -> Answer:
    """A 200 JSON answer (keys sorted, non-JSON values as ``str``)."""
    return 200, json.dumps(obj, indent=1, sort_keys=True, default=str).encode() + b"\n", (
        "application/json"
    )


def ready_answer(ready: bool, why_not: str = "not ready") -> Answer:
    """``/ready``: 200 when ready, else 503 with the reason."""
    if ready:
        return 200, b"ready\n", "text/plain"
    return 503, why_not.encode() + b"\n", "text/plain"


def response(code: int, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def parse_request_line(head: bytes) -> tuple[str, str] | None:
    """(method, path) from a request head, or None if it is not HTTP/1.x."""
    try:
        line = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    return parts[0], parts[1]


def respond(routes: Routes, method: str, path: str) -> bytes:
    """The full response for one request (pure apart from what the routes read)."""
    handler = routes.get(path.split("?", 1)[0])
    if handler is None:
        return response(404, b"unknown path\n", "text/plain")
    if method not in ("GET", "HEAD"):
        return response(405, b"GET only\n", "text/plain")
    resp = response(*handler())
    return resp[: resp.index(b"\r\n\r\n") + 4] if method == "HEAD" else resp


def respond_to_head(routes: Routes, head: bytes) -> bytes:
    """The response for a raw request head (400 if it is not a request line)."""
    parsed = parse_request_line(head) if b"\r\n\r\n" in head else None
    if parsed is None:
        return response(400, b"bad request\n", "text/plain")
    return respond(routes, *parsed)


async def handle(routes: Routes, stream: trio.abc.Stream) -> None:
    """Serve one connection: read one head (bounded), answer, close."""
    buf = bytearray()
    try:
        with trio.move_on_after(READ_TIMEOUT):
            while b"\r\n\r\n" not in buf and len(buf) <= MAX_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        await stream.send_all(respond_to_head(routes, bytes(buf)))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:  # one failing route must not take the admin server down
        log.exception("admin request failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_listeners(routes: Routes, listeners: list[trio.SocketListener]) -> None:
    """Serve until cancelled on already-bound ``listeners``."""

    async def handler(stream: trio.SocketStream) -> None:
        await handle(routes, stream)

    await trio.serve_listeners(handler, listeners)


async def serve(
    routes: Routes,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind ``host:port`` (0 picks one), ``started(bound port)``, serve until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await serve_listeners(routes, listeners)
