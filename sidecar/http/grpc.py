"""gRPC over the sidecar's HTTP/2 hops: status extraction and what it means for retries.

A gRPC response is ``:status 200`` and ``content-type: application/grpc...``; the
call's result is ``grpc-status`` (and ``grpc-message``) in the trailers, or in the
headers of a *trailers-only* response (HEADERS with END_STREAM, no DATA), which
servers use for immediate errors. A 200 without any ``grpc-status`` is a broken
call (gRPC's HTTP mapping: UNKNOWN); a non-200 HTTP status maps to a gRPC code by
the table in gRPC's ``http-grpc-status-mapping.md``.

Retries: ``UNAVAILABLE`` (14) is the code gRPC itself designates as transient, and it
maps to :attr:`Outcome.GATEWAY_ERROR` (Envoy's ``grpc-status -> 503``), so it is retried
under ``retry_on: [gateway-error]`` or ``[5xx]``. gRPC calls are POSTs; gRPC's own retry
design (gRFC A6) leaves idempotency to the service owner who opts codes in, so
:func:`retry_idempotent` treats a gRPC call as idempotent for retry purposes. Other
codes are application results, never transport failures, and are not retried.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

from sidecar.http.headers import Header, get_all
from sidecar.retry import Outcome


class GrpcStatus(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_TO_HTTP: Final[dict[int, int]] = {
    0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429,
    9: 400, 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip
# Envoy's Grpc::Utility::grpcToHttpStatus.

_FROM_HTTP: Final[dict[int, GrpcStatus]] = {
    400: GrpcStatus.INTERNAL,
    401: GrpcStatus.UNAUTHENTICATED,
    403: GrpcStatus.PERMISSION_DENIED,
    404: GrpcStatus.UNIMPLEMENTED,
    429: GrpcStatus.UNAVAILABLE,
    502: GrpcStatus.UNAVAILABLE,
    503: GrpcStatus.UNAVAILABLE,
    504: GrpcStatus.UNAVAILABLE,
}
# gRPC's http-grpc-status-mapping.md; anything else is UNKNOWN.


def is_grpc(headers: Sequence[Header]) -> bool:
    """Whether a request or response carries gRPC (``content-type: application/grpc[+-;...]``)."""
    for value in get_all(headers, b"content-type"):
        v = value.lower()
        if v == b"application/grpc" or v[:17] in (b"application/grpc+", b"application/grpc;"):
            return True
    return False


def parse_status(value: bytes) -> int | None:
    """``grpc-status`` as an int: ASCII digits only; None if malformed."""
    if not value or len(value) > 3 or not value.isdigit():
        return None
    return int(value)


def grpc_status(response_headers: Sequence[Header], trailers: Sequence[Header] | None) -> int:
    """The call's gRPC status code.

    Trailers win; with no trailers (trailers-only response, or a stream that ended
    after the headers) the headers are searched. A 200 with no parsable status is
    UNKNOWN; a non-200 ``:status`` maps by gRPC's table.
    """
    status_values = get_all(response_headers, b":status")
    http = int(status_values[0]) if status_values and status_values[0].isdigit() else 0
    for block in (trailers, response_headers):
        if block is None:
            continue
        values = get_all(block, b"grpc-status")
        if values:
            parsed = parse_status(values[0])
            return GrpcStatus.UNKNOWN if parsed is None else parsed
    if http != 200:
        return _FROM_HTTP.get(http, GrpcStatus.UNKNOWN)
    return GrpcStatus.UNKNOWN


def http_equivalent(code: int) -> int:
    """The HTTP status a gRPC code counts as (metrics ``code``, outlier detection)."""
    return _TO_HTTP.get(code, 500)


def retry_outcome(code: int) -> Outcome:
    """The retry classification of a finished gRPC call."""
    if code == GrpcStatus.UNAVAILABLE:
        return Outcome.GATEWAY_ERROR
    return Outcome.SUCCESS


def retry_idempotent(method: str, grpc: bool) -> bool:
    """Whether the retry policy may repeat a request that may have been processed.

    HTTP: RFC 9110's idempotent methods. gRPC: yes (see the module docstring).
    """
    return grpc or method in IDEMPOTENT_METHODS


IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 9.2.2."""


__all__ = [
    "IDEMPOTENT_METHODS",
    "GrpcStatus",
    "grpc_status",
    "http_equivalent",
    "is_grpc",
    "parse_status",
    "retry_idempotent",
    "retry_outcome",
]
