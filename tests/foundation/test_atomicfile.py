"""write_atomic: the mode holds whatever the umask, a failure leaves the old file and no litter."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trust.atomicfile import write_atomic


def test_replaces_with_the_requested_mode_despite_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomic(target, b"new", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    write_atomic(target, b"secret", mode=0o600, durable=False)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / f".state.json.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert victim.read_bytes() == b"untouched"
