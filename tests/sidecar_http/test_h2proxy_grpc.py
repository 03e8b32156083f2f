"""HTTP/2 stream mapping, flow-control forwarding, and gRPC status handling."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.config.model import Retries
from sidecar.http.grpc import (
    GrpcStatus,
    grpc_status,
    http_equivalent,
    is_grpc,
    retry_idempotent,
    retry_outcome,
)
from sidecar.http.h1 import H1ServerConnection, RequestHead
from sidecar.http.h2proxy import (
    HeaderError,
    SendData,
    SendTrailers,
    StreamForwarder,
    downstream_response_headers,
    forward_trailers,
    h1_response_from_h2,
    h2_request_from_h1,
    request_pseudo,
    upstream_request_headers,
)
from sidecar.http.paths import normalize_path
from sidecar.http.routes import retry_policy
from sidecar.http.tracing import start
from sidecar.retry import Outcome

GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/pkg.Svc/../pkg.Svc/Get"),
    (b":authority", b"shop.prod"),
    (b"content-type", b"application/grpc+proto"),
    (b"te", b"trailers"),
    (b"connection", b"x-drop"),
    (b"x-drop", b"1"),
    (b"traceparent", b"garbage"),
]


def test_upstream_request_keeps_te_trailers_and_normalised_path() -> None:
    pseudo = request_pseudo(GRPC_REQUEST)
    path = normalize_path(pseudo.path)
    trace = start(random.Random(1))
    out = upstream_request_headers(GRPC_REQUEST, path, trace)
    assert out[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"shop.prod"),
        (b":path", b"/pkg.Svc/Get"),
    ]
    assert out[4:] == [
        (b"content-type", b"application/grpc+proto"),
        (b"te", b"trailers"),
        (b"traceparent", trace.traceparent()),
    ]


def test_missing_pseudo_headers_are_refused() -> None:
    with pytest.raises(HeaderError):
        request_pseudo([(b":method", b"GET")])
    with pytest.raises(HeaderError):
        downstream_response_headers([(b"content-type", b"x")])


def test_response_and_trailer_hygiene() -> None:
    resp = downstream_response_headers(
        [(b"x-a", b"1"), (b":status", b"200"), (b"keep-alive", b"1")]
    )
    assert resp == [(b":status", b"200"), (b"x-a", b"1")]
    assert forward_trailers([(b"grpc-status", b"0"), (b":status", b"200"), (b"te", b"x")]) == [
        (b"grpc-status", b"0")
    ]
    assert h1_response_from_h2([(b":status", b"404"), (b"x", b"y")]) == (404, [(b"x", b"y")])


def test_h1_request_translates_to_h2() -> None:
    conn = H1ServerConnection()
    conn.receive_data(b"GET /a/../b?q HTTP/1.1\r\nHost: shop\r\nX-A: 1\r\n\r\n")
    head = conn.next_event()
    assert isinstance(head, RequestHead)
    trace = start(random.Random(2))
    assert h2_request_from_h1(head, trace) == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"shop"),
        (b":path", b"/b?q"),
        (b"x-a", b"1"),
        (b"traceparent", trace.traceparent()),
    ]


# -- flow control --------------------------------------------------------------------------


def test_app_data_is_acknowledged_only_as_upstream_accepts_it() -> None:
    fwd = StreamForwarder()
    assert fwd.push(b"a" * 10, flow_controlled_length=14) == 0  # 4 bytes padding
    assert fwd.next(window=0, max_frame_size=16384) is None  # upstream window closed
    first = fwd.next(window=6, max_frame_size=16384)
    assert isinstance(first, SendData) and bytes(first.data) == b"a" * 6 and first.ack == 6
    fwd.push_end()
    second = fwd.next(window=100, max_frame_size=16384)
    assert isinstance(second, SendData) and second.ack == 4 + 4 and second.end_stream
    assert fwd.done and fwd.next(100, 100) is None


def test_trailers_follow_the_data() -> None:
    fwd = StreamForwarder()
    fwd.push(b"xyz", 3)
    fwd.push_end([(b"grpc-status", b"14"), (b"connection", b"close")])
    data = fwd.next(100, 100)
    assert isinstance(data, SendData) and not data.end_stream
    assert fwd.next(100, 100) == SendTrailers([(b"grpc-status", b"14")])


def test_empty_padded_frame_is_acknowledged_at_once() -> None:
    assert StreamForwarder().push(b"", 9) == 9


@given(
    st.lists(st.tuples(st.binary(min_size=0, max_size=50), st.integers(0, 10)), max_size=20),
    st.lists(st.integers(0, 40), min_size=1, max_size=50),
)
def test_forwarding_preserves_bytes_and_acknowledges_exactly_once(
    frames: list[tuple[bytes, int]], windows: list[int]
) -> None:
    fwd = StreamForwarder()
    acked = sum(fwd.push(data, len(data) + pad) for data, pad in frames)
    fwd.push_end()
    sent = bytearray()
    ended = False
    steps = 0
    while not ended:
        window = windows[steps % len(windows)] or 1  # progress eventually
        action = fwd.next(window, max_frame_size=16)
        steps += 1
        assert isinstance(action, SendData)
        assert len(action.data) <= min(window, 16)
        sent += action.data
        acked += action.ack
        ended = action.end_stream
        assert fwd.buffered == sum(len(d) for d, _ in frames) - len(sent)
    assert bytes(sent) == b"".join(d for d, _ in frames)
    assert acked == sum(len(d) + p for d, p in frames)


# -- gRPC ----------------------------------------------------------------------------------


def test_grpc_detection() -> None:
    assert is_grpc([(b"content-type", b"application/grpc")])
    assert is_grpc([(b"content-type", b"application/grpc+proto")])
    assert not is_grpc([(b"content-type", b"application/grpc-web")])
    assert not is_grpc([(b"content-type", b"application/json")])


OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


@pytest.mark.parametrize(
    ("headers", "trailers", "expected"),
    [
        (OK_HEADERS, [(b"grpc-status", b"0")], GrpcStatus.OK),
        (OK_HEADERS, [(b"grpc-status", b"14"), (b"grpc-message", b"x")], GrpcStatus.UNAVAILABLE),
        ([*OK_HEADERS, (b"grpc-status", b"5")], None, GrpcStatus.NOT_FOUND),  # trailers-only
        (OK_HEADERS, [], GrpcStatus.UNKNOWN),  # no status at all
        (OK_HEADERS, [(b"grpc-status", b"x1")], GrpcStatus.UNKNOWN),  # malformed
        ([(b":status", b"503")], None, GrpcStatus.UNAVAILABLE),  # HTTP error mapping
        ([(b":status", b"401")], None, GrpcStatus.UNAUTHENTICATED),
        ([(b":status", b"500")], None, GrpcStatus.UNKNOWN),
    ],
)
def test_grpc_status_extraction(
    headers: list[tuple[bytes, bytes]], trailers: list[tuple[bytes, bytes]] | None, expected: int
) -> None:
    assert grpc_status(headers, trailers) == expected


def test_unavailable_is_retried_through_the_shared_retry_policy() -> None:
    policy = retry_policy(Retries(retry_on=("gateway-error",)))
    idempotent = retry_idempotent("POST", grpc=True)
    assert policy.should_retry(1, retry_outcome(GrpcStatus.UNAVAILABLE), idempotent).retry
    assert retry_outcome(GrpcStatus.INTERNAL) is Outcome.SUCCESS
    assert not retry_idempotent("POST", grpc=False) and retry_idempotent("PUT", grpc=False)
    assert http_equivalent(GrpcStatus.UNAVAILABLE) == 503 and http_equivalent(99) == 500
