"""Port planning for ``meshfed up``: every listener of a run, and one offset for all.

A run moves *every* port of the config by the same offset, so the copy keeps
its shape (a cluster's gateway is still ``base + 1``, a replica still ``p + i``)
and two runs on one machine never share a port. The core is pure: it lists the
listeners (:func:`listeners`), assigns the ports ``up`` adds to the config
(:func:`extra_ports`) and picks the first offset whose ports are all free
according to a predicate (:func:`choose_offset`). The adapters at the bottom
probe by binding and hold an ``flock`` per offset, so two concurrent ``up``
runs that both find an offset free cannot both take it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from federation.config.model import FederationConfig, Workload

__all__ = [
    "SIDECAR_ADMIN_HOST",
    "ExtraPorts",
    "Listener",
    "OffsetLock",
    "PortConflict",
    "choose_offset",
    "duplicates",
    "extra_ports",
    "is_loopback",
    "listeners",
    "lock_offset",
    "port_is_free",
]

#: Where ``meshfed sidecar run`` binds its admin port (SidecarOptions.admin_host).
SIDECAR_ADMIN_HOST = "127.0.0.1"
MAX_PORT = 65535


class PortConflict(ValueError):
    """The plan itself uses one (host, port) twice, or no offset is free."""


@dataclass(frozen=True, slots=True, order=True)
class Listener:
    """One socket a run will bind."""

    host: str
    port: int
    owner: str
    """Who binds it (``gateway/aws-use1 tunnel``), for error messages."""

    def shifted(self, offset: int) -> Listener:
        return Listener(self.host, self.port + offset, self.owner)


@dataclass(frozen=True, slots=True)
class ExtraPorts:
    """Ports ``up`` adds to the config: all above the config's own, so none collides."""

    sidecar_admin: dict[tuple[str, str, str], int]
    """(cluster, namespace, workload) -> admin port of replica 0 for workloads without one."""
    traffic: int
    """The traffic generator's ``/stats`` and ``/metrics``."""
    etcd_client: int
    etcd_peer: int


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


def _replica_port(host: str, port: int, replica: int) -> int:
    # docs/config.md: on a loopback address instance i adds i to every port.
    return port + replica if is_loopback(host) else port


def _workload_listeners(w: Workload, admin_port: int | None) -> Iterator[Listener]:
    for i in range(w.replicas):
        who = f"{w.cluster}/{w.name}-{i}"
        yield Listener(
            w.address, _replica_port(w.address, w.inbound_port, i), f"sidecar {who} inbound"
        )
        port = admin_port if admin_port is not None else w.admin_port
        if port is not None:
            yield Listener(
                SIDECAR_ADMIN_HOST, _replica_port(w.address, port, i), f"sidecar {who} admin"
            )
        for s in w.serves:
            yield Listener(s.app.host, _replica_port(s.app.host, s.app.port, i), f"app {who}")
        for u in w.upstreams:
            yield Listener(
                u.listen.host,
                _replica_port(u.listen.host, u.listen.port, i),
                f"sidecar {who} -> {u.service}",
            )


def listeners(cfg: FederationConfig, extra: ExtraPorts | None = None) -> list[Listener]:
    """Every socket the run binds, at offset 0, sorted."""
    out: list[Listener] = []
    for c in cfg.clusters:
        gw = c.gateway
        host = gw.bind or gw.address
        if "tunnel" in gw.modes:
            out.append(Listener(host, gw.tunnel_port, f"gateway/{c.name} tunnel"))
        out.append(Listener(host, gw.passthrough_port, f"gateway/{c.name} passthrough"))
        out.append(Listener(host, gw.admin_port, f"gateway/{c.name} admin"))
        out.append(Listener(c.agent.address, c.agent.catalog_port, f"agent/{c.name} catalog"))
        out.append(Listener(c.agent.address, c.agent.admin_port, f"agent/{c.name} admin"))
    for w in cfg.workloads:
        admin = None if extra is None else extra.sidecar_admin.get((w.cluster, w.namespace, w.name))
        out.extend(_workload_listeners(w, admin))
    if extra is not None:
        out.append(Listener("127.0.0.1", extra.traffic, "traffic"))
        out.append(Listener("127.0.0.1", extra.etcd_client, "etcd client"))
        out.append(Listener("127.0.0.1", extra.etcd_peer, "etcd peer"))
    return sorted(out)


def extra_ports(cfg: FederationConfig) -> ExtraPorts:
    """Admin ports for sidecars the config gives none (``up`` watches every sidecar), the
    traffic generator's port and etcd's: a block starting at the next hundred above the
    highest port the config uses, so they cannot collide with any configured listener."""
    top = max(lst.port for lst in listeners(cfg))
    nxt = (top // 100 + 1) * 100
    admin: dict[tuple[str, str, str], int] = {}
    for w in cfg.workloads:
        if w.admin_port is None:
            admin[(w.cluster, w.namespace, w.name)] = nxt
            nxt += w.replicas
    return ExtraPorts(admin, traffic=nxt, etcd_client=nxt + 1, etcd_peer=nxt + 2)


def duplicates(items: Iterable[Listener]) -> list[tuple[Listener, Listener]]:
    """Pairs of listeners on one (host, port); a wildcard host clashes with every host."""
    seen: dict[int, list[Listener]] = {}
    clashes = []
    for lst in sorted(items):
        for other in seen.get(lst.port, []):
            wild = {"0.0.0.0", "::"} & {lst.host, other.host}
            if other.host == lst.host or wild:
                clashes.append((other, lst))
        seen.setdefault(lst.port, []).append(lst)
    return clashes


def choose_offset(
    planned: list[Listener],
    is_free: Callable[[Listener], bool],
    *,
    requested: int | None = None,
    step: int = 1000,
    try_lock: Callable[[int], bool] = lambda _offset: True,
) -> int:
    """The offset to run at: ``requested`` if all its ports are free, else the first of
    0, step, 2*step, ... whose ports are all free and whose lock ``try_lock`` obtains.

    The lock is taken *before* probing, so a concurrent run that probes the same
    offset skips it instead of racing for the ports.
    """
    top = max(lst.port for lst in planned)
    candidates = [requested] if requested is not None else range(0, MAX_PORT - top + 1, step)
    busy_note = ""
    for offset in candidates:
        if top + offset > MAX_PORT or min(lst.port for lst in planned) + offset < 1:
            raise PortConflict(f"port offset {offset} moves ports out of 1-{MAX_PORT}")
        if not try_lock(offset):
            busy_note = f"offset {offset} is held by another `meshfed up`"
            continue
        taken = [lst for lst in planned if not is_free(lst.shifted(offset))]
        if not taken:
            return offset
        t = taken[0].shifted(offset)
        busy_note = f"{t.host}:{t.port} ({t.owner}) is in use at offset {offset}"
    raise PortConflict(f"no free port offset ({busy_note}); stop other runs or use --port-offset")


# -- adapters: bind probes and offset locks --------------------------------------------------


def port_is_free(lst: Listener) -> bool:
    """Can ``lst`` be bound now? SO_REUSEADDR as trio's listeners set it, so sockets
    in TIME_WAIT from an earlier run do not count as busy."""
    family = socket.AF_INET6 if ":" in lst.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((lst.host, lst.port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortConflict(
                    f"cannot bind {lst.host} ({lst.owner}): address not available on this "
                    "machine (macOS needs `ifconfig lo0 alias` for 127.0.0.2+)"
                ) from None
            return False
    return True


class OffsetLock:
    """Exclusive ``flock`` on ``<dir>/offset-<N>.lock`` while a run uses offset N.

    The kernel drops the lock when the process dies, so a crashed run never
    blocks an offset for good.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.held: dict[int, IO[bytes]] = {}

    def try_lock(self, offset: int) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = (self.directory / f"offset-{offset}.lock").open("ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self.held[offset] = f
        return True

    def keep_only(self, offset: int) -> None:
        for other in [o for o in self.held if o != offset]:
            self.release(other)

    def release(self, offset: int) -> None:
        f = self.held.pop(offset, None)
        if f is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def release_all(self) -> None:
        for offset in list(self.held):
            self.release(offset)


def lock_dir() -> Path:
    """Per-user lock directory shared by every ``up`` run on this machine."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"  # noqa: S108 (per-user name below)
    return Path(base) / f"meshfed-up-locks-{os.getuid()}"


def lock_offset(directory: Path | None = None) -> OffsetLock:
    return OffsetLock(directory if directory is not None else lock_dir())
