"""``meshfed up`` and its pokes: ``status``, ``call``, ``kill``, ``revive``, ``logs``,
and the demo processes (``demo app``, ``demo traffic``). See docs/up.md.

Exit codes (docs/cli.md): 0 ok (``up`` after a clean shutdown); 1 a call failed;
2 invalid input (config, target, flags), one line saying what to do; 3 a
dependency is unavailable (no running ``up``, a component did not start).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import trio
import typer

from federation import logs
from federation.cli.up import prepare
from federation.cli.up.collect import collect_view, read_manifest
from federation.cli.up.plan import Component, Layout
from federation.cli.up.pokes import (
    PokeError,
    find_run_dirs,
    format_log_line,
    locality_tier,
    log_files,
    path_of,
    plan_call,
    read_lines,
)
from federation.cli.up.ports import (
    PortConflict,
    choose_offset,
    duplicates,
    extra_ports,
    listeners,
    lock_offset,
    port_is_free,
)
from federation.cli.up.prom import scrape_config
from federation.cli.up.supervisor import StartFailed, Supervisor, control_request
from federation.config.errors import ConfigError
from federation.config.loader import load_config

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3
DEFAULT_CONFIG = Path("configs/demo.yaml")

demo_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
log = logging.getLogger("meshfed.up")


def _fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    typer.echo(f"meshfed: {message}", err=True)
    raise typer.Exit(code)


def _store_choice(store: str) -> tuple[str, str | None]:
    """(mode, external url) for --store memory|embedded|etcd|etcd://h:p."""
    if store in ("memory", "embedded", "memory://"):
        return "embedded", None
    if store == "etcd":
        return "etcd", None
    if store.startswith("etcd://"):
        from federation.store.open import InvalidStoreURL, parse_store_url

        try:
            parse_store_url(store)
        except InvalidStoreURL as exc:
            _fail(str(exc))
        return "external", store
    _fail(f"--store {store!r}: use memory, etcd (started by up) or etcd://host:port")


# -- up -------------------------------------------------------------------------------------


def up(
    config: Annotated[Path, typer.Argument(help="Deployment config.")] = DEFAULT_CONFIG,
    store: Annotated[
        str, typer.Option("--store", help="memory (in-process), etcd (started here) or etcd://h:p.")
    ] = "memory",
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Default: $XDG_RUNTIME_DIR or /tmp.")
    ] = None,
    port_offset: Annotated[
        str, typer.Option("--port-offset", help="auto, or a number added to every port.")
    ] = "auto",
    once: Annotated[bool, typer.Option("--once", help="Print one frame, no live view.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the view as JSON once.")] = False,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Stop after this many seconds.")
    ] = None,
    prometheus_config: Annotated[
        Path | None, typer.Option("--prometheus-config", help="Write a scrape config here.")
    ] = None,
    rate: Annotated[float, typer.Option("--rate", help="Requests/s per traffic flow.")] = 4.0,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the run dir after stopping.")] = False,
) -> None:
    """Run a whole federation on this machine, one process per component, watched live."""
    mode, external = _store_choice(store)
    etcd_binary = shutil.which("etcd") or "/usr/bin/etcd"
    if mode == "etcd" and not os.access(etcd_binary, os.X_OK):
        _fail("--store etcd needs the etcd binary (apt-get install etcd-server)", EXIT_UNAVAILABLE)
    try:
        base_cfg = load_config(config)
    except ConfigError as exc:
        _fail(f"{exc.issues[0]} (run `meshfed config validate {config}`)")
    except OSError as exc:
        _fail(f"{config}: {exc.strerror}")
    extra = extra_ports(base_cfg)
    planned = listeners(base_cfg, extra)
    clashes = duplicates(planned)
    if clashes:
        a, b = clashes[0]
        _fail(f"{config}: {a.owner} and {b.owner} both listen on {a.host}:{a.port}")
    locks = lock_offset()
    try:
        requested = None if port_offset == "auto" else int(port_offset)
    except ValueError:
        _fail(f"--port-offset {port_offset!r}: use auto or a whole number")
    try:
        offset = choose_offset(planned, port_is_free, requested=requested, try_lock=locks.try_lock)
    except PortConflict as exc:
        locks.release_all()
        _fail(str(exc), EXIT_UNAVAILABLE)
    locks.keep_only(offset)
    try:
        layout = prepare.make_run_dir(run_dir or prepare.default_run_dir())
    except (FileExistsError, OSError) as exc:
        _fail(str(exc))
    try:
        run = prepare.prepare_run(
            config,
            layout,
            offset,
            extra,
            mode=mode,  # type: ignore[arg-type]
            external=external,
            etcd_binary=etcd_binary,
            rate=rate,
        )
        prepare.write_traffic_plan(run.plan, layout)
    except ConfigError as exc:
        prepare.remove_run_dir(layout)
        _fail(f"the port-shifted copy is invalid: {exc.issues[0]} (try another --port-offset)")
    cfg, plan, store_url = run.cfg, run.plan, run.store_url
    if prometheus_config is not None:
        prometheus_config.write_text(scrape_config(plan.components))
    logs.configure("INFO", stream=(layout.logs / "up.log").open("a"), component="up")
    meta = run.meta(layout, config, mode)
    typer.echo(
        f"meshfed up: {len(plan.components)} components of {config} at port offset {offset}, "
        f"store {store_url}, run dir {layout.root}",
        err=True,
    )
    code = 0
    try:
        code = trio.run(_run_up, cfg, plan, layout, meta, mode, once, as_json, duration)
    finally:
        locks.release_all()
        if not keep:
            prepare.remove_run_dir(layout)
    raise typer.Exit(code)


def _try_hints(plan_components: tuple[Component, ...], run_dir: Path) -> str:
    callers = sorted({f"{c.cluster}/{c.workload}" for c in plan_components if c.caller})
    zone = next((c for c in plan_components if c.kind == "app" and not c.caller), None)
    rd = f" --run-dir {run_dir}"
    lines = ["try:", f"  meshfed status{rd}"]
    if callers:
        lines.append(f"  meshfed call whoami --from {callers[0]}{rd}")
    if zone is not None:
        lines.append(
            f"  meshfed kill zone:{zone.cluster}/{zone.zone}{rd}   (then: meshfed revive ...)"
        )
    lines.append(f"  meshfed logs gateway{rd} --follow")
    return "\n".join(lines)


async def _run_up(
    cfg: Any,
    plan: Any,
    layout: Layout,
    meta: dict[str, Any],
    mode: str,
    once: bool,
    as_json: bool,
    duration: float | None,
) -> int:
    from federation.agent.runner import Agent, AgentOptions
    from federation.store.open import open_store

    async with open_store("memory://") as embedded:

        def in_process(comp: Component) -> Any:
            assert comp.cluster is not None
            cluster = cfg.cluster(comp.cluster)

            async def run_agent() -> None:
                agent = Agent(
                    cfg,
                    comp.cluster or "",
                    "memory://",
                    layout.ca_dir(cluster.trust_domain),
                    layout.agent_state(comp.cluster or ""),
                    AgentOptions(),
                )
                await agent.run(store=embedded)

            return run_agent

        sup = Supervisor(plan, layout, meta, in_process=in_process if mode == "embedded" else None)
        try:
            return await _supervise(sup, plan, layout, once, as_json, duration)
        except BaseException:
            # Whatever went wrong in `up` itself, no child may outlive it.
            sup.kill_everything_now()
            raise


async def _supervise(
    sup: Supervisor,
    plan: Any,
    layout: Layout,
    once: bool,
    as_json: bool,
    duration: float | None,
) -> int:
    code = 0
    async with trio.open_nursery() as nursery:
        stop = trio.Event()

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(on_signal)
        await nursery.start(sup.serve_control)
        try:
            with trio.CancelScope() as start_scope:
                nursery.start_soon(_cancel_on, stop, start_scope)
                await sup.start_all(
                    nursery,
                    lambda stage, n: typer.echo(f"  {stage.name.lower():<9} {n} ready", err=True),
                )
        except StartFailed as exc:
            typer.echo(f"meshfed up: {exc}", err=True)
            code = EXIT_UNAVAILABLE
            stop.set()
        if not stop.is_set():
            typer.echo(_try_hints(plan.components, layout.root), err=True)
            if duration is not None:
                nursery.start_soon(_stop_after, stop, duration)
            await _show(sup, stop, once=once, as_json=as_json)
        await stop.wait()
        typer.echo(
            "meshfed up: stopping (traffic, sidecars, apps, gateways, agents, store)", err=True
        )
        await sup.stop_all()
        nursery.cancel_scope.cancel()
    return code


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _stop_after(stop: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    stop.set()


async def _show(sup: Supervisor, stop: trio.Event, *, once: bool, as_json: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    from federation.cli.up.live import render_view

    console = Console()
    if once or as_json:
        # One frame once traffic had a few seconds, so the frame shows where it goes.
        with trio.move_on_after(3):
            await stop.wait()
        view = await collect_view(sup.manifest())
        if as_json:
            typer.echo(json.dumps(view.to_obj(), indent=1))
        else:
            console.print(render_view(view))
        return
    if not console.is_terminal:
        return  # headless: `meshfed status` shows the view on demand
    with Live(console=console, refresh_per_second=2, screen=False) as live:
        while not stop.is_set():
            live.update(render_view(await collect_view(sup.manifest())))
            with trio.move_on_after(1.0):
                await stop.wait()


# -- status / call / kill / revive / logs ------------------------------------------------------


RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="The run dir (default: the newest live run).")
]


def _run_dir(run_dir: Path | None) -> Path:
    if run_dir is not None:
        if not (run_dir / "run.json").is_file():
            _fail(
                f"--run-dir {run_dir}: no run.json (is `meshfed up` running there?)",
                EXIT_UNAVAILABLE,
            )
        return run_dir
    for d, _ in find_run_dirs(prepare.default_run_base()):
        return d
    _fail(
        f"no running `meshfed up` under {prepare.default_run_base()} "
        "(start one, or give --run-dir)",
        EXIT_UNAVAILABLE,
    )


def status(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="The view model as JSON.")] = False,
) -> None:
    """The live view's data for a running federation, once."""
    d = _run_dir(run_dir)
    view = trio.run(collect_view, read_manifest(d))
    if as_json:
        typer.echo(json.dumps(view.to_obj(), indent=1))
        return
    from rich.console import Console

    from federation.cli.up.live import render_view

    Console(width=160).print(render_view(view))


def call(
    service: Annotated[str, typer.Argument(help="whoami or whoami.demo")],
    source: Annotated[str, typer.Option("--from", help="Calling workload (W or CLUSTER/W).")],
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One request through the mesh via the workload's sidecar; who served it, and how."""
    from federation.cli.up.adminclient import http_get
    from federation.cli.up.traffic import call_once

    d = _run_dir(run_dir)
    manifest = read_manifest(d)
    cfg = load_config(Path(manifest["config_copy"]))
    try:
        cp = plan_call(cfg, service, source)
    except PokeError as exc:
        _fail(str(exc))
    sidecar = next(
        (c for c in manifest["components"]
         if c["kind"] == "sidecar" and c["cluster"] == cp.workload.cluster
         and c["workload"] == cp.workload.name and c["replica"] == 0),
        None,
    )  # fmt: skip

    async def go() -> tuple[Any, Any]:
        result = await call_once(cp.protocol, cp.target, cp.service)
        stats = await http_get(sidecar["admin"], "/stats") if sidecar else None
        return result, (stats.json() if stats is not None else None)

    result, stats = trio.run(go)
    out: dict[str, Any] = {
        "service": cp.service,
        "from": f"{cp.workload.cluster}/{cp.workload.name}",
        "via_listener": cp.target,
        "ok": result.ok,
        "code": result.code,
        "latency_ms": round(result.latency * 1000, 2),
    }
    if result.ok:
        assert result.served_cluster is not None and result.served_zone is not None
        ep = result.served_workload
        out.update(
            served_by=ep,
            served_cluster=result.served_cluster,
            served_zone=result.served_zone,
            tier=locality_tier(cfg, cp.workload, result.served_cluster, result.served_zone),
            path=path_of(stats, cp.service, result.served_cluster, ep),
        )
    else:
        out["error"] = result.detail
    if as_json:
        typer.echo(json.dumps(out, indent=1))
    elif result.ok:
        typer.echo(
            f"{out['from']} -> {cp.service}: served by {out['served_by']} in "
            f"{out['served_cluster']}/{out['served_zone']} ({out['latency_ms']} ms)\n"
            f"  path {out['path'] or 'unknown (no sidecar stats)'}, locality tier {out['tier']}"
        )
    else:
        typer.echo(f"{out['from']} -> {cp.service}: FAILED {result.code}: {result.detail}")
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def _poke(op: str, target: str, run_dir: Path | None) -> None:
    d = _run_dir(run_dir)
    try:
        resp = trio.run(control_request, d / "control.sock", op, target)
    except (OSError, trio.TooSlowError) as exc:
        _fail(f"cannot reach `meshfed up` at {d / 'control.sock'}: {exc}", EXIT_UNAVAILABLE)
    if not resp.get("ok"):
        _fail(str(resp.get("error")))
    names = resp.get("components") or []
    verb = "killed" if op == "kill" else "revived"
    typer.echo(f"{verb} {len(names)}: {', '.join(names) or '(nothing to do)'}")


def kill(
    target: Annotated[str, typer.Argument(help="ENDPOINT, zone:C/Z, gateway:C or cluster:C")],
    run_dir: RunDirOpt = None,
) -> None:
    """SIGKILL the processes TARGET names (docs/up.md lists what each target covers)."""
    _poke("kill", target, run_dir)


def revive(
    target: Annotated[str, typer.Argument(help="As for kill.")],
    run_dir: RunDirOpt = None,
) -> None:
    """Start what TARGET names again, with the same command line."""
    _poke("revive", target, run_dir)


def logs_cmd(
    component: Annotated[
        str | None, typer.Argument(help="A component or prefix: gateway, sidecar/aws-use1.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """The run's JSON logs (one file per component), merged and readable."""
    d = _run_dir(run_dir)
    files = log_files(Layout(d), component)
    if not files:
        _fail(f"no log matches {component!r} in {d / 'logs'}")
    pos: dict[Path, int] = {}
    for name, path in files:
        lines, pos[path] = read_lines(path)
        for line in lines:
            typer.echo(format_log_line(name, line))
    while follow:
        time.sleep(0.5)
        for name, path in log_files(Layout(d), component):
            try:
                lines, pos[path] = read_lines(path, pos.get(path, 0))
            except FileNotFoundError:
                return  # the run ended and its dir is gone
            for line in lines:
                typer.echo(format_log_line(name, line))


# -- the demo processes ----------------------------------------------------------------------


@demo_app.command("app")
def demo_app_cmd(
    kind: Annotated[str, typer.Option("--kind", help="http, http2 or tcp")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT")],
    workload: Annotated[str, typer.Option("--workload")],
    cluster: Annotated[str, typer.Option("--cluster")],
    zone: Annotated[str, typer.Option("--zone")],
    replica: Annotated[int, typer.Option("--replica", min=0)] = 0,
) -> None:
    """A demo workload that answers with who served the call."""
    from federation.cli.up.demoapps import Identity, serve_app

    if kind not in ("http", "http2", "tcp"):
        _fail(f"--kind {kind!r}: use http, http2 or tcp")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"--listen {listen!r}: write HOST:PORT")
    logs.configure("INFO", component="app", cluster=cluster, workload=workload)
    me = Identity(workload, cluster, zone, replica)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_app, kind, me, host.strip("[]"), int(port))
            log.info("demo %s app listening on %s:%s", kind, host, bound)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except OSError as exc:
        _fail(f"cannot listen on {listen}: {exc.strerror or exc}")


@demo_app.command("traffic")
def demo_traffic_cmd(
    plan: Annotated[Path, typer.Option("--plan", help="traffic-plan.json written by up.")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT of /stats and /metrics.")],
    rate: Annotated[
        float | None, typer.Option("--rate", help="Override every flow's rate.")
    ] = None,
    window: Annotated[float, typer.Option("--window", help="Stats window (s).")] = 10.0,
) -> None:
    """Steady requests through each source sidecar's upstream listener."""
    from dataclasses import replace

    from federation.cli.up.traffic import Flow, run_traffic

    try:
        flows = [Flow.from_obj(f) for f in json.loads(plan.read_text())["flows"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"--plan {plan}: {exc}")
    if rate is not None:
        flows = [replace(f, rate=rate) for f in flows]
    host, _, port = listen.rpartition(":")
    logs.configure("INFO", component="traffic")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_traffic(
                    flows, host, int(port), window=window,
                    wall=time.time() - trio.current_time(), task_status=task_status,
                )
            )  # fmt: skip
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


def register(app: typer.Typer) -> None:
    """Add the top-level commands to the ``meshfed`` app (one call in main.py)."""
    app.command("up")(up)
    app.command("status")(status)
    app.command("call")(call)
    app.command("kill")(kill)
    app.command("revive")(revive)
    app.command("logs")(logs_cmd)
    app.add_typer(demo_app, name="demo", help="Demo workloads and traffic for `meshfed up`.")


__all__ = ["register"]
