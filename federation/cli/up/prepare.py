"""Everything ``up`` writes before it starts a process: the run directory, the
port-shifted config (and its per-cluster copies), one CA per trust domain
(``meshfed trust init``'s code), every trust bundle, and the traffic plan
(gateways and sidecars get their SVIDs from their agents with join tokens).
Blocking file work, run before trio starts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import yaml

from federation.cli.up.configcopy import cluster_first, shift_document
from federation.cli.up.plan import Layout, Plan, gateway_spiffe_id
from federation.cli.up.ports import ExtraPorts
from federation.config.loader import load_config
from federation.config.model import FederationConfig
from trust.rotation import CaDirectory
from trust.spiffe import TrustDomain

__all__ = ["default_run_dir", "make_run_dir", "write_configs", "write_traffic_plan", "write_trust"]


def default_run_base() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")  # noqa: S108 (0700 dir below)


def default_run_dir() -> Path:
    return default_run_base() / f"meshfed-up-{secrets.token_hex(4)}"


def make_run_dir(path: Path) -> Layout:
    """Create the run directory (0700; refused if it exists and is not empty)."""
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"--run-dir {path} is not empty; choose a new one")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout = Layout(path)
    layout.logs.mkdir(mode=0o700)
    return layout


def remove_run_dir(layout: Layout) -> None:
    shutil.rmtree(layout.root, ignore_errors=True)


def write_configs(
    source: Path,
    layout: Layout,
    offset: int,
    extra: ExtraPorts,
    *,
    store_endpoints: tuple[str, ...] | None,
) -> FederationConfig:
    """Write ``config.yaml`` (shifted) and ``config-<cluster>.yaml``; load it strictly."""
    doc = yaml.safe_load(source.read_text())
    shifted = shift_document(doc, offset, extra.sidecar_admin, store_endpoints=store_endpoints)
    header = f"# written by `meshfed up` from {source}: every port + {offset}\n"
    layout.config.write_text(header + yaml.safe_dump(shifted, sort_keys=False))
    cfg = load_config(layout.config)
    for c in cfg.clusters:
        layout.cluster_config(c.name).write_text(
            header
            + f"# {c.name}'s workloads first (sidecar run --workload takes the first match)\n"
            + yaml.safe_dump(cluster_first(shifted, c.name), sort_keys=False)
        )
    return cfg


def write_trust(cfg: FederationConfig, layout: Layout, now: dt.datetime) -> dict[str, Any]:
    """CAs and bundles; returns ``{cluster: {spiffe_id}}`` of the gateways, which get their
    SVIDs from their agents with a join token (like sidecars) and renew them there."""
    layout.bundles.mkdir(mode=0o700)
    domains = sorted({c.trust_domain for c in cfg.clusters})
    for td in domains:
        ca = CaDirectory.init(layout.ca_dir(td), TrustDomain.parse(td), now)
        (layout.bundles / f"{td}.json").write_text(ca.bundle().to_json())
    for c in cfg.clusters:
        layout.agent_state(c.name).mkdir(parents=True, mode=0o700)
    return {c.name: {"spiffe_id": gateway_spiffe_id(cfg, c.name)} for c in cfg.clusters}


def write_traffic_plan(plan: Plan, layout: Layout) -> None:
    layout.traffic_plan.write_text(json.dumps({"flows": list(plan.flows)}, indent=1))
