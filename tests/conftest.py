"""Fixtures shared by every test folder. Keep this file small; folder-specific fixtures go
in that folder's conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_server import EtcdServer, etcd_available


@pytest.fixture
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A fresh, healthy, real etcd on free loopback ports with its own data dir.

    ``etcd_server.url`` is the store URL; ``.kill()`` / ``.restart()`` / ``.compact(rev)``
    are blocking (call them via ``trio.to_thread.run_sync`` inside trio tests).
    Skips the test when the etcd binary is missing (``apt-get install etcd-server``).
    """
    if not etcd_available():
        pytest.skip("etcd binary not found (install Debian's etcd-server)")
    base: Path = tmp_path_factory.mktemp("etcd")
    server = EtcdServer.launch(base)
    try:
        yield server
    finally:
        server.kill()
