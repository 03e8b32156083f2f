"""Rich rendering of the view model: one frame (``--once``, ``meshfed status``) or a
live dashboard refreshed every second. Rendering only; the data is statusview's."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from federation.cli.up.statusview import View

__all__ = ["render_view"]

_STATE_STYLE = {
    "ready": "green",
    "starting": "yellow",
    "died": "bold red",
    "killed": "magenta",
    "unresponsive": "red",
    "stopping": "yellow",
    "stopped": "dim",
}


def _state(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def _yes(value: bool | None, yes: str = "up", no: str = "DOWN") -> Text:
    if value is None:
        return Text("?", style="dim")
    return Text(yes, style="green") if value else Text(no, style="bold red")


def _human(seconds: float) -> str:
    s = abs(int(seconds))
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    return text if seconds >= 0 else f"-{text}"


def _counts(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return "  ".join(
        f"{k} {100 * n / total:.0f}%" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])
    )


def render_view(view: View) -> RenderableType:
    run = view.run
    head = Text.assemble(
        ("meshfed up ", "bold"),
        f"{run.get('run_dir')}  store {run.get('store_url')}  port offset {run.get('offset')}",
    )
    clusters = Table(title="clusters", title_justify="left", expand=False)
    for col in ("cluster", "agent", "phase", "store", "catalog", "peers (last seen / sync lag)",
                "gateway", "gateway peers", "sidecars"):  # fmt: skip
        clusters.add_column(col)
    for c in view.clusters:
        peers = "  ".join(
            f"{p} {age:.1f}s/{c.sync_lag.get(p, 0.0) * 1000:.0f}ms"
            for p, age in c.peer_last_seen.items()
        )
        gw_peers = Text()
        for peer, alive in c.gateway_peers.items():
            gw_peers.append(f"{peer} ", style="green" if alive else "bold red")
        clusters.add_row(
            f"{c.name}\n[dim]{c.cloud}/{c.region}[/dim]",
            _state(c.agent_state),
            c.agent_phase or "?",
            _yes(c.store_up),
            f"v{c.catalog_version} ({c.catalog_entries})" if c.catalog_version is not None else "?",
            peers or "-",
            _state(c.gateway_state),
            gw_peers,
            f"{c.sidecars_ready}/{c.sidecars_total}",
        )
    traffic = Table(
        title=f"traffic (last {view.window_seconds}s)", title_justify="left", expand=False
    )
    for col in (
        "flow",
        "req",
        "err",
        "p50",
        "p99",
        "served by cluster",
        "serving zone",
        "failovers",
    ):
        traffic.add_column(col)
    for s in view.services:
        fo = s.failovers[-1] if s.failovers else None
        traffic.add_row(
            s.flow,
            str(s.requests),
            Text(f"{s.error_rate:.0%}", style="bold red" if s.errors else "green"),
            "-" if s.p50_ms is None else f"{s.p50_ms:.1f}ms",
            "-" if s.p99_ms is None else f"{s.p99_ms:.1f}ms",
            _counts(s.by_cluster) or "-",
            s.serving or "-",
            f"{len(s.failovers)}: {fo['from']} -> {fo['to']}" if fo else "0",
        )
    procs = Table(title="processes", title_justify="left", expand=False)
    for col in ("component", "state", "pid", "starts", "note"):
        procs.add_column(col)
    for p in view.processes:
        if p.state == "ready" and p.kind in ("app", "sidecar"):
            continue  # the cluster table counts them; list only what needs a look
        procs.add_row(p.name, _state(p.state), str(p.pid or "-"), str(p.starts), p.note[:60])
    ready = sum(1 for p in view.processes if p.state == "ready")
    soonest = min(view.certs, key=lambda c: c.expires_in) if view.certs else None
    foot = Text(
        f"{ready}/{len(view.processes)} components ready"
        + (
            f"; soonest SVID expiry {soonest.owner} in {_human(soonest.expires_in)}"
            if soonest
            else ""
        )
    )
    alerts = Text("\n".join(f"! {a}" for a in view.alerts), style="bold red")
    return Group(head, clusters, traffic, procs, foot, alerts)
