"""Bring up (or attach to) the federation a drill runs against, with ``meshfed up``'s machinery.

The runner does not shell out to ``meshfed up``: it uses the same pieces in-process (port
offset and its lock, the port-shifted config copies, CAs and bundles, the process plan and
the :class:`~federation.cli.up.supervisor.Supervisor`), so the run directory, ``run.json``
and ``control.sock`` are the ones ``up`` writes, and ``meshfed status --run-dir D`` works
during a drill. Three things differ from ``up``, all decided before anything starts:

* the config copy is rewritten for the drill (:func:`rewrite_document`, pure): a gateway
  that a link fault names is advertised on a fault proxy's address while it still binds its
  own (``clusters[].gateway.bind``), so every peer dials it through the proxy; a traffic
  source with ``caller_failover: off`` gets its service pinned to its own zone;
* an agent whose etcd link a fault names is started with ``--store`` pointing at a fault
  proxy in front of etcd;
* ``up``'s own demo traffic generator is left out (the drill brings its own).

The fault proxies (``chaos.faultproxy.FaultLink``) run in this process and are driven
directly, not through their admin API.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import trio
import yaml

from chaos.faultproxy import FaultLink, serve_fault_proxy
from chaos.injectors import ProcessControl, SocketControl, SupervisorControl
from federation.cli.up import prepare
from federation.cli.up.collect import read_manifest
from federation.cli.up.plan import Component, Layout, Plan
from federation.cli.up.ports import (
    choose_offset,
    duplicates,
    extra_ports,
    listeners,
    lock_offset,
    port_is_free,
)
from federation.cli.up.supervisor import Supervisor
from federation.config.loader import load_config
from federation.config.model import FederationConfig
from federation.store.api import Store

__all__ = [
    "PROXY_HOST_BASE",
    "Federation",
    "LaunchError",
    "LaunchOptions",
    "LinkProxy",
    "Pin",
    "attach_federation",
    "launch_federation",
    "rewrite_document",
]

StoreMode = Literal["embedded", "etcd"]

#: Fault proxies in front of gateways listen on 127.0.100.<n> (all of 127/8 is loopback).
PROXY_HOST_BASE = "127.0.100."


class LaunchError(RuntimeError):
    """The federation could not be started or attached to (one line, says what to do)."""


@dataclass(frozen=True, slots=True)
class Pin:
    """Locality failover off for one caller: ``service`` is only served from the caller's
    zone (the service's workloads in the caller's cluster outside that zone are left out of
    the run, and the service is exported to no other cluster)."""

    cluster: str
    workload: str
    service: str
    """``<name>.<namespace>``."""


@dataclass(frozen=True, slots=True)
class LaunchOptions:
    store: StoreMode = "embedded"
    gateway_proxies: frozenset[str] = frozenset()
    """Clusters whose gateway is reached through a fault proxy."""
    etcd_proxies: frozenset[str] = frozenset()
    """Clusters whose agent reaches etcd through a fault proxy (``store`` must be etcd)."""
    pins: tuple[Pin, ...] = ()
    run_dir: Path | None = None
    keep: bool = False
    ready_timeout: float = 90.0


@dataclass(slots=True)
class LinkProxy:
    """One fault proxy (one :class:`FaultLink`, one or more listeners) on a link."""

    name: str
    """``gateway:<cluster>`` or ``etcd:<cluster>``."""
    link: FaultLink
    listens: list[str] = field(default_factory=list)
    upstreams: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Federation:
    """A running federation as the runner sees it."""

    cfg: FederationConfig
    """The run's (port-shifted) config."""
    layout: Layout
    store_url: str
    store: Store | None
    """The embedded store object when the agents run in this process; else None."""
    control: ProcessControl
    links: dict[str, LinkProxy]
    attached: bool
    notices: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


# -- the pure part: the config rewrite ------------------------------------------------------


def proxy_hosts(clusters: Sequence[str]) -> dict[str, str]:
    """One loopback address per proxied gateway, in a fixed order."""
    return {c: f"{PROXY_HOST_BASE}{i + 1}" for i, c in enumerate(sorted(clusters))}


def rewrite_document(
    doc: Mapping[str, Any], gateway_hosts: Mapping[str, str], pins: Sequence[Pin]
) -> dict[str, Any]:
    """The config document a drill runs on (a deep copy; ``doc`` is not changed).

    ``gateway_hosts``: cluster -> address its gateway is advertised at (a proxy); the
    gateway keeps binding its own address. ``pins``: callers whose service is served only
    from their own zone.
    """
    out = copy.deepcopy(dict(doc))
    for c in out.get("clusters") or []:
        host = gateway_hosts.get(str(c.get("name")))
        if host is None:
            continue
        gw = c["gateway"]
        gw["bind"] = gw.get("bind") or gw["address"]
        gw["address"] = host
    for pin in pins:
        name, _, namespace = pin.service.partition(".")
        workloads = out.get("workloads") or []
        caller = next(
            (
                w
                for w in workloads
                if w.get("cluster") == pin.cluster and w.get("name") == pin.workload
            ),
            None,
        )
        if caller is None:
            raise ValueError(f"pin: no workload {pin.cluster}/{pin.workload}")
        zone = caller.get("zone")

        def elsewhere(
            w: Mapping[str, Any],
            name: str = name,
            ns: str = namespace,
            zone: Any = zone,
            cluster: str = pin.cluster,
        ) -> bool:
            serves = [s.get("service") for s in w.get("serves") or []]
            return (
                name in serves
                and w.get("namespace") == ns
                and w.get("cluster") == cluster
                and w.get("zone") != zone
            )

        # The caller's cluster runs the service only in the caller's zone, and no other
        # cluster exports it: the caller's sidecar has nothing to fail over to.
        out["workloads"] = [w for w in workloads if not elsewhere(w)]
        for svc in out.get("services") or []:
            if svc.get("name") == name and svc.get("namespace") == namespace:
                svc["exported_to"] = []
    return out


def _replace_store_arg(argv: Sequence[str], url: str) -> tuple[str, ...]:
    out = list(argv)
    i = out.index("--store")
    out[i + 1] = url
    return tuple(out)


# -- the trio part ------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """What the run's figures depend on, for the report."""
    uname = os.uname()
    facts: dict[str, Any] = {
        "host": uname.nodename,
        "kernel": f"{uname.sysname} {uname.release}",
        "machine": uname.machine,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "trio": trio.__version__,
    }
    with contextlib.suppress(OSError):
        facts["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["memory"] = line.split(":", 1)[1].strip()
                break
    return facts


@contextlib.asynccontextmanager
async def launch_federation(config_path: str, opts: LaunchOptions) -> AsyncIterator[Federation]:
    """Start the federation of ``config_path`` for a drill; stop it (reverse stage order) on
    exit. Raises :class:`LaunchError` if it cannot start."""
    etcd_binary = shutil.which("etcd") or "/usr/bin/etcd"
    if opts.store == "etcd" and not os.access(etcd_binary, os.X_OK):
        raise LaunchError("the drill needs etcd: install it (apt-get install etcd-server)")
    if opts.etcd_proxies and opts.store != "etcd":
        raise LaunchError("agent-to-etcd links exist only with the etcd store")
    try:
        layout = prepare.make_run_dir(opts.run_dir or prepare.default_run_dir())
    except (FileExistsError, OSError) as exc:
        raise LaunchError(str(exc)) from None
    locks = lock_offset()
    sup: Supervisor | None = None
    try:
        doc = yaml.safe_load(Path(config_path).read_text())  # noqa: ASYNC240 (before start)
        hosts = proxy_hosts(sorted(opts.gateway_proxies))
        source = layout.root / "drill-config.yaml"
        source.write_text(
            f"# {config_path}, rewritten for a drill (chaos/launch.py)\n"
            + yaml.safe_dump(rewrite_document(doc, hosts, opts.pins), sort_keys=False)
        )
        base_cfg = load_config(source)
        extra = extra_ports(base_cfg)
        planned = listeners(base_cfg, extra)
        clashes = duplicates(planned)
        if clashes:
            a, b = clashes[0]
            raise LaunchError(f"{a.owner} and {b.owner} both listen on {a.host}:{a.port}")
        offset = choose_offset(planned, port_is_free, try_lock=locks.try_lock)
        locks.keep_only(offset)
        mode = opts.store
        run = prepare.prepare_run(
            source, layout, offset, extra, mode=mode, etcd_binary=etcd_binary
        )
        cfg, plan, store_url = run.cfg, run.plan, run.store_url
        comps = [c for c in plan.components if c.kind != "traffic"]
        meta = run.meta(layout, config_path, mode, drill_runner=True)
        rng = random.Random(0x5EED)
        async with contextlib.AsyncExitStack() as stack:
            embedded = await stack.enter_async_context(_maybe_embedded(mode))
            async with trio.open_nursery() as nursery:
                links: dict[str, LinkProxy] = {}
                for cluster in sorted(opts.gateway_proxies):
                    gw = cfg.cluster(cluster).gateway
                    proxy = LinkProxy(f"gateway:{cluster}", FaultLink(rng))
                    for port in (gw.tunnel_port, gw.passthrough_port):
                        await nursery.start(
                            serve_fault_proxy, proxy.link, gw.address, port, gw.bind, port
                        )
                        proxy.listens.append(f"{gw.address}:{port}")
                        proxy.upstreams.append(f"{gw.bind}:{port}")
                    links[proxy.name] = proxy
                for cluster in sorted(opts.etcd_proxies):
                    proxy = LinkProxy(f"etcd:{cluster}", FaultLink(rng))
                    port = await nursery.start(
                        serve_fault_proxy,
                        proxy.link,
                        "127.0.0.1",
                        0,
                        "127.0.0.1",
                        run.extra.etcd_client,
                    )
                    proxy.listens.append(f"127.0.0.1:{port}")
                    proxy.upstreams.append(f"127.0.0.1:{run.extra.etcd_client}")
                    links[proxy.name] = proxy
                    comps = [
                        replace(c, argv=_replace_store_arg(c.argv, f"etcd://127.0.0.1:{port}"))
                        if c.kind == "agent" and c.cluster == cluster
                        else c
                        for c in comps
                    ]
                plan = Plan(tuple(comps), plan.store_url, ())
                sup = Supervisor(
                    plan,
                    layout,
                    meta,
                    in_process=_in_process_agents(cfg, layout, embedded) if embedded else None,
                    ready_timeout=opts.ready_timeout,
                )
                await nursery.start(sup.serve_control)
                try:
                    await sup.start_all(nursery, lambda stage, n: None)
                except Exception as exc:
                    raise LaunchError(f"the federation did not start: {exc}") from exc
                fed = Federation(
                    cfg=cfg,
                    layout=layout,
                    store_url=store_url,
                    store=embedded,
                    control=SupervisorControl(sup),
                    links=links,
                    attached=False,
                    facts={"run_dir": str(layout.root), "offset": offset, "store": store_url},
                )
                try:
                    yield fed
                finally:
                    with trio.CancelScope(shield=True):
                        await sup.stop_all()
                    nursery.cancel_scope.cancel()
    except BaseException:
        if sup is not None:
            sup.kill_everything_now()
        raise
    finally:
        locks.release_all()
        if not opts.keep:
            prepare.remove_run_dir(layout)


@contextlib.asynccontextmanager
async def _maybe_embedded(mode: StoreMode) -> AsyncIterator[Store | None]:
    if mode != "embedded":
        yield None
        return
    from federation.store.open import open_store

    async with open_store("memory://") as store:
        yield store


def _in_process_agents(cfg: FederationConfig, layout: Layout, store: Store) -> Any:
    """The agents of an embedded-store run, inside this process (as ``up`` runs them)."""
    from federation.agent.runner import Agent, AgentOptions

    def runner(comp: Component) -> Any:
        assert comp.cluster is not None
        cluster = cfg.cluster(comp.cluster)

        async def run_agent() -> None:
            agent = Agent(
                cfg,
                cluster.name,
                "memory://",
                layout.ca_dir(cluster.trust_domain),
                layout.agent_state(cluster.name),
                AgentOptions(),
            )
            await agent.run(store=store)

        return run_agent

    return runner


@contextlib.asynccontextmanager
async def attach_federation(run_dir: Path) -> AsyncIterator[Federation]:
    """A federation started by ``meshfed up`` (or another runner) in ``run_dir``."""
    try:
        manifest = read_manifest(run_dir)
    except (OSError, ValueError) as exc:
        raise LaunchError(f"--attach {run_dir}: no readable run.json ({exc})") from None
    pid = int(manifest.get("up_pid") or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        raise LaunchError(
            f"--attach {run_dir}: its `meshfed up` (pid {pid}) is not running"
        ) from None
    cfg = load_config(Path(manifest["config_copy"]))
    store_url = str(manifest.get("store_url") or "")
    fed = Federation(
        cfg=cfg,
        layout=Layout(run_dir),
        store_url=store_url,
        store=None,
        control=SocketControl(run_dir),
        links={},
        attached=True,
        facts={"run_dir": str(run_dir), "offset": manifest.get("offset"), "store": store_url},
    )
    if store_url.startswith("memory"):
        fed.notices.append(
            "attached to a run on the embedded store: the store lives in that `meshfed up` "
            "process, so store faults (bundle-rollback, ca-rotate publishing, etcd-*) "
            "cannot be applied and are recorded unverified"
        )
    yield fed
