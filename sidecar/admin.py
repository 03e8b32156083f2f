"""The sidecar's admin endpoint on the workload's ``admin_port``: HTTP/1.1, GET only.

| path | answer |
| --- | --- |
| ``/ready`` | 200 once listeners are up and a catalog is held, 503 otherwise (and while draining) |
| ``/stats`` | JSON: per upstream its tiers, candidates with health sources, connection counts |
| ``/catalog`` | the catalog in use (``Catalog.to_obj``) |
| ``/config`` | JSON: this workload's resolved settings (listeners, limits, identity) |
| ``/metrics`` | Prometheus text |

The agent's admin server (``federation/agent/admin.py``) hard-codes its paths, so
this is a small server of its own that reuses the agent's strict request-line
parser and the same limits: 8 KiB of head within 5 s, one request per connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

import trio

from federation.agent.admin import parse_request_line

__all__ = ["SidecarAdminView", "respond", "serve_admin"]

log = logging.getLogger(__name__)

MAX_HEAD: Final = 8192
READ_TIMEOUT: Final = 5.0


class SidecarAdminView(Protocol):
    """What the admin server reads from the sidecar."""

    def ready(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def catalog_obj(self) -> dict[str, Any] | None: ...

    def config_obj(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...


def _response(code: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _json(obj: object) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode() + b"\n"


def respond(view: SidecarAdminView, method: str, path: str) -> bytes:
    """The full response to one request (pure apart from reading ``view``)."""
    path = path.split("?", 1)[0]
    handlers: dict[str, Callable[[], tuple[int, str, bytes, str]]] = {
        "/ready": lambda: (
            (200, "OK", b"ready\n", "text/plain")
            if view.ready()
            else (503, "Service Unavailable", b"not ready\n", "text/plain")
        ),
        "/stats": lambda: (200, "OK", _json(view.stats()), "application/json"),
        "/catalog": lambda: (200, "OK", _json(view.catalog_obj()), "application/json"),
        "/config": lambda: (200, "OK", _json(view.config_obj()), "application/json"),
        "/metrics": lambda: (200, "OK", view.metrics_text(), "text/plain; version=0.0.4"),
    }
    handler = handlers.get(path)
    if handler is None:
        return _response(404, "Not Found", b"unknown path\n", "text/plain")
    if method not in ("GET", "HEAD"):
        return _response(405, "Method Not Allowed", b"GET only\n", "text/plain")
    resp = _response(*handler())
    return resp[: resp.index(b"\r\n\r\n") + 4] if method == "HEAD" else resp


async def _handle(view: SidecarAdminView, stream: trio.abc.Stream) -> None:
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
            resp = respond(view, *parsed)
        await stream.send_all(resp)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:  # one bad view call must not take the admin server down
        log.exception("admin request failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_admin(
    view: SidecarAdminView,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started(port)`` with the bound port (0 picks one)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(view, stream)

    await trio.serve_listeners(handler, listeners)
