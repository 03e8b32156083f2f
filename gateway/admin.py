"""The gateway's admin endpoint on ``admin_port``: ``/ready``, ``/stats``, ``/metrics``.

A deliberately small HTTP/1.1 server (GET/HEAD, one request per connection,
head at most 8 KiB read within 5 s). The agent has an admin server of the same
shape (``federation/agent/admin.py``) with other paths; this one is separate so
the gateway does not depend on the agent's module (``federation`` may not import
``gateway`` either way round, and the two evolve independently).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

import trio

__all__ = ["AdminView", "render", "serve_admin"]

log = logging.getLogger("meshfed.gateway.admin")

MAX_HEAD: Final = 8192
READ_TIMEOUT: Final = 5.0


class AdminView(Protocol):
    """What the admin server asks of the gateway."""

    def ready(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...


def _response(code: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def render(view: AdminView, head: bytes) -> bytes:
    """The full response to one request head (pure apart from reading ``view``)."""
    try:
        line = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        line = ""
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return _response(400, "Bad Request", b"bad request\n", "text/plain")
    method, path = parts[0], parts[1].split("?", 1)[0]
    handlers: dict[str, Callable[[], tuple[int, str, bytes, str]]] = {
        "/ready": lambda: (
            (200, "OK", b"ready\n", "text/plain")
            if view.ready()
            else (503, "Service Unavailable", b"not ready\n", "text/plain")
        ),
        "/stats": lambda: (
            200,
            "OK",
            json.dumps(view.stats(), indent=1, sort_keys=True, default=str).encode() + b"\n",
            "application/json",
        ),
        "/metrics": lambda: (200, "OK", view.metrics_text(), "text/plain; version=0.0.4"),
    }
    handler = handlers.get(path)
    if handler is None:
        return _response(404, "Not Found", b"unknown path\n", "text/plain")
    if method not in ("GET", "HEAD"):
        return _response(405, "Method Not Allowed", b"GET only\n", "text/plain")
    resp = _response(*handler())
    return resp[: resp.index(b"\r\n\r\n") + 4] if method == "HEAD" else resp


async def _handle(view: AdminView, stream: trio.abc.Stream) -> None:
    buf = bytearray()
    try:
        with trio.move_on_after(READ_TIMEOUT):
            while b"\r\n\r\n" not in buf and len(buf) <= MAX_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        if b"\r\n\r\n" in buf:
            resp = render(view, bytes(buf))
        else:
            resp = _response(400, "Bad Request", b"bad request\n", "text/plain")
        await stream.send_all(resp)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("admin request failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_admin(
    view: AdminView,
    listeners: list[trio.SocketListener],
) -> None:
    """Serve until cancelled on already-bound ``listeners``."""

    async def handle(stream: trio.SocketStream) -> None:
        await _handle(view, stream)

    await trio.serve_listeners(handle, listeners)
