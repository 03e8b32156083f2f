"""The catalog stream: messages survive any framing; bad streams fail typed and bounded."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import keys
from federation.catalog import CatalogBuilder, CatalogView
from federation.model import Record
from federation.store.api import Put
from federation.stream_codec import (
    Delta,
    Heartbeat,
    LineTooLong,
    MalformedMessage,
    Snapshot,
    StreamDecoder,
    StreamError,
    Synced,
    TruncatedStream,
    encode,
)
from tests.catalog import strategies as s


def _builder_with_history() -> tuple[CatalogBuilder, list[Snapshot | Delta]]:
    builder = CatalogBuilder(s.LOCAL, "inc-1")
    out: list[Snapshot | Delta] = [Snapshot(0, builder.snapshot())]
    records: list[Record] = [
        s.cluster("c2"),
        s.export("c2", "a", to=("c1",)),
        s.endpoint("c2", "a"),
        s.gateway("c2"),
        s.endpoint("c1", "b"),
        s.policy(),
    ]
    for rev, record in enumerate(records, start=1):
        version = builder.version
        builder.apply(Put(s.kv(record.key(), record.to_json(), rev)), float(rev))
        delta = builder.changes_since(version)
        assert delta is not None
        out.append(delta)
    doc = b'{"keys":[{"kty":"EC"}],"spiffe_sequence":2}'
    builder.apply(Put(s.kv(keys.bundle("c2.acme.mesh"), doc, 99)), 99.0)
    out.append(Snapshot(builder.version, builder.snapshot()))
    return builder, out


BUILDER, CATALOG_MESSAGES = _builder_with_history()
MESSAGES = [
    *CATALOG_MESSAGES[:2],
    Synced(1),
    *CATALOG_MESSAGES[2:],
    Heartbeat(BUILDER.version, agent_degraded=False),
    Heartbeat(BUILDER.version, agent_degraded=True),
]
STREAM = b"".join(encode(m) for m in MESSAGES)


def test_every_message_round_trips() -> None:
    decoded = StreamDecoder().feed(STREAM)
    assert decoded == MESSAGES
    last = decoded[-3]
    assert isinstance(last, Snapshot) and last.catalog.bundles == BUILDER.snapshot().bundles


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=30))
def test_any_split_of_the_stream_decodes_to_the_same_messages(cuts) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    decoder = StreamDecoder()
    got = []
    for a, b in itertools.pairwise(bounds):
        got.extend(decoder.feed(STREAM[a:b]))
    decoder.close()
    assert got == MESSAGES
    assert decoder.buffered == 0


def test_a_view_fed_from_the_stream_equals_the_builder() -> None:
    view = CatalogView()
    for message in StreamDecoder().feed(STREAM):
        if isinstance(message, Snapshot):
            view.apply_snapshot(message.catalog)
        elif isinstance(message, Delta):
            view.apply_delta(message)
    assert view.catalog == BUILDER.snapshot()


def test_an_over_long_line_is_refused_with_bounded_memory() -> None:
    decoder = StreamDecoder(max_line=64)
    with pytest.raises(LineTooLong):
        for _ in range(1000):
            decoder.feed(b"x" * 16)
    assert decoder.buffered == 0
    with pytest.raises(LineTooLong):
        decoder.feed(encode(Synced(1)))  # stays failed: the stream is not trustworthy


def test_a_long_complete_line_in_one_chunk_is_refused() -> None:
    with pytest.raises(LineTooLong):
        StreamDecoder(max_line=10).feed(encode(Heartbeat(1, agent_degraded=False)))


def test_messages_before_a_bad_line_are_handed_over_with_the_error() -> None:
    decoder = StreamDecoder()
    with pytest.raises(MalformedMessage) as info:
        decoder.feed(encode(Synced(3)) + b'{"type":"synced","version":"3"}\n')
    assert info.value.messages == [Synced(3)]
    assert "Synced.version" in info.value.reason


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b"not json", "message"),
        (b"[]", "message"),
        (b'{"type": 3}', "message.type"),
        (b'{"type":"heartbeat","version":1}', "Heartbeat.agent_degraded"),
        (b'{"type":"snapshot","version":1,"catalog":{}}', "Catalog.schema"),
        (
            b'{"type":"delta","epoch":"e","from_version":2,"to_version":1,"changes":[],'
            b'"last_seen":{}}',
            "Delta.to_version",
        ),
        (
            b'{"type":"delta","epoch":"e","from_version":1,"to_version":2,'
            b'"changes":[{"key":"/meshfed/v1/clusters/x","value":{"schema":1}}],"last_seen":{}}',
            "Delta.changes[0] ClusterRecord",
        ),
        (
            b'{"type":"delta","epoch":"e","from_version":1,"to_version":2,'
            b'"changes":[{"key":"/etc/passwd","deleted":true}],"last_seen":{}}',
            "Delta.changes[0]",
        ),
    ],
)
def test_malformed_messages_are_refused_naming_the_field(line, field) -> None:
    with pytest.raises(MalformedMessage, match="^" + re.escape(field)):
        StreamDecoder().feed(line + b"\n")


def test_deleting_an_unparsable_key_is_refused() -> None:
    # A delta may only touch keys that are valid v1 keys, deletes included.
    line = (
        b'{"type":"delta","epoch":"e","from_version":1,"to_version":2,'
        b'"changes":[{"key":"/meshfed/v1/nope/x","deleted":true}],"last_seen":{}}\n'
    )
    with pytest.raises(MalformedMessage, match="nope"):
        StreamDecoder().feed(line)


def test_unknown_message_types_and_blank_lines_are_skipped() -> None:
    decoder = StreamDecoder()
    got = decoder.feed(b'\n{"type":"from-the-future","x":1}\n' + encode(Synced(2)))
    assert got == [Synced(2)] and decoder.skipped == 1


def test_a_stream_that_ends_mid_line_is_truncated() -> None:
    decoder = StreamDecoder()
    decoder.feed(encode(Synced(1))[:-3])
    with pytest.raises(TruncatedStream):
        decoder.close()
    assert issubclass(TruncatedStream, StreamError)
