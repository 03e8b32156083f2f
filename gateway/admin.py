"""The gateway's admin routes on ``admin_port``: ``/ready``, ``/stats``, ``/metrics``
(served by federation.admin, the server every meshfed process uses)."""

from __future__ import annotations

from typing import Any, Protocol

import trio

from federation import admin

__all__ = ["AdminView", "render", "serve_admin"]


class AdminView(Protocol):
    """What the admin server asks of the gateway."""

    def ready(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...


def routes(view: AdminView) -> admin.Routes:
    return {
        "/ready": lambda: admin.ready_answer(view.ready()),
        "/stats": lambda: admin.json_answer(view.stats()),
        "/metrics": lambda: (200, view.metrics_text(), admin.PROMETHEUS_TEXT),
    }


def render(view: AdminView, head: bytes) -> bytes:
    """The full response to one request head (pure apart from reading ``view``)."""
    return admin.respond_to_head(routes(view), head)


async def serve_admin(view: AdminView, listeners: list[trio.SocketListener]) -> None:
    """Serve until cancelled on already-bound ``listeners``."""
    await admin.serve_listeners(routes(view), listeners)
