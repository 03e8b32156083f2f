"""Fault injection for drills: per-route delay and abort, decided by the caller's sidecar.

``decide(fault, rng)`` draws the two independently (as Envoy's fault filter does):
a request may be delayed, aborted, both (delayed, then answered with the abort
status), or neither. ``percent`` is a share of matching requests in [0, 100];
a draw ``rng.random() * 100 < percent`` makes 0 never and 100 always fire.

The adapter sleeps ``delay`` seconds (its clock, so drills run under MockClock),
then, if ``abort_status`` is set, answers it locally with ``x-meshfed-fault: abort``
and never contacts an upstream; the access log records ``fault_delay`` /
``fault_abort`` in ``response_flags``. Injected aborts are not upstream failures:
they feed neither outlier detection nor retries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from federation.config.model import Fault

FAULT_HEADER: Final = b"x-meshfed-fault"
"""Response header marking a locally injected abort."""


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to inject into one request."""

    delay: float | None = None
    """Seconds to wait before going on, or None."""
    abort_status: int | None = None
    """Status to answer locally instead of forwarding, or None."""

    @property
    def injects(self) -> bool:
        """Whether anything is injected."""
        return self.delay is not None or self.abort_status is not None


NO_FAULT: Final = FaultDecision()


def _fires(percent: float, rng: random.Random) -> bool:
    return rng.random() * 100.0 < percent


def decide(fault: Fault | None, rng: random.Random) -> FaultDecision:
    """Draw the faults for one request matched by a route with ``fault``."""
    if fault is None:
        return NO_FAULT
    delay = fault.delay.duration if fault.delay and _fires(fault.delay.percent, rng) else None
    status = fault.abort.status if fault.abort and _fires(fault.abort.percent, rng) else None
    if delay is None and status is None:
        return NO_FAULT
    return FaultDecision(delay, status)


__all__ = ["FAULT_HEADER", "NO_FAULT", "FaultDecision", "decide"]
