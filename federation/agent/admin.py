"""The agent's admin routes, served by :mod:`federation.admin`.

| path | answer |
| --- | --- |
| ``/ready`` | 200 once the first full sync with the store is done (the sync gate), else 503 |
| ``/status`` | JSON: registration phase, store health, sync, catalog version, peers, bundles |
| ``/catalog`` | the current catalog as JSON (``Catalog.to_obj``) |
| ``/metrics`` | Prometheus text, from the agent's own registry |
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from federation import admin


class AdminView(Protocol):
    """What the admin server asks of the agent."""

    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def catalog_json(self) -> bytes: ...

    def metrics_text(self) -> bytes: ...


def routes(view: AdminView) -> admin.Routes:
    return {
        "/ready": lambda: admin.ready_answer(view.ready(), "not synced"),
        "/status": lambda: admin.json_answer(view.status()),
        "/catalog": lambda: (200, view.catalog_json(), "application/json"),
        "/metrics": lambda: (200, view.metrics_text(), admin.PROMETHEUS_TEXT),
    }


def route(view: AdminView, method: str, path: str) -> bytes:
    """The full response for one request (pure apart from reading ``view``)."""
    return admin.respond(routes(view), method, path)


async def serve_admin(
    view: AdminView,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started(port)`` with the bound port (pass 0 for any)."""
    await admin.serve(routes(view), host, port, task_status=task_status)
