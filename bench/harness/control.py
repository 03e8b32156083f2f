"""Control-plane scenarios: ``bench/agent_bench.py``'s measurements, run by ``bench.run``.

Each runs ``agent_bench.py --part <part> --json`` in a fresh interpreter (its own
etcd on free loopback ports, started and killed by the script, as
``tests/etcd_server.py`` does; or the embedded store), so the data-plane processes
and this one share nothing but the machine. They are not per topology: they
measure meshfed's federation agent path (store -> watch -> importer -> catalog).

* ``propagation_embedded`` / ``propagation_etcd``: one endpoint record rewritten
  ``changes`` times in cluster c-0's keys; latency from before the put until cluster
  c-2's importer shows the new version (``wait_changed``). p50/p99/max over the changes.
* ``full_sync``: 10 clusters x ``sync_services`` services x 10 endpoints bulk-loaded
  into etcd (Txn of 128 puts) and into the embedded store; then ``get_prefix`` and
  the importer's sliced ``apply(Reset)`` timed (wall and CPU), ``Catalog.to_json`` /
  ``from_json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.harness.scenarios import Metric, Settings

AGENT_BENCH: Final = Path(__file__).resolve().parents[1] / "agent_bench.py"
TIMEOUT: Final = 900.0
"""Seconds one control-plane run may take (a full sync on a loaded machine: ~1-3 min)."""


def etcd_binary() -> str | None:
    """The etcd binary ``tests/etcd_server.py`` would start, or None."""
    path = shutil.which("etcd") or "/usr/bin/etcd"
    return path if os.access(path, os.X_OK) else None


def run_agent_bench(part: str, changes: int, services: int) -> dict[str, object]:
    """``agent_bench.py --part PART --json``; its result object. Raises RuntimeError."""
    argv = [
        sys.executable,
        str(AGENT_BENCH),
        "--part",
        part,
        "--changes",
        str(changes),
        "--services",
        str(services),
        "--json",
    ]
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            cwd=AGENT_BENCH.parents[1],
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"agent_bench.py --part {part}: over {TIMEOUT:.0f} s") from exc
    if out.returncode != 0:
        raise RuntimeError(
            f"agent_bench.py --part {part} exited {out.returncode}: {out.stderr.strip()[-400:]}"
        )
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"agent_bench.py --part {part}: no output")
    doc = json.loads(lines[-1])
    if not isinstance(doc, dict):
        raise RuntimeError(f"agent_bench.py --part {part}: not a JSON object")
    return doc


def _num(doc: dict[str, object], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # e.g. "etcd_get_prefix_error"
        raise RuntimeError(value)
    return float("nan")


ControlFn = Callable[[Settings], dict[str, float]]


def _propagation(store: str) -> ControlFn:
    def run(s: Settings) -> dict[str, float]:
        doc = run_agent_bench(f"propagation-{store}", s.changes, s.sync_services)
        got = doc.get(f"{store}_propagation")
        if not isinstance(got, dict):
            raise RuntimeError(f"agent_bench.py: no {store}_propagation in {sorted(doc)}")
        return {k: _num(got, k) for k in ("p50_ms", "p99_ms", "max_ms", "mean_ms", "n")}

    return run


_SYNC_KEYS: Final = (
    "records",
    "etcd_bulk_load_s",
    "etcd_get_prefix_s",
    "etcd_sliced_reset_s",
    "etcd_sliced_reset_cpu_s",
    "etcd_sliced_longest_slice_ms",
    "etcd_to_json_s",
    "etcd_from_json_s",
    "etcd_catalog_json_mb",
    "embedded_get_prefix_s",
    "embedded_sliced_reset_s",
    "embedded_sliced_reset_cpu_s",
)


def _full_sync(s: Settings) -> dict[str, float]:
    doc = run_agent_bench("full-sync", s.changes, s.sync_services)
    if "etcd_get_prefix_error" in doc:
        raise RuntimeError(f"etcd get_prefix failed: {doc['etcd_get_prefix_error']}")
    out = {k: _num(doc, k) for k in _SYNC_KEYS}
    out["etcd_full_sync_s"] = out["etcd_get_prefix_s"] + out["etcd_sliced_reset_s"]
    out["embedded_full_sync_s"] = out["embedded_get_prefix_s"] + out["embedded_sliced_reset_s"]
    return out


@dataclass(frozen=True)
class ControlScenario:
    """A control-plane measurement (not per topology); the first metric is the headline."""

    name: str
    title: str
    metrics: tuple[Metric, ...]
    run: ControlFn
    needs_etcd: bool

    def unavailable(self) -> str | None:
        if self.needs_etcd and etcd_binary() is None:
            return "etcd not installed (apt-get install etcd-server)"
        return None


def _prop_metrics() -> tuple[Metric, ...]:
    return (
        Metric("p99_ms", "ms", False, "p99"),
        Metric("p50_ms", "ms", False, "p50"),
        Metric("max_ms", "ms", False, "max"),
        Metric("mean_ms", "ms", False, "mean"),
        Metric("n", "changes", True, "changes"),
    )


CONTROL: Final[dict[str, ControlScenario]] = {
    c.name: c
    for c in (
        ControlScenario(
            "propagation_etcd",
            "propagation: endpoint write in c-0 -> visible in c-2's catalog, etcd store",
            _prop_metrics(),
            _propagation("etcd"),
            needs_etcd=True,
        ),
        ControlScenario(
            "propagation_embedded",
            "propagation: endpoint write in c-0 -> visible in c-2's catalog, embedded store",
            _prop_metrics(),
            _propagation("embedded"),
            needs_etcd=False,
        ),
        ControlScenario(
            "full_sync",
            "full sync: 10 clusters x S services x 10 endpoints, get_prefix + importer Reset",
            (
                Metric("etcd_full_sync_s", "s", False, "etcd: get_prefix + sliced Reset"),
                Metric("etcd_get_prefix_s", "s", False, "etcd get_prefix"),
                Metric("etcd_sliced_reset_s", "s", False, "sliced Reset wall"),
                Metric("etcd_sliced_reset_cpu_s", "s", False, "sliced Reset CPU"),
                Metric("etcd_sliced_longest_slice_ms", "ms", False, "longest slice"),
                Metric("embedded_full_sync_s", "s", False, "embedded: get_prefix + Reset"),
                Metric("etcd_bulk_load_s", "s", False, "etcd bulk load"),
                Metric("etcd_to_json_s", "s", False, "Catalog.to_json"),
                Metric("etcd_from_json_s", "s", False, "Catalog.from_json"),
                Metric("etcd_catalog_json_mb", "MB", False, "catalog JSON"),
                Metric("records", "keys", True, "records"),
            ),
            _full_sync,
            needs_etcd=True,
        ),
    )
}
