"""Fetch every component's admin payloads for :func:`statusview.build_view` (trio adapter)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from federation.cli.up.adminclient import fetch_all
from federation.cli.up.statusview import Payload, View, build_view

__all__ = ["collect_view", "read_manifest"]

_LIVE = ("starting", "ready")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    return data


async def collect_view(manifest: dict[str, Any], *, timeout: float = 1.5) -> View:  # noqa: ASYNC109
    requests: dict[str, tuple[str, str]] = {}
    for c in manifest.get("components", []):
        admin = c.get("admin")
        if admin is None or c.get("runtime", {}).get("state") not in _LIVE:
            continue
        name = c["name"]
        if c["kind"] == "agent":
            requests[f"{name} data"] = (admin, "/status")
            requests[f"{name} metrics"] = (admin, "/metrics")
        else:
            requests[f"{name} data"] = (admin, "/stats")
    got = await fetch_all(requests, timeout=timeout)
    payloads: dict[str, Payload] = {}
    for c in manifest.get("components", []):
        name = c["name"]
        data = got.get(f"{name} data")
        if data is None:
            continue
        metrics = got.get(f"{name} metrics")
        payloads[name] = Payload(
            ready=None if data.status is None else True,
            data=data.json(),
            metrics=metrics.body.decode("utf-8", "replace")
            if metrics and metrics.status == 200
            else None,
        )
    return build_view(manifest, payloads, dt.datetime.now(dt.UTC))
