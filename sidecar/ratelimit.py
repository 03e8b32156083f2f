"""Per-caller connection rate limits: one token bucket per caller identity.

Pure: ``now`` (seconds, monotonic, from the adapter's clock) is passed in. A
caller is admitted while its bucket holds a token; buckets refill at ``rate``
tokens per second up to ``burst``. The number of tracked callers is bounded
(``max_callers``): when a new caller arrives at the bound, the buckets that are
full again (they carry no information) are dropped first, then the least
recently used one, so a flood of distinct identities cannot grow memory. A
dropped bucket comes back full, which errs toward admitting, and every identity
here has already passed mTLS and authorization.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["RateLimitConfig", "RateLimiter"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Bucket size and refill rate."""

    rate: float = 200.0
    """New connections per second per caller, sustained."""
    burst: float = 400.0
    """Bucket size: connections a quiet caller may open at once."""
    max_callers: int = 10_000
    """Callers tracked at once (memory bound)."""

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number, got {self.rate}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        if self.max_callers < 1:
            raise ValueError("max_callers must be >= 1")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter(Generic[K]):
    """Token buckets keyed by caller."""

    def __init__(self, config: RateLimitConfig | None = None) -> None:
        self._config = config if config is not None else RateLimitConfig()
        self._buckets: OrderedDict[K, _Bucket] = OrderedDict()

    @property
    def config(self) -> RateLimitConfig:
        """The limiter's settings."""
        return self._config

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, bucket: _Bucket, now: float) -> float:
        # A clock that steps back (it should not) must not mint tokens: clamp elapsed at 0.
        elapsed = max(0.0, now - bucket.at)
        return min(self._config.burst, bucket.tokens + elapsed * self._config.rate)

    def tokens(self, caller: K, now: float) -> float:
        """Tokens ``caller`` has at ``now`` (``burst`` for an unknown caller)."""
        bucket = self._buckets.get(caller)
        return self._config.burst if bucket is None else self._level(bucket, now)

    def try_acquire(self, caller: K, now: float) -> bool:
        """Take one token for a new connection of ``caller``; False means refuse it."""
        bucket = self._buckets.get(caller)
        if bucket is None:
            self._make_room(now)
            bucket = _Bucket(self._config.burst, now)
            self._buckets[caller] = bucket
        else:
            self._buckets.move_to_end(caller)
        level = self._level(bucket, now)
        bucket.at = max(bucket.at, now)
        if level < 1.0:
            bucket.tokens = level
            return False
        bucket.tokens = level - 1.0
        return True

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self._config.max_callers:
            return
        full = [k for k, b in self._buckets.items() if self._level(b, now) >= self._config.burst]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) >= self._config.max_callers:
            self._buckets.popitem(last=False)
