"""Is the store reachable? One flag fed by every store call the agent makes.

The store's watch re-lists on its own and never reports an outage, so the
agent learns that etcd is down from its own calls (keepalives every TTL/3,
registration attempts): each success or :class:`StoreUnavailable` is reported
here. Listeners (the catalog source's waiters, metrics) are told on every flip.
"""

from __future__ import annotations

from collections.abc import Callable


class StoreHealth:
    """Up/down state of the store as the agent last saw it; starts down (never reached)."""

    def __init__(self) -> None:
        self.up = False
        self.ever_up = False
        self.changed_at = 0.0
        self.last_error = "not connected yet"
        self.failures = 0
        self._listeners: list[Callable[[bool], None]] = []

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def ok(self, now: float) -> None:
        if not self.up:
            self.up = True
            self.ever_up = True
            self.changed_at = now
            self.last_error = ""
            self._notify()

    def failed(self, now: float, error: BaseException | str) -> None:
        self.failures += 1
        self.last_error = str(error)[:300]
        if self.up:
            self.up = False
            self.changed_at = now
            self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener(self.up)
