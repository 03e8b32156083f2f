"""Shared helpers for the agent tests: CA dirs, a store that can be taken down, polling."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from federation.config import load_config
from federation.config.model import FederationConfig
from federation.store.api import Store, StoreUnavailable, WatchEvent
from trust.rotation import CaDirectory
from trust.spiffe import TrustDomain

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
CLUSTERS = ("aws-use1", "gcp-euw1", "onprem-dc1")


def demo_config() -> FederationConfig:
    return load_config(DEMO)


def make_ca(base: Path, cluster: str, config: FederationConfig | None = None) -> Path:
    """What `meshfed trust init --config demo.yaml --cluster <c>` does."""
    cfg = config or demo_config()
    td = TrustDomain.parse("spiffe://" + str(cfg.cluster(cluster).trust_domain))
    path = base / f"ca-{cluster}"
    CaDirectory.init(path, td, dt.datetime.now(dt.UTC))
    return path


async def wait_for(cond: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> None:
    """Poll ``cond`` until truthy; the timeout only bounds a failing test."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(step)


class FlakyStore:
    """Wraps a store; ``set_down(True)`` makes every call raise StoreUnavailable and
    breaks every watch, which re-opens (starting with a Reset) once ``set_down(False)``.
    This is what an etcd outage looks like through the real backend."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False
        self._up = trio.Event()
        self._up.set()
        self._scopes: list[trio.CancelScope] = []

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            self._up = trio.Event()
            for cs in self._scopes:
                cs.cancel()
        else:
            self._up.set()

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("flaky store is down")

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._check()
            await trio.lowlevel.checkpoint()
            result = await fn(*args, **kwargs)
            self._check()  # the answer is lost too
            return result

        return call

    @asynccontextmanager
    async def watch_prefix(self, prefix: str) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        send, recv = trio.open_memory_channel[WatchEvent](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, prefix, send)
            yield recv
            nursery.cancel_scope.cancel()

    async def _pump(self, prefix: str, send: trio.MemorySendChannel[WatchEvent]) -> None:
        while True:
            await self._up.wait()
            with trio.CancelScope() as cs:
                self._scopes.append(cs)
                try:
                    async with self.inner.watch_prefix(prefix) as events:
                        async for ev in events:
                            await send.send(ev)
                finally:
                    self._scopes.remove(cs)
