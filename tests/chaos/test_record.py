"""Records: JSONL round trip, strict reading, columnar view."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chaos.record import FaultRecord, Recorder, RequestLog, RequestRecord, read_records

times = st.floats(0, 1e5, allow_nan=False)
text = st.text(max_size=12)
records = st.builds(
    RequestRecord,
    times,
    times,
    text,
    text,
    st.sampled_from(["ok", "error"]),
    text,
    times,
    text,
    text,
    text,
)


@given(st.lists(records, max_size=30))
def test_log_keeps_every_record(items):
    log = RequestLog(items)
    assert len(log) == len(items)
    assert list(log) == items
    assert [log.t_start[i] for i in log.by_start()] == sorted(r.t_start for r in items)


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "run.jsonl"
    req = RequestRecord(
        0.5, 0.6, "aws-use1/frontend", "whoami.demo", "error", "timeout", 0.1, "", "", ""
    )
    fault = FaultRecord(1.0, "latency", "link:a->b", {"delay": 0.2}, True, "status generation 2")
    with Recorder(path) as rec:
        rec.request(req)
        rec.fault(fault)
    assert len(rec.requests) == 1 and rec.faults == [fault]
    log, faults = read_records(path)
    assert list(log) == [req]
    assert faults == (fault,)


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[]",
        '{"kind": "other"}',
        '{"kind": "fault", "t": "1"}',
        '{"kind": "fault", "t": 1, "fault": "kill", "target": "etcd", "params": {},'
        ' "verified": 1, "detail": ""}',
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path, line):
    path = tmp_path / "run.jsonl"
    path.write_text("\n" + line + "\n")
    with pytest.raises(ValueError, match=r"run.jsonl:2: "):
        read_records(path)
