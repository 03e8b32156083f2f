"""The sidecar's own entry point (``python -m sidecar``, sidecar/entry.py) stays light and
takes exactly ``meshfed sidecar run``'s arguments.

The light-entry check runs a real sidecar process up to ``/ready`` and reads what it has
imported: an L4 sidecar on a static catalog must never load the typer CLI, the store's
etcd/grpc client or the HTTP layer (idle RSS, docs/performance-notes.md). The same
check on an HTTP workload shows the HTTP layer does load when a listener needs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sidecarkit import Mesh, Ports, config_text, make_config

from sidecar.entry import parser

ROOT = Path(__file__).resolve().parents[2]

# Runs `python -m sidecar ARGS...`; once the admin port answers /ready with 200, writes
# sys.modules to OUT and sends itself SIGTERM (the sidecar drains and exits 0). Only the
# standard library's socket/json/threading are added to what the sidecar loads.
_DRIVER = r"""
import json, os, runpy, signal, socket, sys, threading, time
admin, out = int(sys.argv[1]), sys.argv[2]

def ready():
    try:
        with socket.create_connection(("127.0.0.1", admin), timeout=1) as s:
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False

def watch():
    while not ready():
        time.sleep(0.05)
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
sys.argv = ["sidecar", *sys.argv[3:]]
runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
"""

HEAVY = (
    "typer",
    "click",
    "rich",
    "pydantic",
    "etcd3",
    "grpc",
    "google.protobuf",
    "federation.store.etcd",
    "federation.cli.main",
    "h2",
    "h11",
    "hpack",
    "sidecar.http.server",
)


def _modules_when_ready(base: Path, text: str, mesh: Mesh, workload: str, admin: int) -> set[str]:
    config, catalog = base / "mesh.yaml", base / "catalog.json"
    config.write_text(text)
    catalog.write_bytes(mesh.catalog().to_json())
    svid_dir = mesh.write_svid_dir(base, workload)
    out = base / "modules.json"
    argv = [
        sys.executable, "-c", _DRIVER, str(admin), str(out),
        "--config", str(config), "--workload", workload, "--state-dir", str(base / "state"),
        "--svid-dir", str(svid_dir), "--catalog", str(catalog), "--drain", "1",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=base, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "drained, exiting" in done.stderr
    modules: list[str] = json.loads(out.read_text())
    return set(modules)


def _loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def test_l4_sidecar_process_never_loads_the_cli_the_store_client_or_the_http_layer(
    tmp_path: Path,
) -> None:
    ports = Ports.pick()
    mesh = Mesh.build(make_config(ports))  # client: tcp upstreams only
    modules = _modules_when_ready(
        tmp_path, config_text(ports), mesh, "client", ports.admin["client"]
    )
    assert "sidecar.runner" in modules and "trio" in modules  # it really ran the sidecar
    assert [name for name in HEAVY if _loaded(modules, name)] == []


def test_http_sidecar_process_loads_the_http_layer_but_not_the_cli(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "sidecar_http_e2e"))
    try:
        import httpkit
    finally:
        sys.path.pop(0)
    ports = httpkit.Ports.pick()
    text = httpkit.config_text(ports)
    from federation.config import parse_config

    mesh = Mesh.build(parse_config(text, "http.yaml"))
    modules = _modules_when_ready(tmp_path, text, mesh, "client", ports.admin["client"])
    assert {"h11", "h2.connection", "sidecar.http.server", "sidecar.http.proxy"} <= modules
    assert [name for name in ("typer", "rich", "pydantic", "grpc") if _loaded(modules, name)] == []


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def _help(text: str, prog: str) -> tuple[list[str], str]:
    """(the usage's words after the program name, the rest of the help)."""
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: {prog} "), usage
    return usage.removeprefix(f"usage: {prog} ").split(), rest


def test_meshfed_sidecar_run_and_python_m_sidecar_share_one_parser() -> None:
    cli = _run("-m", "federation.cli.main", "sidecar", "run", "--help")
    light = _run("-m", "sidecar", "--help")
    assert (cli.returncode, light.returncode) == (0, 0)
    assert "--inbound-burst N" in light.stdout
    assert _help(cli.stdout, "meshfed sidecar run") == _help(light.stdout, "python -m sidecar")


@pytest.mark.parametrize(
    ("prefix", "prog"),
    [
        (("-m", "sidecar"), "python -m sidecar"),
        (("-m", "federation.cli.main", "sidecar", "run"), "meshfed sidecar run"),
    ],
)
def test_both_entries_refuse_bad_input_with_exit_2(prefix: tuple[str, ...], prog: str) -> None:
    base = ("--config", "c.yaml", "--workload", "w", "--state-dir", "/nonexistent/s")
    usage = _run(*prefix, *base, "--replica", "-1")
    assert usage.returncode == 2
    assert f"{prog}: error: argument --replica" in usage.stderr
    both = _run(*prefix, *base, "--svid-dir", "d", "--join-token", "t")
    assert both.returncode == 2
    assert "meshfed sidecar: give exactly one of --svid-dir and --join-token" in both.stderr


def test_parser_maps_every_option_of_docs_sidecar_md() -> None:
    args = parser().parse_args(
        [
            "--config", "f.yaml", "--workload", "web", "--state-dir", "s", "--replica", "2",
            "--cluster", "c1", "--join-token", "tok", "--agent", "[::1]:7000",
            "--catalog", "cat.json", "--bundles", "b", "--drain", "2", "--inbound-rate", "5",
            "--inbound-burst", "7", "--log-level", "warning",
        ]
    )  # fmt: skip
    assert vars(args) == {
        "config": Path("f.yaml"),
        "workload": "web",
        "state_dir": Path("s"),
        "replica": 2,
        "cluster": "c1",
        "svid_dir": None,
        "join_token": "tok",
        "agent": "[::1]:7000",
        "catalog": Path("cat.json"),
        "bundles_dir": Path("b"),
        "drain_seconds": 2.0,
        "rate": 5.0,
        "burst": 7.0,
        "log_level": "warning",
    }
