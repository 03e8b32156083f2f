"""`pip install .` into a brand-new virtual environment, then etcd3 imports and round-trips.

This is the newcomer's path (README's first command) and the proof that the
etcd3/protobuf fix needs no pin: the fresh environment gets whatever protobuf
pip resolves today (about 15 s here, from pip's cache).
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = r"""
import sys, trio
from google.protobuf import __version__ as pb
from federation.store.etcd_compat import import_etcd3
from federation.store import open_store

assert int(pb.split(".")[0]) >= 4, pb
etcd3 = import_etcd3()
assert etcd3.etcdrpc.PutRequest(key=b"k", value=b"v").SerializeToString() == b"\n\x01k\x12\x01v"

async def main():
    async with open_store(sys.argv[1]) as store:
        await store.put("/clean/install", b"ok")
        kv = await store.get("/clean/install")
        assert kv is not None and kv.value == b"ok"
    print("round-trip ok with protobuf", pb, "in", sys.prefix)

trio.run(main)
"""


@pytest.mark.etcd
def test_pip_install_into_a_fresh_venv_then_etcd_round_trip(tmp_path, etcd_server):
    # Build from a copy: setuptools writes build/ next to the sources it builds.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                      ".mypy_cache", ".ruff_cache", ".pytest_cache", "chaos"),
    )
    shutil.copytree(ROOT / "chaos", src / "chaos", ignore=shutil.ignore_patterns("reports"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # Run from tmp_path so the checkout is not on sys.path: the installed package is used.
    run = subprocess.run(
        [str(py), "-c", SNIPPET, etcd_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "round-trip ok with protobuf" in run.stdout
    assert run.stdout.strip().endswith(str(env_dir))  # the fresh environment ran it
