"""The sidecar's admin routes on the workload's ``admin_port`` (served by federation.admin).

| path | answer |
| --- | --- |
| ``/ready`` | 200 once listeners are up and a catalog is held, 503 otherwise (and while draining) |
| ``/stats`` | JSON: per upstream its tiers, candidates with health sources, connection counts |
| ``/catalog`` | the catalog in use (``Catalog.to_obj``) |
| ``/config`` | JSON: this workload's resolved settings (listeners, limits, identity) |
| ``/metrics`` | Prometheus text |
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from federation import admin

__all__ = ["SidecarAdminView", "respond", "serve_admin"]


class SidecarAdminView(Protocol):
    """What the admin server reads from the sidecar."""

    def ready(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def catalog_obj(self) -> dict[str, Any] | None: ...

    def config_obj(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...


def routes(view: SidecarAdminView) -> admin.Routes:
    return {
        "/ready": lambda: admin.ready_answer(view.ready()),
        "/stats": lambda: admin.json_answer(view.stats()),
        "/catalog": lambda: admin.json_answer(view.catalog_obj()),
        "/config": lambda: admin.json_answer(view.config_obj()),
        "/metrics": lambda: (200, view.metrics_text(), admin.PROMETHEUS_TEXT),
    }


def respond(view: SidecarAdminView, method: str, path: str) -> bytes:
    """The full response to one request (pure apart from reading ``view``)."""
    return admin.respond(routes(view), method, path)


async def serve_admin(
    view: SidecarAdminView,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started(port)`` with the bound port (0 picks one)."""
    await admin.serve(routes(view), host, port, task_status=task_status)
