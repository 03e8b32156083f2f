"""Passive outlier detection: eject endpoints that keep failing, bring them back later.

A sans-IO state machine per upstream service. The adapter reports outcomes of
real traffic (:meth:`OutlierDetector.on_success`, :meth:`~OutlierDetector.on_failure`)
with a :class:`FailureKind`; the L4 proxy reports ``CONNECT`` outcomes, the L7
layer also reports ``HTTP_5XX`` outcomes per response. The detector answers
with events (:class:`Ejected`, :class:`EjectionSkipped`, :class:`Returned`) to
log, count and push into the balancer as health changes.

Per endpoint::

    ACTIVE --(threshold consecutive failures of one kind, cap allows)--> EJECTED
    ACTIVE --(threshold reached, cap full)--> ACTIVE   (EjectionSkipped; counter reset)
    EJECTED --(now >= ejected_until)--> ACTIVE         (Returned; counters reset)

Each kind has its own consecutive counter and a success of a kind resets only
that counter: a host that accepts connections but answers 503 must not have its
5xx streak erased by its successful connects. Outcomes reported while a host is
ejected (it can still get traffic in panic) are ignored.

Ejection time backs off exponentially: ``min(max_ejection_time,
base_ejection_time x 2 ** (n - 1))`` for the n-th ejection (Envoy multiplies
linearly, ``base x n``; DESIGN asks for exponential backoff). ``n`` is
forgiven by one for every ``decay_interval`` the host spends back in service,
so an endpoint that failed once long ago starts again from ``base``.

At most ``max_ejection_percent`` of known endpoints are ejected at once, except
that one endpoint may always be ejected (Envoy's rule, so small pools still
shed a bad host); ``max_ejection_percent = 0`` disables ejection. The
balancer's panic mode covers the rest.

No I/O, no clock: every method that needs time takes ``now`` (seconds,
monotonic, from the adapter's clock).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class FailureKind(enum.Enum):
    """Which consecutive counter an outcome feeds."""

    CONNECT = "connect"
    """TCP connect or TLS handshake to the endpoint (locally originated)."""
    HTTP_5XX = "http_5xx"
    """An HTTP response status from the endpoint (5xx is a failure)."""


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Thresholds and times for outlier detection."""

    consecutive_connect_failures: int = 5
    """Consecutive connect failures that eject (Envoy's consecutive_local_origin_failure)."""
    consecutive_5xx: int = 5
    """Consecutive 5xx responses that eject."""
    base_ejection_time: float = 30.0
    """Seconds of the first ejection."""
    max_ejection_time: float = 300.0
    """Cap on one ejection's duration, in seconds."""
    max_ejection_percent: float = 10.0
    """At most this percent of known endpoints ejected at once, but always one; 0 disables."""
    decay_interval: float = 30.0
    """Seconds back in service that forgive one step of the exponential backoff."""

    def __post_init__(self) -> None:
        if self.consecutive_connect_failures < 1 or self.consecutive_5xx < 1:
            raise ValueError("consecutive failure thresholds must be >= 1")
        if not (0 < self.base_ejection_time <= self.max_ejection_time < math.inf):
            raise ValueError("need 0 < base_ejection_time <= max_ejection_time < inf")
        if not (0.0 <= self.max_ejection_percent <= 100.0):
            raise ValueError("max_ejection_percent must be in [0, 100]")
        if not (self.decay_interval > 0):
            raise ValueError("decay_interval must be > 0")

    def threshold(self, kind: FailureKind) -> int:
        """The consecutive-failure threshold for ``kind``."""
        if kind is FailureKind.CONNECT:
            return self.consecutive_connect_failures
        return self.consecutive_5xx

    def ejection_time(self, times_ejected: int) -> float:
        """Duration of the ``times_ejected``-th ejection (1-based)."""
        if times_ejected < 1:
            raise ValueError("times_ejected is 1-based")
        # Cap the exponent too, so a long-flapping host cannot overflow the float.
        exponent = min(times_ejected - 1, 64)
        return min(self.max_ejection_time, self.base_ejection_time * 2.0**exponent)


@dataclass(frozen=True, slots=True)
class Ejected(Generic[K]):
    """An endpoint was ejected: stop sending it traffic until ``until``."""

    endpoint: K
    """The ejected endpoint."""
    kind: FailureKind
    """The failure kind whose streak triggered it."""
    times_ejected: int
    """How many ejections count against it now, this one included (after decay)."""
    until: float
    """When it returns (same clock as ``now``)."""


@dataclass(frozen=True, slots=True)
class EjectionSkipped(Generic[K]):
    """An endpoint crossed a threshold but the ejection cap was full (Envoy's overflow)."""

    endpoint: K
    """The endpoint that would have been ejected."""
    kind: FailureKind
    """The failure kind whose streak triggered it."""
    ejected: int
    """Endpoints ejected at the time."""
    total: int
    """Endpoints known at the time."""


@dataclass(frozen=True, slots=True)
class Returned(Generic[K]):
    """An ejected endpoint's time is up: it takes traffic again."""

    endpoint: K
    """The returning endpoint."""
    ejected_at: float
    """When it was ejected."""
    at: float
    """When it became eligible to return (its ``until``)."""


OutlierEvent = Ejected[K] | EjectionSkipped[K] | Returned[K]


@dataclass(slots=True)
class _HostState:
    consecutive: dict[FailureKind, int]
    times_ejected: int = 0
    ejected_at: float | None = None
    ejected_until: float | None = None
    returned_at: float | None = None


class OutlierDetector(Generic[K]):
    """Outlier detection for one upstream service's endpoints.

    Every method that takes ``now`` first returns endpoints whose time is up,
    so the ejection cap is judged on the present; their :class:`Returned`
    events are part of that method's answer. The adapter should also call
    :meth:`poll` at :meth:`next_deadline` so returns are not delayed until the
    next request.
    """

    def __init__(self, config: OutlierConfig | None = None) -> None:
        self._config = config if config is not None else OutlierConfig()
        self._hosts: dict[K, _HostState] = {}

    @property
    def config(self) -> OutlierConfig:
        """The detector's configuration."""
        return self._config

    def update(self, endpoints: Iterable[K]) -> None:
        """Replace the endpoint set; removed endpoints are forgotten with their history."""
        keep = dict.fromkeys(endpoints)
        self._hosts = {
            ep: self._hosts.get(ep) or _HostState(consecutive=dict.fromkeys(FailureKind, 0))
            for ep in keep
        }

    def is_ejected(self, endpoint: K) -> bool:
        """Whether ``endpoint`` is ejected now (as of the last ``now`` seen)."""
        state = self._hosts.get(endpoint)
        return state is not None and state.ejected_until is not None

    def ejected(self) -> frozenset[K]:
        """All endpoints currently ejected."""
        return frozenset(ep for ep, s in self._hosts.items() if s.ejected_until is not None)

    def next_deadline(self) -> float | None:
        """The earliest time an ejected endpoint returns; ``None`` if none is ejected."""
        times = [s.ejected_until for s in self._hosts.values() if s.ejected_until is not None]
        return min(times) if times else None

    def poll(self, now: float) -> list[Returned[K]]:
        """Return every endpoint whose ejection ended at or before ``now``, earliest first."""
        due = sorted(
            (
                (s.ejected_until, ep)
                for ep, s in self._hosts.items()
                if s.ejected_until is not None and s.ejected_until <= now
            ),
            key=lambda pair: pair[0],
        )
        events: list[Returned[K]] = []
        for until, ep in due:
            state = self._hosts[ep]
            assert state.ejected_at is not None
            events.append(Returned(endpoint=ep, ejected_at=state.ejected_at, at=until))
            state.ejected_at = None
            state.ejected_until = None
            # Decay counts from when it became eligible, not from when we noticed.
            state.returned_at = until
            state.consecutive = dict.fromkeys(FailureKind, 0)
        return events

    def on_success(self, endpoint: K, kind: FailureKind, now: float) -> list[OutlierEvent[K]]:
        """A successful outcome of ``kind``: resets that kind's streak."""
        events: list[OutlierEvent[K]] = list(self.poll(now))
        state = self._hosts.get(endpoint)
        if state is not None and state.ejected_until is None:
            state.consecutive[kind] = 0
        return events

    def on_failure(self, endpoint: K, kind: FailureKind, now: float) -> list[OutlierEvent[K]]:
        """A failed outcome of ``kind``; may eject ``endpoint`` (or report the cap full)."""
        events: list[OutlierEvent[K]] = list(self.poll(now))
        state = self._hosts.get(endpoint)
        if state is None or state.ejected_until is not None:
            return events
        state.consecutive[kind] += 1
        if state.consecutive[kind] < self._config.threshold(kind):
            return events
        # The streak is spent either way, as in Envoy: a host the cap kept in
        # service must fail a full threshold again before the next attempt.
        state.consecutive[kind] = 0
        ejected = sum(1 for s in self._hosts.values() if s.ejected_until is not None)
        total = len(self._hosts)
        cap = self._config.max_ejection_percent
        if cap <= 0.0 or (ejected > 0 and (ejected + 1) * 100.0 > cap * total):
            events.append(
                EjectionSkipped(endpoint=endpoint, kind=kind, ejected=ejected, total=total)
            )
            return events
        times = state.times_ejected
        if times and state.returned_at is not None:
            forgiven = int((now - state.returned_at) // self._config.decay_interval)
            times = max(0, times - max(0, forgiven))
        times += 1
        until = now + self._config.ejection_time(times)
        state.times_ejected = times
        state.ejected_at = now
        state.ejected_until = until
        state.consecutive = dict.fromkeys(FailureKind, 0)
        events.append(Ejected(endpoint=endpoint, kind=kind, times_ejected=times, until=until))
        return events

    def __repr__(self) -> str:
        return (
            f"<OutlierDetector endpoints={len(self._hosts)} ejected={len(self.ejected())} "
            f"next_return={self.next_deadline()}>"
        )
