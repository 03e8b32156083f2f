"""Prometheus scrape config for a run: one job per component kind, every admin endpoint
as a static target labelled with its component, cluster and zone. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from federation.cli.up.plan import Component

__all__ = ["scrape_config"]


def scrape_config(components: Iterable[Component], *, interval: str = "5s") -> str:
    """A ``prometheus.yml`` scraping ``/metrics`` of every component with an admin port."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for c in components:
        if c.admin is None:
            continue
        labels = {"component": c.name}
        if c.cluster:
            labels["cluster"] = c.cluster
        if c.zone:
            labels["zone"] = c.zone
        jobs.setdefault(f"meshfed-{c.kind}", []).append({"targets": [c.admin], "labels": labels})
    doc = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": targets}
            for job, targets in sorted(jobs.items())
        ],
    }
    header = "# written by `meshfed up --prometheus-config`; valid while the run lasts\n"
    return header + yaml.safe_dump(doc, sort_keys=False)
