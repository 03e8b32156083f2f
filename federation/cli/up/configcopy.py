"""The run's copy of the deployment config: every port moved by the run's offset.

Pure: it edits the YAML document (plain dicts and lists as ``yaml.safe_load``
returns them), never the frozen model, so what it writes is a config a person
could have written; ``up`` then loads the copy with the strict loader, so a
copy that does not validate never starts anything.

Besides the offset it (1) gives every workload without one an ``admin_port``
(``up`` watches every sidecar through its admin endpoint), (2) points the
store settings at the run's store, and (3) can reorder workloads so that one
cluster's come first: ``meshfed sidecar run --workload W`` takes the first
workload named W, and the demo has ``whoami`` in two clusters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["ConfigCopyError", "cluster_first", "shift_document"]


class ConfigCopyError(ValueError):
    """The document does not have the shape the strict loader accepted."""


def _shift_addr(value: Any, offset: int, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigCopyError(f"{where}: expected host:port")
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit():
        raise ConfigCopyError(f"{where}: expected host:port, got {value!r}")
    return f"{host}:{int(port) + offset}"


def _shift(mapping: dict[str, Any], key: str, offset: int) -> None:
    value = mapping.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        mapping[key] = value + offset


def shift_document(
    doc: Mapping[str, Any],
    offset: int,
    admin_ports: Mapping[tuple[str, str, str], int],
    *,
    store_endpoints: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """A deep copy of ``doc`` with every listener port plus ``offset``.

    ``admin_ports`` maps (cluster, namespace, workload) to an admin port (before
    the offset) for workloads whose document has none. ``store_endpoints``
    switches the store settings to etcd at those endpoints. Service ports
    (``services[].ports[].port``) are names of a service's port, not listeners:
    they stay.
    """
    out = copy.deepcopy(dict(doc))
    for i, c in enumerate(out.get("clusters") or []):
        for part, keys in (
            ("gateway", ("tunnel_port", "passthrough_port", "admin_port")),
            ("agent", ("catalog_port", "admin_port")),
        ):
            spec = c.get(part)
            if not isinstance(spec, dict):
                raise ConfigCopyError(f"clusters[{i}].{part}: expected a mapping")
            defaults = _DEFAULT_PORTS[part]
            for key in keys:
                # A port left to its default moves too: write it out explicitly.
                spec.setdefault(key, defaults[key])
                _shift(spec, key, offset)
    for i, w in enumerate(out.get("workloads") or []):
        _shift(w, "inbound_port", offset)
        if w.get("admin_port") is None:
            wkey = (str(w.get("cluster")), str(w.get("namespace")), str(w.get("name")))
            if wkey in admin_ports:
                w["admin_port"] = admin_ports[wkey]
                _shift(w, "admin_port", offset)
        else:
            _shift(w, "admin_port", offset)
        for j, s in enumerate(w.get("serves") or []):
            s["app"] = _shift_addr(s.get("app"), offset, f"workloads[{i}].serves[{j}].app")
        for j, u in enumerate(w.get("upstreams") or []):
            u["listen"] = _shift_addr(u.get("listen"), offset, f"workloads[{i}].upstreams[{j}]")
    if store_endpoints is not None:
        fed = out.setdefault("federation", {})
        settings = fed.setdefault("settings", None) or {}
        fed["settings"] = settings
        store = settings.get("store") or {}
        store["backend"] = "etcd"
        store["endpoints"] = list(store_endpoints)
        settings["store"] = store
    return out


# Defaults of federation/config/model.py's GatewaySpec and AgentSpec; a test checks
# that they match the model, so a changed default cannot silently go unshifted.
_DEFAULT_PORTS: dict[str, dict[str, int]] = {
    "gateway": {"tunnel_port": 15008, "passthrough_port": 15443, "admin_port": 15021},
    "agent": {"catalog_port": 15010, "admin_port": 15014},
}


def cluster_first(doc: Mapping[str, Any], cluster: str) -> dict[str, Any]:
    """``doc`` with ``cluster``'s workloads moved to the front (stable otherwise)."""
    out = dict(doc)
    workloads = list(out.get("workloads") or [])
    out["workloads"] = [w for w in workloads if w.get("cluster") == cluster] + [
        w for w in workloads if w.get("cluster") != cluster
    ]
    return out
