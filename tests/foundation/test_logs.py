"""JSON log lines: one object per line, static and per-event fields, odd values survive."""

from __future__ import annotations

import io
import json
import logging

import pytest

from federation import logs


def test_each_record_is_one_json_object_with_static_and_event_fields() -> None:
    out = io.StringIO()
    logs.configure("info", out, component="agent", cluster="aws-use1")
    log = logging.getLogger("meshfed.test")
    log.info('refused "x"\nnext', extra={"fields": {"reason": "untrusted_domain", "code": 403}})
    log.debug("not shown at info")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["component"] == "agent" and obj["cluster"] == "aws-use1"
    assert obj["msg"] == 'refused "x"\nnext'
    assert obj["reason"] == "untrusted_domain" and obj["code"] == 403
    assert obj["level"] == "info"


def test_exceptions_and_unserialisable_values_are_kept() -> None:
    out = io.StringIO()
    logs.configure("debug", out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("t").exception("failed", extra={"fields": {"obj": object()}})
    obj = json.loads(out.getvalue())
    assert "RuntimeError: boom" in obj["error"]
    assert obj["obj"].startswith("<object object")


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        logs.configure("loud")


def test_plain_extra_attributes_are_fields_too() -> None:
    out = io.StringIO()
    logs.configure("info", out, component="gateway")
    logging.getLogger("g").info("refused", extra={"event": "refused", "reason": "not_exported"})
    obj = json.loads(out.getvalue())
    assert (obj["event"], obj["reason"], obj["component"]) == ("refused", "not_exported", "gateway")
    assert "args" not in obj and "levelno" not in obj  # record internals stay out
