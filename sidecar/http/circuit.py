"""Circuit breaking for one upstream service, and the outlier feed from HTTP responses.

Envoy's thresholds, per caller sidecar and upstream service
(``traffic_policy.circuit_breaking``):

* ``max_requests``: requests in flight (HTTP/2: open streams). Checked when a request
  (or a retry attempt) starts.
* ``max_pending_requests``: requests waiting for a connection. Checked when a request
  has to wait because no connection can take it; ``0`` means never wait.
* ``max_connections``: upstream connections. When it is reached a request does not
  fail at once: it waits as pending (and the pending limit decides), as in Envoy.

Each ``admit_*`` returns :data:`ADMITTED` or an :class:`Open`. An admitted slot must be
released exactly once (``release_*``). On Open the adapter answers 503 with
``x-meshfed-overloaded: <reason>`` (:meth:`Open.header`) without contacting the
upstream; such local refusals are not upstream failures and feed neither outlier
detection nor the retry policy.

:func:`report_response` turns each upstream response into an
:class:`~sidecar.outlier.OutlierDetector` call with ``FailureKind.HTTP_5XX``; a gRPC
status in trailers counts through its HTTP equivalent (UNAVAILABLE is a 503).
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, TypeVar

from federation.config.model import CircuitBreaking
from sidecar.http.grpc import http_equivalent
from sidecar.outlier import FailureKind, OutlierDetector, OutlierEvent

K = TypeVar("K", bound=Hashable)

OVERLOADED_HEADER: Final = b"x-meshfed-overloaded"
"""Response header naming the limit that refused the request."""


class OverloadReason(enum.Enum):
    """Which limit is full; the value is the header value and the metric label."""

    MAX_CONNECTIONS = "max_connections"
    """Not returned to requests (they wait as pending); counted for metrics."""
    MAX_PENDING_REQUESTS = "max_pending_requests"
    """Too many requests already waiting for a connection."""
    MAX_REQUESTS = "max_requests"
    """Too many requests in flight."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """The slot is taken; release it when done."""


ADMITTED: Final = Admitted()


@dataclass(frozen=True, slots=True)
class Open:
    """The circuit is open for this request: answer 503, do not forward."""

    reason: OverloadReason
    """The full limit."""
    limit: int
    """Its configured value, for the log line."""

    status: int = 503
    """Status to answer."""

    def header(self) -> tuple[bytes, bytes]:
        """``(x-meshfed-overloaded, <reason>)`` for the 503."""
        return OVERLOADED_HEADER, self.reason.value.encode("ascii")


@dataclass(frozen=True, slots=True)
class CircuitStatistics:
    """A snapshot for metrics and tests."""

    requests: int
    """Requests in flight."""
    pending: int
    """Requests waiting for a connection."""
    connections: int
    """Open upstream connections."""
    opened: dict[str, int]
    """Refusals so far by reason value."""


class CircuitBreaker:
    """Counters against the limits; no clock, no I/O."""

    def __init__(self, limits: CircuitBreaking | None = None) -> None:
        self.limits = limits if limits is not None else CircuitBreaking()
        self.requests = 0
        self.pending = 0
        self.connections = 0
        self._opened = {r.value: 0 for r in OverloadReason}

    def _open(self, reason: OverloadReason, limit: int) -> Open:
        self._opened[reason.value] += 1
        return Open(reason, limit)

    def admit_request(self) -> Admitted | Open:
        """A request or retry attempt wants to start."""
        if self.requests >= self.limits.max_requests:
            return self._open(OverloadReason.MAX_REQUESTS, self.limits.max_requests)
        self.requests += 1
        return ADMITTED

    def release_request(self) -> None:
        """An admitted request (attempt) ended, however it ended."""
        if self.requests <= 0:
            raise ValueError("release_request without admit_request")
        self.requests -= 1

    def admit_pending(self) -> Admitted | Open:
        """An admitted request has to wait for a connection."""
        if self.pending >= self.limits.max_pending_requests:
            return self._open(OverloadReason.MAX_PENDING_REQUESTS, self.limits.max_pending_requests)
        self.pending += 1
        return ADMITTED

    def release_pending(self) -> None:
        """A pending request got a connection, or gave up waiting."""
        if self.pending <= 0:
            raise ValueError("release_pending without admit_pending")
        self.pending -= 1

    def admit_connection(self) -> Admitted | Open:
        """The pool wants a new upstream connection. On Open, queue the request as pending."""
        if self.connections >= self.limits.max_connections:
            return self._open(OverloadReason.MAX_CONNECTIONS, self.limits.max_connections)
        self.connections += 1
        return ADMITTED

    def release_connection(self) -> None:
        """An admitted connection closed (or its connect failed)."""
        if self.connections <= 0:
            raise ValueError("release_connection without admit_connection")
        self.connections -= 1

    def statistics(self) -> CircuitStatistics:
        """Counts for metrics."""
        return CircuitStatistics(self.requests, self.pending, self.connections, dict(self._opened))

    def __repr__(self) -> str:
        lim = self.limits
        return (
            f"<CircuitBreaker requests={self.requests}/{lim.max_requests} "
            f"pending={self.pending}/{lim.max_pending_requests} "
            f"connections={self.connections}/{lim.max_connections}>"
        )


def effective_status(http_status: int, grpc_status: int | None) -> int:
    """The HTTP status that counts for outlier detection and the access log's ``code``.

    A gRPC response is HTTP 200 with the real result in ``grpc-status``; it counts as
    its HTTP equivalent (Envoy's mapping, :func:`~sidecar.http.grpc.http_equivalent`).
    """
    if grpc_status is None or http_status != 200:
        return http_status
    return http_equivalent(grpc_status)


def report_response(
    detector: OutlierDetector[K],
    endpoint: K,
    http_status: int,
    now: float,
    grpc_status: int | None = None,
) -> list[OutlierEvent[K]]:
    """Feed one upstream response to outlier detection: 5xx is a failure, else a success.

    Only responses that came from ``endpoint`` belong here: not local 503s (circuit
    open, fault abort, no healthy upstream), which say nothing about the endpoint.
    """
    status = effective_status(http_status, grpc_status)
    if 500 <= status <= 599:
        return detector.on_failure(endpoint, FailureKind.HTTP_5XX, now)
    return detector.on_success(endpoint, FailureKind.HTTP_5XX, now)


__all__ = [
    "ADMITTED",
    "OVERLOADED_HEADER",
    "Admitted",
    "CircuitBreaker",
    "CircuitStatistics",
    "Open",
    "OverloadReason",
    "effective_status",
    "report_response",
]
