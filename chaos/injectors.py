"""Fault injectors for drills: apply one timeline event, then verify it took effect.

Every injector records one :class:`~chaos.record.FaultRecord` per applied fault (several for
multi-step faults: one per ``ca-rotate`` step, one per ``rolling-restart`` batch), with
``verified`` set only on evidence (a process gone or stopped, a proxy status at the new
generation, an agent reporting a refusal, ...). A fault that cannot be applied in this run
(no etcd, an attached run without proxies, a fault not supported) is recorded unverified
with the reason, which fails the drill's *faults applied and verified* verdict.

Pure parts: :func:`process_targets`, :func:`link_names`, :func:`fault_setting`,
:func:`check_link_status`, :func:`drop_wait` (when may ``ca-rotate``'s drop run),
:func:`check_issuers` (which CA signed the workloads' SVIDs), :func:`check_svid_expired`
and :func:`check_fresh_svid` (``cert-expire`` / ``cert-renew`` evidence from a sidecar's
``/stats``). The rest is a thin trio adapter over ``meshfed up``'s supervisor
(in this process, or through ``control.sock`` when attached), the fault proxies, the store
and the trust CA directories.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from chaos.drill import Target, TimelineEvent
from chaos.faultproxy import FaultSetting
from chaos.record import FaultRecord, ParamValue, Recorder
from federation import keys
from federation.cli.up.adminclient import http_get
from federation.cli.up.collect import read_manifest
from federation.cli.up.plan import Component, resolve_target
from federation.cli.up.supervisor import Supervisor, control_request
from federation.config.model import FederationConfig
from federation.store.api import Store

if TYPE_CHECKING:
    from chaos.launch import Federation

__all__ = [
    "ComponentInfo",
    "Injector",
    "ProcessControl",
    "SocketControl",
    "SupervisorControl",
    "check_fresh_svid",
    "check_issuers",
    "check_link_status",
    "check_svid_expired",
    "drop_wait",
    "fault_setting",
    "link_names",
    "process_targets",
]

#: How long an injector waits for evidence that a fault took effect.
VERIFY_TIMEOUT = 5.0
POLL = 0.1
LIVE = ("starting", "ready")


# -- pure --------------------------------------------------------------------------------------


def process_targets(target: Target, cfg: FederationConfig) -> list[str]:
    """The ``meshfed kill``/``revive`` targets (docs/up.md) a drill target stands for."""
    match target.kind:
        case "zone":
            return [f"zone:{target.cluster}/{target.zone}"]
        case "cluster":
            return [f"cluster:{target.cluster}"]
        case "cloud":
            return [f"cluster:{c.name}" for c in cfg.clusters if c.cloud == target.cloud]
        case "gateway":
            return [f"gateway:{target.cluster}"]
        case "agent":
            return [f"agent/{target.cluster}"]
        case "endpoint":
            w = next(
                w
                for w in cfg.workloads
                if w.cluster == target.cluster and w.name == target.workload
            )
            replicas = range(w.replicas) if target.replica is None else [target.replica]
            return [f"{w.cluster}/{w.name}-{r}" for r in replicas]
        case _:
            raise ValueError(f"{target} names no processes")


def link_names(target: Target, available: Sequence[str]) -> list[str]:
    """The fault proxies (``gateway:<c>``, ``etcd:<c>``) a link fault on ``target`` drives.

    ``link:a->b`` is b's gateway proxy (it carries every peer's connections into b's
    gateway, not only a's); ``link:a->etcd`` is a's agent-to-etcd proxy; ``gateway:c`` is c's
    gateway proxy; ``cluster:c`` (partition) is every proxy of c."""
    match target.kind:
        case "link":
            wanted = [
                f"etcd:{target.cluster}" if target.peer == "etcd" else f"gateway:{target.peer}"
            ]
        case "gateway":
            wanted = [f"gateway:{target.cluster}"]
        case "cluster":
            wanted = [f"gateway:{target.cluster}", f"etcd:{target.cluster}"]
        case _:
            wanted = []
    return [w for w in wanted if w in available]


def fault_setting(event: TimelineEvent) -> FaultSetting:
    """The proxy setting of a link fault."""
    p = event.params
    match event.fault:
        case "latency":
            return FaultSetting("latency", delay=p.delay or 0.0, jitter=p.jitter or 0.0)
        case "blackhole" | "partition":
            return FaultSetting("blackhole")
        case "reset":
            return FaultSetting("reset")
        case "bandwidth":
            return FaultSetting(
                "bandwidth", bytes_per_second=p.bytes_per_second or 0, burst=p.burst or 0
            )
        case "heal":
            return FaultSetting("pass")
        case _:
            raise ValueError(f"{event.fault} is not a link fault")


def check_link_status(
    before: Mapping[str, Any], after: Mapping[str, Any], setting: FaultSetting
) -> tuple[bool, str]:
    """Whether a proxy's status shows ``setting`` in force at a new generation."""
    fault = after.get("fault") or {}
    if fault.get("mode") != setting.mode:
        return False, f"proxy reports mode {fault.get('mode')!r}, not {setting.mode!r}"
    if int(after.get("generation", 0)) <= int(before.get("generation", 0)):
        return False, "proxy generation did not advance"
    return True, f"mode {setting.mode} at generation {after.get('generation')}"


def drop_wait(
    allowed_at: dt.datetime | None, now: dt.datetime, deadline: dt.datetime
) -> float | None:
    """Seconds to wait before ``ca-rotate``'s drop step may run: 0 when it is allowed now
    (``allowed_at`` None or passed: no SVID of the old CA can still be valid), None when it
    will not be allowed by ``deadline`` (the injector then tries at the deadline and records
    the refusal: a drop that did not happen is never skipped silently)."""
    if allowed_at is None or allowed_at <= now:
        return 0.0
    if allowed_at > deadline:
        return None
    return (allowed_at - now).total_seconds()


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def check_issuers(
    statuses: Mapping[str, Mapping[str, Any] | None], key_id: str
) -> tuple[bool, str]:
    """Whether every sidecar (name -> its ``/stats``, None if it did not answer) holds an SVID
    signed by the CA whose subject key identifier is ``key_id`` (hex)."""
    if not statuses:
        return False, "no live sidecar to check"
    silent = sorted(n for n, st in statuses.items() if not st)
    other = sorted(
        n for n, st in statuses.items() if st and st.get("svid_issuer_key_id") != key_id
    )
    if silent or other:
        parts = []
        if other:
            parts.append(f"{len(other)} on another CA ({', '.join(other)})")
        if silent:
            parts.append(f"{len(silent)} did not answer ({', '.join(silent)})")
        return False, "; ".join(parts)
    return True, f"all {len(statuses)} sidecar SVIDs issued by CA {key_id[:16]}"


def check_svid_expired(status: Mapping[str, Any] | None, now: dt.datetime) -> tuple[bool, str]:
    """``cert-expire`` evidence: the sidecar's ``/stats`` shows its SVID past NotAfter while
    renewal is frozen (the SVID it holds is the one that expired, not a renewed one)."""
    if not status:
        return False, "the sidecar did not answer /stats"
    not_after = _time(status.get("svid_not_after"))
    if not_after is None:
        return False, f"no usable svid_not_after in /stats ({status.get('svid_not_after')!r})"
    frozen = bool((status.get("svid_renewal") or {}).get("frozen"))
    if not frozen:
        return False, "renewal is not frozen"
    if now < not_after:
        left = (not_after - now).total_seconds()
        return False, f"SVID valid until {not_after.isoformat()} ({left:.1f}s left)"
    return True, (
        f"SVID serial {status.get('svid_serial')} expired at {not_after.isoformat()}"
        f" ({(now - not_after).total_seconds():.1f}s ago), renewal frozen"
    )


def check_fresh_svid(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, now: dt.datetime
) -> tuple[bool, str]:
    """``cert-renew`` evidence: a new SVID (another serial) for the same SPIFFE ID, valid
    now, with renewal no longer frozen."""
    if not after:
        return False, "the sidecar did not answer /stats"
    not_after = _time(after.get("svid_not_after"))
    if not_after is None or not_after <= now:
        return False, f"SVID still expired (NotAfter {after.get('svid_not_after')})"
    if before and after.get("svid_serial") == before.get("svid_serial"):
        return False, "same SVID serial as the expired one"
    if before and after.get("spiffe_id") != before.get("spiffe_id"):
        return False, f"SPIFFE ID changed: {before.get('spiffe_id')} -> {after.get('spiffe_id')}"
    if (after.get("svid_renewal") or {}).get("frozen"):
        return False, "renewal still frozen"
    return True, f"fresh SVID serial {after.get('svid_serial')} valid until {not_after.isoformat()}"


def _params(event: TimelineEvent, **extra: ParamValue) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {
        name: getattr(event.params, name) for name in sorted(event.params.given())
    }
    out.update(extra)
    return out


# -- process control -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ComponentInfo:
    name: str
    kind: str
    state: str
    pid: int | None
    in_process: bool
    admin: str | None
    ready_addr: str


class ProcessControl(Protocol):
    """Kill/revive through ``meshfed up``'s supervisor, and what a target resolves to now."""

    def resolve(self, target: str) -> list[ComponentInfo]: ...

    async def kill(self, target: str) -> list[str]: ...

    async def revive(self, target: str) -> list[str]: ...


def _info(comp: Component, runtime: Mapping[str, Any]) -> ComponentInfo:
    pid = runtime.get("pid")
    return ComponentInfo(
        comp.name,
        comp.kind,
        str(runtime.get("state", "")),
        int(pid) if pid else None,
        comp.in_process,
        comp.admin,
        comp.ready_addr,
    )


class SupervisorControl:
    """The supervisor of a federation this process started."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def resolve(self, target: str) -> list[ComponentInfo]:
        return [
            _info(c, self.sup.states[c.name].to_obj())
            for c in resolve_target(self.sup.plan.components, target)
        ]

    async def kill(self, target: str) -> list[str]:
        return await self.sup.kill(target)

    async def revive(self, target: str) -> list[str]:
        return await self.sup.revive(target)


class SocketControl:
    """A running ``meshfed up`` (``--attach``): ``run.json`` and ``control.sock``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def resolve(self, target: str) -> list[ComponentInfo]:
        manifest = read_manifest(self.run_dir)
        comps = []
        runtime: dict[str, Any] = {}
        for obj in manifest["components"]:
            obj = dict(obj)
            runtime[obj["name"]] = obj.pop("runtime", {})
            comps.append(Component.from_obj(obj))
        return [_info(c, runtime[c.name]) for c in resolve_target(comps, target)]

    async def _call(self, op: str, target: str) -> list[str]:
        resp = await control_request(self.run_dir / "control.sock", op, target)
        if not resp.get("ok"):
            raise RuntimeError(str(resp.get("error")))
        return [str(n) for n in resp.get("components") or []]

    async def kill(self, target: str) -> list[str]:
        return await self._call("kill", target)

    async def revive(self, target: str) -> list[str]:
        return await self._call("revive", target)


def proc_state(pid: int) -> str | None:
    """The kernel's state letter of ``pid`` (``R``, ``S``, ``T``, ``Z``...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def pid_alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = VERIFY_TIMEOUT) -> bool:  # noqa: ASYNC109
    with trio.move_on_after(timeout):
        while True:
            if await check():
                return True
            await trio.sleep(POLL)
    return False


async def _tcp_open(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with trio.fail_after(1.0):
            stream = await trio.open_tcp_stream(host, int(port))
    except (OSError, trio.TooSlowError):
        return False
    await stream.aclose()
    return True


# -- the injector ----------------------------------------------------------------------------


class Injector:
    """Applies timeline events to one federation and records what happened."""

    def __init__(
        self,
        fed: Federation,
        recorder: Recorder,
        now: Callable[[], float],
        *,
        notices: list[str] | None = None,
    ) -> None:
        self.fed = fed
        self.recorder = recorder
        self.now = now
        """Seconds since the drill's t0."""
        self.notices = notices if notices is not None else fed.notices
        self.killed: dict[str, None] = {}
        self.paused: dict[int, str] = {}
        self.faulted_links: set[str] = set()
        self.etcd_stopped = False
        self.rolled_back: dict[str, bytes] = {}
        self.frozen: dict[str, ComponentInfo] = {}
        """Sidecars whose renewal a ``cert-expire`` froze, by component name."""
        self.expired_stats: dict[str, Any] = {}
        """Their ``/stats`` when the expiry was seen (``cert-renew`` checks for a new serial)."""

    # -- recording --

    def _record(
        self, event: TimelineEvent, t: float, ok: bool, detail: str, **extra: ParamValue
    ) -> None:
        self.recorder.fault(
            FaultRecord(t, event.fault, str(event.target), _params(event, **extra), ok, detail)
        )

    async def apply(self, event: TimelineEvent) -> None:
        """Apply ``event`` and record it (multi-step faults return after the last step)."""
        handlers: dict[str, Callable[[TimelineEvent], Awaitable[None]]] = {
            "kill": self._kill,
            "revive": self._revive,
            "pause": self._pause,
            "resume": self._resume,
            "latency": self._link,
            "blackhole": self._link,
            "reset": self._link,
            "bandwidth": self._link,
            "partition": self._link,
            "heal": self._link,
            "etcd-stop": self._etcd_stop,
            "etcd-start": self._etcd_start,
            "etcd-compact": self._etcd_compact,
            "bundle-rollback": self._bundle_rollback,
            "ca-rotate": self._ca_rotate,
            "rolling-restart": self._rolling_restart,
            "cert-expire": self._cert_expire,
            "cert-renew": self._cert_renew,
        }
        try:
            await handlers[event.fault](event)
        except Exception as exc:  # an injector bug must show in the report, not end the run
            self._record(event, self.now(), False, f"injector failed: {type(exc).__name__}: {exc}")

    # -- processes --

    async def _kill(self, event: TimelineEvent) -> None:
        targets = process_targets(event.target, self.fed.cfg)
        before = [c for t in targets for c in self.fed.control.resolve(t) if c.state in LIVE]
        names: list[str] = []
        for t in targets:
            names += await self.fed.control.kill(t)
            self.killed[t] = None
        t_applied = self.now()
        if not names:
            self._record(event, t_applied, False, "nothing running matched (already down?)")
            return
        hit = [c for c in before if c.name in names]

        async def gone() -> bool:
            for c in hit:
                if c.in_process:
                    if c.admin and (await http_get(c.admin, "/ready", timeout=0.5)).status:
                        return False
                elif c.pid is not None and pid_alive(c.pid):
                    return False
            return True

        ok = await _until(gone)
        alive = [c.name for c in hit if not c.in_process and c.pid and pid_alive(c.pid)]
        detail = (
            f"SIGKILL {len(names)}: {', '.join(names)}; all gone"
            if ok
            else f"still running after {VERIFY_TIMEOUT:.0f}s: {', '.join(alive) or 'in-process'}"
        )
        self._record(event, t_applied, ok, detail)

    async def _revive(self, event: TimelineEvent) -> None:
        targets = process_targets(event.target, self.fed.cfg)
        names: list[str] = []
        # A revive takes effect from its first started process, while the supervisor
        # waits for each to be ready in turn: record its start, so recovery is measured
        # from it and the failover window ends there (not seconds into the recovery).
        t_applied = self.now()
        for t in targets:
            names += await self.fed.control.revive(t)
            self.killed.pop(t, None)
        comps = [c for t in targets for c in self.fed.control.resolve(t)]
        bad = [
            c.name
            for c in comps
            if c.state != "ready" or (not c.in_process and (c.pid is None or not pid_alive(c.pid)))
        ]
        ok = bool(names) and not bad
        detail = (
            f"started {len(names)} and ready: {', '.join(names)}"
            if ok
            else ("nothing to revive" if not names else f"not ready: {', '.join(bad)}")
        )
        self._record(event, t_applied, ok, detail)

    def _process_pids(self, event: TimelineEvent) -> tuple[list[ComponentInfo], list[str]]:
        comps = [
            c
            for t in process_targets(event.target, self.fed.cfg)
            for c in self.fed.control.resolve(t)
        ]
        refused = [c.name for c in comps if c.in_process or c.pid in (None, os.getpid())]
        return [c for c in comps if c.name not in refused], refused

    async def _pause(self, event: TimelineEvent) -> None:
        await self._signal(event, signal.SIGSTOP, stopped=True)

    async def _resume(self, event: TimelineEvent) -> None:
        await self._signal(event, signal.SIGCONT, stopped=False)

    async def _signal(self, event: TimelineEvent, sig: signal.Signals, *, stopped: bool) -> None:
        comps, refused = self._process_pids(event)
        live = [c for c in comps if c.state in LIVE and c.pid is not None]
        for c in live:
            assert c.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, sig)
            if stopped:
                self.paused[c.pid] = c.name
            else:
                self.paused.pop(c.pid, None)
        t_applied = self.now()

        async def effect() -> bool:
            return all((proc_state(c.pid or 0) == "T") == stopped for c in live)

        ok = bool(live) and await _until(effect, 2.0) and not refused
        verb = "SIGSTOP" if stopped else "SIGCONT"
        detail = f"{verb} {len(live)}: {', '.join(c.name for c in live)}"
        if refused:
            detail += (
                f"; cannot signal {', '.join(refused)} (runs inside the runner's process: "
                "use the etcd store for a separate agent process)"
            )
        elif not live:
            detail = "nothing running matched"
        elif not ok:
            detail += "; kernel state did not change"
        self._record(event, t_applied, ok, detail)

    # -- links --

    async def _link(self, event: TimelineEvent) -> None:
        names = link_names(event.target, sorted(self.fed.links))
        if not names:
            why = (
                "an attached run has no fault proxies (start the federation from the drill)"
                if self.fed.attached
                else "no fault proxy on this link"
            )
            self._record(event, self.now(), False, why)
            return
        setting = fault_setting(event)
        results: list[tuple[bool, str]] = []
        befores = {n: self.fed.links[n].link.status().to_json() for n in names}
        for n in names:
            self.fed.links[n].link.set_fault(setting)
            if setting.mode == "pass":
                self.faulted_links.discard(n)
            else:
                self.faulted_links.add(n)
        t_applied = self.now()
        for n in names:
            after = self.fed.links[n].link.status().to_json()
            ok, why = check_link_status(befores[n], after, setting)
            if ok and setting.mode == "reset":
                ok, why = await self._verify_reset(n, befores[n])
            results.append((ok, f"{n}: {why}"))
        detail = "; ".join(why for _, why in results)
        if event.fault == "partition":
            detail += "; partition as a fault-proxy blackhole (see notices)"
        self._record(event, t_applied, all(ok for ok, _ in results), detail)

    async def _verify_reset(self, name: str, before: Mapping[str, Any]) -> tuple[bool, str]:
        proxy = self.fed.links[name]
        if proxy.link.status().connections_reset > int(before.get("connections_reset", 0)):
            return True, f"reset {proxy.link.status().connections_reset} connection(s)"
        # Nothing was live: a probe connection through the proxy must be reset.
        host, _, port = proxy.listens[0].rpartition(":")
        with contextlib.suppress(OSError, trio.TooSlowError):
            with trio.fail_after(2.0):
                stream = await trio.open_tcp_stream(host, int(port))
                async with stream:
                    with contextlib.suppress(trio.BrokenResourceError, OSError):
                        await stream.receive_some(1)
        grew = proxy.link.status().connections_reset > int(before.get("connections_reset", 0))
        return grew, ("probe connection reset" if grew else "no connection was reset")

    # -- etcd --

    def _etcd_addr(self) -> str | None:
        url = self.fed.store_url
        return url[len("etcd://") :].split(",")[0] if url.startswith("etcd://") else None

    async def _etcd_stop(self, event: TimelineEvent) -> None:
        addr = self._etcd_addr()
        if addr is None or not self.fed.control.resolve("etcd"):
            self._record(event, self.now(), False, "this run has no etcd (embedded store)")
            return
        names = await self.fed.control.kill("etcd")
        self.etcd_stopped = True
        t_applied = self.now()

        async def closed() -> bool:
            return not await _tcp_open(addr)

        ok = bool(names) and await _until(closed)
        self._record(
            event,
            t_applied,
            ok,
            f"etcd killed; {addr} refuses connections" if ok else f"{addr} still answers",
        )

    async def _etcd_start(self, event: TimelineEvent) -> None:
        addr = self._etcd_addr()
        if addr is None or not self.fed.control.resolve("etcd"):
            self._record(event, self.now(), False, "this run has no etcd (embedded store)")
            return
        t_applied = self.now()  # as for revive: from when it starts
        names = await self.fed.control.revive("etcd")
        self.etcd_stopped = False

        async def up() -> bool:
            return await _tcp_open(addr)

        ok = bool(names) and await _until(up)
        self._record(
            event, t_applied, ok, f"etcd started; {addr} accepts" if ok else f"{addr} not answering"
        )

    @contextlib.asynccontextmanager
    async def _store(self) -> AsyncIterator[Store | None]:
        if self.fed.store is not None:
            yield self.fed.store
            return
        if not self.fed.store_url.startswith("etcd://"):
            yield None
            return
        from federation.store.open import open_store

        async with open_store(self.fed.store_url) as store:
            yield store

    async def _etcd_compact(self, event: TimelineEvent) -> None:
        async with self._store() as store:
            if store is None:
                self._record(event, self.now(), False, "the store is not reachable from the runner")
                return
            rev = await store.current_revision()
            await store.compact(rev)
            t_applied = self.now()
            self._record(
                event, t_applied, rev > 0, f"compacted {self.fed.store_url} to revision {rev}"
            )

    # -- trust --

    async def _agent_status(self) -> dict[str, Any]:
        """Every live agent's ``/status`` by cluster (None where it does not answer)."""
        out: dict[str, Any] = {}
        for c in self.fed.cfg.clusters:
            comps = [x for x in self.fed.control.resolve(f"agent/{c.name}") if x.state in LIVE]
            if comps and comps[0].admin:
                out[c.name] = (await http_get(comps[0].admin, "/status", timeout=1.0)).json()
        return out

    @staticmethod
    def _refusals(status: Any, td: str) -> int:
        if not isinstance(status, dict):
            return 0
        return sum(
            int(n)
            for key, n in (status.get("bundle_refusals") or {}).items()
            if str(key).startswith(f"{td}/")
        )

    async def _bundle_rollback(self, event: TimelineEvent) -> None:
        from trust.bundle import TrustBundle
        from trust.spiffe import TrustDomain

        td = self.fed.cfg.cluster(event.target.cluster).trust_domain
        key = keys.bundle(td)
        async with self._store() as store:
            if store is None:
                self._record(event, self.now(), False, "the store is not reachable from the runner")
                return
            kv = await store.get(key)
            if kv is None:
                self._record(event, self.now(), False, f"no bundle published at {key}")
                return
            current = TrustBundle.from_json(TrustDomain.parse(td), kv.value)
            if current.sequence == 0:
                self._record(event, self.now(), False, "the bundle is at sequence 0: nothing lower")
                return
            before = await self._agent_status()
            stale = TrustBundle(current.trust_domain, current.roots, current.sequence - 1)
            self.rolled_back.setdefault(key, kv.value)
            await store.put(key, stale.to_json().encode())
            t_applied = self.now()

        async def refused_everywhere() -> bool:
            after = await self._agent_status()
            return bool(after) and all(
                self._refusals(after.get(c), td) > self._refusals(before.get(c), td)
                and ((after.get(c) or {}).get("bundles") or {}).get(td, {}).get("sequence")
                == current.sequence
                for c in before
            )

        ok = await _until(refused_everywhere)
        after = await self._agent_status()
        per = ", ".join(
            f"{c} refusals {self._refusals(before.get(c), td)}->{self._refusals(after.get(c), td)}"
            f" holds seq {((after.get(c) or {}).get('bundles') or {}).get(td, {}).get('sequence')}"
            for c in before
        )
        self._record(
            event,
            t_applied,
            ok,
            f"wrote {td} sequence {stale.sequence} over {current.sequence}; {per}",
        )

    async def _sidecar_stats(self, comps: Sequence[ComponentInfo]) -> dict[str, Any]:
        """``/stats`` of each sidecar by component name (None where it does not answer)."""
        out: dict[str, Any] = {}
        for c in comps:
            out[c.name] = (
                (await http_get(c.admin, "/stats", timeout=1.0)).json() if c.admin else None
            )
        return out

    def _cluster_sidecars(self, cluster: str) -> list[ComponentInfo]:
        """Every live sidecar of ``cluster``, callers included."""
        out: list[ComponentInfo] = []
        for w in self.fed.cfg.workloads:
            if w.cluster != cluster:
                continue
            for r in range(w.replicas):
                with contextlib.suppress(Exception):  # a workload this run left out
                    out += [
                        c
                        for c in self.fed.control.resolve(f"sidecar/{cluster}/{w.name}-{r}")
                        if c.kind == "sidecar" and c.state in LIVE and c.admin
                    ]
        return out

    async def _ca_rotate(self, event: TimelineEvent) -> None:
        """publish, switch, drop; ``interval`` apart, the drop also not before the old CA's
        last SVID has expired (``CaRotation.drop_allowed_at``), at most ``max_wait`` after
        the switch. One record per step, each verified on the agents' bundles; the switch
        also on the signing CA and on every live sidecar of the cluster renewing with the
        new CA, the drop on the old root being gone everywhere."""
        from trust.publish import publish_bundle
        from trust.rotation import CaDirectory, RotationRefused

        cluster = self.fed.cfg.cluster(event.target.cluster)
        td = cluster.trust_domain
        interval = event.params.interval or 5.0
        ttl = self.fed.cfg.federation.settings.svid_ttl
        max_wait = event.params.max_wait or (ttl + 30.0)
        ca_path = self.fed.layout.ca_dir(td)
        steps = ("publish", "switch", "drop")
        done: list[str] = []
        try:
            async with self._store() as store:
                for i, step in enumerate(steps):
                    if i:
                        await trio.sleep(interval)
                    if store is None:
                        self._record(event, self.now(), False, "store not reachable", step=step)
                        done.append(step)
                        continue
                    extra = ""
                    if step == "drop":
                        extra = await self._wait_for_drop(ca_path, max_wait)
                    try:
                        ca = CaDirectory.open(ca_path)
                        active_before = (ca_path / "ca.crt").read_bytes()
                        bundle = ca.rotate(step, dt.datetime.now(dt.UTC))  # type: ignore[arg-type]
                        await publish_bundle(store, bundle)
                    except Exception as exc:
                        why = exc.problem if isinstance(exc, RotationRefused) else str(exc)
                        self._record(
                            event, self.now(), False, f"{step} refused: {why}{extra}", step=step
                        )
                        done.append(step)
                        for rest in steps[i + 1 :]:
                            self._record(
                                event, self.now(), False, f"not attempted after {step}", step=rest
                            )
                            done.append(rest)
                        return
                    t_applied = self.now()
                    ok, detail = await self._verify_rotation_step(
                        step, td, bundle, ca_path, active_before, interval, ttl
                    )
                    self._record(event, t_applied, ok, detail + extra, step=step)
                    done.append(step)
        finally:
            # Cancelled (the run's grace after the traffic ran out): a step that did not
            # happen must show as such, never vanish from the report.
            for step in steps:
                if step not in done:
                    self._record(
                        event, self.now(), False, f"{step}: not done when the run ended", step=step
                    )

    async def _wait_for_drop(self, ca_path: Path, max_wait: float) -> str:
        """Sleep until ``drop_allowed_at`` has passed (re-read each time), at most
        ``max_wait``; returns the record's detail suffix. Whether the drop is allowed then
        is the drop step's own decision (``CaRotation.drop``), recorded either way."""
        from trust.rotation import CaDirectory

        t_start = trio.current_time()
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(0.0, max_wait))
        allowed_at = None
        while True:
            allowed_at = CaDirectory.open(ca_path).state.drop_allowed_at()
            wait = drop_wait(allowed_at, dt.datetime.now(dt.UTC), deadline)
            if wait == 0.0:
                break
            if wait is None:  # not allowed in time: try at the deadline; the refusal is recorded
                await trio.sleep(max(0.0, (deadline - dt.datetime.now(dt.UTC)).total_seconds()))
                break
            await trio.sleep(wait + 0.2)  # past NotAfter, strictly
        waited = trio.current_time() - t_start
        when = allowed_at.isoformat(timespec="seconds") if allowed_at else "now"
        return f"; waited {waited:.1f}s for the old CA's last SVID to expire ({when})"

    async def _verify_rotation_step(
        self,
        step: str,
        td: str,
        bundle: Any,
        ca_path: Path,
        active_before: bytes,
        interval: float,
        ttl: float,
    ) -> tuple[bool, str]:
        from cryptography import x509

        from federation.agent.overview import fingerprints

        want = fingerprints(bundle.roots)

        async def agents_hold(seq: int = bundle.sequence, want: list[str] = want) -> bool:
            st = await self._agent_status()
            return bool(st) and all(
                ((s or {}).get("bundles") or {}).get(td, {}).get("sequence") == seq
                and ((s or {}).get("bundles") or {}).get(td, {}).get("roots") == want
                for s in st.values()
            )

        ok = await _until(agents_hold, min(VERIFY_TIMEOUT, max(1.0, interval / 2)))
        detail = (
            f"{step}: {td} bundle sequence {bundle.sequence}, {len(want)} root(s)"
            + ("; every agent holds it" if ok else "; not every agent holds it")
        )
        if step == "publish":
            return ok, detail
        signing = x509.load_pem_x509_certificates((ca_path / "ca.crt").read_bytes())[0]
        key_id = signing.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest.hex()
        if step == "switch":
            switched = (ca_path / "ca.crt").read_bytes() != active_before
            detail += "; signing CA switched" if switched else "; signing CA did NOT change"
            ok = ok and switched
        # Every live sidecar must renew with the new CA: within one SVID lifetime at most
        # (the renewal is due at about half of it). After the drop only these can be valid.
        cluster = next(c.name for c in self.fed.cfg.clusters if c.trust_domain == td)
        why = ""
        renewed = False

        async def on_new_ca() -> bool:
            nonlocal why, renewed
            st = await self._sidecar_stats(self._cluster_sidecars(cluster))
            renewed, why = check_issuers(st, key_id)
            return renewed

        t_start = trio.current_time()
        await _until(on_new_ca, ttl + 5.0 if step == "switch" else VERIFY_TIMEOUT)
        detail += f"; {why}" + (
            f" ({trio.current_time() - t_start:.1f}s after the step)" if step == "switch" else ""
        )
        if step == "drop":
            detail += "; old root gone from every agent's bundle" if ok else ""
        return ok and renewed, detail

    # -- certificate expiry --

    def _target_sidecars(self, event: TimelineEvent) -> list[ComponentInfo]:
        return [
            c
            for t in process_targets(event.target, self.fed.cfg)
            for c in self.fed.control.resolve(t)
            if c.kind == "sidecar" and c.state in LIVE and c.admin
        ]

    async def _cert_expire(self, event: TimelineEvent) -> None:
        """Freeze the target sidecars' SVID renewal (SIGUSR1, docs/drills.md), then wait
        until the SVID they hold is past its NotAfter. Recorded when the expiry is seen."""
        if event.target.kind != "endpoint":
            self._record(
                event,
                self.now(),
                False,
                f"cert-expire on a {event.target.kind} is not supported: only sidecars expose a "
                "renewal freeze (SIGUSR1)",
            )
            return
        comps = [c for c in self._target_sidecars(event) if c.pid and not c.in_process]
        if not comps:
            self._record(event, self.now(), False, "no live sidecar process matched")
            return
        for c in comps:
            assert c.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGUSR1)
            self.frozen[c.name] = c
        t_frozen = self.now()

        async def frozen() -> bool:
            st = await self._sidecar_stats(comps)
            return all(((s or {}).get("svid_renewal") or {}).get("frozen") for s in st.values())

        if not await _until(frozen):
            self._record(event, self.now(), False, "no sidecar confirmed the renewal freeze")
            return
        ttl = self.fed.cfg.federation.settings.svid_ttl
        max_wait = event.params.max_wait or (ttl + 30.0)
        results: dict[str, tuple[bool, str]] = {}

        async def expired() -> bool:
            st = await self._sidecar_stats(comps)
            now = dt.datetime.now(dt.UTC)
            results.update({n: check_svid_expired(s, now) for n, s in st.items()})
            return all(ok for ok, _ in results.values())

        ok = await _until(expired, max_wait)
        t_expired = self.now()
        self.expired_stats.update(await self._sidecar_stats(comps))
        ready = [
            c.name for c in comps if (await http_get(c.admin or "", "/ready", timeout=1.0)).status
            == 200
        ]
        detail = (
            f"renewal frozen at t={t_frozen:.1f}s; "
            + "; ".join(f"{n}: {why}" for n, (_, why) in sorted(results.items()))
            + (f"; still ready: {', '.join(ready)}" if ready else "; /ready 503")
        )
        if not ok:
            detail += f" (gave up after {max_wait:.0f}s)"
        self._record(event, t_expired, ok, detail)

    async def _cert_renew(self, event: TimelineEvent) -> None:
        """Resume renewal (SIGUSR2). An expired SVID cannot authenticate a renewal (the
        agent verifies the client certificate), so a sidecar still expired after
        ``VERIFY_TIMEOUT`` is re-attested: restarted with a fresh join token, as an
        operator would. Verified on a fresh SVID for the same SPIFFE ID."""
        names = [n for n in self.frozen if self._matches(event, n)]
        t_applied = self.now()
        if not names:
            self._record(event, t_applied, False, "no frozen sidecar on this target")
            return
        comps = [self.frozen[n] for n in names]
        for c in comps:
            if c.pid:  # never 0: that would signal the runner's own process group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, signal.SIGUSR2)
        results: dict[str, tuple[bool, str]] = {}

        async def fresh(comps: list[ComponentInfo] = comps) -> bool:
            st = await self._sidecar_stats(comps)
            now = dt.datetime.now(dt.UTC)
            results.update(
                {n: check_fresh_svid(self.expired_stats.get(n), s, now) for n, s in st.items()}
            )
            return all(ok for ok, _ in results.values())

        how = "renewed in place"
        if not await _until(fresh):
            stuck = [n for n in names if not results.get(n, (False, ""))[0]]
            errors = {
                n: ((self.expired_stats.get(n) or {}).get("svid_renewal") or {}).get("last_error")
                for n in stuck
            }
            for n in stuck:
                await self.fed.control.kill(n)
                await self.fed.control.revive(n)
            how = "re-attested (restarted with a fresh join token) " + ", ".join(stuck)
            last = [e for e in errors.values() if e]
            if last:
                how += f" after the renewal was refused ({last[0]})"
            comps = [c for n in names for c in self.fed.control.resolve(n)]

            async def fresh_again(comps: list[ComponentInfo] = comps) -> bool:
                return await fresh(comps)

            await _until(fresh_again, event.params.max_wait or 30.0)
        ok = all(okr for okr, _ in results.values()) and bool(results)
        for n in names:
            self.frozen.pop(n, None)
        self._record(
            event,
            t_applied,
            ok,
            f"renewal resumed; {how}; "
            + "; ".join(f"{n}: {why}" for n, (_, why) in sorted(results.items())),
        )

    def _matches(self, event: TimelineEvent, name: str) -> bool:
        return any(
            c.name == name
            for t in process_targets(event.target, self.fed.cfg)
            for c in self.fed.control.resolve(t)
        )

    # -- rolling restart --

    async def _rolling_restart(self, event: TimelineEvent) -> None:
        target = event.target
        cfg = self.fed.cfg
        if target.kind == "gateway":
            units = [f"gateway:{target.cluster}"]
        else:
            units = [
                f"{w.cluster}/{w.name}-{r}"
                for w in cfg.workloads
                if w.cluster == target.cluster
                and (target.kind != "zone" or w.zone == target.zone)
                and (target.kind != "endpoint" or w.name == target.workload)
                and not w.upstreams
                for r in range(w.replicas)
                if target.kind != "endpoint" or target.replica in (None, r)
            ]
        batch = event.params.batch or 1
        interval = event.params.interval or 5.0
        for i in range(0, len(units), batch):
            if i:
                await trio.sleep(interval)
            group = units[i : i + batch]
            comps = [c for u in group for c in self.fed.control.resolve(u) if c.state in LIVE]
            old = {c.name: c.pid for c in comps}
            # Sidecar first (it drains and deregisters), then the app: reverse start order.
            for c in sorted(comps, key=lambda c: c.kind != "sidecar"):
                if c.pid and not c.in_process:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(c.pid, signal.SIGTERM)

            async def exited(comps: list[ComponentInfo] = comps) -> bool:
                return all(not (c.pid and pid_alive(c.pid)) for c in comps)

            drained = await _until(exited, 10.0)
            names: list[str] = []
            for u in group:
                with contextlib.suppress(RuntimeError, Exception):
                    names += await self.fed.control.revive(u)
            t_applied = self.now()
            new = {c.name: c for u in group for c in self.fed.control.resolve(u)}
            fresh = [
                n for n, c in new.items() if c.state == "ready" and c.pid != old.get(n) and c.pid
            ]
            ok = drained and bool(comps) and len(fresh) == len(comps)
            self._record(
                event,
                t_applied,
                ok,
                f"batch {i // batch + 1}: SIGTERM+drain {', '.join(sorted(old))}; "
                f"restarted {len(fresh)}/{len(comps)}"
                + ("" if drained else "; did not exit in 10s"),
                batch_index=i // batch + 1,
            )

    # -- cleanup --

    async def restore_all(self) -> list[str]:
        """Undo every fault still in force (after the traffic ended); returns what was done."""
        done: list[str] = []
        for pid, name in list(self.paused.items()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            done.append(f"resumed {name}")
        self.paused.clear()
        for name in sorted(self.faulted_links):
            self.fed.links[name].link.set_fault(FaultSetting("pass"))
            done.append(f"healed {name}")
        self.faulted_links.clear()
        if self.etcd_stopped:
            with contextlib.suppress(Exception):
                await self.fed.control.revive("etcd")
                done.append("started etcd")
            self.etcd_stopped = False
        if self.rolled_back:
            async with self._store() as store:
                for key, value in self.rolled_back.items():
                    if store is not None:
                        await store.put(key, value)
                        done.append(f"restored {key}")
            self.rolled_back.clear()
        for name, comp in list(self.frozen.items()):
            with contextlib.suppress(Exception):
                if comp.pid:
                    os.kill(comp.pid, signal.SIGUSR2)
                now = dt.datetime.now(dt.UTC)
                st = (await self._sidecar_stats([comp])).get(name)
                if check_svid_expired(st, now)[0] or (st or {}).get("svid_expired"):
                    await self.fed.control.kill(name)
                    await self.fed.control.revive(name)
                    done.append(f"re-attested {name}")
                else:
                    done.append(f"resumed SVID renewal of {name}")
        self.frozen.clear()
        for t in list(self.killed):
            with contextlib.suppress(Exception):
                names = await self.fed.control.revive(t)
                if names:
                    done.append(f"revived {t}")
        self.killed.clear()
        return done
