"""Everything ``up`` writes before it starts a process: the run directory, the
port-shifted config (and its per-cluster copies), one CA per trust domain
(``meshfed trust init``'s code), every trust bundle, gateway SVIDs
(``meshfed trust issue``'s code: the gateway CLI takes only files), and the
traffic plan. Blocking file work, run before trio starts.
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
from trust.spiffe import SpiffeId, TrustDomain

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
    """CAs, bundles and gateway SVIDs; returns ``{cluster: {spiffe_id, not_after}}``."""
    layout.bundles.mkdir(mode=0o700)
    domains = sorted({c.trust_domain for c in cfg.clusters})
    cas: dict[str, CaDirectory] = {}
    for td in domains:
        ca = CaDirectory.init(layout.ca_dir(td), TrustDomain.parse(td), now)
        cas[td] = ca
        (layout.bundles / f"{td}.json").write_text(ca.bundle().to_json())
    svids: dict[str, Any] = {}
    ttl = dt.timedelta(seconds=cfg.federation.settings.svid_ttl)
    for c in cfg.clusters:
        d = layout.gateway_svid(c.name)
        d.mkdir(parents=True, mode=0o700)
        sid = gateway_spiffe_id(cfg, c.name)
        svid = cas[c.trust_domain].issue(SpiffeId.parse(sid), now, ttl)
        fd = os.open(d / "svid.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(svid.key_pem())
        (d / "svid.crt").write_bytes(svid.chain_pem())
        shutil.copytree(layout.bundles, d / "bundles")
        svids[c.name] = {"spiffe_id": sid, "not_after": svid.not_after.isoformat()}
    for c in cfg.clusters:
        layout.agent_state(c.name).mkdir(parents=True, mode=0o700)
    return svids


def write_traffic_plan(plan: Plan, layout: Layout) -> None:
    layout.traffic_plan.write_text(json.dumps({"flows": list(plan.flows)}, indent=1))
