"""HTTP/1.1 framing: smuggling cases as raw bytes, each against h11 alone and through h1.py."""

from __future__ import annotations

import h11
import pytest

from sidecar.http.h1 import (
    NEED_DATA,
    PAUSED,
    BodyData,
    ConnectionClosed,
    H1ClientConnection,
    H1Limits,
    H1ServerConnection,
    MessageEnd,
    Refusal,
    RequestHead,
    ResponseHead,
    refusal_response,
)


def req(*fields: bytes, line: bytes = b"POST / HTTP/1.1", body: bytes = b"") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in (b"Host: a", *fields)) + b"\r\n" + body


def h11_verdict(raw: bytes) -> int | None:
    """What h11 alone does: None if it accepts the head, else its status hint."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        conn.next_event()
    except h11.RemoteProtocolError as exc:
        return exc.error_status_hint
    return None


def events(conn: H1ServerConnection) -> list[object]:
    out: list[object] = []
    while True:
        ev = conn.next_event()
        out.append(ev)
        if ev in (NEED_DATA, PAUSED) or isinstance(ev, ConnectionClosed):
            return out


def refused(raw: bytes, limits: H1Limits | None = None) -> Refusal:
    conn = H1ServerConnection(limits)
    conn.receive_data(raw)
    with pytest.raises(Refusal) as info:
        events(conn)
    with pytest.raises(Refusal):  # sticky
        conn.next_event()
    return info.value


# (name, raw request, what h11 alone does, our status, our reason)
SMUGGLING = [
    (
        "CL+TE",
        req(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        None,
        400,
        "cl_and_te",
    ),
    (
        "TE+CL",
        req(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"),
        None,
        400,
        "cl_and_te",
    ),
    (
        "CL,CL equal",
        req(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
        None,
        400,
        "duplicate_content_length",
    ),
    (
        "CL,CL differ",
        req(b"Content-Length: 5", b"Content-Length: 6", body=b"hello"),
        400,
        400,
        "duplicate_content_length",
    ),
    ("CL list", req(b"Content-Length: 5, 5", body=b"hello"), None, 400, "bad_content_length"),
    ("CL sign", req(b"Content-Length: +5", body=b"hello"), 400, 400, "bad_content_length"),
    (
        "TE chunked twice",
        req(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        501,
        400,
        "te_not_chunked",
    ),
    (
        "TE chunked, chunked",
        req(b"Transfer-Encoding: chunked, chunked"),
        501,
        400,
        "te_not_chunked",
    ),
    ("TE identity", req(b"Transfer-Encoding: identity"), 501, 400, "te_not_chunked"),
    ("TE xchunked", req(b"Transfer-Encoding: xchunked"), 501, 400, "te_not_chunked"),
    ("TE chunked, gzip", req(b"Transfer-Encoding: chunked, gzip"), 501, 400, "te_not_chunked"),
    ("TE gzip, chunked", req(b"Transfer-Encoding: gzip, chunked"), 501, 501, "te_unsupported"),
    (
        "TE on HTTP/1.0",
        req(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.0"),
        None,
        400,
        "te_in_http10",
    ),
    ("obs-fold", req(b"X-A: b", b" c"), None, 400, "obs_fold"),
    ("obs-fold TE", req(b"Transfer-Encoding:", b" chunked"), None, 400, "obs_fold"),
    ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n", None, 400, "bare_lf"),
    ("CTL in value", req(b"X-A: b\x01c"), None, 400, "bad_header_value"),
    ("DEL in value", req(b"X-A: b\x7fc"), None, 400, "bad_header_value"),
    ("space before colon", req(b"Transfer-Encoding : chunked"), 400, 400, "bad_header_name"),
    ("space in name", req(b"X A: b"), 400, 400, "bad_header_name"),
    ("NUL in value", req(b"X-A: b\x00c"), 400, 400, "bad_header_value"),
    ("head too large", req(b"X: " + b"a" * 20_000), None, 431, "head_too_large"),
    ("too many headers", req(*(b"X-%d: 1" % i for i in range(101))), None, 431, "too_many_headers"),
]


@pytest.mark.parametrize(
    ("raw", "h11_alone", "status", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in SMUGGLING],
)
def test_smuggling_inputs_are_refused_with_the_right_status(
    raw: bytes, h11_alone: int | None, status: int, reason: str
) -> None:
    assert h11_verdict(raw) == h11_alone  # documents what h11 does by itself
    refusal = refused(raw)
    assert (refusal.status, refusal.reason) == (status, reason)


def test_h11_refusals_come_through_with_its_status() -> None:
    assert (
        refused(req(line=b"GET / HTTP/1.1").replace(b"Host: a\r\n", b"")).status == 400
    )  # no Host
    assert refused(req(b"Host: b", line=b"GET / HTTP/1.1")).status == 400  # two Hosts
    bad_chunk = req(b"Transfer-Encoding: chunked", body=b"0x5\r\nhello\r\n0\r\n\r\n")
    conn = H1ServerConnection()
    conn.receive_data(bad_chunk)
    assert isinstance(conn.next_event(), RequestHead)
    with pytest.raises(Refusal) as info:
        conn.next_event()
    assert info.value.status == 400


def test_incomplete_oversized_head_is_431_before_the_blank_line() -> None:
    conn = H1ServerConnection(H1Limits(max_head_bytes=1024))
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 2000)
    with pytest.raises(Refusal) as info:
        conn.next_event()
    assert info.value.status == 431


def test_bad_paths_are_refused_by_the_framing_layer() -> None:
    assert refused(req(line=b"GET /a%2Fb HTTP/1.1")).reason == "path_escaped_slash"
    assert refused(req(line=b"CONNECT a:443 HTTP/1.1")).status == 405


def test_refusal_response_closes() -> None:
    raw = refusal_response(Refusal(431, "head_too_large"))
    assert raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close\r\n" in raw and b"x-meshfed-refused: head_too_large" in raw


def test_request_head_is_normalised_and_stripped_of_hop_by_hop_fields() -> None:
    conn = H1ServerConnection()
    conn.receive_data(
        req(
            b"Connection: keep-alive, X-Secret",
            b"X-Secret: 1",
            b"Keep-Alive: timeout=5",
            b"TE: trailers",
            b"Upgrade: h2c",
            b"Proxy-Authorization: x",
            b"Content-Length: 3",
            b"X-Keep: yes",
            line=b"POST //a/./b/../c?q=1 HTTP/1.1",
            body=b"abc",
        )
    )
    head = conn.next_event()
    assert isinstance(head, RequestHead)
    assert head.path.target == "/a/c?q=1" and head.method == "POST" and head.keep_alive
    assert head.headers == [(b"host", b"a"), (b"x-keep", b"yes")]
    assert head.framing.content_length == 3 and not head.framing.chunked
    assert events(conn) == [BodyData(b"abc"), MessageEnd([]), PAUSED]


def test_absolute_form_target_uses_its_authority() -> None:
    conn = H1ServerConnection()
    conn.receive_data(req(line=b"GET http://shop.prod:8080/x/../y?z HTTP/1.1"))
    head = conn.next_event()
    assert isinstance(head, RequestHead)
    assert (head.authority, head.path.target) == (b"shop.prod:8080", "/y?z")
    assert (b"host", b"shop.prod:8080") in head.headers


def test_body_streams_in_pieces_without_buffering() -> None:
    conn = H1ServerConnection()
    conn.receive_data(req(b"Transfer-Encoding: chunked"))
    head = conn.next_event()
    assert isinstance(head, RequestHead) and head.framing.chunked
    assert conn.next_event() is NEED_DATA
    received = 0
    for _ in range(100):  # 100 x 64 KiB chunks: each comes out as it goes in
        conn.receive_data(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        ev = conn.next_event()
        assert isinstance(ev, BodyData)
        received += len(ev.data)
        while (ev := conn.next_event()) is not NEED_DATA:
            assert isinstance(ev, BodyData)
            received += len(ev.data)
    conn.receive_data(b"0\r\nX-Trailer: t\r\nConnection: x\r\n\r\n")
    assert conn.next_event() == MessageEnd([(b"x-trailer", b"t")])
    assert received == 100 * 0x10000


def test_pipelined_requests_are_each_checked() -> None:
    conn = H1ServerConnection()
    good = req(line=b"GET /one HTTP/1.1")
    smuggled = req(b"Content-Length: 0", b"Transfer-Encoding: chunked", line=b"POST /two HTTP/1.1")
    conn.receive_data(good + smuggled)
    head = conn.next_event()
    assert isinstance(head, RequestHead) and head.path.path == "/one"
    assert events(conn) == [MessageEnd([]), PAUSED]
    conn.send_response(200, [(b"x", b"1")], content_length=0)
    conn.send_end()
    assert conn.reusable
    conn.start_next_cycle()
    with pytest.raises(Refusal) as info:
        conn.next_event()
    assert info.value.reason == "cl_and_te"


def test_response_is_reframed_by_h11() -> None:
    conn = H1ServerConnection()
    conn.receive_data(req(line=b"GET / HTTP/1.1"))
    events(conn)
    out = conn.send_response(
        200, [(b"transfer-encoding", b"gzip"), (b"connection", b"close"), (b"x-a", b"1")]
    )
    out += conn.send_data(b"hi") + conn.send_end()
    assert out.lower() == (
        b"http/1.1 200 ok\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )


def test_clean_close_between_requests() -> None:
    conn = H1ServerConnection()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    truncated = H1ServerConnection()
    truncated.receive_data(b"GET / HTTP/1.1\r\nHo")
    truncated.receive_data(b"")
    with pytest.raises(Refusal):
        truncated.next_event()


# -- the client side (responses from an upstream) ------------------------------------------


def client_after_get() -> H1ClientConnection:
    conn = H1ClientConnection()
    out = conn.send_request("GET", "/x", [(b"host", b"shop"), (b"connection", b"close")])
    assert out == b"GET /x HTTP/1.1\r\nhost: shop\r\ncontent-length: 0\r\n\r\n"
    conn.send_end()
    return conn


def test_upstream_response_streams_and_connection_is_reusable() -> None:
    conn = client_after_get()
    conn.receive_data(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nKeep-Alive: 5\r\n\r\nab"
    )
    info = conn.next_event()
    assert isinstance(info, ResponseHead) and info.status == 100
    head = conn.next_event()
    assert isinstance(head, ResponseHead) and head.status == 200 and head.headers == []
    assert head.framing.content_length == 4
    assert conn.next_event() == BodyData(b"ab")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"cd")
    assert [conn.next_event(), conn.next_event()] == [BodyData(b"cd"), MessageEnd([])]
    assert conn.reusable


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "upstream_cl_and_te",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            "upstream_duplicate_content_length",
        ),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "upstream_obs_fold"),
    ],
)
def test_bad_upstream_responses_become_502(raw: bytes, reason: str) -> None:
    conn = client_after_get()
    conn.receive_data(raw)
    with pytest.raises(Refusal) as info:
        conn.next_event()
    assert (info.value.status, info.value.reason) == (502, reason)


def test_extra_bytes_after_a_response_make_the_connection_unreusable() -> None:
    conn = client_after_get()
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert isinstance(conn.next_event(), ResponseHead)
    assert conn.next_event() == MessageEnd([])
    assert not conn.reusable
