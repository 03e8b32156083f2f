"""The HTTP/2 guard, driven by real h2 connections talking in memory."""

from __future__ import annotations

import itertools

import pytest
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st

from federation.h2guard import (
    ALLOW,
    CONNECTION_WINDOW,
    STREAM_WINDOW,
    Close,
    H2Guard,
    H2GuardLimits,
    RateLimit,
    RejectStream,
    Verdict,
    recommended_h2_config,
)

REQUEST = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "svc")]


class Pair:
    """A client and a server H2Connection, the server guarded, joined in memory."""

    def __init__(self, limits: H2GuardLimits | None = None) -> None:
        server_tuning = recommended_h2_config("server")
        self.client = recommended_h2_config("client").new_connection()
        self.server = server_tuning.new_connection()
        self.guard = H2Guard(limits or server_tuning.guard_limits, client_side=False)
        self.h2_events: list[object] = []
        assert self.deliver(0.0) == []
        self.back()

    def back(self) -> None:
        """Server -> client (settings ACKs, responses, PING ACKs)."""
        data = self.server.data_to_send()
        if data:
            self.client.receive_data(data)

    def deliver(self, now: float, data: bytes | None = None) -> list[Verdict]:
        """Client -> guard -> server, the way the gateway adapter does it."""
        if data is None:
            data = self.client.data_to_send()
        v = self.guard.observe_bytes(data, now)
        if v is not ALLOW:
            return [v]
        try:
            events = self.server.receive_data(data)
        except ProtocolError as e:
            return [self.guard.close_for_h2_error(e)]
        self.h2_events.extend(events)
        return self.guard.observe_events(events, now)

    def request(self, end_stream: bool = True, headers: list[tuple[str, str]] = REQUEST) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end_stream)
        return sid


def send_all(conn: H2Connection, sid: int, data: bytes, end_stream: bool = False) -> int:
    """send_data in frames h2 accepts; returns the number of DATA frames."""
    size = conn.max_outbound_frame_size
    chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    for i, chunk in enumerate(chunks):
        conn.send_data(sid, chunk, end_stream=end_stream and i == len(chunks) - 1)
    return len(chunks)


def closes(verdicts: list[Verdict]) -> list[Close]:
    return [v for v in verdicts if isinstance(v, Close)]


# -- configuration ---------------------------------------------------------------


def test_recommended_config_reaches_the_peer() -> None:
    pair = Pair()
    remote = pair.client.remote_settings
    assert remote[SettingCodes.INITIAL_WINDOW_SIZE] == STREAM_WINDOW
    assert remote[SettingCodes.MAX_CONCURRENT_STREAMS] == 256
    assert remote[SettingCodes.MAX_HEADER_LIST_SIZE] == 64 * 1024
    assert remote[SettingCodes.MAX_FRAME_SIZE] == 16384
    assert pair.server.remote_settings[SettingCodes.ENABLE_PUSH] == 0
    # The connection window is raised by WINDOW_UPDATE, not by SETTINGS.
    assert pair.client.outbound_flow_control_window == CONNECTION_WINDOW
    assert pair.server.outbound_flow_control_window == CONNECTION_WINDOW
    assert pair.server.decoder.max_header_list_size == 64 * 1024
    limits = recommended_h2_config("server").guard_limits
    assert limits.max_header_list_size == 32 * 1024
    assert limits.max_header_block_bytes == 64 * 1024


def test_a_stream_may_receive_4_mib_without_a_window_update() -> None:
    pair = Pair()
    sid = pair.request(end_stream=False)
    send_all(pair.client, sid, b"x" * (4 * 1024 * 1024 - 1024), end_stream=True)
    assert pair.deliver(1.0) == []
    assert pair.client.local_flow_control_window(sid) == 1024


# -- normal traffic --------------------------------------------------------------


def test_normal_traffic_is_allowed() -> None:
    pair = Pair()
    now = 0.0
    for i in range(100):
        now += 0.01
        sid = pair.request(end_stream=False)
        send_all(pair.client, sid, b"y" * 10_000, end_stream=True)
        if i % 25 == 0:
            pair.client.ping(b"pingpong")
        assert pair.deliver(now) == []
        pair.server.send_headers(sid, [(":status", "200")])
        pair.guard.note_data_sent(send_all(pair.server, sid, b"z" * 20_000, end_stream=True))
        pair.back()
        # The client returns credit like a real one: WINDOW_UPDATEs for what it read.
        pair.client.acknowledge_received_data(20_000, sid)
        assert pair.deliver(now) == []
    stats = pair.guard.statistics()
    assert stats.streams_opened == 100
    assert stats.closed is None
    assert pair.guard.closed is None


# -- rapid reset (CVE-2023-44487) ---------------------------------------------------


def test_rapid_reset_burst_closes_on_the_reset_rate_before_h2_sees_it() -> None:
    pair = Pair()
    for _ in range(1000):
        sid = pair.request()
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
    [close] = closes(pair.deliver(5.0))  # one write holding 1000 HEADERS + RST_STREAM
    assert close.reason == "rst_flood"
    assert close.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    # The scanner tripped first: h2 never decoded (or answered) any of those streams.
    assert pair.guard.statistics().streams_opened == 0
    assert not any(isinstance(e, RequestReceived) for e in pair.h2_events)


def test_rapid_reset_pair_by_pair_closes_on_the_premature_ratio() -> None:
    pair = Pair()
    verdicts: list[Verdict] = []
    for _ in range(1000):
        sid = pair.request()
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
        verdicts = pair.deliver(5.0)
        if verdicts:
            break
    [close] = closes(verdicts)
    assert close.reason == "rapid_reset"
    assert pair.guard.statistics().streams_opened == 100


def test_rapid_reset_below_the_rate_closes_on_the_premature_ratio() -> None:
    pair = Pair()
    now = 0.0
    verdicts: list[Verdict] = []
    for _ in range(1000):
        now += 0.01  # 100 resets/s: under the 200/s rate limit
        sid = pair.request()
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
        verdicts = pair.deliver(now)
        if verdicts:
            break
    [close] = closes(verdicts)
    assert close.reason == "rapid_reset"
    stats = pair.guard.statistics()
    assert stats.streams_opened == 100
    assert stats.premature_resets == 100


def test_occasional_cancels_are_allowed() -> None:
    pair = Pair()
    now = 0.0
    for i in range(300):
        now += 0.01
        sid = pair.request()
        if i % 3 == 0:
            pair.client.reset_stream(sid, ErrorCodes.CANCEL)
        assert pair.deliver(now) == []
        pair.back()
    assert pair.guard.statistics().premature_resets == 100
    assert pair.guard.closed is None


def test_resets_of_old_streams_are_not_premature() -> None:
    pair = Pair(H2GuardLimits(rapid_reset_min_streams=10))
    sids = [pair.request(end_stream=False) for _ in range(50)]
    assert pair.deliver(0.0) == []
    for sid in sids:
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
    assert pair.deliver(2.0) == []
    assert pair.guard.statistics().premature_resets == 0


# -- control frame floods --------------------------------------------------------------


def test_ping_flood_closes() -> None:
    pair = Pair()
    for i in range(1000):
        pair.client.ping(i.to_bytes(8, "big"))
    [close] = closes(pair.deliver(1.0))
    assert close.reason == "ping_flood"
    assert close.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_few_pings_a_second_are_allowed_for_a_long_time() -> None:
    pair = Pair()
    for i in range(200):
        pair.client.ping(i.to_bytes(8, "big"))
        assert pair.deliver(i * 0.2) == []
        pair.back()


def test_settings_flood_closes() -> None:
    pair = Pair()
    verdicts: list[Verdict] = []
    for i in range(100):
        pair.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 4096 + i})
        verdicts = pair.deliver(1.0)
        pair.back()
        if verdicts:
            break
    [close] = closes(verdicts)
    assert close.reason == "settings_flood"
    assert i == 19  # the initial SETTINGS counted as the first of 20


def test_window_update_flood_without_data_closes() -> None:
    pair = Pair()
    for _ in range(1000):
        pair.client.increment_flow_control_window(1)
    [close] = closes(pair.deliver(1.0))
    assert close.reason == "window_update_flood"


def test_window_updates_paid_for_by_data_we_sent_are_allowed() -> None:
    pair = Pair()
    pair.guard.note_data_sent(1000)
    for _ in range(1000):
        pair.client.increment_flow_control_window(1)
    assert pair.deliver(1.0) == []


def test_window_updates_on_a_reset_stream_are_counted_though_h2_emits_no_event() -> None:
    pair = Pair()
    sid = pair.request(end_stream=False)
    pair.client.reset_stream(sid)
    assert pair.deliver(0.0) == []
    before = len(pair.h2_events)
    frames = b""
    for _ in range(150):
        f = WindowUpdateFrame(sid)
        f.window_increment = 1
        frames += f.serialize()
    assert pair.deliver(1.0, frames) == []
    assert len(pair.h2_events) == before  # h2 swallowed all 150
    [close] = closes(pair.deliver(1.0, frames))
    assert close.reason == "window_update_flood"


def test_empty_data_flood_closes() -> None:
    pair = Pair()
    sid = pair.request(end_stream=False)
    for _ in range(100):
        pair.client.send_data(sid, b"")
    [close] = closes(pair.deliver(1.0))
    assert close.reason == "empty_data_flood"


def test_padding_only_data_frames_count_as_empty() -> None:
    pair = Pair()
    sid = pair.request(end_stream=False)
    assert pair.deliver(0.0) == []
    frames = b""
    for _ in range(51):
        f = DataFrame(sid, b"", flags=["PADDED"], pad_length=10)
        frames += f.serialize()
    [close] = closes(pair.deliver(1.0, frames))
    assert close.reason == "empty_data_flood"


def test_data_with_end_stream_and_no_payload_is_normal() -> None:
    pair = Pair()
    for _ in range(100):
        sid = pair.request(end_stream=False)
        pair.client.send_data(sid, b"", end_stream=True)
    assert pair.deliver(1.0) == []


# -- header blocks ------------------------------------------------------------------------


def raw_headers(
    stream_id: int, headers: list[tuple[str, str]], *, end_headers: bool = True
) -> bytes:
    """A HEADERS frame encoded with a fresh HPACK encoder (valid on a fresh connection)."""
    f = HeadersFrame(stream_id, Encoder().encode(headers))
    f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def test_continuation_flood_closes_after_eight_frames() -> None:
    pair = Pair()
    wire = raw_headers(1, REQUEST, end_headers=False)
    wire += b"".join(ContinuationFrame(1, b"").serialize() for _ in range(1000))
    [close] = closes(pair.deliver(1.0, wire))
    assert close.reason == "continuation_flood"
    assert close.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert pair.guard.statistics().frames == 1 + 9 + 2  # + client SETTINGS, WINDOW_UPDATE


def test_h2_alone_stops_a_continuation_flood_after_64_frames() -> None:
    # What h2 4.x does without the guard: a PROTOCOL_ERROR once 64 are buffered.
    server = recommended_h2_config("server").new_connection()
    client = recommended_h2_config("client").new_connection()
    server.receive_data(client.data_to_send())
    wire = raw_headers(1, REQUEST, end_headers=False)
    wire += b"".join(ContinuationFrame(1, b"").serialize() for _ in range(100))
    with pytest.raises(ProtocolError) as e:
        server.receive_data(wire)
    close = H2Guard().close_for_h2_error(e.value)
    assert close.reason == "h2_protocol_error"
    assert close.error_code == ErrorCodes.PROTOCOL_ERROR


def test_large_encoded_header_block_closes_before_its_body_arrives() -> None:
    pair = Pair()
    wire = raw_headers(1, REQUEST, end_headers=False)
    chunk = ContinuationFrame(1, b"\x00" * 16384).serialize()
    for _ in range(3):
        wire += chunk
    assert pair.deliver(1.0, wire) == []  # 3 x 16 KiB + HEADERS is under 64 KiB
    # Only the 9-byte header of the next CONTINUATION: already too much.
    [close] = closes(pair.deliver(1.0, chunk[:9]))
    assert close.reason == "header_block_too_large"


def test_too_many_header_fields_rejects_the_stream_only() -> None:
    pair = Pair()
    fat = REQUEST + [(f"x-h{i}", "v") for i in range(150)]
    sid = pair.request(headers=fat)
    [reject] = pair.deliver(1.0)
    assert reject == RejectStream(sid, "too_many_header_fields")
    assert reject.http_status == 431
    pair.request()
    assert pair.deliver(1.0) == []  # the connection is still usable


def test_header_list_over_the_soft_limit_rejects_the_stream() -> None:
    pair = Pair()
    sid = pair.request(headers=[*REQUEST, ("x-big", "v" * 40_000)])
    assert pair.deliver(1.0) == [RejectStream(sid, "header_list_too_large")]


def test_many_rejected_header_blocks_close_the_connection() -> None:
    pair = Pair()
    fat = REQUEST + [(f"x-h{i}", "v") for i in range(150)]
    verdicts: list[Verdict] = []
    for _ in range(30):
        pair.request(headers=fat)
        verdicts = pair.deliver(1.0)
        if closes(verdicts):
            break
    [close] = closes(verdicts)
    assert close.reason == "stream_error_flood"
    assert pair.guard.statistics().streams_rejected == 21


def test_hpack_bomb_is_stopped_by_h2s_header_list_limit() -> None:
    # Small on the wire (indexed references), 80 KiB decoded: the guard's encoded-size
    # check passes it and h2's decoder limit (the advertised 64 KiB) stops it.
    pair = Pair()
    bomb = REQUEST + [("x-bomb", "b" * 4000)] * 20
    wire = raw_headers(1, bomb)
    assert len(wire) < 5000
    [close] = closes(pair.deliver(1.0, wire))
    assert close.reason == "h2_header_list_too_large"
    assert close.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_h2_enforces_max_concurrent_streams() -> None:
    pair = Pair()
    enc = Encoder()
    wire = b""
    for i in range(257):
        f = HeadersFrame(1 + 2 * i, enc.encode(REQUEST))
        f.flags.add("END_HEADERS")
        wire += f.serialize()
    [close] = closes(pair.deliver(1.0, wire))
    assert close.reason == "h2_too_many_streams"


def test_stream_budget_ends_the_connection_gracefully() -> None:
    pair = Pair(H2GuardLimits(max_streams_per_connection=10))
    for _ in range(10):
        pair.request()
    assert pair.deliver(1.0) == []
    pair.request()
    [close] = closes(pair.deliver(1.0))
    assert close == Close("stream_budget_exhausted", ErrorCodes.NO_ERROR, close.detail)


# -- scanner properties ------------------------------------------------------------------------


def test_bad_preface_closes() -> None:
    guard = H2Guard()
    close = guard.observe_bytes(b"GET / HTTP/1.1\r\n", 0.0)
    assert isinstance(close, Close)
    assert close.reason == "bad_preface"


def test_close_is_sticky() -> None:
    pair = Pair()
    for i in range(200):
        pair.client.ping(i.to_bytes(8, "big"))
    [close] = closes(pair.deliver(1.0))
    assert pair.guard.observe_bytes(b"", 100.0) is close
    assert pair.guard.statistics().closed is close


def flood_bytes() -> bytes:
    client = recommended_h2_config("client").new_connection()
    for i in range(30):
        client.ping(i.to_bytes(8, "big"))
    return client.data_to_send()


FLOOD = flood_bytes()


@given(st.lists(st.integers(min_value=0, max_value=len(FLOOD)), max_size=20))
def test_verdict_does_not_depend_on_how_reads_are_split(cuts: list[int]) -> None:
    limits = H2GuardLimits(pings=RateLimit(20, 1.0))
    whole_guard = H2Guard(limits)
    whole = whole_guard.observe_bytes(FLOOD, 0.0)
    guard = H2Guard(limits)
    points = [0, *sorted(cuts), len(FLOOD)]
    verdict: object = ALLOW
    for a, b in itertools.pairwise(points):
        verdict = guard.observe_bytes(FLOOD[a:b], 0.0)
    assert isinstance(whole, Close)
    assert verdict == whole
    # Both stopped at the same frame: SETTINGS, WINDOW_UPDATE and the 21st PING.
    assert guard.statistics().frames == whole_guard.statistics().frames == 2 + 21


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        RateLimit(0, 1.0)
    with pytest.raises(ValueError):
        H2GuardLimits(rapid_reset_max_ratio=1.5)
