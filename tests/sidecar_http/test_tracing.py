"""W3C traceparent parsing (spec edge cases), child spans, tracestate passthrough."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http.tracing import (
    MAX_TRACESTATE_BYTES,
    ParsedParent,
    TraceContext,
    child,
    from_headers,
    parse_traceparent,
    replace_headers,
    start,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01".encode()


def test_spec_example_parses() -> None:
    assert parse_traceparent(VALID) == ParsedParent(0, TRACE, SPAN, 1)


INVALID = [
    VALID.upper(),  # upper-case hex
    f"00-{TRACE.upper()}-{SPAN}-01".encode(),
    f"00-{'0' * 32}-{SPAN}-01".encode(),  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
    f"ff-{TRACE}-{SPAN}-01".encode(),  # version ff is invalid
    f"00-{TRACE}-{SPAN}-01-extra".encode(),  # version 00 is exactly 55 chars
    f"00-{TRACE[:-1]}-{SPAN}-01".encode(),  # short trace id
    f"00-{TRACE}-{SPAN}0-01".encode(),  # long parent id
    f"00-{TRACE}-{SPAN}-1".encode(),  # short flags
    f"00-{TRACE}-{SPAN}-0g".encode(),  # non-hex flags
    f"00_{TRACE}_{SPAN}_01".encode(),  # wrong separator
    f"0-{TRACE}-{SPAN}-01".encode(),
    f"cc-{TRACE}-{SPAN}-01.x".encode(),  # future version: extra data must follow a '-'
    b"",
]


@pytest.mark.parametrize("value", INVALID)
def test_invalid_traceparents_are_refused(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_future_versions_are_parsed_as_their_version_00_prefix() -> None:
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01".encode()) == ParsedParent(0xCC, TRACE, SPAN, 1)
    parsed = parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-the-future-holds".encode())
    assert parsed == ParsedParent(0xCC, TRACE, SPAN, 1)
    ctx = child(parsed, random.Random(1))
    assert ctx.traceparent().startswith(b"00-")  # we propagate the version we speak


def test_child_keeps_trace_and_sampling_with_new_span() -> None:
    parent = parse_traceparent(VALID)
    assert parent is not None
    ctx = child(parent, random.Random(3), b"rojo=00f067aa0ba902b7")
    assert ctx.trace_id == TRACE and ctx.parent_span_id == SPAN and ctx.span_id != SPAN
    assert ctx.sampled and ctx.traceparent() == f"00-{TRACE}-{ctx.span_id}-01".encode()
    unsampled = child(ParsedParent(0, TRACE, SPAN, 0xFE), random.Random(3))
    assert unsampled.flags == 0  # unknown flag bits are not propagated


def test_absent_or_invalid_or_repeated_parent_starts_a_new_trace_and_drops_state() -> None:
    for headers in (
        [],
        [(b"traceparent", VALID.upper()), (b"tracestate", b"a=1")],
        [(b"traceparent", VALID), (b"traceparent", VALID), (b"tracestate", b"a=1")],
    ):
        ctx = from_headers(headers, random.Random(9))
        assert ctx.trace_id != TRACE and ctx.parent_span_id is None and ctx.tracestate is None


def test_tracestate_passes_through_untouched_and_bounded() -> None:
    hs = [
        (b"traceparent", VALID),
        (b"tracestate", b"rojo=1,congo=t61rcWkgMzE"),
        (b"tracestate", b"x=y"),
    ]
    ctx = from_headers(hs, random.Random(1))
    assert ctx.tracestate == b"rojo=1,congo=t61rcWkgMzE,x=y"
    big = [(b"traceparent", VALID), (b"tracestate", b"a=" + b"x" * MAX_TRACESTATE_BYTES)]
    assert from_headers(big, random.Random(1)).tracestate is None
    out = replace_headers([(b"a", b"1"), *hs], ctx)
    assert [n for n, _ in out] == [b"a", b"traceparent", b"tracestate"]


def test_context_validates_its_ids() -> None:
    with pytest.raises(ValueError):
        TraceContext("0" * 32, SPAN, 1)
    with pytest.raises(ValueError):
        TraceContext(TRACE, SPAN.upper(), 1)


@given(st.integers(0, 2**64))
def test_started_traces_round_trip_through_the_parser(seed: int) -> None:
    ctx = start(random.Random(seed))
    parsed = parse_traceparent(ctx.traceparent())
    assert parsed == ParsedParent(0, ctx.trace_id, ctx.span_id, ctx.flags)


@given(st.binary(max_size=80))
def test_parser_never_raises_and_accepts_only_canonical_forms(value: bytes) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None and parsed.version == 0:
        assert (
            value.strip(b" \t")
            == f"00-{parsed.trace_id}-{parsed.parent_id}-{parsed.flags:02x}".encode()
        )
