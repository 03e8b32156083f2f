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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from federation.cli.up.configcopy import cluster_first, shift_document
from federation.cli.up.plan import Layout, Plan, build_plan, gateway_spiffe_id
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


@dataclass(frozen=True)
class PreparedRun:
    """A run dir made ready to start: port-shifted configs, CAs, the process plan."""

    cfg: FederationConfig
    """The port-shifted config the components read."""
    plan: Plan
    """Every component, in start order."""
    store_url: str
    """What the agents connect to (``memory://`` or ``etcd://host:port``)."""
    offset: int
    """The port offset applied."""
    extra: ExtraPorts
    """The ports ``up`` adds (traffic, etcd), shifted by ``offset``."""
    gateway_svids: dict[str, Any]
    """Per cluster, what the gateways' certificates will say (for the manifest)."""

    def meta(self, layout: Layout, config: Path | str, mode: str, **more: Any) -> dict[str, Any]:
        """The run manifest's fixed part (``meshfed status`` and the pokes read it)."""
        return {
            "run_dir": str(layout.root),
            "config": str(config),
            "config_copy": str(layout.config),
            "offset": self.offset,
            "store": mode,
            "up_pid": os.getpid(),
            "started_at": time.time(),
            "control": str(layout.control),
            "clusters": [
                {"name": c.name, "cloud": c.cloud, "region": c.region} for c in self.cfg.clusters
            ],
            "gateway_svids": self.gateway_svids,
            **more,
        }


def meshfed_argv() -> list[str]:
    """The command prefix for components: this interpreter and source tree, whatever PATH says."""
    return [sys.executable, "-m", "federation.cli.main"]


def sidecar_argv() -> list[str]:
    """The command prefix for sidecars: ``meshfed sidecar run``'s light entry point, without
    the typer CLI (sidecar/entry.py; ~12 MiB less per sidecar, docs/performance-notes.md)."""
    return [sys.executable, "-m", "sidecar"]


def prepare_run(
    source: Path,
    layout: Layout,
    offset: int,
    extra: ExtraPorts,
    *,
    mode: Literal["embedded", "etcd", "external"],
    external: str | None = None,
    etcd_binary: str = "etcd",
    rate: float = 4.0,
) -> PreparedRun:
    """Write the port-shifted configs and the CAs into ``layout`` and plan the processes.

    Shared by ``meshfed up`` and the drill runner so both start the same federation.
    Raises ConfigError if the shifted copy is invalid.
    """
    shifted = type(extra)(
        extra.sidecar_admin,  # shifted with the rest of the document
        extra.traffic + offset,
        extra.etcd_client + offset,
        extra.etcd_peer + offset,
    )
    store_url = {
        "embedded": "memory://",
        "etcd": f"etcd://127.0.0.1:{shifted.etcd_client}",
        "external": external or "",
    }[mode]
    cfg = write_configs(
        source,
        layout,
        offset,
        extra,
        store_endpoints=None if mode == "embedded" else (store_url[len("etcd://") :],),
    )
    gateway_svids = write_trust(cfg, layout, dt.datetime.now(dt.UTC))
    plan = build_plan(
        cfg,
        layout,
        meshfed_argv(),
        shifted,
        store=mode,
        store_url=store_url,
        etcd_binary=etcd_binary,
        sidecar_has_cluster_flag=True,  # workload names repeat across clusters
        rate=rate,
        sidecar=sidecar_argv(),
    )
    return PreparedRun(cfg, plan, store_url, offset, shifted, gateway_svids)
