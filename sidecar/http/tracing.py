"""W3C Trace Context (``traceparent`` / ``tracestate``) for the sidecar's HTTP hops.

``traceparent: 00-<trace-id:32 hex>-<parent-id:16 hex>-<flags:2 hex>``, strictly
(W3C Trace Context, Level 1, section 3.2):

* hex is lower-case only; every field has its exact length; all-zero trace or
  parent ids are invalid; version ``ff`` is invalid;
* version ``00`` must be exactly 55 characters;
* a *higher* version is parsed as version 00's prefix (spec 3.2.4: the first four
  fields keep their meaning; more may follow after a ``-``); we propagate it as
  version 00, the version we speak;
* more than one ``traceparent`` field line is invalid.

An invalid or absent ``traceparent`` starts a new trace (:func:`start`) and the
``tracestate`` is dropped with it (spec 3.3.1: tracestate means nothing without a
valid parent). A valid one gets a child span per hop (:func:`child`): same trace id
and flags, fresh span id, the incoming span id becoming the parent in the access log.

``tracestate`` is vendor data we never read: passed through byte for byte
(multiple field lines joined with ``,`` as RFC 9110 allows), unless it exceeds
:data:`MAX_TRACESTATE_BYTES`, in which case it is dropped whole rather than
truncated (the spec requires at least 512 characters be propagated; we allow 8x).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sidecar.http.headers import Header, get_all

TRACEPARENT: Final = b"traceparent"
TRACESTATE: Final = b"tracestate"
MAX_TRACESTATE_BYTES: Final = 4096
"""Longest combined ``tracestate`` passed through."""

SAMPLED: Final = 0x01
"""The ``sampled`` bit of trace-flags."""

_V00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_FUTURE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One hop's trace position."""

    trace_id: str
    """32 lower-case hex digits, not all zero."""
    span_id: str
    """16 lower-case hex digits, not all zero: this hop's span (the ``parent-id`` sent on)."""
    flags: int
    """trace-flags byte (bit 0: sampled)."""
    parent_span_id: str | None = None
    """The caller's span id, if the trace came in; None for a trace we started."""
    tracestate: bytes | None = None
    """Opaque vendor state to pass on, or None."""

    def __post_init__(self) -> None:
        if not re.fullmatch("[0-9a-f]{32}", self.trace_id) or self.trace_id == _ZERO_TRACE:
            raise ValueError(f"invalid trace id {self.trace_id!r}")
        if not re.fullmatch("[0-9a-f]{16}", self.span_id) or self.span_id == _ZERO_SPAN:
            raise ValueError(f"invalid span id {self.span_id!r}")
        if not 0 <= self.flags <= 0xFF:
            raise ValueError(f"invalid trace flags {self.flags}")

    @property
    def sampled(self) -> bool:
        """Whether the caller records this trace."""
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> bytes:
        """The ``traceparent`` value to send upstream (always version 00)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}".encode("ascii")

    def headers(self) -> list[Header]:
        """``traceparent`` and, if any, ``tracestate`` to add to the upstream request."""
        out: list[Header] = [(TRACEPARENT, self.traceparent())]
        if self.tracestate is not None:
            out.append((TRACESTATE, self.tracestate))
        return out


@dataclass(frozen=True, slots=True)
class ParsedParent:
    """A valid incoming ``traceparent``."""

    version: int
    """The version it came with (we answer in 00)."""
    trace_id: str
    """Trace id."""
    parent_id: str
    """The caller's span id."""
    flags: int
    """trace-flags."""


def parse_traceparent(value: bytes) -> ParsedParent | None:
    """Parse one ``traceparent`` value; None if invalid. Surrounding OWS is tolerated."""
    value = value.strip(b" \t")
    if value.startswith(b"00"):
        m = _V00.fullmatch(value)
        if m is None:
            return None
        version, (trace, parent, flags) = 0, m.groups()
    else:
        f = _FUTURE.fullmatch(value)
        if f is None or f.group(1) == b"ff":
            return None
        version = int(f.group(1), 16)
        trace, parent, flags = f.group(2), f.group(3), f.group(4)
    t, p = trace.decode(), parent.decode()
    if t == _ZERO_TRACE or p == _ZERO_SPAN:
        return None
    return ParsedParent(version, t, p, int(flags, 16))


def _new_id(rng: random.Random, bits: int) -> str:
    while True:  # all-zero is invalid; redraw (probability 2**-bits)
        n = rng.getrandbits(bits)
        if n:
            return f"{n:0{bits // 4}x}"


def start(rng: random.Random, *, sampled: bool = True) -> TraceContext:
    """A new trace (no valid ``traceparent`` came in)."""
    return TraceContext(_new_id(rng, 128), _new_id(rng, 64), SAMPLED if sampled else 0)


def child(
    parent: ParsedParent, rng: random.Random, tracestate: bytes | None = None
) -> TraceContext:
    """This hop's span under ``parent``; flags (sampling decision) inherited."""
    # Only the sampled bit has a defined meaning in version 00; unknown bits are not
    # propagated (spec 3.2.2.5: "MUST set all other bits to zero" on send).
    return TraceContext(
        parent.trace_id, _new_id(rng, 64), parent.flags & SAMPLED, parent.parent_id, tracestate
    )


def _tracestate(headers: Sequence[Header]) -> bytes | None:
    values = [v.strip(b" \t") for v in get_all(headers, TRACESTATE)]
    values = [v for v in values if v]
    if not values:
        return None
    joined = b",".join(values)
    return joined if len(joined) <= MAX_TRACESTATE_BYTES else None


def from_headers(headers: Sequence[Header], rng: random.Random) -> TraceContext:
    """This hop's context: a child of a valid incoming trace, else a new trace."""
    values = get_all(headers, TRACEPARENT)
    parsed = parse_traceparent(values[0]) if len(values) == 1 else None
    if parsed is None:
        return start(rng)
    return child(parsed, rng, _tracestate(headers))


def replace_headers(headers: Sequence[Header], context: TraceContext) -> list[Header]:
    """``headers`` with any incoming ``traceparent``/``tracestate`` replaced by ``context``'s."""
    kept = [(n, v) for n, v in headers if n not in (TRACEPARENT, TRACESTATE)]
    return kept + context.headers()


__all__ = [
    "MAX_TRACESTATE_BYTES",
    "SAMPLED",
    "TRACEPARENT",
    "TRACESTATE",
    "ParsedParent",
    "TraceContext",
    "child",
    "from_headers",
    "parse_traceparent",
    "replace_headers",
    "start",
]
