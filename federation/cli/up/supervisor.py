"""The trio process supervisor of ``meshfed up``.

It starts the plan stage by stage (each stage only once the previous one is
ready), watches every process, records each state change in the run manifest
(``run.json``, what ``meshfed status`` reads), serves kill/revive requests on a
Unix socket in the run directory, and stops everything in reverse stage order:
SIGTERM, then SIGKILL after a deadline.

A process that exits on its own is recorded as ``died`` and left dead: a
restart would hide exactly what the demo is there to show. Only ``revive``
starts it again, with the same command line (and a fresh join token, since a
token is burned on first use).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from federation.cli.up.adminclient import http_get
from federation.cli.up.plan import Component, Layout, Plan, Stage, TargetError, resolve_target
from federation.jointoken import JoinTokenFile
from federation.parentwatch import ENV
from trust.atomicfile import write_atomic
from trust.spiffe import SpiffeId

__all__ = ["ProcessState", "StartFailed", "Supervisor", "control_request"]

log = logging.getLogger("meshfed.up")

JOIN_TOKEN_FILE = "join-tokens.json"  # noqa: S105 (the agent's file name, not a secret)
JOIN_TOKEN_TTL = 600.0

InProcessRunner = Callable[[Component], Callable[..., Awaitable[None]]]
"""Returns ``async fn(task_status=...)`` that runs an in-process component until cancelled."""


class StartFailed(RuntimeError):
    """A component exited or did not become ready during start-up."""


@dataclass(slots=True)
class ProcessState:
    """Runtime state of one component (the manifest's ``runtime`` part)."""

    state: str = "pending"
    """pending, starting, ready, died, killed, stopping, stopped."""
    pid: int | None = None
    exit_code: int | None = None
    starts: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "starts": self.starts,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "note": self.note,
            **self.extra,
        }


class Supervisor:
    def __init__(
        self,
        plan: Plan,
        layout: Layout,
        meta: dict[str, Any],
        *,
        in_process: InProcessRunner | None = None,
        ready_timeout: float = 60.0,
        stop_deadline: float = 5.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.plan = plan
        self.layout = layout
        self.meta = meta
        self.in_process = in_process
        self.ready_timeout = ready_timeout
        self.stop_deadline = stop_deadline
        self.env = env
        self.states = {c.name: ProcessState() for c in plan.components}
        self.procs: dict[str, trio.Process] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self._exited: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        self.stopping = False

    # -- manifest --------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        return {
            **self.meta,
            "store_url": self.plan.store_url,
            "updated_at": time.time(),
            "components": [
                {**c.to_obj(), "runtime": self.states[c.name].to_obj()}
                for c in self.plan.components
            ],
        }

    def write_manifest(self) -> None:
        # Rewritten on every state change: atomic (readers never see half a file),
        # not fsync'd (it describes live processes; a crash makes it moot anyway).
        data = json.dumps(self.manifest(), indent=1).encode()
        write_atomic(self.layout.manifest, data, mode=0o644, durable=False)

    def _set(self, name: str, state: str, **changes: Any) -> None:
        st = self.states[name]
        st.state = state
        for key, value in changes.items():
            setattr(st, key, value)
        self.write_manifest()

    # -- starting ----------------------------------------------------------------------------

    def _argv(self, comp: Component) -> list[str]:
        argv = list(comp.argv)
        if comp.join_spiffe_id is not None and comp.agent_state_dir is not None:
            tokens = JoinTokenFile(Path(comp.agent_state_dir) / JOIN_TOKEN_FILE)
            token = tokens.issue(SpiffeId.parse(comp.join_spiffe_id), JOIN_TOKEN_TTL, time.time())
            argv += ["--join-token", token]
        return argv

    async def _spawn(self, comp: Component) -> None:
        """Start one component (no readiness wait)."""
        assert self._nursery is not None
        st = self.states[comp.name]
        st.starts += 1
        exited = self._exited[comp.name] = trio.Event()
        if comp.in_process:
            assert self.in_process is not None
            scope = trio.CancelScope()
            self.scopes[comp.name] = scope
            runner = self.in_process(comp)

            async def run_inline() -> None:
                try:
                    with scope:
                        await runner()
                except Exception as exc:  # an in-process part failing must not end `up`
                    log.exception("%s failed", comp.name)
                    self._set(comp.name, "died", note=f"{type(exc).__name__}: {exc}")
                finally:
                    exited.set()
                    state = self.states[comp.name].state
                    if state == "stopping":
                        self._set(comp.name, "stopped")
                    elif state in ("starting", "ready"):
                        self._set(comp.name, "died", note="returned on its own")

            self._set(
                comp.name, "starting", pid=os.getpid(), started_at=time.time(), exit_code=None
            )
            self._nursery.start_soon(run_inline)
            return
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        logf = (self.layout.logs / comp.log_name).open("ab")
        try:
            proc = await trio.lowlevel.open_process(
                self._argv(comp),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                # Own session: a terminal's Ctrl-C reaches `up` only, which then stops
                # the children in order instead of all of them at once.
                start_new_session=True,
                # ... and if `up` itself is SIGKILLed, each child notices and drains
                # (federation/parentwatch.py) instead of running on as an orphan.
                env={**(self.env if self.env is not None else os.environ), ENV: str(os.getpid())},
            )
        finally:
            logf.close()
        self.procs[comp.name] = proc
        self._set(
            comp.name, "starting", pid=proc.pid, started_at=time.time(), exit_code=None, note=""
        )
        self._nursery.start_soon(self._watch, comp, proc, exited)

    async def _watch(self, comp: Component, proc: trio.Process, exited: trio.Event) -> None:
        code = await proc.wait()
        exited.set()
        st = self.states[comp.name]
        if st.state in ("killed", "stopping", "stopped"):
            self._set(comp.name, "stopped" if st.state == "stopping" else st.state, exit_code=code)
        else:
            log.warning("%s (pid %s) exited with %s", comp.name, proc.pid, code)
            self._set(comp.name, "died", exit_code=code, note=self._log_tail(comp))

    def _log_tail(self, comp: Component) -> str:
        try:
            lines = (self.layout.logs / comp.log_name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        # Tracebacks end in boxes and blank lines: keep the last lines that say something.
        useful = [ln.strip(" |+-") for ln in lines if ln.strip(" |+-")]
        return " / ".join(useful[-4:])[-600:]

    async def _wait_ready(self, comp: Component) -> None:
        deadline = trio.current_time() + self.ready_timeout
        exited = self._exited[comp.name]
        while trio.current_time() < deadline:
            if exited.is_set():
                st = self.states[comp.name]
                raise StartFailed(
                    f"{comp.name} exited with {st.exit_code} while starting: {st.note} "
                    f"(log: {self.layout.logs / comp.log_name})"
                )
            if await self.probe_ready(comp):
                self._set(comp.name, "ready", ready_at=time.time())
                return
            await trio.sleep(0.2)
        raise StartFailed(
            f"{comp.name} not ready after {self.ready_timeout:.0f}s "
            f"(log: {self.layout.logs / comp.log_name})"
        )

    @staticmethod
    async def probe_ready(comp: Component) -> bool:
        if comp.ready == "http":
            got = await http_get(comp.ready_addr, "/ready", timeout=1.0)
            return got.status == 200
        host, _, port = comp.ready_addr.rpartition(":")
        try:
            with trio.fail_after(1.0):
                stream = await trio.open_tcp_stream(host, int(port))
        except (OSError, trio.TooSlowError):
            return False
        await stream.aclose()
        return True

    async def start_all(
        self, nursery: trio.Nursery, on_stage: Callable[[Stage, int], None]
    ) -> None:
        """Start every stage in order; raises :class:`StartFailed`."""
        self._nursery = nursery
        self.write_manifest()
        for group in self.plan.stages():
            for comp in group:
                await self._spawn(comp)
            failures: list[StartFailed] = []

            async def wait(comp: Component, failures: list[StartFailed] = failures) -> None:
                try:
                    await self._wait_ready(comp)
                except StartFailed as exc:
                    failures.append(exc)

            async with trio.open_nursery() as waits:
                for comp in group:
                    waits.start_soon(wait, comp)
            if failures:
                raise failures[0]
            on_stage(group[0].stage, len(group))

    # -- pokes -------------------------------------------------------------------------------

    async def kill(self, target: str) -> list[str]:
        """SIGKILL (or cancel, in-process) what ``target`` names; returns the names."""
        async with self._lock:
            comps = resolve_target(self.plan.components, target)
            done = []
            for comp in comps:
                st = self.states[comp.name]
                if st.state not in ("starting", "ready"):
                    continue
                self._set(comp.name, "killed", note=f"killed by `meshfed kill {target}`")
                if comp.in_process:
                    self.scopes[comp.name].cancel()
                else:
                    with contextlib.suppress(ProcessLookupError):
                        self.procs[comp.name].send_signal(signal.SIGKILL)
                done.append(comp.name)
            for name in done:
                await self._exited[name].wait()
            return done

    async def revive(self, target: str) -> list[str]:
        """Start again (same command line) what ``target`` names and is not running."""
        async with self._lock:
            comps = resolve_target(self.plan.components, target)
            todo = [c for c in comps if self.states[c.name].state in ("killed", "died", "stopped")]
            for comp in todo:  # in stage order: an app before its sidecar
                await self._spawn(comp)
                await self._wait_ready(comp)
            return [c.name for c in todo]

    async def serve_control(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One JSON request per connection: ``{"op": "kill"|"revive", "target": T}``."""
        path = self.layout.control
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await sock.bind(str(path))
        os.chmod(path, 0o600)  # only this user may poke the run
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()

        async def handle(stream: trio.abc.Stream) -> None:
            async with stream:
                buf = b""
                with trio.move_on_after(5):
                    while not buf.endswith(b"\n"):
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        buf += chunk
                try:
                    req = json.loads(buf)
                    op, target = req["op"], str(req["target"])
                    if op == "kill":
                        names = await self.kill(target)
                    elif op == "revive":
                        names = await self.revive(target)
                    else:
                        raise TargetError(f"unknown op {op!r}")
                    resp: dict[str, Any] = {"ok": True, "components": names}
                except (TargetError, StartFailed, ValueError, KeyError) as exc:
                    resp = {"ok": False, "error": str(exc)}
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(json.dumps(resp).encode() + b"\n")

        await trio.serve_listeners(handle, [listener])

    # -- stopping ----------------------------------------------------------------------------

    async def stop_all(self) -> None:
        """Reverse stage order: SIGTERM, wait ``stop_deadline``, SIGKILL, reap."""
        self.stopping = True
        for group in reversed(self.plan.stages()):
            live = [c for c in group if self.states[c.name].state in ("starting", "ready")]
            for comp in live:
                self._set(comp.name, "stopping")
                if comp.in_process:
                    self.scopes[comp.name].cancel()
                else:
                    with contextlib.suppress(ProcessLookupError):
                        self.procs[comp.name].send_signal(signal.SIGTERM)
            with trio.move_on_after(self.stop_deadline):
                for comp in live:
                    await self._exited[comp.name].wait()
            for comp in live:
                if not self._exited[comp.name].is_set() and not comp.in_process:
                    log.warning(
                        "%s ignored SIGTERM for %.0fs: SIGKILL", comp.name, self.stop_deadline
                    )
                    with contextlib.suppress(ProcessLookupError):
                        self.procs[comp.name].send_signal(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                for comp in live:
                    await self._exited[comp.name].wait()
        self.write_manifest()

    def kill_everything_now(self) -> None:
        """Last resort (start-up failed badly, or `up` is being torn down): SIGKILL all."""
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)


async def control_request(
    socket_path: Path,
    op: str,
    target: str,
    timeout: float = 120.0,  # noqa: ASYNC109
) -> dict[str, Any]:
    """Send one kill/revive request to a running ``up``."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(str(socket_path))
        async with stream:
            await stream.send_all(json.dumps({"op": op, "target": target}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
    result: dict[str, Any] = json.loads(buf)
    return result
