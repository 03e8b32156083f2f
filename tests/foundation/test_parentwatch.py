"""A child of `meshfed up` drains and exits when its parent is SIGKILLed (no orphans)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from federation import parentwatch

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import signal, sys, time
from pathlib import Path
from federation import parentwatch
marker = Path(sys.argv[1])
def drain(*_):
    marker.write_text("drained")
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
assert parentwatch.start_from_env(poll=0.05, grace=5.0)
marker.write_text("watching")
time.sleep(60)
"""

PARENT = r"""
import os, subprocess, sys, time
env = dict(os.environ, MESHFED_PARENT_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, init, reaps it).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_child_drains_when_its_parent_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30  # bounds a failing test only
    while (marker.read_text() if marker.exists() else "") != "watching":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert _alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    while _alive(child_pid):
        assert time.monotonic() < deadline, "the orphan kept running"
        time.sleep(0.05)
    assert marker.read_text() == "drained"  # it went through SIGTERM, not the hard exit


def test_without_the_variable_or_with_another_parent_nothing_starts() -> None:
    assert parentwatch.start_from_env({}) is False
    assert parentwatch.start_from_env({parentwatch.ENV: "not-a-pid"}) is False
    assert parentwatch.start_from_env({parentwatch.ENV: str(os.getppid() + 1)}) is False
