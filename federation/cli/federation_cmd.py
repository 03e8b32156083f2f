"""``meshfed federation ...``: the federation as the store holds it (docs/agent.md).

Read-only; one prefix read at one revision. Exit codes: 0 fine, 1 ``check``
found a mismatch, 2 invalid input, 3 the store is unreachable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from federation import keys
from federation.agent.overview import Overview, compare_bundles
from federation.config.errors import ConfigError
from federation.config.loader import load_config
from federation.store.api import StoreError, StoreUnavailable
from federation.store.etcd import EtcdConfig
from federation.store.open import InvalidStoreURL, open_store

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

StoreOpt = Annotated[str, typer.Option("--store", help="etcd://host:port")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"meshfed federation: {message}", err=True)
    raise typer.Exit(code)


def _read(url: str) -> Overview:
    async def main() -> Overview:
        cfg = EtcdConfig(endpoints=("-",), connect_attempts=2, call_timeout=3.0)
        async with open_store(url, etcd_config=cfg) as store:
            rev, items = await store.get_prefix(keys.ROOT)
            return Overview.build(rev, items)

    try:
        return trio.run(main)
    except InvalidStoreURL as exc:
        _fail(str(exc), EXIT_INVALID)
    except StoreUnavailable as exc:
        _fail(f"store {url} unavailable: {exc}", EXIT_UNAVAILABLE)
    except StoreError as exc:
        _fail(f"store {url}: {exc}", EXIT_UNAVAILABLE)
    raise AssertionError("unreachable")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@app.command()
def status(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Clusters: registration, liveness, record age, gateways, exported/imported counts."""
    ov = _read(store)
    st = ov.status(time.time())
    if as_json:
        typer.echo(json.dumps({"revision": ov.revision, "clusters": st}, indent=1, sort_keys=True))
        return
    typer.echo(f"store {store} at revision {ov.revision}: {len(st)} clusters")
    typer.echo(
        f"{'CLUSTER':<14} {'STATE':<8} {'INCARNATION':<18} {'UP':>6} {'AGE':>6} "
        f"{'EXPORTED':>8} {'IMPORTED':>8} {'ENDPOINTS':>9}  GATEWAYS"
    )
    for name, c in st.items():
        state = "live" if c["live"] else ("record" if c["registered"] else "absent")
        gws = (
            ", ".join(f"{g['id']} {g['address']} {'+'.join(g['modes'])}" for g in c["gateways"])
            or "-"
        )
        typer.echo(
            f"{name:<14} {state:<8} {c['incarnation'] or '-':<18} {_age(c['uptime']):>6} "
            f"{_age(c['record_age']):>6} {c['exported']:>8} {c['imported']:>8} "
            f"{c['healthy_endpoints']:>4}/{c['endpoints']:<4}  {gws}"
        )
    if ov.bad:
        typer.echo(f"{len(ov.bad)} keys do not decode, e.g. {ov.bad[0]}")


@app.command()
def services(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Exported services: which clusters run them, to whom, and endpoint counts."""
    ov = _read(store)
    svcs = ov.services()
    if as_json:
        typer.echo(json.dumps(svcs, indent=1, sort_keys=True))
        return
    typer.echo(f"{'SERVICE':<22} {'CLUSTER':<14} {'EXPORTED TO':<24} {'ENDPOINTS':>9}  PORTS")
    for s in svcs:
        for cluster, c in s["clusters"].items():
            to = ",".join(c["exported_to"]) or "(own cluster only)"
            typer.echo(
                f"{s['service']:<22} {cluster:<14} {to:<24} {c['endpoints']:>9}  "
                f"{' '.join(c['ports'])}"
            )


@app.command()
def endpoints(
    service: Annotated[str, typer.Argument(help="<service>.<namespace>, e.g. whoami.demo")],
    store: StoreOpt,
    as_json: JsonOpt = False,
) -> None:
    """Where every endpoint of a service is: cluster/region/zone, health, weight."""
    name, dot, namespace = service.partition(".")
    if not dot or not name or not namespace or "." in namespace:
        _fail(f"{service!r} is not <service>.<namespace> (e.g. whoami.demo)", EXIT_INVALID)
    ov = _read(store)
    eps = ov.endpoints_of(namespace, name)
    rows: list[dict[str, Any]] = [
        {
            "cluster": e.cluster,
            "cloud": e.locality.cloud,
            "region": e.locality.region,
            "zone": e.locality.zone,
            "id": e.endpoint_id,
            "address": f"{e.address}:{e.port}",
            "healthy": e.healthy,
            "weight": e.weight,
            "network": e.network,
            "spiffe_id": e.spiffe_id,
        }
        for e in eps
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=1, sort_keys=True))
        return
    if not rows:
        typer.echo(f"no endpoints of {service} in the store")
        return
    typer.echo(
        f"{'CLUSTER':<14} {'REGION':<20} {'ZONE':<16} {'ENDPOINT':<14} {'ADDRESS':<20} "
        f"{'HEALTH':<8} WEIGHT"
    )
    for r in rows:
        typer.echo(
            f"{r['cluster']:<14} {r['cloud'] + '/' + r['region']:<20} {r['zone']:<16} "
            f"{r['id']:<14} {r['address']:<20} {'healthy' if r['healthy'] else 'down':<8} "
            f"{r['weight']}"
        )


def _agent_status(host: str, port: int) -> dict[str, Any] | str:
    async def get() -> dict[str, Any]:
        with trio.fail_after(3):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET /status HTTP/1.1\r\nHost: agent\r\n\r\n")
                data = bytearray()
                while chunk := await stream.receive_some(65536):
                    data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ValueError(head.split(b"\r\n", 1)[0].decode("ascii", "replace"))
        obj = json.loads(body)
        if not isinstance(obj, dict):
            raise ValueError("status is not a JSON object")
        return obj

    try:
        return trio.run(get)
    except (OSError, trio.TooSlowError, ValueError) as exc:
        return f"unreachable ({exc or type(exc).__name__})"


@app.command()
def check(
    store: StoreOpt,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Also compare each agent's view (admin /status)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every domain's bundle sequence and roots; with --config, each agent's view compared."""
    cfg = None
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            _fail(f"{exc.issues[0]} (run `meshfed config validate {config}`)", EXIT_INVALID)
        except OSError as exc:
            _fail(f"{config}: {exc.strerror}", EXIT_INVALID)
    ov = _read(store)
    summary = ov.bundle_summary()
    problems = [f"{td}: {b['error']}" for td, b in summary.items() if "error" in b]
    agents: dict[str, Any] = {}
    if cfg is not None:
        for c in cfg.clusters:
            got = _agent_status(c.agent.address, c.agent.admin_port)
            if isinstance(got, str):
                agents[c.name] = {"reachable": False, "error": got}
                continue
            diff = compare_bundles(summary, got.get("bundles", {}))
            agents[c.name] = {"reachable": True, "problems": diff, "phase": got.get("phase")}
            problems += [f"agent {c.name}: {d}" for d in diff]
    if as_json:
        typer.echo(
            json.dumps(
                {"bundles": summary, "agents": agents, "problems": problems},
                indent=1,
                sort_keys=True,
            )
        )
    else:
        for td, b in summary.items():
            if "error" in b:
                typer.echo(f"{td:<28} MALFORMED  {b['error']}")
            else:
                typer.echo(f"{td:<28} sequence {b['sequence']:<4} roots {' '.join(b['roots'])}")
        for name, a in agents.items():
            if not a["reachable"]:
                typer.echo(f"agent {name:<14} {a['error']}")
            else:
                verdict = "agrees" if not a["problems"] else f"{len(a['problems'])} mismatches"
                typer.echo(f"agent {name:<14} {a['phase']:<8} {verdict}")
        for p in problems:
            typer.echo(f"MISMATCH {p}")
    if problems:
        raise typer.Exit(EXIT_FAILED)
