"""The agent's admin endpoint: a tiny HTTP/1.1 server (GET only, one request per connection).

| path | answer |
| --- | --- |
| ``/ready`` | 200 once the first full sync with the store is done (the sync gate), else 503 |
| ``/status`` | JSON: registration phase, store health, sync, catalog version, peers, bundles |
| ``/catalog`` | the current catalog as JSON (``Catalog.to_obj``) |
| ``/metrics`` | Prometheus text, from the agent's own registry |

The request parser is deliberately small and strict: request line and headers
at most 8 KiB, read within 5 s; anything else gets 400/404/405 and the
connection is closed. It binds the agent's ``admin_port`` on its address, which
is meant for the cluster's operators and probes, never the internet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

MAX_HEAD = 8192
READ_TIMEOUT = 5.0


class AdminView(Protocol):
    """What the admin server asks of the agent."""

    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def catalog_json(self) -> bytes: ...

    def metrics_text(self) -> bytes: ...


def _response(code: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def route(view: AdminView, method: str, path: str) -> bytes:
    """The full response for one request (pure apart from reading ``view``)."""
    path = path.split("?", 1)[0]
    handlers: dict[str, Callable[[], tuple[int, str, bytes, str]]] = {
        "/ready": lambda: (
            (200, "OK", b"ready\n", "text/plain")
            if view.ready()
            else (503, "Service Unavailable", b"not synced\n", "text/plain")
        ),
        "/status": lambda: (
            200,
            "OK",
            json.dumps(view.status(), indent=1, sort_keys=True).encode() + b"\n",
            "application/json",
        ),
        "/catalog": lambda: (200, "OK", view.catalog_json(), "application/json"),
        "/metrics": lambda: (200, "OK", view.metrics_text(), "text/plain; version=0.0.4"),
    }
    handler = handlers.get(path)
    if handler is None:
        return _response(404, "Not Found", b"unknown path\n", "text/plain")
    if method not in ("GET", "HEAD"):
        return _response(405, "Method Not Allowed", b"GET only\n", "text/plain")
    code, reason, body, ctype = handler()
    resp = _response(code, reason, body, ctype)
    if method == "HEAD":
        return resp[: resp.index(b"\r\n\r\n") + 4]
    return resp


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


async def _handle(view: AdminView, stream: trio.abc.Stream) -> None:
    buf = bytearray()
    try:
        with trio.move_on_after(READ_TIMEOUT):
            while b"\r\n\r\n" not in buf and len(buf) <= MAX_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        parsed = parse_request_line(bytes(buf)) if b"\r\n\r\n" in buf else None
        if parsed is None:
            resp = _response(400, "Bad Request", b"bad request\n", "text/plain")
        else:
            resp = route(view, *parsed)
        await stream.send_all(resp)
    except trio.BrokenResourceError:
        pass
    except Exception:
        log.exception("admin request failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_admin(
    view: AdminView,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started(port)`` with the bound port (pass 0 for any)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, lambda s: _handle(view, s), listeners)
        task_status.started(bound)
